"""Causal depthwise conv1d (+ SiLU) of a Gated DeltaNet layer in PyTorch (docs/causal_conv.md).

    y_t[c] = act( Σ_{i=0}^{K-1} w[c, i] · x_{t-(K-1)+i}[c] ),   inputs before a sequence's start from its state

The conv state holds the last K-1 *pre-activation* inputs per channel, oldest first (`[N, C, K-1]`, pitfall B14).

Version log:
  v1 (this file) prefill: every packed sequence gets its K-1 state rows placed in front of its tokens in one
     "extended" buffer [T_total + N·(K-1), C]; the K taps are K shifted multiply-adds over that buffer (vectorised
     over all sequences and channels), then the real rows are read back and the new states gathered from each
     segment's last K-1 rows.  Sequences never see each other (pitfall B13), lengths < K-1 keep older state
     columns (B14).  Decode: `causal_conv1d_update` works on a pool `[S, C, K-1]` in place, one contiguous view per
     run of consecutive slots; slot −1 = padding (zeros out, nothing touched).
  Assumes: fp32 accumulation (float64 for float64 inputs); output in x's dtype; new state in the state's dtype
  (x's when no state is given).  The prefill is differentiable as written (autograd records the index copies and
  the tap products); the decode update writes into its pool, so it refuses inputs that require grad.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

from optimized._checks import conv_shapes, conv_update_shapes, conv_weight, records_grad, silu_flag
from optimized.slots import check_slots, slot_runs

__all__ = ["causal_conv1d", "causal_conv1d_update"]


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
        new_conv_state: [N, C, K-1] (the last K-1 pre-activation inputs, oldest first)
    """
    who = "causal_conv1d"
    w = conv_weight(who, weight)
    silu = silu_flag(who, activation)
    B, T, cu, N = conv_shapes(who, x, w, conv_state, cu_seqlens)
    C, K = w.shape
    total = B * T
    dev = x.device
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    state_dtype = conv_state.dtype if conv_state is not None else x.dtype
    x2 = x.reshape(total, C)
    P = K - 1

    # Extended buffer: sequence n occupies rows [cu[n] + n·P, cu[n+1] + (n+1)·P): its P state rows, then its tokens.
    ext = torch.zeros(total + N * P, C, dtype=cdt, device=dev)  # [T_total + N·P, C]
    seq_of_tok = torch.repeat_interleave(
        torch.arange(N, device=dev), torch.tensor([b - a for a, b in pairwise(cu)], device=dev)
    )  # [T_total]
    tok_rows = torch.arange(total, device=dev) + (seq_of_tok + 1) * P  # [T_total]  row of each token in ext
    ext.index_copy_(0, tok_rows, x2.to(cdt))
    if P and conv_state is not None:
        st_rows = (torch.tensor(cu[:-1], device=dev) + torch.arange(N, device=dev) * P)[:, None] + torch.arange(
            P, device=dev
        )  # [N, P]
        ext.index_copy_(0, st_rows.reshape(-1), conv_state.to(cdt).transpose(1, 2).reshape(N * P, C))

    # K shifted multiply-adds over the whole buffer: out[r] = Σ_i w[:, i] · ext[r − P + i] for r ≥ P.
    wc = w.to(cdt)
    L = ext.shape[0] - P
    acc = ext[P:] * wc[:, P]  # newest input meets the last tap
    for i in range(P):
        acc.add_(ext[i : i + L] * wc[:, i])
    y = acc.index_select(0, tok_rows - P)  # [T_total, C]
    if silu:
        y = F.silu(y)
    y = y.to(x.dtype).reshape(x.shape)

    if P:
        end_rows = torch.tensor(cu[1:], device=dev) + (torch.arange(N, device=dev) + 1) * P  # one past each segment
        last = (end_rows[:, None] - P + torch.arange(P, device=dev)).reshape(-1)  # [N·P]
        new_state = ext.index_select(0, last).view(N, P, C).transpose(1, 2).to(state_dtype).contiguous()
    else:
        new_state = torch.zeros(N, C, 0, dtype=state_dtype, device=dev)
    return y, new_state


def causal_conv1d_update(x, weight, *, conv_pool, slot_ids):
    """One decode token per row: SiLU(conv) out, conv_pool[slot_ids[b]] shifted in place.

    Args:
        x:         [B, C]
        weight:    [C, K] or [C, 1, K]
        conv_pool: [S, C, K-1] updated in place (rows not named in slot_ids are untouched)
        slot_ids:  [B] int; −1 = padding row (output zeros, no slot touched); slots in one call are distinct
    Returns:
        y: [B, C] in x's dtype
    """
    who = "causal_conv1d_update"
    if records_grad(x, weight, conv_pool):
        raise ValueError(f"{who}: the in-place decode update is inference-only (it overwrites the conv pool); for "
                         "gradients run causal_conv1d with conv_state")
    w = conv_weight(who, weight)
    B, C, K = conv_update_shapes(who, x, w, conv_pool)
    ids = check_slots(who, slot_ids, B, conv_pool.shape[0])
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    wc = w.to(cdt)
    y = torch.zeros(B, C, dtype=x.dtype, device=x.device)
    for b0, s0, n in slot_runs(ids):
        pool = conv_pool[s0 : s0 + n]  # [n, C, K-1] a view: the pool itself is updated
        xb = x[b0 : b0 + n]
        acc = xb.to(cdt) * wc[:, K - 1]  # [n, C]
        if K > 1:
            acc.add_(torch.einsum("nck,ck->nc", pool.to(cdt), wc[:, : K - 1]))
            # shift left by one and append the new (pre-activation) input — in place
            if K > 2:
                pool[:, :, :-1] = pool[:, :, 1:].clone()
            pool[:, :, -1] = xb.to(conv_pool.dtype)
        y[b0 : b0 + n] = F.silu(acc).to(x.dtype)
    return y
