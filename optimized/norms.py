"""Normalisations of Qwen3.5 in PyTorch (docs/norms.md; pitfall B4, B5).

Two conventions live in one model:
- `rms_norm`: zero-centred x̂ · (1 + w) (block, final and q/k norms); fp32 compute, (1 + w) multiplied in fp32,
  the product cast back to x's dtype (HF "(x·w).to(dtype)").
- `gated_rms_norm`: the GDN output norm with a *plain* weight, norm before the gate:
  n = x̂ (fp32) → cast to x's dtype → · w → · silu(z in fp32) → cast.
- `l2_norm`: x · (Σx² + eps)^(-1/2), eps inside the sqrt, on the sum (HF/FLA `l2norm`, pitfall B5); the gated
  delta rule applies it to q and k (`L2_EPS` is its eps, also used by the rule's fused reductions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "gated_rms_norm", "l2_norm", "L2_EPS"]

L2_EPS = 1e-6  # x · (Σx² + 1e-6)^(-1/2), eps inside the sqrt (HF `l2norm`, pitfall B5)


def _cdt(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero-centred RMSNorm over the last axis: x / rms(x) · (1 + w).   x [..., D], weight [D] -> [..., D]"""
    cdt = _cdt(x)
    xf = x.to(cdt)
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (n * (1.0 + weight.to(cdt))).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GDN output norm: (w · x / rms(x)) · silu(z) over the last axis.   x, z [..., D], weight [D] -> [..., D]"""
    if tuple(z.shape) != tuple(x.shape):
        raise ValueError(f"gated_rms_norm: z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    cdt = _cdt(x)
    xf = x.to(cdt)
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)  # normalised, cast (HF)
    n = weight.to(cdt) * n.to(cdt)  # the norm weight is kept fp32 (pitfall B23)
    return (n * F.silu(z.to(cdt))).to(x.dtype)


def l2_norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x · (Σ x² + eps)^(-1/2) over the last axis (HF/FLA `l2norm`).  [..., D] -> [..., D]"""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
