"""Gated full attention of Qwen3.5 (every 4th layer; transformers' `Qwen3_5Attention`), with a per-sequence KV cache.

For one sequence of T new tokens x [T, H] after T_past cached tokens:

    P          = x W_qᵀ                           [T, nh·2·hd]
    [q | gate] = P viewed as [T, nh, 2·hd], split in half on the last axis      (per head! pitfall B2)
    q          = RoPE(RMSNorm_q(q)),  k = RoPE(RMSNorm_k(x W_kᵀ)),  v = x W_vᵀ  (norm before RoPE)
    o_i        = Σ_{s ≤ T_past + i} softmax_s( q_i · k_s · hd^-½ ) v_s        (causal, GQA)
    y          = ( o ⊙ σ(gate) ) W_oᵀ                                 (gate after attention, before o_proj)

The q_proj output is laid out per head as [q_h0 | gate_h0 | q_h1 | gate_h1 | …].  Splitting it as
[all q | all gates] runs without error and silently corrupts heads 1..nh−1 (llmman#16, shainet#199; MAX warns
about it too).  GQA: KV head j serves the nh/nkv *consecutive* query heads j·g .. j·g + g − 1 (HF `repeat_kv`).
RMSNorms are the zero-centred `x̂·(1 + w)` kind (pitfall B4); RoPE is partial, interleaved MRoPE
(pitfalls B18/B19).  There is no sliding window, no sink, no bias.

`KVCache` keeps, per live request, one (k, v) pair per full-attention layer (post-norm, post-RoPE), indexed by
`config.kv_cache_index(layer)` (layer 3 -> 0, layer 7 -> 1, ...): the model hands a request's pairs to
`gated_attention` as `past_kv` and stores the past + new pairs it returns.

Computation runs in x's dtype: float64 (the oracle) or float32 (mirrors HF's fp32 eager path: fp32 RoPE tables,
fp32 softmax).  Shape legend: T_total packed tokens, N sequences, H hidden, nh = H_q query heads,
nkv = H_kv KV heads, hd = D_h head dim, R rotary dim.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from reference.config import Qwen35Config
from reference.errors import StateCacheError, UnknownRequestError
from reference.norms import rms_norm, sigmoid
from reference.packing import check_cu_seqlens
from reference.rope import apply_partial_rope, rope_tables, text_position_ids


@dataclass
class AttentionWeights:
    """Weights of one gated full-attention layer (checkpoint names `self_attn.*`, PyTorch [out, in] layout).

    q_proj: [2·nh·hd, H]   rows per head: hd query rows, then hd gate rows (attn_output_gate true)
            [nh·hd, H]     query rows only (attn_output_gate false: no output gate; `config.q_proj_rows`)
    k_proj: [nkv·hd, H]
    v_proj: [nkv·hd, H]
    o_proj: [H, nh·hd]
    q_norm: [hd]           zero-centred RMSNorm weight (1 + w is applied)
    k_norm: [hd]
    """

    q_proj: np.ndarray
    k_proj: np.ndarray
    v_proj: np.ndarray
    o_proj: np.ndarray
    q_norm: np.ndarray
    k_norm: np.ndarray

    def validate(self, config) -> None:
        """Raise ValueError naming the first weight whose shape does not fit `config`."""
        H, nh, nkv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        gated = getattr(config, "attn_output_gate", True)
        expected = {
            "q_proj": ((2 if gated else 1) * nh * hd, H),
            "k_proj": (nkv * hd, H),
            "v_proj": (nkv * hd, H),
            "o_proj": (H, nh * hd),
            "q_norm": (hd,),
            "k_norm": (hd,),
        }
        for name, shape in expected.items():
            got = np.shape(getattr(self, name))
            if got != shape:
                hint = ("" if name != "q_proj" else " (q_proj holds q AND gate: 2·nh·hd rows)" if gated
                        else " (attn_output_gate is false: q_proj holds q only, nh·hd rows, no gate rows)")
                raise ValueError(f"AttentionWeights.{name} has shape {got}, expected {shape}{hint}")

    def without_gate(self, config) -> AttentionWeights:
        """The same layer with its gate rows dropped: q_proj [2·nh·hd, H] → [nh·hd, H] (the per-head query
        rows), for a config with attn_output_gate false.  Other arrays are shared, not copied."""
        nh, hd = config.num_attention_heads, config.head_dim
        q = np.asarray(self.q_proj).reshape(nh, 2, hd, -1)[:, 0]  # [nh, hd, H]  rows per head: q, then gate
        return AttentionWeights(**{**self.__dict__, "q_proj": q.reshape(nh * hd, -1)})

    @classmethod
    def random(cls, config, seed: int = 0, *, std: float = 0.2, norm_std: float = 0.1) -> AttentionWeights:
        """Random float64 weights of the right shapes (tests, notebooks)."""
        rng = np.random.default_rng(seed)
        H, nh, nkv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        gated = getattr(config, "attn_output_gate", True)
        return cls(
            q_proj=rng.standard_normal(((2 if gated else 1) * nh * hd, H)) * std,
            k_proj=rng.standard_normal((nkv * hd, H)) * std,
            v_proj=rng.standard_normal((nkv * hd, H)) * std,
            o_proj=rng.standard_normal((H, nh * hd)) * std,
            q_norm=rng.standard_normal(hd) * norm_std,
            k_norm=rng.standard_normal(hd) * norm_std,
        )


def split_q_gate(p: np.ndarray, num_heads: int, head_dim: int, *, gated: bool = True):
    """Split the q_proj output per head into query and gate (pitfall B2).

        gated:      P [T, nh·2·hd] → view [T, nh, 2·hd] → q = [..., :hd], gate = [..., hd:]
        not gated:  P [T, nh·hd]   → q = view [T, nh, hd], gate = None   (attn_output_gate false)

    Returns:
        q: [T, nh, hd];  gate: [T, nh, hd] (flattened to [T, nh·hd] by the caller where needed) or None.
    """
    T = p.shape[0]
    width = (2 if gated else 1) * num_heads * head_dim
    if p.shape[1] != width:
        raise ValueError(f"q_proj output has width {p.shape[1]}, expected {'2·' if gated else ''}nh·hd = {width}")
    if not gated:
        return p.reshape(T, num_heads, head_dim), None
    p = p.reshape(T, num_heads, 2 * head_dim)  # [T, nh, 2·hd]  per-head [q | gate]
    return p[..., :head_dim], p[..., head_dim:]


def repeat_kv(x: np.ndarray, num_groups: int) -> np.ndarray:
    """[S, nkv, hd] → [S, nkv·g, hd] with KV head j copied to query heads j·g .. j·g + g − 1 (HF repeat_kv)."""
    return np.repeat(x, num_groups, axis=1)


def softmax(s: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in s's dtype (causal rows always see >= 1 key, so no row is all −inf)."""
    m = np.max(s, axis=axis, keepdims=True)
    e = np.exp(s - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float, q_offset: int = 0) -> np.ndarray:
    """Causal softmax attention of one sequence with GQA.

        o_i = Σ_{s ≤ q_offset + i} softmax_s(scale · q_i · k_s) v_s

    Query i sits at absolute index q_offset + i (q_offset = number of cached tokens), so it sees every cached key
    and the new keys up to itself.

    Args:
        q: [T, nh, hd];  k, v: [S, nkv, hd] with S = q_offset + T.
    Returns:
        o: [T, nh, hd].
    """
    T, nh, hd = q.shape
    S, nkv, _ = k.shape
    if S != q_offset + T:
        raise ValueError(f"keys cover {S} positions but q_offset + T = {q_offset + T}")
    g = nh // nkv
    kk = repeat_kv(k, g)  # [S, nh, hd]
    vv = repeat_kv(v, g)  # [S, nh, hd]
    scores = np.einsum("thd,shd->hts", q, kk) * q.dtype.type(scale)  # [nh, T, S]
    allowed = np.arange(S)[None, :] <= (q_offset + np.arange(T))[:, None]  # [T, S]
    scores = np.where(allowed[None], scores, -np.inf)  # masked keys get exactly zero weight
    probs = softmax(scores, axis=-1)  # [nh, T, S]
    return np.einsum("hts,shd->thd", probs, vv)  # [T, nh, hd]


