"""Packed ragged batches: N sequences of different lengths laid end to end along the token axis.

A packed batch is a [T_total, ...] array plus `cu_seqlens` [N+1], the cumulative sequence lengths:

    sequence n = rows cu_seqlens[n] .. cu_seqlens[n+1] − 1,   cu_seqlens[0] = 0,   cu_seqlens[N] = T_total

(the varlen convention of flash-attention and fla; the models' `input_row_offsets` are these offsets).  A sequence may
be empty (two equal offsets) unless the caller says otherwise.  Every packed op of the oracle — the causal conv, the
gated delta rule, gated attention, the vision tower's attention — validates the offsets with `check_cu_seqlens`,
so they accept and refuse the same arrays with the same messages.  The torch twin is
`optimized._checks.cu_seqlens_list` (tensors or lists in, host ints out).
"""
from __future__ import annotations

import numpy as np

__all__ = ["check_cu_seqlens"]


def check_cu_seqlens(cu_seqlens, total: int, who: str, *, nonempty: bool = False) -> np.ndarray:
    """Validate packed-sequence offsets and return them as int64.

    Args:
        cu_seqlens: [N+1] integer array-like, N >= 1.
        total:      T_total, the packed length the offsets must end at.
        who:        the calling op, named at the start of every message.
        nonempty:   True to refuse empty sequences (offsets must rise strictly).
    Returns:
        [N+1] int64 array.
    Raises:
        ValueError naming `who` and "cu_seqlens" when the offsets are not 1-D with at least two entries, not
        integers, do not start at 0, do not end at `total`, or fall (or, with `nonempty`, stay level).
    """
    cu = np.asarray(cu_seqlens)
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"{who}: cu_seqlens must be [N+1] with N >= 1, got shape {cu.shape}")
    if not np.issubdtype(cu.dtype, np.integer):
        raise ValueError(f"{who}: cu_seqlens must be integers, got {cu.dtype}")
    steps = np.diff(cu)
    if cu[0] != 0 or cu[-1] != total or np.any(steps <= 0 if nonempty else steps < 0):
        how = "rise strictly" if nonempty else "rise"
        raise ValueError(f"{who}: cu_seqlens must {how} from 0 to the packed length {total}, got {cu.tolist()}")
    return cu.astype(np.int64)
