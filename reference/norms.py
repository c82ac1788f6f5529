"""Normalizations of Qwen3.5 (docs/norms.md), and the scalar activations they use.

Three different norms live in one model, and mixing them up gives deterministic garbage (pitfall B4, B5):

| function         | formula                                     | w init | used for                          |
|------------------|---------------------------------------------|--------|-----------------------------------|
| `rms_norm`       | x / sqrt(mean(x²) + eps) · (1 + w)          | 0      | block, final, attention q/k norms |
| `gated_rms_norm` | [x / sqrt(mean(x²) + eps) · w] · silu(z)    | 1      | GDN output norm, per value head   |
| `l2_norm`        | x · (Σ x² + eps)^(-1/2), eps inside the sqrt | —      | GDN q/k inside the kernel         |

Every function computes in `dtype` (float64 by default; pass `dtype=np.float32` to mirror the fp32 arithmetic that
Hugging Face and the optimized path use) and returns an array of that dtype.  The reductions run over the last axis.
"""
from __future__ import annotations

import numpy as np

__all__ = ["rms_norm", "gated_rms_norm", "l2_norm", "sigmoid", "silu", "softplus"]


def sigmoid(x, *, dtype=np.float64) -> np.ndarray:
    """σ(x) = 1 / (1 + e^(-x)), evaluated as exp(-log(1 + e^(-x))) so that no intermediate overflows."""
    x = np.asarray(x, dtype=dtype)
    return np.exp(-np.logaddexp(np.asarray(0.0, dtype=dtype), -x)).astype(dtype, copy=False)


def silu(x, *, dtype=np.float64) -> np.ndarray:
    """silu(x) = x · σ(x)."""
    x = np.asarray(x, dtype=dtype)
    return x * sigmoid(x, dtype=dtype)


def softplus(x, *, dtype=np.float64) -> np.ndarray:
    """softplus(x) = log(1 + e^x), without overflow for large x.

    Hugging Face uses torch's softplus (threshold 20: returns x for x > 20); MAX does the same thresholding.  The
    exact form differs from x by < 2.1e-9 above the threshold, far below fp32 rounding of x there.
    """
    x = np.asarray(x, dtype=dtype)
    return np.logaddexp(np.asarray(0.0, dtype=dtype), x).astype(dtype, copy=False)


def _inv_rms(x: np.ndarray, eps: float) -> np.ndarray:
    """1 / sqrt(mean(x², last axis) + eps), kept with a trailing axis of size 1 for broadcasting."""
    ms = np.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    return 1.0 / np.sqrt(ms + x.dtype.type(eps))


def rms_norm(x, weight, eps: float = 1e-6, *, dtype=np.float64) -> np.ndarray:
    """Zero-centred RMSNorm (HF `Qwen3_5RMSNorm`):  y = x / sqrt(mean(x²) + eps) · (1 + w).

    The checkpoint stores w (initialised to 0, often negative), not 1 + w.  `1 + w` is formed in the compute dtype
    (fp32 semantics): materialising it in bf16 would round small deltas |w| ~ 1e-3 away (pitfall B4, lmdeploy#4790).

    Shapes:
        x:      [..., D]
        weight: [D]
        return: [..., D]   (dtype `dtype`)
    """
    x = np.asarray(x, dtype=dtype)
    w = np.asarray(weight, dtype=dtype)
    if w.ndim != 1 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be [D={x.shape[-1]}], got {w.shape}")
    # HF: normalise in fp32, multiply by (1 + w) in fp32, cast the product (not x̂) to the input dtype.
    return (x * _inv_rms(x, eps)) * (1.0 + w)


def gated_rms_norm(x, z, weight, eps: float = 1e-6, *, dtype=np.float64) -> np.ndarray:
    """Gated RMSNorm of the GDN output (HF `Qwen3_5RMSNormGated`):

        y = [ x / sqrt(mean(x²) + eps) · w ] · silu(z)

    Plain weight w (initialised to 1, not 1 + w), and the norm is taken over x *before* the gate (pitfall B4):
    gating first and then normalising would cancel the gate's magnitude.  Applied per value head, so D = D_v.

    Shapes:
        x:      [..., D]   (the rule's output o, one head per row)
        z:      [..., D]   (the output gate, same shape as x)
        weight: [D]
        return: [..., D]
    """
    x = np.asarray(x, dtype=dtype)
    z = np.asarray(z, dtype=dtype)
    w = np.asarray(weight, dtype=dtype)
    if z.shape != x.shape:
        raise ValueError(f"gated_rms_norm: z must have the shape of x {x.shape}, got {z.shape}")
    if w.ndim != 1 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"gated_rms_norm: weight must be [D={x.shape[-1]}], got {w.shape}")
    n = w * (x * _inv_rms(x, eps))  # [..., D]  normalise, then the plain weight
    return n * silu(z, dtype=dtype)  # gate after the norm, silu(z) in the compute dtype (as HF)


def l2_norm(x, eps: float = 1e-6, *, dtype=np.float64) -> np.ndarray:
    """L2 normalisation of GDN queries and keys (HF `l2norm`):  x̂ = x · (Σ x² + eps)^(-1/2).

    eps sits inside the square root and is added to the *sum*, not the mean: this is HF's `l2norm` and fla's kernel
    (`use_qk_l2norm_in_kernel`).  It is neither F.normalize (x / max(‖x‖, eps)) nor an RMSNorm (eps on the mean would
    be D times larger, pitfall B5, mlx-lm#1624).  An all-zero vector maps to zeros, a tiny one to x/sqrt(eps).

    Shapes:
        x:      [..., D]
        return: [..., D]
    """
    x = np.asarray(x, dtype=dtype)
    ss = np.sum(x * x, axis=-1, keepdims=True)  # [..., 1]
    return x * (1.0 / np.sqrt(ss + x.dtype.type(eps)))
