"""Slot pools: per-request state kept in place in one persistent tensor per layer, addressed by slot id.

The optimized model keeps the Gated DeltaNet state of every live request in pools (docs/state_cache.md):

    conv_pool  [S, C, K-1]           one row per slot: the last K-1 pre-activation conv inputs
    state_pool [S, H_v, D_k, D_v]    one row per slot: the recurrent state (fp32, pitfall B8)

A request owns one slot (row) for its lifetime.  A decode step names its rows by `slot_ids [B]`: row b of the
batch reads and writes pool row `slot_ids[b]` in place, and `−1` marks a padding row, which outputs zeros and
touches no slot (pitfall B9).  The slots of one call are distinct, so no two rows write the same pool row.

The helpers here are what the torch ops (`optimized.conv.causal_conv1d_update`,
`optimized.gated_delta.fused_recurrent_gated_delta_rule_update`) and their Triton twins share:

    check_slot_ids(who, slot_ids, B)              slot_ids is an integer tensor [B]        (no device sync)
    check_slot_range(who, slot_ids, pool_size)    every id is −1 or in [0, S)              (reads the ids on the host)
    check_slots(who, slot_ids, B, pool_size)      both, plus distinct slots; the ids as host ints (the torch ops)
    slot_runs(ids)                                maximal runs of consecutive rows holding consecutive slots

`slot_runs` is what lets the torch ops update a pool with no gather/scatter copies: each run is one contiguous
view `pool[s0 : s0 + n]` updated in place.  The Triton kernels index the pool per row instead and only check the
range off the GPU (a host read on CUDA would sync, and break graph capture).  Torch only (no triton import).
"""
from __future__ import annotations

import torch

__all__ = ["check_slot_ids", "check_slot_range", "check_slots", "slot_runs"]


def check_slot_ids(who: str, slot_ids: torch.Tensor, B: int) -> None:
    """slot_ids must be a 1-D integer tensor [B] (a shape and dtype check: no device sync)."""
    if slot_ids.dim() != 1 or slot_ids.shape[0] != B or slot_ids.is_floating_point():
        raise ValueError(f"{who}: slot_ids must be an integer tensor [B={B}], got {slot_ids.dtype} "
                         f"{tuple(slot_ids.shape)}")


def _range_error(who: str, bad: list[int], pool_size: int) -> ValueError:
    return ValueError(f"{who}: slot ids must be -1 (padding) or in [0, {pool_size}), got {bad}")


def check_slot_range(who: str, slot_ids: torch.Tensor, pool_size: int) -> None:
    """Every slot id is −1 (padding) or a pool row in [0, pool_size).  Reads the ids on the host."""
    bad = slot_ids[(slot_ids < -1) | (slot_ids >= pool_size)]
    if bad.numel():
        raise _range_error(who, bad.tolist(), pool_size)


def check_slots(who: str, slot_ids: torch.Tensor, B: int, pool_size: int) -> list[int]:
    """All slot checks of a torch op — an integer tensor [B], ids −1 or in [0, pool_size), no slot twice — and the
    ids as host ints (one device sync), ready for `slot_runs`."""
    check_slot_ids(who, slot_ids, B)
    ids = [int(s) for s in slot_ids.tolist()]
    bad = [s for s in ids if s < -1 or s >= pool_size]
    if bad:
        raise _range_error(who, bad, pool_size)
    valid = [s for s in ids if s >= 0]
    if len(set(valid)) != len(valid):
        raise ValueError(f"{who}: a slot appears twice in one batch: {ids}")
    return ids


def slot_runs(slot_ids) -> list[tuple[int, int, int]]:
    """Split slot ids into maximal runs (row0, slot0, length) of consecutive rows holding consecutive slots.

    Args:
        slot_ids: [B] ids (a tensor or host ints); −1 rows (padding) belong to no run.
    Returns:
        runs in row order: rows row0 .. row0 + length − 1 hold slots slot0 .. slot0 + length − 1, so each run is
        processed as one contiguous view of the pool, updated in place with no gather/scatter copies.
    """
    ids = [int(s) for s in (slot_ids.tolist() if hasattr(slot_ids, "tolist") else slot_ids)]
    runs: list[tuple[int, int, int]] = []
    b = 0
    while b < len(ids):
        if ids[b] < 0:
            b += 1
            continue
        e = b + 1
        while e < len(ids) and ids[e] == ids[e - 1] + 1:
            e += 1
        runs.append((b, ids[b], e - b))
        b = e
    return runs
