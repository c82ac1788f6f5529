"""Causal depthwise conv1d (+ SiLU) over the q, k, v channels of a Gated DeltaNet layer (docs/causal_conv.md).

    y_t[c] = act( Σ_{i=0}^{K-1} w[c, i] · x_{t-(K-1)+i}[c] )

The newest input meets the last tap w[c, K-1].  Inputs before the start of a sequence come from the conv state,
which holds the last K-1 *pre-activation* inputs of each channel, oldest first (`[N, C, K-1]`, the fla/vLLM/MAX
convention; Hugging Face keeps K columns, of which only the last K-1 matter — pitfall B14).  A fresh sequence
has a zero state.  Every packed sequence of a varlen batch has its own state and never sees its neighbours
(pitfall B13).
"""
from __future__ import annotations

import numpy as np

from reference.norms import silu
from reference.packing import check_cu_seqlens

__all__ = ["causal_conv1d", "causal_conv1d_update"]


def _conv_weight(weight, dtype) -> np.ndarray:
    """Accept the conv weight as [C, K] or as PyTorch's depthwise [C, 1, K] (HF's nn.Conv1d; MAX also reads 2-D)."""
    w = np.asarray(weight, dtype=dtype)
    if w.ndim == 3:
        if w.shape[1] != 1:
            raise ValueError(f"causal_conv1d: weight [C, 1, K] expected for a 3-D weight, got {w.shape}")
        w = w[:, 0, :]
    if w.ndim != 2 or w.shape[1] < 1:
        raise ValueError(f"causal_conv1d: weight must be [C, K] or [C, 1, K], got {np.shape(weight)}")
    return w  # [C, K]


def _activate(y: np.ndarray, activation, dtype) -> np.ndarray:
    if activation is None or activation == "identity":
        return y
    if activation in ("silu", "swish"):
        return silu(y, dtype=dtype)
    raise ValueError(f"causal_conv1d: unknown activation {activation!r} (use 'silu' or None)")


def causal_conv1d(x, weight, *, conv_state=None, cu_seqlens=None, activation="silu", dtype=np.float64):
    """Causal depthwise conv1d with a carried state, for prefill (with or without a prior state) and decode.

        ext   = [ state (K-1 columns, oldest first) | x_1 … x_T ]              per sequence and channel
        y_t   = act( Σ_i w[:, i] · ext[t + i] )                                 t = 0 … T-1
        state ← last K-1 columns of ext   (pre-activation; when T < K-1, older state columns shift left)

    Args:
        x:          [T_total, C]  (packed; one sequence unless `cu_seqlens` is given)  or  [B, T, C]  (B sequences)
        weight:     [C, K]  or  [C, 1, K]
        conv_state: [N, C, K-1] or None (zeros: fresh sequences)
        cu_seqlens: [N+1] int, only with 2-D x (or 3-D x with B = 1): sequence n is x[cu[n]:cu[n+1]]
        activation: "silu" (the model) or None (the raw convolution)
        dtype:      compute and output dtype (float64 default, np.float32 to mirror fp32)
    Returns:
        y:              same shape as x
        new_conv_state: [N, C, K-1]
    """
    x = np.asarray(x, dtype=dtype)
    w = _conv_weight(weight, dtype)  # [C, K]
    C, K = w.shape
    if x.ndim not in (2, 3):
        raise ValueError(f"causal_conv1d: x must be [T_total, C] or [B, T, C], got {x.shape}")
    if x.shape[-1] != C:
        raise ValueError(f"causal_conv1d: x has {x.shape[-1]} channels but weight has C={C}")

    # Describe every sequence as (row of the [B, T, C] view, start, end).
    x3 = x if x.ndim == 3 else x[None]  # [B, T, C]
    B, T = x3.shape[:2]
    if cu_seqlens is None:
        segments = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise ValueError(f"causal_conv1d: with cu_seqlens, x must hold one packed row, got batch {B}")
        cu = check_cu_seqlens(cu_seqlens, T, "causal_conv1d")
        segments = [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]
    N = len(segments)

    if conv_state is None:
        state = np.zeros((N, C, K - 1), dtype=dtype)
    else:
        state = np.asarray(conv_state, dtype=dtype)
        if state.shape != (N, C, K - 1):
            raise ValueError(f"causal_conv1d: conv_state must be [N={N}, C={C}, K-1={K - 1}], got {state.shape}")

    y3 = np.zeros_like(x3)
    new_state = np.empty((N, C, K - 1), dtype=dtype)
    for n, (b, s, e) in enumerate(segments):
        ext = np.concatenate([state[n].T, x3[b, s:e]], axis=0)  # [K-1+T_n, C]
        L = e - s
        acc = np.zeros((L, C), dtype=dtype)  # [T_n, C]
        for i in range(K):  # tap i meets the input K-1-i steps back
            acc += ext[i:i + L] * w[:, i]
        y3[b, s:e] = _activate(acc, activation, dtype)
        new_state[n] = ext[ext.shape[0] - (K - 1):].T  # [C, K-1]  pre-activation, oldest first
    y = y3 if x.ndim == 3 else y3[0]
    return y, new_state


def causal_conv1d_update(x, weight, *, conv_state, activation="silu", dtype=np.float64):
    """One decode step for B independent sequences: `causal_conv1d` with T = 1 per sequence.

        y_b = act( Σ_{i<K-1} w[:, i] · state_b[:, i] + w[:, K-1] · x_b ),   state_b ← [state_b[:, 1:] | x_b]

    Args:
        x:          [B, C]  (one new token per sequence)
        weight:     [C, K] or [C, 1, K]
        conv_state: [B, C, K-1]
    Returns:
        y:              [B, C]
        new_conv_state: [B, C, K-1]   (a new array; the input state is not modified)
    """
    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"causal_conv1d_update: x must be [B, C], got {x.shape}")
    y, new_state = causal_conv1d(x[:, None, :], weight, conv_state=conv_state, activation=activation, dtype=dtype)
    return y[:, 0, :], new_state
