"""Tensor and data parallelism for Qwen3.5: the sharding plan, on NumPy weights (docs/parallel.md).

    check_tensor_parallel(config, tp)        ConfigError naming the sizes when tp does not divide the heads
    local_config(config, tp)                 the geometry one rank computes with (its heads, its MLP columns)
    shard_index(config, name, tp, rank)      which rows / columns of checkpoint tensor `name` rank `rank` holds
    shard_weights(weights, tp, rank)         a ModelWeights holding only that rank's shard
    TensorParallelSimulation(weights, tensor_parallel=tp)
                                             the ranks in one process: a Qwen35Model that runs every layer once
                                             per rank and sums where an all-reduce would (the oracle)

The plan, for `tp` ranks (rank r of tp; every split is a contiguous block, so rank r's part of a size-n axis
is [r·n/tp, (r+1)·n/tp)):

* Gated attention (full layers): split by KV-head groups.  Rank r holds KV heads [r·nkv/tp, (r+1)·nkv/tp) and
  the query heads that read them (query head i reads KV head i // (nh/nkv), so they are also a contiguous
  block).  When tp is a multiple of nkv (more ranks than KV heads: 27B has 4 KV heads, TP=8), each rank holds
  nh/tp query heads and a copy of the one KV head they read, shared by tp/nkv consecutive ranks
  (`kv_head_range`).  `q_proj` rows come per head as [q_h | gate_h] (2·hd rows each; hd without the output
  gate), so a head block is a contiguous row block; `k_proj` / `v_proj` rows by KV head; `o_proj` columns by query head.
  q_norm / k_norm (one [hd] weight shared by the heads) are replicated.
* Gated DeltaNet (linear layers): split by key-head groups with their value heads (value head j reads key head
  j // (H_v/H_k)).  `in_proj_qkv` and the conv channels hold three blocks [Q | K | V]; rank r takes its key
  heads' rows of the Q block and of the K block and its value heads' rows of the V block.  `in_proj_z` rows,
  `in_proj_b` / `in_proj_a` rows, `A_log` and `dt_bias` by value head; `out_proj` columns by value head.  The
  gated RMSNorm normalises each value head over D_v with one shared [D_v] weight: replicated.
* SwiGLU MLP: `gate_proj` / `up_proj` rows (column-parallel), `down_proj` columns (row-parallel).
* Sparse MoE: experts [r·E/tp, (r+1)·E/tp) whole; the router is replicated (every rank routes every token and
  keeps the assignments to its experts); the shared expert is split like a SwiGLU MLP, its scalar gate
  replicated.
* Vocabulary-parallel embedding and lm_head: rank r holds vocabulary rows [⌊r·V/tp⌋, ⌊(r+1)·V/tp⌋) (V need not
  divide: the blocks differ by at most one row).  The embedding of a token outside the block is zero; the
  logits are the ranks' blocks side by side.  Tied embeddings share one block.
* Everything else — the residual stream, every RMSNorm weight, the vision tower — is replicated.

Communication: one sum over ranks (an all-reduce) of every partial block output — the token mixer's output
projection and the MLP's down projection — plus one for the embedding, and one gather of the logits.  Each
rank's state holds only its heads: the conv state has its conv channels, the recurrent state its value heads,
the KV cache its KV heads.  A `tp` that does not divide the heads is a ConfigError naming the sizes.

`TensorParallelSimulation` subclasses reference.model.Qwen35Model, so this module imports the model; the modules
the model is built on (reference.weights, reference.memory) import this one inside the functions that need it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reference.attention import gated_attention
from reference.config import LINEAR, Qwen35Config
from reference.deltanet import gated_deltanet
from reference.errors import ConfigError
from reference.mlp import MLPWeights, sparse_moe_block, swiglu_mlp
from reference.model import Qwen35Model, _model_dtype
from reference.norms import rms_norm
from reference.weights import ModelWeights, load_weights

__all__ = ["check_tensor_parallel", "local_config", "kv_head_range", "vocab_range", "expert_range", "block",
           "conv_state_channels", "shard_index", "TensorShard", "shard_weights", "layer_tensor_names",
           "check_data_parallel", "assign_replicas", "data_parallel_splits", "TensorParallelSimulation"]


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def check_tensor_parallel(config: Qwen35Config, tp: int) -> None:
    """Refuse (ConfigError naming every size that does not divide) a tensor-parallel degree the plan cannot use.

    Needed: tp divides num_attention_heads and either divides num_key_value_heads or is a multiple of it (then
    each KV head is copied to tp/nkv ranks: `kv_head_range`), linear_num_key_heads (Gated DeltaNet; the value
    heads follow), intermediate_size (dense MLP) or num_experts and shared_expert_intermediate_size (MoE).  The
    vocabulary need not divide.  Only sizes of layers the model has are checked."""
    tp = _positive_int("tensor_parallel", tp)
    sizes = []  # (name, size) that tp must divide
    if config.num_full_layers:
        sizes.append(("num_attention_heads", config.num_attention_heads))
        if tp % config.num_key_value_heads:  # not the copied-KV-head case: whole KV heads per rank
            sizes.append(("num_key_value_heads", config.num_key_value_heads))
    if config.num_linear_layers:
        sizes.append(("linear_num_key_heads", config.linear_num_key_heads))
    if config.is_moe:
        sizes += [("num_experts", config.num_experts),
                  ("shared_expert_intermediate_size", config.shared_expert_intermediate_size)]
    else:
        sizes.append(("intermediate_size", config.intermediate_size))
    bad = [f"{name}={n}" for name, n in sizes if n % tp]
    if bad:
        raise ConfigError(f"tensor_parallel={tp} does not divide {', '.join(bad)}: every rank must hold whole heads "
                          f"(or, for the KV heads, a copy of one: tp a multiple of num_key_value_heads) and an "
                          f"equal share of the MLP; use a tensor_parallel that divides "
                          f"{', '.join(name for name, n in sizes if n % tp)}")


def local_config(config: Qwen35Config, tp: int) -> Qwen35Config:
    """The geometry one of `tp` ranks computes with: its share of the attention heads, the Gated DeltaNet key
    and value heads, the MLP's intermediate size (dense) or the shared expert's (MoE).  The vocabulary, the
    hidden size and `num_experts` (the router still scores every expert) are unchanged."""
    check_tensor_parallel(config, tp)
    changes = dict(num_attention_heads=config.num_attention_heads // tp,
                   num_key_value_heads=max(config.num_key_value_heads // tp, 1),  # one (copied) head when tp > nkv
                   linear_num_key_heads=config.linear_num_key_heads // tp,
                   linear_num_value_heads=config.linear_num_value_heads // tp)
    if config.is_moe:
        changes["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size // tp
    else:
        changes["intermediate_size"] = config.intermediate_size // tp
    return config.replace(**changes)


def block(n: int, tp: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous block [start, stop) of n items split over tp ranks: [⌊r·n/tp⌋, ⌊(r+1)·n/tp⌋)."""
    if not 0 <= rank < tp:
        raise ConfigError(f"rank {rank!r} is out of range 0..{tp - 1} for tensor_parallel={tp}")
    return rank * n // tp, (rank + 1) * n // tp


