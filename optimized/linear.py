"""`linear(x, W)` = x Wᵀ, with the single-row (decode) case on CPU routed to NumPy's BLAS.

Why: a decode step multiplies one activation row by every weight matrix, so it streams each weight once and is
memory bound.  On the AMD EPYC machine of docs/benchmarks.md (one thread), the MKL path torch's CPU build takes for
`F.linear` with one row streamed 29–34 MB weights ~30 % slower than NumPy's OpenBLAS `W @ x` (gemv over the
row-major weight): e.g. 1.46 ms vs 0.98 ms for a [7168, 1024] fp32 weight.  The product is the same (fp32
accumulation in both; only the summation order differs, as between any two BLAS).  Everything with more than one
row (prefill, batched decode) stays on torch's sgemm, the faster one for real matrix products here.

QWEN35_CPU_GEMV=torch turns the routing off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["linear"]


def _numpy_gemv(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dim() == 2 and x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype == torch.float32 and w.is_contiguous() and not w.requires_grad and not x.requires_grad
            and os.environ.get("QWEN35_CPU_GEMV", "numpy") != "torch")


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w [out, in]ᵀ -> [..., out]  (no bias)."""
    if _numpy_gemv(x, w):
        return torch.from_numpy(w.numpy() @ x.detach().contiguous().numpy()[0])[None]  # [1, out]
    return F.linear(x, w)
