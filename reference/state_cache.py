"""Per-request state of the Gated DeltaNet layers: one persistent pool per linear layer, claimed by slot.

Qwen3.5 keeps two kinds of per-request memory (docs/state_cache.md):

* every **linear** (Gated DeltaNet) layer: a conv state `[conv_dim, K-1]` (last K-1 pre-activation inputs) and a
  recurrent state `[H_v, D_k, D_v]` (K-major) — fixed size, however long the request;  held here;
* every **full-attention** layer: the K and V of every past token `[T, H_kv, D_h]` — grows with the context;
  held by `reference.attention.KVCache`, beside the attention that reads it.

`GatedDeltaNetStateCache` is the gather/scatter design of MAX's Qwen3.5 pipeline docs.  One persistent pool per
linear layer, `conv [max_batch, conv_dim, K-1]` and `recurrent [max_batch, H_v, D_k, D_v]`, zero-initialised,
and bookkeeping `request_id -> slot`:

    claim(id)                -> slot      idempotent; a fresh slot is zeroed in every layer; PoolFullError if none
    get_states(ids)          -> gather    fresh dense [B, ...] copies of the ids' rows, one pair per linear layer
    update_states(ids, c, r) -> scatter   the model's output rows written back to the ids' slots
    release(id)                           the slot returns to the free list (no-op for an unknown id, as MAX)

At peak a forward step holds the pool, the gathered inputs and the model's outputs: 3 x max_batch x per_req
bytes (`reference.memory`, rule "gather_scatter"); an in-place pool (what `optimized` does) holds 1x.

Every method validates all its arguments before touching any state, so an error never leaves a half-done update.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from reference.config import Qwen35Config
from reference.errors import ConfigError, PoolFullError, StateCacheError, UnknownRequestError
from reference.memory import conv_state_shape, recurrent_state_shape

__all__ = ["StateCacheError", "PoolFullError", "UnknownRequestError", "GatedDeltaNetStateCache"]


def _check_ids(request_ids: Sequence[Hashable], what: str) -> list:
    ids = list(request_ids)
    if not ids:
        raise StateCacheError(f"{what}: empty list of request ids")
    seen = set()
    for rid in ids:
        if rid in seen:
            raise StateCacheError(f"{what}: request {rid!r} appears twice in one batch")
        seen.add(rid)
    return ids


class GatedDeltaNetStateCache:
    """Persistent conv + recurrent state pools for every linear layer, with slot bookkeeping.

    Args:
        config: Qwen35Config (layer map and state geometry).
        max_batch_size: number of slots (requests alive at once).
        dtype: state dtype (the model dtype: float64 in the oracle, float32 on request).

    Attributes:
        conv_pools:      list over linear layers of [max_batch, conv_dim, K-1]
        recurrent_pools: list over linear layers of [max_batch, H_v, D_k, D_v]
        Pools are listed in linear-layer order: `config.linear_layer_index(layer)` gives a layer's position.
    """

    def __init__(self, config: Qwen35Config, max_batch_size: int, dtype=np.float64):
        if not isinstance(max_batch_size, (int, np.integer)) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.config = config
        self.max_batch_size = int(max_batch_size)
        self.dtype = np.dtype(dtype)
        n = config.num_linear_layers
        self.conv_pools = [np.zeros((self.max_batch_size,) + conv_state_shape(config), self.dtype) for _ in range(n)]
        self.recurrent_pools = [np.zeros((self.max_batch_size,) + recurrent_state_shape(config), self.dtype)
                                for _ in range(n)]
        self._free: list[int] = list(range(self.max_batch_size))  # lowest slot handed out first
        self._slots: dict[Hashable, int] = {}

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_layers(self) -> int:
        return len(self.conv_pools)

    @property
    def active_requests(self) -> list:
        return list(self._slots)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def __contains__(self, request_id) -> bool:
        return request_id in self._slots

    def slot_of(self, request_id) -> int:
        if request_id not in self._slots:
            raise UnknownRequestError(f"request {request_id!r} holds no state slot (never claimed, or released)")
        return self._slots[request_id]

    @property
    def bytes_per_slot(self) -> int:
        """Bytes one request occupies in the pools (= reference.memory.state_bytes_per_request)."""
        return sum(p[0].nbytes for p in self.conv_pools) + sum(p[0].nbytes for p in self.recurrent_pools)

    @property
    def nbytes(self) -> int:
        """Bytes of every pool together (= max_batch_size x bytes_per_slot)."""
        return sum(p.nbytes for p in self.conv_pools) + sum(p.nbytes for p in self.recurrent_pools)

    # ------------------------------------------------------------------ lifecycle
    def claim(self, request_id) -> int:
        """The slot of `request_id`, claiming (and zeroing) a free one if it has none.  Idempotent.

        Raises PoolFullError when all max_batch_size slots are taken.
        """
        if request_id in self._slots:
            return self._slots[request_id]  # chunked-prefill continuation / decode: keep the state
        if not self._free:
            raise PoolFullError(
                f"cannot claim a state slot for request {request_id!r}: all {self.max_batch_size} slots are held "
                f"by live requests ({', '.join(map(repr, list(self._slots)[:8]))}"
                f"{', ...' if len(self._slots) > 8 else ''}); release one first or raise max_batch_size")
        slot = self._free.pop(0)
        for pool in self.conv_pools:
            pool[slot] = 0  # a new request starts from zero state (never from a previous owner's)
        for pool in self.recurrent_pools:
            pool[slot] = 0
        self._slots[request_id] = slot
        return slot

    def release(self, request_id) -> bool:
        """Return the request's slot to the free list.  Unknown ids are a no-op (returns False), as in MAX."""
        slot = self._slots.pop(request_id, None)
        if slot is None:
            return False
        self._free.append(slot)
        self._free.sort()
        return True

    def get_states(self, request_ids: Sequence[Hashable]):
        """Gather: dense copies of the requests' rows, in `request_ids` order.

        Returns:
            conv:      list over linear layers of [B, conv_dim, K-1]
            recurrent: list over linear layers of [B, H_v, D_k, D_v]
        """
        ids = _check_ids(request_ids, "get_states")
        slots = np.array([self.slot_of(r) for r in ids], dtype=np.int64)  # [B]
        conv = [pool[slots] for pool in self.conv_pools]  # fancy indexing copies: [B, conv_dim, K-1]
        rec = [pool[slots] for pool in self.recurrent_pools]  # [B, H_v, D_k, D_v]
        return conv, rec

    def update_states(self, request_ids: Sequence[Hashable], conv_states, recurrent_states) -> None:
        """Scatter: write row b of each layer's output states to the slot of request_ids[b].

        Args:
            conv_states:      list over linear layers of [B, conv_dim, K-1]
            recurrent_states: list over linear layers of [B, H_v, D_k, D_v]
        Everything (ids, layer count, shapes) is checked before the first write.
        """
        ids = _check_ids(request_ids, "update_states")
        slots = np.array([self.slot_of(r) for r in ids], dtype=np.int64)
        B = len(ids)
        if len(conv_states) != self.num_layers or len(recurrent_states) != self.num_layers:
            raise StateCacheError(
                f"update_states: expected {self.num_layers} conv and recurrent states (one per linear layer), got "
                f"{len(conv_states)} and {len(recurrent_states)}")
        for i, (c, r) in enumerate(zip(conv_states, recurrent_states, strict=True)):
            want_c = (B,) + self.conv_pools[i].shape[1:]
            want_r = (B,) + self.recurrent_pools[i].shape[1:]
            if np.shape(c) != want_c or np.shape(r) != want_r:
                raise StateCacheError(
                    f"update_states: linear layer {i}: expected conv {want_c} and recurrent {want_r}, got "
                    f"{np.shape(c)} and {np.shape(r)}")
        for i, (c, r) in enumerate(zip(conv_states, recurrent_states, strict=True)):
            self.conv_pools[i][slots] = c
            self.recurrent_pools[i][slots] = r
