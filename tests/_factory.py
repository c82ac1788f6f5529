"""Test-only input helpers.  The gated-delta input factory itself (physically valid q, k, v, g, β, h0) is
`qwen35.measure.gdn_inputs`, shared with the notebooks and the benchmarks."""
from __future__ import annotations

import numpy as np


def random_cu_seqlens(seed: int, lengths) -> np.ndarray:
    """cu_seqlens [N+1] for the given per-sequence lengths."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)
