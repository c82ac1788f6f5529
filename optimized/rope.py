"""Partial, interleaved multimodal RoPE in PyTorch (SPEC §6 step 3, §7; PITFALLS B18, B19).

The frequency → axis assignment comes from `reference.rope.mrope_axis_of_frequency` (one source of truth); the
tables are built in fp32 (float64 for float64 activations) and cast to the activation dtype, as HF.
Only the first R = rotary_dim channels of each head rotate (rotate_half pairing j ↔ j + R/2); the rest pass
through bit-exactly.
"""
from __future__ import annotations

import torch

from reference.rope import mrope_axis_of_frequency

__all__ = ["inv_freq", "mrope_cos_sin", "apply_partial_rope", "rotate_half"]


def inv_freq(rotary_dim: int, theta: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """inv_freq[j] = theta^(−2j/R), j = 0 .. R/2 − 1 (over the *rotary* width, PITFALLS B18).  -> [R/2]"""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be positive and even, got {rotary_dim}")
    j = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device)
    return (1.0 / (float(theta) ** (j / rotary_dim))).to(dtype)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq_: torch.Tensor, mrope_section, *, interleaved: bool = True):
    """cos, sin tables [T, R] for (M)RoPE positions [3, T] (rows t, h, w) or [T] (broadcast to all rows)."""
    p = position_ids
    if p.dim() == 1:
        p = p[None].expand(3, -1)
    if p.dim() != 2 or p.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, T] or [T], got {tuple(position_ids.shape)}")
    if sum(int(s) for s in mrope_section) != inv_freq_.shape[0]:
        raise ValueError(f"sum(mrope_section) must equal R/2 = {inv_freq_.shape[0]}, got {tuple(mrope_section)}")
    axis = torch.as_tensor(mrope_axis_of_frequency(mrope_section, interleaved=interleaved), device=p.device)
    pos = p.to(inv_freq_.dtype)  # [3, T]  (each row read through its own stride, PITFALLS B19)
    angles_all = pos[:, :, None] * inv_freq_[None, None, :]  # [3, T, R/2]
    j = torch.arange(inv_freq_.shape[0], device=p.device)
    theta = angles_all[axis, :, j].T  # [T, R/2]  axis(j) for frequency j
    emb = torch.cat([theta, theta], dim=-1)  # [T, R]
    return emb.cos(), emb.sin()


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
