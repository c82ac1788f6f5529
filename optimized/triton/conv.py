"""Triton kernels for the causal depthwise conv1d (+ SiLU) of a Gated DeltaNet layer (docs/causal_conv.md).

    y_t[c] = act( Σ_{i=0}^{K-1} w[c, i] · x_{t-(K-1)+i}[c] ),   x_τ for τ before the sequence start from the state

The conv state holds the last K-1 *pre-activation* inputs per channel, oldest first ([N, C, K-1], fla/vLLM/MAX
convention; pitfall B14).

Version log
-------------
v1 (this file)
  * `_causal_conv1d_fwd_kernel`  grid (N, ⌈max_len/BT⌉, ⌈C/BC⌉): a [BT tokens, BC channels] tile per program
    (GPU: 16 × 128, 4 warps: ptxas for sm_90 reports 241 registers and no spills; 64 × 128 spilled 6 KB), the K
    taps unrolled (K constexpr); taps that reach before the sequence start read the sequence's own state row (or
    zeros), so packed sequences never see each other (pitfall B13).  Programs past a short sequence's end are
    fully masked.
  * `_causal_conv1d_state_kernel` grid (N, ⌈C/BC⌉): the new state = the last K-1 entries of [state | x], which
    for a sequence shorter than K-1 still contains older state columns shifted left (pitfall B14).
  * `_causal_conv1d_update_kernel` grid (B, ⌈C/BC⌉): one decode token per row, state read and shifted *in place*
    at conv_pool[slot_ids[b]]; slot −1 = padding (zeros out, nothing touched).  Each channel's K-1 state entries
    are read and written by one thread (1-D [BC] columns, BC ≥ threads), so the in-place shift has no race.
  Assumes: K ≤ 8 (taps unrolled), fp32 accumulation, outputs in x's dtype, new state in the state's dtype (x's
  when no state is given).  Fixed block sizes (no autotune).

Cost model (T tokens, C channels, K taps, e = element size)
  FLOPs: 2·K·C·T (+ ≈4·C·T for SiLU).  Bytes: x read T·C·e (the K-fold reuse stays in L1/L2), y written T·C·e,
  weight C·K·e, state 2·N·C·(K-1)·e.  Decode step: 2·K·C FLOPs per row; bytes ≈ C·e (x) + C·e (y) + 2·C·(K-1)·e
  (state read + write) + C·K·e (weight, shared by the batch).
"""
from __future__ import annotations

from itertools import pairwise

import torch
import triton
import triton.language as tl

from optimized._checks import conv_shapes, conv_update_shapes, conv_weight, silu_flag
from optimized.slots import check_slot_ids, check_slot_range
from optimized.triton._common import alloc, block, check_device, pow2

__all__ = ["causal_conv1d", "causal_conv1d_update"]


