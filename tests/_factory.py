"""The shared input factory: physically valid gated-delta inputs.

g = logsigmoid(·)/normalizer (≤ 0) with a random fraction masked to exactly 0 (no decay, fla's mask_p);
beta = sigmoid(·) in (0, 1); q, k raw (the kernels L2-normalise them); h0 random.
Used by tests, notebooks and benchmarks alike.  NumPy float64 out; callers cast.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class GDNInputs:
    q: np.ndarray  # [B, T, H_k, D_k]
    k: np.ndarray  # [B, T, H_k, D_k]
    v: np.ndarray  # [B, T, H_v, D_v]
    g: np.ndarray  # [B, T, H_v]
    beta: np.ndarray  # [B, T, H_v]
    h0: np.ndarray | None  # [N, H_v, D_k, D_v]


def gdn_inputs(
    seed: int,
    B: int,
    T: int,
    H_k: int,
    H_v: int,
    D_k: int,
    D_v: int,
    *,
    N: int | None = None,
    gate_normalizer: float = 1.0,
    mask_p: float = 0.1,
    with_h0: bool = True,
    beta_mode: str = "random",  # "random" | "zero" | "one"
) -> GDNInputs:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H_k, D_k))
    k = rng.standard_normal((B, T, H_k, D_k))
    v = rng.standard_normal((B, T, H_v, D_v))
    g = logsigmoid(rng.standard_normal((B, T, H_v))) / gate_normalizer
    if mask_p > 0:
        g = np.where(rng.random(g.shape) < mask_p, 0.0, g)
    if beta_mode == "zero":
        beta = np.zeros((B, T, H_v))
    elif beta_mode == "one":
        beta = np.ones((B, T, H_v))
    else:
        beta = sigmoid(rng.standard_normal((B, T, H_v)))
    n = B if N is None else N
    h0 = 0.5 * rng.standard_normal((n, H_v, D_k, D_v)) if with_h0 else None
    return GDNInputs(q, k, v, g, beta, h0)


def random_cu_seqlens(seed: int, lengths) -> np.ndarray:
    """cu_seqlens [N+1] for the given per-sequence lengths."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)
