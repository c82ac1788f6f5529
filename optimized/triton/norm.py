"""Triton kernel for the gated RMSNorm of the Gated DeltaNet output (HF `Qwen3_5RMSNormGated`).

    y = w · [x / sqrt(mean(x²) + eps)] · silu(z)        per row of D = D_v elements (one value head)

Plain weight w (not 1 + w), normalise before the gate (pitfall B4).  Numerics follow HF: x in fp32, the
normalised row rounded to the input dtype (a no-op for fp32), times w and silu(z) in fp32, one cast at the end.

Version log
-------------
v1 (this file)
  * `_gated_rms_norm_kernel` grid (⌈rows/BR⌉): a [BR rows, BD = next_pow2(D)] tile per program, fp32 statistics,
    one read of x and z and one write of y.  Assumes D ≤ 8192 (a whole row in registers); BR = 16 on a GPU
    (D = 128: 2048 elements per program), bigger tiles under the interpreter.  No autotune.

Cost model (R rows of D, e = element size): FLOPs ≈ 8·R·D (square-sum, scale, weight, sigmoid, two products);
bytes = 3·R·D·e (x, z read, y written) + D·e (weight).  Purely bandwidth-bound.
"""
from __future__ import annotations

import triton
import triton.language as tl

from optimized.triton._common import alloc, block, check_device, pow2

__all__ = ["gated_rms_norm"]


@triton.jit
def _gated_rms_norm_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr,  # x, z, y [R, D]; w [D]
    R, D, eps,
    BR: tl.constexpr, BD: tl.constexpr,
):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.arange(0, BD)
    rmask = rows < R
    cmask = cols < D
    m = rmask[:, None] & cmask[None, :]
    off = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # [BR]
    n = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # HF: n.to(input_dtype) before × w
    y = w[None, :] * n * (z * tl.sigmoid(z))
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


def gated_rms_norm(x, z, weight, eps=1e-6):
    """y = w · x / rms(x) · silu(z) over the last axis.

    Args:
        x:      [..., D]
        z:      [..., D] (same shape as x)
        weight: [D]
        eps:    added to mean(x²)
    Returns:
        y: [..., D] in x's dtype
    """
    who = "gated_rms_norm"
    if tuple(z.shape) != tuple(x.shape):
        raise ValueError(f"{who}: z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    if x.dim() < 1:
        raise ValueError(f"{who}: x must be [..., D], got a scalar")
    D = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != D:
        raise ValueError(f"{who}: weight must be [D={D}], got {tuple(weight.shape)}")
    if D > 8192:
        raise ValueError(f"{who}: the Triton kernel keeps a whole row in registers: D <= 8192, got {D}")
    dev = check_device(who, x, z, weight)
    y = alloc(tuple(x.shape), x.dtype, dev)
    R = x.numel() // max(D, 1)
    if R == 0 or D == 0:
        return y
    BD = pow2(D, 16)
    if dev.type == "cuda":
        BR = max(1, min(16, 4096 // BD))
    else:
        BR = max(1, min(pow2(R), 16384 // BD))
    BR = block("norm_br", BR)
    _gated_rms_norm_kernel[(triton.cdiv(R, BR),)](
        x.contiguous(), z.contiguous(), weight.contiguous(), y, R, D, float(eps), BR=BR, BD=BD, num_warps=4,
    )
    return y


if __name__ == "__main__":  # validate against the float64 oracle, then time (docs/triton_kernels.md)
    from optimized.triton._selfcheck import main

    main("norm")