@triton.jit
def _causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, state_ptr, cu_ptr, y_ptr,  # x, y [T_total, C]; w [C, K]; state [N, C, K-1]; cu [N+1]
    C,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_t = tl.program_id(1)
    i_c = tl.program_id(2)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    t = bos + i_t * BT + tl.arange(0, BT)  # [BT] token index
    tmask = t < eos
    c = i_c * BC + tl.arange(0, BC)  # [BC] channel
    cmask = c < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(K):  # tap i meets the input K-1-i steps back
        rel = t - bos - (K - 1) + i  # [BT] position inside the sequence (negative: from the state)
        in_x = rel >= 0
        xv = tl.load(x_ptr + (bos + rel)[:, None] * C + c[None, :],
                     mask=(tmask & in_x)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:  # state column K-1+rel holds position rel ∈ [-(K-1), -1], oldest first
            sv = tl.load(state_ptr + (i_n * C + c[None, :]) * (K - 1) + (K - 1 + rel)[:, None],
                         mask=(tmask & (rel < 0))[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            xv += sv
        w_i = tl.load(w_ptr + c * K + i, mask=cmask, other=0.0).to(tl.float32)  # [BC]
        acc += xv * w_i[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + t[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _causal_conv1d_state_kernel(
    x_ptr, state_ptr, cu_ptr, new_state_ptr,  # x [T_total, C]; state, new_state [N, C, K-1]
    C,
    K: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr, HAS_STATE: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    c = i_c * BC + tl.arange(0, BC)
    cmask = c < C
    j = tl.arange(0, BJ)  # new state column, oldest first
    jmask = j < K - 1
    rel = (eos - bos) - (K - 1) + j  # [BJ] position inside the sequence of the input that lands in column j
    in_x = rel >= 0
    m = cmask[:, None] & jmask[None, :]
    val = tl.load(x_ptr + (bos + rel)[None, :] * C + c[:, None], mask=m & in_x[None, :], other=0.0)
    if HAS_STATE:  # sequence shorter than K-1: older state columns shift left (pitfall B14)
        sv = tl.load(state_ptr + (i_n * C + c[:, None]) * (K - 1) + (K - 1 + rel)[None, :],
                     mask=m & (rel < 0)[None, :], other=0.0)
        val = tl.where(in_x[None, :], val.to(new_state_ptr.dtype.element_ty), sv.to(new_state_ptr.dtype.element_ty))
    tl.store(new_state_ptr + (i_n * C + c[:, None]) * (K - 1) + j[None, :],
             val.to(new_state_ptr.dtype.element_ty), mask=m)


@triton.jit
def _causal_conv1d_update_kernel(
    x_ptr, w_ptr, pool_ptr, slot_ptr, y_ptr,  # x, y [B, C]; w [C, K]; pool [S, C, K-1]; slot [B]
    C,
    K: tl.constexpr, BC: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    slot = tl.load(slot_ptr + i_b).to(tl.int64)
    c = i_c * BC + tl.arange(0, BC)
    cmask = c < C
    valid = (c * 0 + slot) >= 0  # [BC]; padding row: no pool access (pitfall B9)
    slot = tl.maximum(slot, 0)
    smask = cmask & valid
    base = pool_ptr + (slot * C + c) * (K - 1)  # [BC] pointers to column 0 of each channel's state
    xv = tl.load(x_ptr + i_b * C + c, mask=cmask, other=0.0)
    acc = xv.to(tl.float32) * tl.load(w_ptr + c * K + (K - 1), mask=cmask, other=0.0).to(tl.float32)
    if K > 1:
        cur = tl.load(base, mask=smask, other=0.0)  # column 0 (oldest)
        for j in tl.static_range(K - 1):
            acc += cur.to(tl.float32) * tl.load(w_ptr + c * K + j, mask=cmask, other=0.0).to(tl.float32)
            if j + 1 < K - 1:
                nxt = tl.load(base + (j + 1), mask=smask, other=0.0)  # read column j+1 before it is overwritten
            else:
                nxt = xv.to(pool_ptr.dtype.element_ty)  # the newest input enters the last column
            tl.store(base + j, nxt.to(pool_ptr.dtype.element_ty), mask=smask)  # shift left by one
            cur = nxt
    y = acc * tl.sigmoid(acc)
    y = tl.where(valid, y, 0.0)
    tl.store(y_ptr + i_b * C + c, y.to(y_ptr.dtype.element_ty), mask=cmask)


def _conv_weight(who, weight):
    """The shared [C, K] weight check (optimized._checks), plus this kernel's tap limit; contiguous."""
    weight = conv_weight(who, weight)
    if weight.shape[1] > 8:
        raise ValueError(f"{who}: the Triton kernel unrolls the taps: K <= 8, got K={weight.shape[1]}")
    return weight.contiguous()


def causal_conv1d(x, weight, *, conv_state=None, cu_seqlens=None, activation="silu"):
    """Causal depthwise conv1d with a carried state (prefill, varlen).

    Args:
        x:          [T_total, C] (packed; one sequence unless cu_seqlens) or [B, T, C] (B sequences)
        weight:     [C, K] or [C, 1, K]
        conv_state: [N, C, K-1] or None (zeros: fresh sequences); not modified
        cu_seqlens: [N+1] int (2-D x, or 3-D x with B = 1)
        activation: "silu"/"swish" or None/"identity"
    Returns:
        y:              shape of x, x's dtype
        new_conv_state: [N, C, K-1] (the last K-1 pre-activation inputs, oldest first), conv_state's dtype or x's
    """
    who = "causal_conv1d"
    w = _conv_weight(who, weight)
    silu = silu_flag(who, activation)
    B, T, cu, N = conv_shapes(who, x, w, conv_state, cu_seqlens)
    C, K = w.shape
    total = B * T
    dev = check_device(who, x, w, conv_state)
    x2 = x.contiguous().view(total, C)
    state = conv_state.contiguous() if conv_state is not None else None
    y = alloc(tuple(x.shape), x.dtype, dev)
    new_state = alloc((N, C, K - 1), conv_state.dtype if conv_state is not None else x.dtype, dev)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
    max_len = max(b - a for a, b in pairwise(cu))
    on_gpu = dev.type == "cuda"
    BC = block("conv_bc", min(pow2(C, 16), 128 if on_gpu else 512))
    if max_len > 0:
        # GPU: 16×128 tiles compile without spills (sm_90); the interpreter prefers few, big programs
        BT = block("conv_bt", min(pow2(max_len, 16), 16 if on_gpu else 128))
        _causal_conv1d_fwd_kernel[(N, triton.cdiv(max_len, BT), triton.cdiv(C, BC))](
            x2, w, state if state is not None else x2, cu_t, y.view(total, C), C,
            K=K, BT=BT, BC=BC, HAS_STATE=state is not None, SILU=silu, num_warps=4,
        )
    if K > 1:
        _causal_conv1d_state_kernel[(N, triton.cdiv(C, BC))](
            x2, state if state is not None else x2, cu_t, new_state, C,
            K=K, BC=BC, BJ=pow2(K - 1), HAS_STATE=state is not None, num_warps=4,
        )
    return y, new_state


def causal_conv1d_update(x, weight, *, conv_pool, slot_ids):
    """One decode token per row: SiLU(conv) out, conv_pool[slot_ids[b]] shifted in place.

    Args:
        x:         [B, C]
        weight:    [C, K] or [C, 1, K]
        conv_pool: [S, C, K-1] updated in place (rows not named in slot_ids are untouched)
        slot_ids:  [B] int; −1 = padding row (output zeros, no slot touched).  Slots in one call must be distinct.
    Returns:
        y: [B, C] in x's dtype
    """
    who = "causal_conv1d_update"
    w = _conv_weight(who, weight)
    B, C, K = conv_update_shapes(who, x, w, conv_pool)
    check_slot_ids(who, slot_ids, B)
    dev = check_device(who, x, w, conv_pool, slot_ids)
    if dev.type != "cuda":  # a host check is free here; on CUDA it would sync (and break graph capture)
        check_slot_range(who, slot_ids, conv_pool.shape[0])
    y = alloc((B, C), x.dtype, dev)
    if B == 0:
        return y
    # BC ≥ 32·num_warps: each channel belongs to exactly one thread, so the in-place shift cannot race.
    BC = block("conv_update_bc", 256 if dev.type == "cuda" else min(pow2(C, 16), 1024))
    _causal_conv1d_update_kernel[(B, triton.cdiv(C, BC))](
        x.contiguous(), w, conv_pool, slot_ids.contiguous(), y, C, K=K, BC=BC, num_warps=4,
    )
    return y


if __name__ == "__main__":  # validate against the float64 oracle, then time (docs/triton_kernels.md)
    from optimized.triton._selfcheck import main

    main("conv")
