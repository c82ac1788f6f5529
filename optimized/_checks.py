"""Shape checks shared by the torch ops (optimized/) and their Triton twins (optimized/triton/).

The two twins take the same arguments, so they validate them with the same code and raise the
same messages; what only one twin needs (the Triton kernels' block limits, device rules) stays in that twin.
`records_grad` says when autograd records a call (the torch ops' differentiable paths, the refusals of the
inference-only ops).  Torch only (no triton import), so the torch path works where Triton is missing.
"""
from __future__ import annotations

from itertools import pairwise

import torch


def conv_weight(who: str, weight: torch.Tensor) -> torch.Tensor:
    """The depthwise conv weight as [C, K] (a view).

    Args:
        weight: [C, K], or PyTorch's depthwise layout [C, 1, K] (HF's nn.Conv1d layout; MAX also reads 2-D)
    Returns:
        [C, K]
    """
    if weight.dim() == 3:
        if weight.shape[1] != 1:
            raise ValueError(f"{who}: a 3-D weight must be [C, 1, K], got {tuple(weight.shape)}")
        weight = weight[:, 0, :]  # [C, K]
    if weight.dim() != 2 or weight.shape[1] < 1:
        raise ValueError(f"{who}: weight must be [C, K] or [C, 1, K], got {tuple(weight.shape)}")
    return weight


def cu_seqlens_list(cu_seqlens, total: int, who: str) -> list[int]:
    """Validate cu_seqlens [N+1] (0 … total, non-decreasing) and return it as host ints (one device sync).

    The torch twin of `reference.packing.check_cu_seqlens`: a tensor (integer, 1-D) or any sequence of ints."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError(f"{who}: cu_seqlens must be a 1-D integer tensor [N+1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        cu = [int(c) for c in cu_seqlens.tolist()]
    else:
        cu = [int(c) for c in cu_seqlens]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != total or any(b < a for a, b in pairwise(cu)):
        raise ValueError(f"{who}: cu_seqlens must rise from 0 to the packed length {total} with N >= 1, got {cu}")
    return cu


def silu_flag(who: str, activation) -> bool:
    """True for "silu"/"swish", False for None/"identity"."""
    if activation in ("silu", "swish"):
        return True
    if activation is None or activation == "identity":
        return False
    raise ValueError(f"{who}: unknown activation {activation!r} (use 'silu' or None)")


def conv_shapes(who: str, x: torch.Tensor, w: torch.Tensor, conv_state, cu_seqlens):
    """Check `causal_conv1d`'s x against w [C, K], the packing and conv_state; returns (B, T, cu list, N).

    Args:
        x:          [T_total, C] (one packed row) or [B, T, C] (B sequences; B = 1 with cu_seqlens)
        conv_state: [N, C, K-1] or None
        cu_seqlens: [N+1] or None (then the B rows are the N = B sequences)
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"{who}: x must be [T_total, C] or [B, T, C], got {tuple(x.shape)}")
    C, K = w.shape
    if x.shape[-1] != C:
        raise ValueError(f"{who}: x has {x.shape[-1]} channels but weight has C={C}")
    if x.dim() == 3:
        B, T = x.shape[0], x.shape[1]
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"{who}: with cu_seqlens, x must hold one packed row, got batch {B}")
    else:
        B, T = 1, x.shape[0]
    cu = [b * T for b in range(B + 1)] if cu_seqlens is None else cu_seqlens_list(cu_seqlens, B * T, who)
    N = len(cu) - 1
    if conv_state is not None and tuple(conv_state.shape) != (N, C, K - 1):
        raise ValueError(f"{who}: conv_state must be [N={N}, C={C}, K-1={K - 1}], got {tuple(conv_state.shape)}")
    return B, T, cu, N


def conv_update_shapes(who: str, x: torch.Tensor, w: torch.Tensor, conv_pool: torch.Tensor) -> tuple[int, int, int]:
    """Check `causal_conv1d_update`'s x [B, C] and conv_pool [S, C, K-1] (contiguous) against w [C, K];
    returns (B, C, K)."""
    if x.dim() != 2:
        raise ValueError(f"{who}: x must be [B, C], got {tuple(x.shape)}")
    C, K = w.shape
    if x.shape[1] != C:
        raise ValueError(f"{who}: x has {x.shape[1]} channels but weight has C={C}")
    if conv_pool.dim() != 3 or tuple(conv_pool.shape[1:]) != (C, K - 1):
        raise ValueError(f"{who}: conv_pool must be [S, C={C}, K-1={K - 1}], got {tuple(conv_pool.shape)}")
    if not conv_pool.is_contiguous():
        raise ValueError(f"{who}: conv_pool must be contiguous (it is updated in place)")
    return x.shape[0], C, K


def gdn_shapes(who: str, q, k, v, g, beta) -> tuple[int, int, int, int, int, int]:
    """Check the shared gated-delta signature's shapes; returns (B, T, H_k, D_k, H_v, D_v).

    Args:
        q, k:    [B, T, H_k, D_k]
        v:       [B, T, H_v, D_v] with H_v a multiple of H_k
        g, beta: [B, T, H_v]
    """
    if q.dim() != 4:
        raise ValueError(f"{who}: q must be [B, T, H_k, D_k], got {tuple(q.shape)}")
    B, T, H_k, D_k = q.shape
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"{who}: k must have the shape of q {tuple(q.shape)} = [B, T, H_k, D_k], got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:2]) != (B, T):
        raise ValueError(f"{who}: v must be [B={B}, T={T}, H_v, D_v], got {tuple(v.shape)}")
    H_v, D_v = v.shape[2], v.shape[3]
    if H_k == 0 or H_v % H_k != 0:
        raise ValueError(f"{who}: value heads H_v={H_v} must be a multiple of key heads H_k={H_k}")
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != (B, T, H_v):
            raise ValueError(f"{who}: {name} must be [B={B}, T={T}, H_v={H_v}], got {tuple(t.shape)}")
    return B, T, H_k, D_k, H_v, D_v


def check_initial_state(who: str, initial_state, N: int, H_v: int, D_k: int, D_v: int) -> None:
    """initial_state is None or [N, H_v, D_k, D_v] (K-major)."""
    if initial_state is not None and tuple(initial_state.shape) != (N, H_v, D_k, D_v):
        raise ValueError(f"{who}: initial_state must be [N={N}, H_v={H_v}, D_k={D_k}, D_v={D_v}] (K-major), "
                         f"got {tuple(initial_state.shape)}")


def records_grad(*tensors) -> bool:
    """True when autograd records an op on these tensors: grad mode is on and one of them requires grad.  The torch
    ops take their differentiable path then, and the in-place decode ops and the Triton kernels refuse."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
