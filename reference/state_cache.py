"""Per-request caches of the hybrid model: Gated DeltaNet state pools and the full-attention KV cache.

Qwen3.5 keeps two kinds of per-request memory (docs/state_cache.md):

* every **linear** (Gated DeltaNet) layer: a conv state `[conv_dim, K-1]` (last K-1 pre-activation inputs) and a
  recurrent state `[H_v, D_k, D_v]` (K-major) — fixed size, however long the request;
* every **full-attention** layer: the K and V of every past token `[T, H_kv, D_h]` — grows with the context.

`GatedDeltaNetStateCache` is the gather/scatter design of MAX's Qwen3.5 pipeline docs.  One persistent pool per
linear layer, `conv [max_batch, conv_dim, K-1]` and `recurrent [max_batch, H_v, D_k, D_v]`, zero-initialised,
and bookkeeping `request_id -> slot`:

    claim(id)                -> slot      idempotent; a fresh slot is zeroed in every layer; PoolFullError if none
    get_states(ids)          -> gather    fresh dense [B, ...] copies of the ids' rows, one pair per linear layer
    update_states(ids, c, r) -> scatter   the model's output rows written back to the ids' slots
    release(id)                           the slot returns to the free list (no-op for an unknown id, as MAX)

At peak a forward step holds the pool, the gathered inputs and the model's outputs: 3 x max_batch x per_req
bytes (`reference.memory`, rule "gather_scatter"); an in-place pool (what `optimized` does) holds 1x.

`KVCache` holds the full-attention layers' K/V per request, indexed by `config.kv_cache_index(layer)` (layer 3 ->
0, layer 7 -> 1, ...): only full layers have an entry.

Every method validates all its arguments before touching any state, so an error never leaves a half-done update.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np

from reference.config import Qwen35Config
from reference.errors import ConfigError, PoolFullError, StateCacheError, UnknownRequestError
from reference.memory import conv_state_shape, recurrent_state_shape

__all__ = ["StateCacheError", "PoolFullError", "UnknownRequestError", "GatedDeltaNetStateCache", "KVCache"]


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
        for i, (c, r) in enumerate(zip(conv_states, recurrent_states)):
            want_c = (B,) + self.conv_pools[i].shape[1:]
            want_r = (B,) + self.recurrent_pools[i].shape[1:]
            if np.shape(c) != want_c or np.shape(r) != want_r:
                raise StateCacheError(
                    f"update_states: linear layer {i}: expected conv {want_c} and recurrent {want_r}, got "
                    f"{np.shape(c)} and {np.shape(r)}")
        for i, (c, r) in enumerate(zip(conv_states, recurrent_states)):
            self.conv_pools[i][slots] = c
            self.recurrent_pools[i][slots] = r


class KVCache:
    """K and V of every past token of every live request, for the full-attention layers only.

    Per request: a list with one (k [T, H_kv, D_h], v [T, H_kv, D_h]) pair per full layer, in KV-index order;
    `config.kv_cache_index(layer)` maps a decoder layer to its entry.  K is stored post-norm, post-RoPE.
    """

    def __init__(self, config: Qwen35Config, dtype=np.float64):
        self.config = config
        self.dtype = np.dtype(dtype)
        self._kv: dict[Hashable, list[tuple[np.ndarray, np.ndarray]]] = {}

    @property
    def num_layers(self) -> int:
        return self.config.num_full_layers

    def __contains__(self, request_id) -> bool:
        return request_id in self._kv

    @property
    def active_requests(self) -> list:
        return list(self._kv)

    def claim(self, request_id) -> None:
        """Start an empty cache for a new request (idempotent)."""
        if request_id not in self._kv:
            shape = (0, self.config.num_key_value_heads, self.config.head_dim)
            self._kv[request_id] = [(np.zeros(shape, self.dtype), np.zeros(shape, self.dtype))
                                    for _ in range(self.num_layers)]

    def release(self, request_id) -> bool:
        return self._kv.pop(request_id, None) is not None

    def _entry(self, request_id):
        if request_id not in self._kv:
            raise UnknownRequestError(f"request {request_id!r} has no KV cache (never claimed, or released)")
        return self._kv[request_id]

    def seq_len(self, request_id) -> int:
        """Tokens cached for the request (the same in every full layer)."""
        entry = self._entry(request_id)
        return int(entry[0][0].shape[0]) if entry else 0

    def get(self, request_ids: Sequence[Hashable], layer: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (k, v) pairs of decoder layer `layer` (a full-attention layer) for each request, in order."""
        idx = self.config.kv_cache_index(layer)
        return [self._entry(r)[idx] for r in request_ids]

    def set(self, request_ids: Sequence[Hashable], layer: int, kv: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """Replace the (k, v) pairs of decoder layer `layer` for each request (the attention returns past + new)."""
        idx = self.config.kv_cache_index(layer)
        entries = [self._entry(r) for r in request_ids]
        if len(kv) != len(entries):
            raise StateCacheError(f"KVCache.set: {len(kv)} (k, v) pairs for {len(entries)} requests")
        for entry, (k, v) in zip(entries, kv):
            entry[idx] = (np.asarray(k, self.dtype), np.asarray(v, self.dtype))

    def nbytes(self, request_id) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._entry(request_id))