def kv_head_range(config: Qwen35Config, tp: int, rank: int) -> tuple[int, int]:
    """The KV heads [start, stop) rank `rank` holds: a block of nkv/tp heads when tp divides nkv; when tp is a
    multiple of nkv, the one KV head its query heads read (query head i reads KV head i // (nh/nkv)), which
    tp/nkv consecutive ranks hold a copy of."""
    check_tensor_parallel(config, tp)
    nkv = config.num_key_value_heads
    if nkv % tp == 0:
        return block(nkv, tp, rank)
    block(1, tp, rank)  # the rank is in range
    head = rank // (tp // nkv)
    return head, head + 1


def vocab_range(config: Qwen35Config, tp: int, rank: int) -> tuple[int, int]:
    """The vocabulary rows [start, stop) of the embedding and lm_head that rank `rank` holds."""
    return block(config.vocab_size, tp, rank)


def expert_range(config: Qwen35Config, tp: int, rank: int) -> tuple[int, int]:
    """The experts [start, stop) of a MoE model that rank `rank` holds (whole experts)."""
    check_tensor_parallel(config, tp)
    return block(config.num_experts, tp, rank)


def _rows(start: int, stop: int, width: int) -> np.ndarray:
    """Row indices of items [start, stop), each `width` rows long."""
    return np.arange(start * width, stop * width, dtype=np.int64)