def gated_attention(x, w: AttentionWeights, config, *, position_ids=None, cu_seqlens=None, past_kv=None,
                    dtype=None):
    """Gated full attention over a ragged batch, with a KV cache.

    Per sequence n (tokens cu_seqlens[n] .. cu_seqlens[n+1]−1, T_past_n cached tokens):

        P = x W_qᵀ → [T, nh, 2·hd] → q, gate (per-head halves)
        q = RoPE(rms_norm(q, q_norm)),  k = RoPE(rms_norm(x W_kᵀ, k_norm)),  v = x W_vᵀ
        K = [K_past ; k],  V = [V_past ; v]
        o = causal_attention(q, K, V, scale = config.attention_scale, q_offset = T_past_n)
        y = (o.reshape(T, nh·hd) ⊙ σ(gate)) W_oᵀ

    Args:
        x: [T_total, H] float32 or float64 (the compute dtype; weights are cast to it).
        w: AttentionWeights.
        config: Qwen35Config (hidden_size, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps,
            rope_theta, rope_scaling, max_position_embeddings, rotary_dim, mrope_section, mrope_interleaved,
            attention_scale, attn_output_gate).
        position_ids: [3, T_total] integer (t, h, w) MRoPE positions of the new tokens, or [T_total].
            None: text positions T_past_n + arange(T_n) per sequence (rope_delta 0).
        cu_seqlens: [N+1] packed-sequence offsets; None = one sequence.
        past_kv: None, or a list of N pairs (k [T_past, nkv, hd], v [T_past, nkv, hd]), post-norm post-RoPE.
        dtype: compute dtype (np.float32 or np.float64); None = x's dtype if float32/float64, else float64.
    Returns:
        y: [T_total, H];  new_kv: list of N pairs (k [T_past + T_n, nkv, hd], v [...]) — the full cache.
    """
    x = np.asarray(x)
    if dtype is None:
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    x = x.astype(dt, copy=False)
    H, nh, nkv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if x.ndim != 2 or x.shape[1] != H:
        raise ValueError(f"x must be [T_total, H={H}], got shape {x.shape}")
    if nh % nkv:
        raise ValueError(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
    w.validate(config)
    gated = bool(getattr(config, "attn_output_gate", True))  # q_proj carries gate rows only when gated
    T_total = x.shape[0]
    cu = (np.array([0, T_total], dtype=np.int64) if cu_seqlens is None
          else check_cu_seqlens(cu_seqlens, T_total, "gated_attention"))
    N = cu.shape[0] - 1
    if past_kv is None:
        past_kv = [None] * N
    if len(past_kv) != N:
        raise ValueError(f"past_kv has {len(past_kv)} entries but cu_seqlens describes {N} sequences")
    past = []
    for n, entry in enumerate(past_kv):
        if entry is None:
            past.append((np.zeros((0, nkv, hd), dt), np.zeros((0, nkv, hd), dt)))
            continue
        k_p, v_p = (np.asarray(a) for a in entry)
        if k_p.ndim != 3 or k_p.shape[1:] != (nkv, hd) or v_p.shape != k_p.shape:
            raise ValueError(
                f"past_kv[{n}] must be (k, v) of shape [T_past, nkv={nkv}, hd={hd}], got {k_p.shape}, {v_p.shape}")
        past.append((k_p.astype(dt, copy=False), v_p.astype(dt, copy=False)))
    if position_ids is None:
        pos = np.concatenate(
            [text_position_ids(int(cu[n + 1] - cu[n]), start=past[n][0].shape[0]) for n in range(N)], axis=1)
    else:
        pos = np.asarray(position_ids)
        if pos.ndim == 1:
            pos = np.broadcast_to(pos, (3, pos.shape[0]))
        if pos.shape != (3, T_total):
            raise ValueError(f"position_ids must be [3, T_total={T_total}], got shape {pos.shape}")

    Wq, Wk, Wv, Wo = (np.asarray(a, dtype=dt) for a in (w.q_proj, w.k_proj, w.v_proj, w.o_proj))
    eps = config.rms_norm_eps

    # One sequence at a time, every op on that sequence's rows only: a packed batch is then bitwise equal to a
    # loop over sequences, whatever BLAS does with the row count (pitfall B12/B13).
    y = np.empty((T_total, H), dtype=dt)
    new_kv = []
    for n in range(N):
        s, e = int(cu[n]), int(cu[n + 1])
        T = e - s
        xs = x[s:e]  # [T, H]
        if T == 0:  # an empty chunk leaves the cache as it was
            new_kv.append(past[n])
            continue

        # q_proj output split per head into [q | gate] (pitfall B2).
        q, gate = split_q_gate(xs @ Wq.T, nh, hd, gated=gated)  # [T, nh, hd] each (gate None if not gated)
        k = (xs @ Wk.T).reshape(T, nkv, hd)  # [T, nkv, hd]
        v = (xs @ Wv.T).reshape(T, nkv, hd)  # [T, nkv, hd]

        # q/k norm over hd, per head, BEFORE RoPE (zero-centred weight, pitfall B4).
        q = rms_norm(q, w.q_norm, eps, dtype=dt)  # [T, nh, hd]
        k = rms_norm(k, w.k_norm, eps, dtype=dt)  # [T, nkv, hd]

        # Partial interleaved MRoPE on the first R channels; tables in the compute dtype, as HF.
        # RoPE scaling per request: `dynamic` uses this chunk's max position + 1 (docs/rope_and_mrope.md).
        cos, sin = rope_tables(pos[:, s:e], config, dtype=dt)  # [T, R]
        q = apply_partial_rope(q, cos, sin)  # [T, nh, hd]
        k = apply_partial_rope(k, cos, sin)  # [T, nkv, hd]

        k_past, v_past = past[n]
        k_all = np.concatenate([k_past, k], axis=0)  # [T_past + T, nkv, hd]
        v_all = np.concatenate([v_past, v], axis=0)  # [T_past + T, nkv, hd]
        o = causal_attention(q, k_all, v_all, scale=config.attention_scale, q_offset=k_past.shape[0])  # [T, nh, hd]
        new_kv.append((k_all, v_all))

        o = o.reshape(T, nh * hd)  # [T, nh·hd]  channel c of head h at h·hd + c
        if gated:
            # Output gate after attention, before o_proj; gate flattened the same way as o.
            o = o * sigmoid(gate.reshape(T, nh * hd), dtype=dt)
        y[s:e] = o @ Wo.T  # [T, H]
    return y, new_kv


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
        for entry, (k, v) in zip(entries, kv, strict=True):
            entry[idx] = (np.asarray(k, self.dtype), np.asarray(v, self.dtype))

    def nbytes(self, request_id) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._entry(request_id))
