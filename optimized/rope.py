"""Partial, interleaved multimodal RoPE in PyTorch (docs/pitfalls.md, B18, B19).

The frequency → axis assignment comes from `reference.rope.mrope_axis_of_frequency` (one source of truth); the
tables are built in fp32 (float64 for float64 activations) and cast to the activation dtype, as HF.
Only the first R = rotary_dim channels of each head rotate (rotate_half pairing j ↔ j + R/2); the rest pass
through bit-exactly.

RoPE scaling (linear / dynamic / yarn, `reference.rope.RopeScaling`): the R/2 scaled frequencies and the attention
factor are the reference's float64 values (`reference.rope.scaled_inv_freq`, cached per argument set) cast to the
table dtype; `default` keeps the torch `inv_freq` below.  `packed_rope_tables` builds one table for a packed
batch, or one per request under `dynamic` (whose frequencies depend on each request's length).
"""
from __future__ import annotations

from functools import lru_cache
from itertools import pairwise

import numpy as np
import torch

from reference.rope import RopeScaling, mrope_axis_of_frequency
from reference.rope import scaled_inv_freq as _scaled_inv_freq_f64

__all__ = ["inv_freq", "scaled_inv_freq", "mrope_cos_sin", "rope_tables", "packed_rope_tables", "apply_partial_rope",
           "rotate_half"]


def inv_freq(rotary_dim: int, theta: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """inv_freq[j] = theta^(−2j/R), j = 0 .. R/2 − 1 (over the *rotary* width, docs/pitfalls.md, B18).  -> [R/2]"""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be positive and even, got {rotary_dim}")
    j = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device)
    return (1.0 / (float(theta) ** (j / rotary_dim))).to(dtype)


@lru_cache(maxsize=512)
def _scaled_f64(rotary_dim: int, theta: float, scaling: RopeScaling, max_position_embeddings: int, seq_len):
    freqs, factor = _scaled_inv_freq_f64(rotary_dim, theta, scaling, seq_len=seq_len, dtype=np.float64,
                                         max_position_embeddings=max_position_embeddings)
    freqs.setflags(write=False)  # shared by every caller of the cache
    return freqs, factor


def scaled_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling, *, max_position_embeddings: int,
                    seq_len: int | None = None, dtype=torch.float32, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq [R/2], attention factor) of a RoPE scaling (equations: `reference.rope.scaled_inv_freq`).

    `default` is exactly `inv_freq(rotary_dim, theta)`; the other types are computed in float64 and cast.
    `seq_len` matters for `dynamic` only (a chunk's max position + 1)."""
    if scaling.rope_type == "default":
        return inv_freq(rotary_dim, theta, dtype=dtype, device=device), 1.0
    seq_len = int(seq_len) if scaling.depends_on_seq_len and seq_len is not None else None
    freqs, factor = _scaled_f64(int(rotary_dim), float(theta), scaling, int(max_position_embeddings), seq_len)
    return torch.tensor(freqs, dtype=dtype, device=device), factor


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq_: torch.Tensor, mrope_section, *, interleaved: bool = True,
                  attention_factor: float = 1.0):
    """cos, sin tables [T, R] for (M)RoPE positions [3, T] (rows t, h, w) or [T] (broadcast to all rows).

    Both tables are multiplied by `attention_factor` (yarn's; 1 multiplies nothing)."""
    p = position_ids
    if p.dim() == 1:
        p = p[None].expand(3, -1)
    if p.dim() != 2 or p.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, T] or [T], got {tuple(position_ids.shape)}")
    if sum(int(s) for s in mrope_section) != inv_freq_.shape[0]:
        raise ValueError(f"sum(mrope_section) must equal R/2 = {inv_freq_.shape[0]}, got {tuple(mrope_section)}")
    axis = torch.as_tensor(mrope_axis_of_frequency(mrope_section, interleaved=interleaved), device=p.device)
    pos = p.to(inv_freq_.dtype)  # [3, T]  (each row read through its own stride, docs/pitfalls.md, B19)
    angles_all = pos[:, :, None] * inv_freq_[None, None, :]  # [3, T, R/2]
    j = torch.arange(inv_freq_.shape[0], device=p.device)
    theta = angles_all[axis, :, j].T  # [T, R/2]  axis(j) for frequency j
    emb = torch.cat([theta, theta], dim=-1)  # [T, R]
    if attention_factor != 1.0:
        return emb.cos() * attention_factor, emb.sin() * attention_factor
    return emb.cos(), emb.sin()


def rope_tables(position_ids: torch.Tensor, config, *, dtype=torch.float32):
    """cos, sin [T, R] of one request's chunk under `config.rope_scaling` (twin of `reference.rope.rope_tables`).

    `dynamic` reads L = max position of the chunk (over t, h, w) + 1; other types ignore the length."""
    scaling = getattr(config, "rope_scaling", None) or RopeScaling()
    seq_len = int(position_ids.max()) + 1 if scaling.depends_on_seq_len and position_ids.numel() else None
    freqs, factor = scaled_inv_freq(config.rotary_dim, config.rope_theta, scaling, seq_len=seq_len, dtype=dtype,
                                    max_position_embeddings=config.max_position_embeddings,
                                    device=position_ids.device)  # [R/2]
    return mrope_cos_sin(position_ids, freqs, config.mrope_section,
                         interleaved=bool(getattr(config, "mrope_interleaved", True)), attention_factor=factor)


def packed_rope_tables(position_ids: torch.Tensor, cu_seqlens, config, *, dtype=torch.float32):
    """cos, sin [T_total, R] of a packed batch (positions [3, T_total], requests at cu_seqlens [N+1]).

    One table for every token, except under `dynamic`: there each request's rows get the table of its own
    length (its chunk's max position + 1), as if it ran alone."""
    scaling = getattr(config, "rope_scaling", None) or RopeScaling()
    cu = [int(c) for c in cu_seqlens]
    if not scaling.depends_on_seq_len or len(cu) <= 2:
        return rope_tables(position_ids, config, dtype=dtype)
    parts = [rope_tables(position_ids[:, s:e], config, dtype=dtype) for s, e in pairwise(cu) if e > s]
    if not parts:
        return rope_tables(position_ids, config, dtype=dtype)
    return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] → [−x2, x1] over the last axis."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R channels of every head; channels R.. pass through.  x [T, heads, D_h], cos/sin [T, R]."""
    R = cos.shape[-1]
    if x.dim() != 3 or cos.shape[0] != x.shape[0] or R > x.shape[-1] or R % 2:
        raise ValueError(f"apply_partial_rope: x [T, heads, D_h] and cos/sin [T, R≤D_h], got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}")
    c = cos.to(x.dtype)[:, None, :]  # [T, 1, R]
    s = sin.to(x.dtype)[:, None, :]
    xr = x[..., :R]
    out = x.clone()
    out[..., :R] = xr * c + rotate_half(xr) * s
    return out