def conv_state_channels(config: Qwen35Config, tp: int, rank: int) -> np.ndarray:
    """The channels of the Gated DeltaNet conv (rows of `in_proj_qkv` and `conv1d`, channels of the conv state)
    that rank `rank` of `tp` holds, sorted: its key heads' rows of the Q block and of the K block, then its value
    heads' rows of the V block — three pieces, not one contiguous block.  [conv_dim / tp] int64."""
    check_tensor_parallel(config, tp)
    c = config
    k0, k1 = block(c.linear_num_key_heads, tp, rank)
    v0, v1 = block(c.linear_num_value_heads, tp, rank)
    Dk, kd = c.linear_key_head_dim, c.key_dim
    return np.concatenate([_rows(k0, k1, Dk), kd + _rows(k0, k1, Dk), 2 * kd + _rows(v0, v1, c.linear_value_head_dim)])


_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def shard_index(config: Qwen35Config, name: str, tp: int, rank: int) -> tuple[int, np.ndarray] | None:
    """Which part of language-model tensor `name` rank `rank` of `tp` holds: (axis, indices along that axis), or
    None when the tensor is replicated.

    `name` is a checkpoint name with the LM prefix stripped (`embed_tokens.weight`, `lm_head.weight`,
    `layers.3.self_attn.q_proj.weight`, `layers.0.linear_attn.A_log`, `layers.1.mlp.experts.gate_up_proj`, ...).
    Indices are sorted; taking them along `axis` gives the shard.  Unknown names are a ValueError."""
    check_tensor_parallel(config, tp)
    c = config
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return 0, np.arange(*vocab_range(c, tp, rank), dtype=np.int64)
    if name == "norm.weight":
        return None
    m = _LAYER.match(name)
    if m is None:
        raise ValueError(f"shard_index: {name!r} is not a Qwen3.5 language-model tensor name")
    part = m.group(2)
    if part in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return None
    if part.startswith("linear_attn."):
        v0, v1 = block(c.linear_num_value_heads, tp, rank)
        v_rows = _rows(v0, v1, c.linear_value_head_dim)
        what = part[len("linear_attn."):]
        if what in ("in_proj_qkv.weight", "conv1d.weight"):  # [Q | K | V] blocks of rows / conv channels
            return 0, conv_state_channels(c, tp, rank)
        if what == "in_proj_z.weight":
            return 0, v_rows
        if what in ("in_proj_b.weight", "in_proj_a.weight", "A_log", "dt_bias"):
            return 0, np.arange(v0, v1, dtype=np.int64)
        if what == "out_proj.weight":
            return 1, v_rows
        if what == "norm.weight":
            return None
    elif part.startswith("self_attn."):
        q0, q1 = block(c.num_attention_heads, tp, rank)
        g0, g1 = kv_head_range(c, tp, rank)
        hd = c.head_dim
        what = part[len("self_attn."):]
        if what == "q_proj.weight":
            return 0, _rows(q0, q1, c.q_proj_rows // c.num_attention_heads)  # [q_h | gate_h] per head
        if what in ("k_proj.weight", "v_proj.weight"):
            return 0, _rows(g0, g1, hd)
        if what == "o_proj.weight":
            return 1, _rows(q0, q1, hd)
        if what in ("q_norm.weight", "k_norm.weight"):
            return None
    elif part.startswith("mlp."):
        what = part[len("mlp."):]
        if c.is_moe:
            if what in ("gate.weight", "shared_expert_gate.weight"):
                return None
            if what in ("experts.gate_up_proj", "experts.down_proj"):
                return 0, np.arange(*expert_range(c, tp, rank), dtype=np.int64)
            i0, i1 = block(c.shared_expert_intermediate_size, tp, rank)
            if what in ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"):
                return 0, np.arange(i0, i1, dtype=np.int64)
            if what == "shared_expert.down_proj.weight":
                return 1, np.arange(i0, i1, dtype=np.int64)
        else:
            i0, i1 = block(c.intermediate_size, tp, rank)
            if what in ("gate_proj.weight", "up_proj.weight"):
                return 0, np.arange(i0, i1, dtype=np.int64)
            if what == "down_proj.weight":
                return 1, np.arange(i0, i1, dtype=np.int64)
    raise ValueError(f"shard_index: {name!r} is not a Qwen3.5 language-model tensor name")


@dataclass(frozen=True)
class TensorShard:
    """Which tensor-parallel rank a set of weights belongs to: rank `rank` of `tensor_parallel`, for `config`
    (the whole model's).  `local` is the geometry the rank computes with; `vocab` and `experts` its blocks."""

    config: Qwen35Config
    tensor_parallel: int
    rank: int

    def __post_init__(self):
        check_tensor_parallel(self.config, self.tensor_parallel)
        block(1, self.tensor_parallel, self.rank)  # the rank is in range

    @property
    def local(self) -> Qwen35Config:
        return local_config(self.config, self.tensor_parallel)

    @property
    def vocab(self) -> tuple[int, int]:
        return vocab_range(self.config, self.tensor_parallel, self.rank)

    @property
    def experts(self) -> tuple[int, int] | None:
        return expert_range(self.config, self.tensor_parallel, self.rank) if self.config.is_moe else None


# field of the reference weight dataclasses -> checkpoint name (after `layers.{i}.`)
_MIXER_NAMES = {
    LINEAR: {"in_proj_qkv": "linear_attn.in_proj_qkv.weight", "in_proj_z": "linear_attn.in_proj_z.weight",
             "in_proj_b": "linear_attn.in_proj_b.weight", "in_proj_a": "linear_attn.in_proj_a.weight",
             "conv1d": "linear_attn.conv1d.weight", "dt_bias": "linear_attn.dt_bias", "A_log": "linear_attn.A_log",
             "norm": "linear_attn.norm.weight", "out_proj": "linear_attn.out_proj.weight"},
    "full_attention": {n: f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm",
                                                            "k_norm")},
}
_DENSE_NAMES = {n: f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
_MOE_NAMES = {"gate": "mlp.gate.weight", "gate_up_proj": "mlp.experts.gate_up_proj",
              "down_proj": "mlp.experts.down_proj", "shared_gate_proj": "mlp.shared_expert.gate_proj.weight",
              "shared_up_proj": "mlp.shared_expert.up_proj.weight",
              "shared_down_proj": "mlp.shared_expert.down_proj.weight",
              "shared_expert_gate": "mlp.shared_expert_gate.weight"}


def layer_tensor_names(config: Qwen35Config, layer_type: str) -> tuple[dict, dict]:
    """(mixer field -> name, MLP field -> name) of one layer: the reference weight dataclasses' field names and
    the checkpoint names after `layers.{i}.`."""
    return _MIXER_NAMES[layer_type], (_MOE_NAMES if config.is_moe else _DENSE_NAMES)


def _take(a, spec):
    if spec is None:
        return a
    axis, idx = spec
    return np.ascontiguousarray(np.take(a, idx, axis=axis))


def shard_weights(weights, tp: int, rank: int):
    """The part of a whole model's `reference.weights.ModelWeights` that rank `rank` of `tp` holds (a new
    ModelWeights of copies; `shard` set to its TensorShard; the vision tensors replicated)."""
    c = weights.config
    shard = TensorShard(c, tp, rank)

    def take(name, a):
        return _take(np.asarray(a), shard_index(c, name, tp, rank))

    layers = []
    for i, lw in enumerate(weights.layers):
        mixer_names, mlp_names = layer_tensor_names(c, lw.layer_type)
        p = f"layers.{i}."
        mixer = dataclasses.replace(lw.mixer, **{f: take(p + n, getattr(lw.mixer, f)) for f, n in mixer_names.items()})
        mlp = dataclasses.replace(lw.mlp, **{f: take(p + n, getattr(lw.mlp, f)) for f, n in mlp_names.items()})
        layers.append(dataclasses.replace(lw, mixer=mixer, mlp=mlp))
    embed = take("embed_tokens.weight", weights.embed_tokens)
    lm_head = embed if weights.lm_head is weights.embed_tokens else take("lm_head.weight", weights.lm_head)
    return dataclasses.replace(weights, embed_tokens=embed, lm_head=lm_head, layers=layers, shard=shard,
                               visual=dict(weights.visual))


# ------------------------------------------------------------------ data parallelism
def check_data_parallel(dp: int) -> int:
    """dp, the number of model replicas, as a positive int (ConfigError otherwise)."""
    return _positive_int("data_parallel", dp)


def assign_replicas(free_slots, n: int) -> list[int]:
    """The replica of each of `n` new requests, in order: each goes to the replica with the most free state slots
    at that moment (the lowest index on a tie), so a batch is spread evenly and no replica is given more requests
    than it has slots (the caller checks first that the total number of free slots is enough)."""
    free = [int(f) for f in free_slots]
    out = []
    for _ in range(n):
        d = max(range(len(free)), key=lambda i: (free[i], -i))
        out.append(d)
        free[d] -= 1
    return out


def data_parallel_splits(replica_of_row, dp: int) -> list[list[int]]:
    """The documented `data_parallel_splits` of a ragged batch: for each of the `dp` replicas, the batch rows
    (requests, in batch order) it runs.  Replica d computes rows splits[d] with its own state pool; the logits
    of all replicas are put back in batch order."""
    splits: list[list[int]] = [[] for _ in range(dp)]
    for b, d in enumerate(replica_of_row):
        splits[int(d)].append(b)
    return splits


# ------------------------------------------------------------------ the ranks in one process (the oracle)
def _all_reduce(parts: list[np.ndarray]) -> np.ndarray:
    """The sum over ranks of their partial results, in rank order: what an all-reduce hands every rank."""
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


def _kv_heads(entries, g0: int, g1: int):
    """Copies of KV heads [g0, g1) of a layer's past_kv (None, or per request None / (k, v) [T, nkv, hd])."""
    if entries is None:
        return None
    return [None if e is None else (e[0][:, g0:g1].copy(), e[1][:, g0:g1].copy()) for e in entries]


class TensorParallelSimulation(Qwen35Model):
    """Tensor parallelism with the ranks in one process: the oracle of a tensor-parallel engine (docs/parallel.md).

    Built from a whole model's ModelWeights (float64 or float32) and `tensor_parallel=tp`, it cuts them with
    `shard_weights` into tp rank weights (`rank_weights[r]`) and runs every layer once per rank, on that rank's
    weights and in its `local_config` geometry, with the unchanged reference layer functions (gated_deltanet,
    gated_attention, swiglu_mlp, sparse_moe_block(experts=...)).  Where a real engine all-reduces, the ranks'
    partial outputs are summed: after the vocabulary-parallel embedding, after each token mixer's output
    projection and after each MLP's down projection.  The logits are the ranks' vocabulary blocks side by side
    (the gather).  Everything between two sums — the residual stream, the norms — is replicated: every rank
    holds the same x.

    State layout.  The state cache and the KV cache keep the *whole* model's layout (they are the ones the
    unsharded Qwen35Model builds), so the whole pipeline API works unchanged: prepare_initial_token_inputs /
    execute / prepare_next_token_inputs / release / snapshot / restore / generate / logits, chunked prefill, and
    image prompts through the replicated vision tower.  `forward` cuts each rank's part out of the gathered
    states with the plan's indices — the conv state's channels are `conv_state_channels` (the same rows as the
    conv1d weight's shard), the recurrent state's are the rank's value heads, the K/V's its KV heads — and puts
    the ranks' new states back in the same places.  What rank r of a real engine stores is exactly its cut
    (`rank_states`): 1/tp of every state, in the local geometry.

    Args:
        weights: the whole model's ModelWeights (not a shard).
        tensor_parallel: tp, the number of ranks; must divide the heads and the MLP (check_tensor_parallel).
        **kwargs: Qwen35Model's (max_batch_size, dtype, return_logits, return_hidden_states, max_length).
    """

    def __init__(self, weights: ModelWeights, *, tensor_parallel: int, **kwargs):
        if weights.shard is not None:
            raise ConfigError(f"TensorParallelSimulation needs a whole model's weights, got the weights of rank "
                              f"{weights.shard.rank} of tensor_parallel={weights.shard.tensor_parallel}")
        super().__init__(weights, **kwargs)
        tp = _positive_int("tensor_parallel", tensor_parallel)
        self.tensor_parallel = tp
        self.local = local_config(self.config, tp)  # every rank's geometry (raises for a tp that does not divide)
        self.rank_weights = [shard_weights(weights, tp, r) for r in range(tp)]
        self._channels = [conv_state_channels(self.config, tp, r) for r in range(tp)]  # each rank's conv channels

    @classmethod
    def from_pretrained(cls, path, *, tensor_parallel: int, dtype=np.float64, config: Qwen35Config | None = None,
                        allow_nonfinite: bool = False, **kwargs) -> TensorParallelSimulation:
        """Load a checkpoint directory (as Qwen35Model.from_pretrained) and split it over `tensor_parallel` ranks."""
        weights = load_weights(Path(path), config=config, dtype=_model_dtype(dtype), allow_nonfinite=allow_nonfinite)
        return cls(weights, tensor_parallel=tensor_parallel, dtype=dtype, **kwargs)

    # ------------------------------------------------------------------ each rank's part of the state
    def rank_states(self, rank: int, conv, rec, past_kv):
        """Rank `rank`'s part of whole-layout states, as that rank of a real engine stores them.

        conv: per linear layer [B, conv_dim, K-1]  -> [B, conv_dim/tp, K-1]   (channels conv_state_channels)
        rec:  per linear layer [B, H_v, D_k, D_v]  -> [B, H_v/tp, D_k, D_v]   (the rank's value heads)
        past_kv: {full layer: per request (k, v) [T, nkv, hd] or None} -> (k, v) [T, max(nkv/tp, 1), hd] or None
        Returns (conv, rec, past_kv) of copies.
        """
        c, tp = self.config, self.tensor_parallel
        channels = self._channels[rank]
        v0, v1 = block(c.linear_num_value_heads, tp, rank)
        g0, g1 = kv_head_range(c, tp, rank)
        conv_r = [np.take(s, channels, axis=1) for s in conv]
        rec_r = [s[:, v0:v1].copy() for s in rec]
        kv_r = {layer: _kv_heads(entries, g0, g1) for layer, entries in past_kv.items()}
        return conv_r, rec_r, kv_r

    # ------------------------------------------------------------------ the forward pass, rank by rank
    def forward(self, tokens, offsets, position_ids, conv, rec, past_kv, image_rows=None, image_emb=None,
                hidden_trace: list | None = None):
        """Qwen35Model.forward (same arguments, same results, states in the whole layout), computed by tp ranks.

        Per layer, every rank r:  a = rms_norm(x)  (x replicated)  ->  its heads' mixer on its weights  ->  a
        partial [total, H] output;  SUM over ranks;  x += sum;  the same for the MLP.
        """
        c, lc, dt, tp = self.config, self.local, self.dtype, self.tensor_parallel
        ranks = self.rank_weights
        eps = c.rms_norm_eps
        tokens = np.asarray(tokens)

        # Vocabulary-parallel embedding: rank r holds rows [v0, v1) of E; it looks up the tokens in its block and
        # leaves zeros for the others.  Every token is in exactly one block, so the SUM is E[tokens].
        parts = []
        for rw in ranks:
            v0, v1 = rw.shard.vocab
            mine = (tokens >= v0) & (tokens < v1)
            part = np.zeros((tokens.shape[0], c.hidden_size), dt)  # [total, H]
            part[mine] = rw.embed_tokens[tokens[mine] - v0]
            parts.append(part)
        x = _all_reduce(parts)  # SUM (all-reduce) #0: the embedding.  x is now replicated on every rank.
        if image_rows is not None and len(image_rows):
            x[image_rows] = np.asarray(image_emb, dtype=dt)  # the vision tower is replicated: every rank has these
        if hidden_trace is not None:
            hidden_trace.append(x.copy())

        seq_lens = np.diff(offsets)
        mode = "recurrent" if np.all(seq_lens == 1) else "chunk"  # as the unsharded model picks
        # Each rank's part of the gathered states: what rank r of a real engine holds (rank_states).
        states = [self.rank_states(r, conv, rec, past_kv) for r in range(tp)]
        new_conv, new_rec, new_kv = list(conv), list(rec), {}
        for i, layer_type in enumerate(c.layer_types):
            # ---- token mixer: column-parallel input projections (each rank's heads), row-parallel output
            # projection (each rank's columns of out_proj / o_proj) -> one partial [total, H] output per rank.
            parts, new_states = [], []
            for r, rw in enumerate(ranks):
                lw = rw.layers[i]
                a = rms_norm(x, lw.input_layernorm, eps, dtype=dt)  # replicated norm weight, replicated x
                conv_r, rec_r, kv_r = states[r]
                if layer_type == LINEAR:
                    li = c.linear_layer_index(i)
                    y, *new_state = gated_deltanet(a, lw.mixer, lc, cu_seqlens=offsets, conv_state=conv_r[li],
                                                   recurrent_state=rec_r[li], mode=mode, dtype=dt)
                else:
                    y, new_state = gated_attention(a, lw.mixer, lc, position_ids=position_ids, cu_seqlens=offsets,
                                                   past_kv=kv_r[i])
                parts.append(y)
                new_states.append(new_state)
            # The ranks' new states, back into the whole layout: conv channels to their places, value heads and
            # KV heads are contiguous blocks in rank order (side by side they are the whole state).
            if layer_type == LINEAR:
                new_conv[li] = np.empty_like(conv[li])
                for r, (conv_r, _) in enumerate(new_states):
                    new_conv[li][:, self._channels[r]] = conv_r
                new_rec[li] = np.concatenate([rec_r for _, rec_r in new_states], axis=1)
            else:
                # Each rank's KV heads go back to their place; when tp > nkv, the ranks sharing a KV head
                # computed the same copy of it (the same rows of k_proj / v_proj on the same x).
                new_kv[i] = []
                for n in range(len(offsets) - 1):
                    k0 = new_states[0][n][0]
                    k = np.empty((k0.shape[0], c.num_key_value_heads, c.head_dim), k0.dtype)
                    v = np.empty_like(k)
                    for r, kv in enumerate(new_states):
                        g0, g1 = kv_head_range(c, tp, r)
                        k[:, g0:g1], v[:, g0:g1] = kv[n]
                    new_kv[i].append((k, v))
            x = x + _all_reduce(parts)  # SUM (all-reduce) #1 of the layer: the mixer's output projection

            # ---- MLP: gate / up rows (column-parallel), down columns (row-parallel); MoE: whole experts per rank,
            # the router replicated, the shared expert split like a dense MLP.
            parts = []
            for rw in ranks:
                lw = rw.layers[i]
                m = rms_norm(x, lw.post_attention_layernorm, eps, dtype=dt)
                if isinstance(lw.mlp, MLPWeights):
                    parts.append(swiglu_mlp(m, lw.mlp.gate_proj, lw.mlp.up_proj, lw.mlp.down_proj))
                else:
                    parts.append(sparse_moe_block(m, lw.mlp, lc, experts=rw.shard.experts))
            x = x + _all_reduce(parts)  # SUM (all-reduce) #2 of the layer: the MLP's down projection
            if hidden_trace is not None:
                hidden_trace.append(x.copy())

        h = rms_norm(x, ranks[0].norm, eps, dtype=dt)  # the final norm is replicated: every rank computes it
        return h, new_conv, new_rec, new_kv

    def _logits(self, h) -> np.ndarray:
        """Vocabulary-parallel lm_head: rank r computes the logits of its vocabulary block [n, v1 - v0]; the
        GATHER puts the blocks side by side, [n, V]."""
        return np.concatenate([h @ rw.lm_head.T.astype(self.dtype, copy=False) for rw in self.rank_weights], axis=1)
