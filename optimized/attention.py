"""Gated full attention of Qwen3.5 in PyTorch, with a KV cache.

    P = x W_qᵀ → [T, nh, 2·hd] → q | gate per head (pitfall B2);  q, k ← RoPE(RMSNorm(·)) (norm before RoPE)
    o = SDPA(q, [K_past; k], [V_past; v]) causal with GQA;   y = (o ⊙ σ(gate)) W_oᵀ

Projections, norms and RoPE run once over all packed tokens (large matmuls); the attention itself runs per
sequence through `torch.nn.functional.scaled_dot_product_attention` (`enable_gqa`, causal), so packed sequences
never see each other.  The cache is either a list of (k, v) tensors (the reference contract: full past+new
returned) or a list of `KVCache` objects appended in place (what the model uses: amortised O(1) append).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from optimized._checks import cu_seqlens_list
from optimized.linear import linear
from optimized.norms import rms_norm
from optimized.rope import apply_partial_rope, packed_rope_tables

__all__ = ["TorchAttentionWeights", "KVCache", "gated_attention", "split_q_gate"]


@dataclass
class TorchAttentionWeights:
    """Torch twin of reference.attention.AttentionWeights (same names and shapes)."""

    q_proj: torch.Tensor  # [2·nh·hd, H] (per-head q | gate rows); [nh·hd, H] when attn_output_gate is false
    k_proj: torch.Tensor  # [nkv·hd, H]
    v_proj: torch.Tensor  # [nkv·hd, H]
    o_proj: torch.Tensor  # [H, nh·hd]
    q_norm: torch.Tensor  # [hd]
    k_norm: torch.Tensor  # [hd]

    @classmethod
    def from_reference(cls, w, *, dtype=torch.float32, device="cpu") -> TorchAttentionWeights:
        def conv(a):
            return torch.from_numpy(np.array(a)).to(device=device, dtype=dtype).contiguous()
        return cls(**{name: conv(getattr(w, name)) for name in cls.__dataclass_fields__})


class KVCache:
    """K and V of one sequence for one full-attention layer: [capacity, nkv, hd] buffers grown by doubling."""

    def __init__(self, nkv: int, hd: int, *, dtype, device, capacity: int = 64):
        self.k = torch.empty(capacity, nkv, hd, dtype=dtype, device=device)
        self.v = torch.empty(capacity, nkv, hd, dtype=dtype, device=device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Append [T, nkv, hd] and return views of the whole cache (k, v) [length, nkv, hd]."""
        need = self.length + k.shape[0]
        if need > self.k.shape[0]:
            cap = max(need, 2 * self.k.shape[0])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.empty((cap,) + tuple(old.shape[1:]), dtype=old.dtype, device=old.device)
                new[: self.length] = old[: self.length]
                setattr(self, name, new)
        self.k[self.length : need] = k
        self.v[self.length : need] = v
        self.length = need
        return self.k[:need], self.v[:need]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def split_q_gate(p: torch.Tensor, num_heads: int, head_dim: int, *, gated: bool = True):
    """P [T, nh·2·hd] → view [T, nh, 2·hd] → q = [..., :hd], gate = [..., hd:]  (per head, pitfall B2).

    gated=False (attn_output_gate false): P [T, nh·hd] → q = view [T, nh, hd], gate = None."""
    width = (2 if gated else 1) * num_heads * head_dim
    if p.shape[-1] != width:
        raise ValueError(f"split_q_gate: q_proj output has width {p.shape[-1]}, expected "
                         f"{'2·' if gated else ''}nh·hd = {width}")
    if not gated:
        return p.view(p.shape[0], num_heads, head_dim), None
    q, gate = torch.split(p.view(p.shape[0], num_heads, 2 * head_dim), head_dim, dim=-1)  # views
    return q, gate


def _attend(q, k, v, scale, q_offset):
    """q [T, nh, hd], k/v [S, nkv, hd] with S = q_offset + T -> o [T, nh, hd] (causal, GQA)."""
    T, S = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, heads, *, hd]
    gqa = q.shape[1] != k.shape[1]
    if q_offset == 0:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif T == 1:
        o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)
    else:
        allowed = torch.arange(S, device=q.device)[None, :] <= (q_offset + torch.arange(T, device=q.device))[:, None]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)  # [T, nh, hd]


def gated_attention(x, w: TorchAttentionWeights, config, *, position_ids=None, cu_seqlens=None, past_kv=None,
                    kv_caches=None):
    """Gated full attention over a ragged batch with a KV cache.

    Args:
        x:            [T_total, H]
        w:            TorchAttentionWeights
        config:       Qwen35Config
        position_ids: [3, T_total] or [T_total] integer; None = text positions T_past_n + arange(T_n)
        cu_seqlens:   [N+1] or None (one sequence)
        past_kv:      None or list of N (k, v) [T_past, nkv, hd] (post-norm, post-RoPE)   — reference contract
        kv_caches:    alternatively a list of N KVCache, appended in place                 — the model's path
    Returns:
        y [T_total, H]; and the list of N full (k, v) pairs (past_kv form) or the KVCache list
    """
    H, nh, nkv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if x.dim() != 2 or x.shape[1] != H:
        raise ValueError(f"gated_attention: x must be [T_total, H={H}], got {tuple(x.shape)}")
    T_total = x.shape[0]
    cu = [0, T_total] if cu_seqlens is None else cu_seqlens_list(cu_seqlens, T_total, "gated_attention")
    N = len(cu) - 1
    if kv_caches is not None:
        if len(kv_caches) != N:
            raise ValueError(f"gated_attention: {len(kv_caches)} KV caches for {N} sequences")
        past_len = [c.length for c in kv_caches]
    else:
        past_kv = [None] * N if past_kv is None else list(past_kv)
        if len(past_kv) != N:
            raise ValueError(f"gated_attention: past_kv has {len(past_kv)} entries for {N} sequences")
        past_len = [0 if e is None else int(e[0].shape[0]) for e in past_kv]
    dev = x.device
    if position_ids is None:
        pos = torch.cat([torch.arange(past_len[n], past_len[n] + cu[n + 1] - cu[n], device=dev) for n in range(N)])
        pos = pos[None].expand(3, -1)
    else:
        pos = torch.as_tensor(position_ids, device=dev)
        if pos.dim() == 1:
            pos = pos[None].expand(3, -1)
        if tuple(pos.shape) != (3, T_total):
            raise ValueError(f"gated_attention: position_ids must be [3, T_total={T_total}], got {tuple(pos.shape)}")

    eps = config.rms_norm_eps
    gated = bool(getattr(config, "attn_output_gate", True))  # q_proj carries gate rows only when gated
    q, gate = split_q_gate(linear(x, w.q_proj), nh, hd, gated=gated)  # [T, nh, hd] each (gate None if not)
    k = linear(x, w.k_proj).view(T_total, nkv, hd)
    v = linear(x, w.v_proj).view(T_total, nkv, hd)
    q = rms_norm(q, w.q_norm, eps)  # norm before RoPE
    k = rms_norm(k, w.k_norm, eps)
    tdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    # RoPE (scaled per config.rope_scaling): one table, or one per request under `dynamic` (its own length).
    cos, sin = packed_rope_tables(pos, cu, config, dtype=tdt)  # [T_total, R] each
    q = apply_partial_rope(q, cos, sin)
    k = apply_partial_rope(k, cos, sin)

    o = torch.empty(T_total, nh, hd, dtype=x.dtype, device=dev)
    new_kv = []
    for n in range(N):
        s, e = cu[n], cu[n + 1]
        if kv_caches is not None:
            if e > s:
                k_all, v_all = kv_caches[n].append(k[s:e], v[s:e])
            new_kv.append(kv_caches[n])
        else:
            if past_kv[n] is None:
                k_all, v_all = k[s:e], v[s:e]
            else:
                k_all = torch.cat([past_kv[n][0].to(x.dtype), k[s:e]], 0)
                v_all = torch.cat([past_kv[n][1].to(x.dtype), v[s:e]], 0)
            new_kv.append((k_all, v_all))
        if e > s:
            o[s:e] = _attend(q[s:e], k_all, v_all, config.attention_scale, past_len[n])
    o = o.view(T_total, nh * hd)
    if gated:
        o = o * torch.sigmoid(gate.reshape(T_total, nh * hd))  # gate after attention, before o_proj (B2)
    return linear(o, w.o_proj), new_kv
