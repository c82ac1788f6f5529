"""The memory model of qwen35: state, KV and weight bytes, and the batch-size rules (docs/state_cache.md).

This is the single memory model of the project: `reference.state_cache`, `optimized` and the `qwen35 memory`
command all use it, and tests check it against the bytes the caches really allocate.

Per request, each Gated DeltaNet (linear) layer keeps

    conv state       conv_dim x (K - 1)        the last K-1 pre-activation conv inputs
    recurrent state  H_v x D_k x D_v           the delta-rule matrix S, one per value head

    state_bytes_per_request = num_linear x [conv_dim·(K−1) + H_v·D_k·D_v] x bytes(state dtype)

Full-attention layers keep a KV cache that grows with the context:

    kv_bytes_per_token = num_full x 2 x H_kv x D_h x bytes(kv dtype)

Two batch-size rules:

* ``"gather_scatter"`` — the design MAX's Qwen3.5 pipeline docs describe: a persistent pool plus gathered input copies
  plus output copies can coexist, so the reservation is 3 x max_batch x per_req, and it is budgeted at 15 % of free
  memory: ``max_batch = max(1, ⌊0.15·free⌋ // (3·per_req))``; 32 when free memory is unknown.
* ``"in_place"`` — a slot-indexed pool updated in place (what `optimized` does): no working copies, so the same
  15 % budget holds ``⌊0.15·free⌋ // (1·per_req)`` requests.

Per device under tensor parallelism (`tensor_parallel=tp`, the plan of `reference.parallel`): rank r holds

    state       num_linear x [conv_dim/tp·(K−1) + H_v/tp·D_k·D_v]      its conv channels, its value heads
    KV / token  num_full x 2 x H_kv/tp x D_h                           its KV heads
    weights     its vocabulary rows of embed_tokens / lm_head + 1/tp of every split tensor + every replicated one

and with data parallelism (`data_parallel=dp`) each of the dp replicas (tp devices each) has its own pool, sized
from ONE device's free memory by the rule above; the whole layout serves dp x that many requests.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import NamedTuple

from .config import Qwen35Config
from .errors import ConfigError

DTYPE_BYTES = {
    "float64": 8, "fp64": 8,
    "float32": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2,
    "float16": 2, "fp16": 2, "half": 2,
    "float8": 1, "fp8": 1, "int8": 1,
}

RULES = {"gather_scatter": 3, "in_place": 1}  # working copies per request alive at peak
STATE_BUDGET_FRACTION = 0.15  # share of free device memory reserved for recurrent state (MAX)
FALLBACK_MAX_BATCH = 32  # "safe for Qwen3.5-27B on H100/A100 80 GB" when the device query fails (MAX); per replica


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype given by name ("bfloat16", "fp32", ...), numpy dtype or torch dtype."""
    name = str(dtype).replace("torch.", "").lower()
    if name in DTYPE_BYTES:
        return DTYPE_BYTES[name]
    try:  # numpy dtype objects and names such as "<f4"
        import numpy as np

        return int(np.dtype(dtype).itemsize)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(set(DTYPE_BYTES))}") from None


def _plan():
    """`reference.parallel` (the sharding plan), imported on first use: it imports the model, whose state cache
    imports this module."""
    from . import parallel

    return parallel


def _tp(config: Qwen35Config, tensor_parallel: int) -> int:
    """`tensor_parallel`, once the plan accepts it for `config` (the ConfigError of check_tensor_parallel)."""
    _plan().check_tensor_parallel(config, tensor_parallel)
    return tensor_parallel


# ---------------------------------------------------------------------- state and KV
def conv_state_shape(config: Qwen35Config, conv_columns: int | None = None, *,
                     tensor_parallel: int = 1) -> tuple[int, int]:
    """Per-request conv state of one linear layer on one rank: [conv_dim/tp, K-1] (MAX/fla keep K-1 columns; HF
    keeps K).  A rank's conv channels are its key heads' Q and K rows and its value heads' V rows."""
    cols = config.linear_conv_kernel_dim - 1 if conv_columns is None else conv_columns
    return (config.conv_dim // _tp(config, tensor_parallel), cols)


def recurrent_state_shape(config: Qwen35Config, *, tensor_parallel: int = 1) -> tuple[int, int, int]:
    """Per-request recurrent state of one linear layer on one rank: [H_v/tp, D_k, D_v] (K-major; its value heads)."""
    return (config.linear_num_value_heads // _tp(config, tensor_parallel), config.linear_key_head_dim,
            config.linear_value_head_dim)


def conv_state_bytes_per_layer(config: Qwen35Config, dtype="bfloat16", conv_columns: int | None = None, *,
                               tensor_parallel: int = 1) -> int:
    """Bytes of one request's conv state [conv_dim/tp, K_conv-1] (or `conv_columns` columns) in one linear layer."""
    c, k = conv_state_shape(config, conv_columns, tensor_parallel=tensor_parallel)
    return c * k * dtype_bytes(dtype)


def recurrent_state_bytes_per_layer(config: Qwen35Config, dtype="bfloat16", *, tensor_parallel: int = 1) -> int:
    """Bytes of one request's recurrent state [H_v/tp, D_k, D_v] in one linear layer."""
    h, dk, dv = recurrent_state_shape(config, tensor_parallel=tensor_parallel)
    return h * dk * dv * dtype_bytes(dtype)


def state_bytes_per_request(config: Qwen35Config, dtype="bfloat16", *, conv_dtype=None,
                            conv_columns: int | None = None, tensor_parallel: int = 1) -> int:
    """Bytes of Gated DeltaNet state one request holds across all linear layers, on one of `tensor_parallel` ranks
    (each holds 1/tp of it: its conv channels and its value heads' matrices; tp x this is the whole state).

    `dtype` is the recurrent-state dtype; `conv_dtype` defaults to it (MAX keeps both in the model dtype;
    vLLM keeps conv in bf16 and the recurrent state in fp32 — pitfall B8).  27B in bf16: 78,446,592 bytes.
    """
    conv_dtype = dtype if conv_dtype is None else conv_dtype
    per_layer = (conv_state_bytes_per_layer(config, conv_dtype, conv_columns, tensor_parallel=tensor_parallel)
                 + recurrent_state_bytes_per_layer(config, dtype, tensor_parallel=tensor_parallel))
    return config.num_linear_layers * per_layer


def kv_bytes_per_token(config: Qwen35Config, dtype="bfloat16", tensor_parallel: int = 1) -> int:
    """KV-cache bytes one token adds on one of `tensor_parallel` ranks: full-attention layers only, its
    H_kv/tp KV heads (one copied head when tp is a multiple of H_kv: `reference.parallel.kv_head_range`)."""
    kv_heads = _kv_heads_per_rank(config, _tp(config, tensor_parallel))
    return config.num_full_layers * 2 * kv_heads * config.head_dim * dtype_bytes(dtype)


# ---------------------------------------------------------------------- weights
class Split(NamedTuple):
    """Parameters of one component under the tensor-parallel plan: `split` are divided among the ranks (each holds
    its block), `replicated` are held whole by every rank."""

    split: int
    replicated: int


VOCAB_PARALLEL = ("embed_tokens", "lm_head")  # split by vocabulary rows: blocks may differ by one row


def parameter_split(config: Qwen35Config, include_vision: bool = True) -> dict[str, Split]:
    """Per component, the checkpoint's parameters split among tensor-parallel ranks and those replicated on each
    (the plan of `reference.parallel`; `mtp.*` excluded).

    Split evenly (a rank holds 1/tp): everything cut by heads, by MLP columns or by whole experts.  Split by
    vocabulary rows (a rank holds its block's rows, ⌊V/tp⌋ or ⌈V/tp⌉): embed_tokens and an untied lm_head.
    Replicated: every RMSNorm weight (layer norms, final norm, q_norm / k_norm, the gated norm's shared [D_v]),
    the MoE router and the shared expert's scalar gate, and the vision tower.
    """
    c = config
    H, V = c.hidden_size, c.vocab_size
    Hv, K = c.linear_num_value_heads, c.linear_conv_kernel_dim
    parts: dict[str, Split] = {
        "embed_tokens": Split(V * H, 0),
        "lm_head": Split(0 if c.tie_word_embeddings else V * H, 0),
        "final_norm": Split(0, H),
    }
    linear = Split(
        split=(c.conv_dim * H  # in_proj_qkv: the [Q | K | V] rows of the rank's key and value heads
               + c.value_dim * H  # in_proj_z: its value heads' rows
               + 2 * Hv * H  # in_proj_b, in_proj_a: one row per value head
               + c.conv_dim * K  # conv1d: its conv channels
               + 2 * Hv  # dt_bias, A_log (kept in float32): one per value head
               + H * c.value_dim),  # out_proj: its value heads' columns
        replicated=c.linear_value_head_dim)  # the gated norm's [D_v] weight (float32), shared by every value head
    full = Split(
        split=(c.q_proj_rows * H  # q_proj: [q_h | gate_h] rows of the rank's query heads
               + 2 * c.num_key_value_heads * c.head_dim * H  # k_proj, v_proj: its KV heads' rows
               + H * c.num_attention_heads * c.head_dim),  # o_proj: its query heads' columns
        replicated=2 * c.head_dim)  # q_norm, k_norm
    if c.is_moe:
        mlp = Split(split=(c.num_experts * 3 * c.moe_intermediate_size * H  # whole experts (gate_up_proj, down_proj)
                           + 3 * c.shared_expert_intermediate_size * H),  # shared expert, split like a SwiGLU MLP
                    replicated=c.num_experts * H + H)  # router, shared_expert_gate
    else:
        mlp = Split(split=3 * c.intermediate_size * H, replicated=0)  # gate/up rows, down columns
    for name, n, per_layer in (("linear_attention_layers", c.num_linear_layers, linear),
                               ("full_attention_layers", c.num_full_layers, full), ("mlp", c.num_hidden_layers, mlp)):
        parts[name] = Split(n * per_layer.split, n * per_layer.replicated)
    parts["layer_norms"] = Split(0, c.num_hidden_layers * 2 * H)  # input and post-attention RMSNorm
    if include_vision and c.vision_config is not None:
        v = c.vision_config
        Hv_, I = v.hidden_size, v.intermediate_size
        block = 4 * Hv_ + (3 * Hv_ * Hv_ + 3 * Hv_) + (Hv_ * Hv_ + Hv_) + (Hv_ * I + I) + (I * Hv_ + Hv_)
        Hm = Hv_ * v.merge_unit
        parts["vision"] = Split(0, (v.patch_dim * Hv_ + Hv_) + v.num_position_embeddings * Hv_ + v.depth * block
                                + 2 * Hv_ + (Hm * Hm + Hm) + (v.out_hidden_size * Hm + v.out_hidden_size))
    return parts


def parameter_counts(config: Qwen35Config, include_vision: bool = True) -> dict[str, int]:
    """Parameter count per component (the checkpoint's tensors; `mtp.*` excluded): split + replicated."""
    return {name: p.split + p.replicated for name, p in parameter_split(config, include_vision).items()}


def _kv_heads_per_rank(config: Qwen35Config, tp: int) -> int:
    """KV heads one rank holds: H_kv/tp, or one copy of a head when there are more ranks than KV heads."""
    return max(config.num_key_value_heads // tp, 1)


def _vocab_rows(config: Qwen35Config, tp: int, rank: int) -> int:
    start, stop = _plan().vocab_range(config, tp, rank)  # also checks that the rank is in range
    return stop - start


def largest_rank(config: Qwen35Config, tensor_parallel: int) -> int:
    """The rank holding the most weights: the one with the most vocabulary rows (the lowest such rank)."""
    tp = _tp(config, tensor_parallel)
    return max(range(tp), key=lambda r: (_vocab_rows(config, tp, r), -r))


def rank_parameter_counts(config: Qwen35Config, include_vision: bool = True, tensor_parallel: int = 1,
                          rank: int | None = None) -> dict[str, int]:
    """Parameter count per component on rank `rank` of `tensor_parallel` (None: the largest rank):
    split / tp + replicated, for embed_tokens / lm_head the rank's vocabulary rows x hidden_size, and for the
    attention layers' k_proj / v_proj the rows of the rank's KV heads (a copied head when tp > H_kv)."""
    tp = _tp(config, tensor_parallel)
    rank = largest_rank(config, tp) if rank is None else rank
    rows = _vocab_rows(config, tp, rank)
    c = config
    counts = {}
    for name, p in parameter_split(config, include_vision).items():
        if name in VOCAB_PARALLEL:
            counts[name] = p.split // c.vocab_size * rows  # rows x H (0 for a tied lm_head)
        elif name == "full_attention_layers":
            # k_proj / v_proj: the rank's KV heads — H_kv/tp, or one head copied on tp/H_kv ranks when tp > H_kv
            kv = c.num_full_layers * 2 * c.head_dim * c.hidden_size
            counts[name] = (p.split - kv * c.num_key_value_heads) // tp + kv * _kv_heads_per_rank(c, tp) + p.replicated
        else:
            counts[name] = p.split // tp + p.replicated
    return counts


def fp32_parameter_count(config: Qwen35Config, tensor_parallel: int = 1) -> int:
    """Parameters kept in float32 whatever the weight dtype (pitfall B23), on one of `tensor_parallel` ranks:
    A_log and dt_bias (split by value head, H_v/tp each) and the gated-norm weight (replicated, D_v)."""
    tp = _tp(config, tensor_parallel)
    return config.num_linear_layers * (2 * config.linear_num_value_heads // tp + config.linear_value_head_dim)


def _bytes(n: int, n32: int, dtype) -> int:
    """Bytes of n parameters in `dtype`, n32 of them kept in float32 or wider."""
    b = dtype_bytes(dtype)
    return (n - n32) * b + n32 * max(b, 4)


def weight_bytes(config: Qwen35Config, dtype="bfloat16", include_vision: bool = True, tensor_parallel: int = 1,
                 rank: int | None = None) -> int:
    """Bytes of the weights in `dtype`, with A_log / dt_bias / gated-norm weight kept in float32 or wider, on rank
    `rank` of `tensor_parallel` (None: the largest rank; tp=1: the whole model)."""
    n = sum(rank_parameter_counts(config, include_vision, tensor_parallel, rank).values())
    return _bytes(n, fp32_parameter_count(config, tensor_parallel), dtype)


def replicated_weight_bytes(config: Qwen35Config, dtype="bfloat16", include_vision: bool = True) -> int:
    """Bytes of the weights every tensor-parallel rank holds whole (norms, router, shared-expert gate, vision
    tower; the gated-norm weight in float32 or wider): Σ over ranks of weight_bytes = the whole model's bytes +
    (tp − 1) x this (+ the copies of KV heads when tp > H_kv)."""
    n = sum(p.replicated for p in parameter_split(config, include_vision).values())
    return _bytes(n, config.num_linear_layers * config.linear_value_head_dim, dtype)


# ---------------------------------------------------------------------- batch-size rules
def _check_rule(rule: str) -> int:
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not known; expected one of {sorted(RULES)}")
    return RULES[rule]


def replica_batch_size(config: Qwen35Config, free_bytes: int | None, rule: str = "gather_scatter",
                       state_dtype="bfloat16", *, tensor_parallel: int = 1) -> int:
    """Requests one replica's state pool holds (every rank of the replica holds its share of each of them).

    `free_bytes` is ONE device's free memory; per_req is the state one rank holds per request:
    ``max(1, ⌊0.15·free⌋ // (copies·per_req))``, copies = 3 (gather_scatter) or 1 (in_place).
    Free memory unknown (None, or a failed query reported as <= 0): the documented fallback, 32.
    A model with no linear layers needs no state: 0.
    """
    copies = _check_rule(rule)
    per_req = state_bytes_per_request(config, state_dtype, tensor_parallel=tensor_parallel)
    if per_req == 0:
        return 0
    if free_bytes is None or free_bytes <= 0:
        return FALLBACK_MAX_BATCH
    return max(1, int(STATE_BUDGET_FRACTION * free_bytes) // (copies * per_req))


def infer_optimal_batch_size(config: Qwen35Config, free_bytes: int | None, rule: str = "gather_scatter",
                             state_dtype="bfloat16", *, tensor_parallel: int = 1, data_parallel: int = 1) -> int:
    """The largest batch whose state reservation fits in 15 % of free memory (MAX's rule), over `data_parallel`
    replicas of `tensor_parallel` devices: data_parallel x `replica_batch_size` (free_bytes: one device's).

    gather_scatter: ``max(1, ⌊0.15·free⌋ // (3·per_req))`` per replica (pool + input copies + output copies);
    in_place:       ``max(1, ⌊0.15·free⌋ // (1·per_req))`` per replica (pool only).
    Free memory unknown (None, or a failed query reported as <= 0): the documented fallback, 32 per replica.
    A model with no linear layers needs no state: 0.
    """
    dp = _plan().check_data_parallel(data_parallel)
    return dp * replica_batch_size(config, free_bytes, rule, state_dtype, tensor_parallel=tensor_parallel)


def estimate_activation_memory(config: Qwen35Config, free_bytes: int | None = None, max_batch_size: int | None = None,
                               rule: str = "gather_scatter", state_dtype="bfloat16", *,
                               tensor_parallel: int = 1) -> int:
    """Bytes to reserve on one device for Gated DeltaNet state before the KV allocator runs.

    Consistent with `replica_batch_size`: copies x max_batch x per_req (one rank's state per request), where
    max_batch is the given `max_batch_size` (one replica's) or the one inferred from `free_bytes` (so gather_scatter
    reserves ≈ 15 % of free memory).
    """
    copies = _check_rule(rule)
    if max_batch_size is None:
        max_batch_size = replica_batch_size(config, free_bytes, rule, state_dtype, tensor_parallel=tensor_parallel)
    return copies * max_batch_size * state_bytes_per_request(config, state_dtype, tensor_parallel=tensor_parallel)


@dataclass(frozen=True)
class MemoryBudget:
    """A memory budget.  Per device (the largest tensor-parallel rank): memory_bytes, weight_bytes, free_bytes,
    the state and KV sizes, and per rule in `rules` the batch of one replica (`max_batch`; every device of a replica
    holds the same requests).  Totals over the tensor_parallel x data_parallel devices: `devices`,
    `total_memory_bytes`, `total_weight_bytes` (dp x Σ ranks' weights) and `rules[rule]["total_max_batch"]`."""

    memory_bytes: int
    weight_bytes: int
    free_bytes: int
    context_len: int
    state_dtype: str
    kv_dtype: str
    weight_dtype: str
    state_bytes_per_request: int
    conv_state_bytes_per_request: int
    recurrent_state_bytes_per_request: int
    kv_bytes_per_token: int
    kv_bytes_per_request: int
    kv_tokens_equal_to_state: float
    max_batch_gather_scatter: int
    max_batch_in_place: int
    rules: dict
    tensor_parallel: int = 1
    data_parallel: int = 1
    devices: int = 1
    replicated_weight_bytes: int = 0
    rank_weight_bytes: tuple = ()
    total_memory_bytes: int = 0
    total_weight_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def memory_budget(config: Qwen35Config, memory_bytes: int, context_len: int = 8192, *, state_dtype="bfloat16",
                  kv_dtype="bfloat16", weight_dtype="bfloat16", include_vision: bool = True,
                  tensor_parallel: int = 1, data_parallel: int = 1) -> MemoryBudget:
    """A device-memory budget: what the weights take, the state and KV per request, and for each rule the
    batch the state rule allows, the batch the KV cache allows at `context_len`, and which of the two binds.

    `memory_bytes` is one device's memory; the layout is `data_parallel` replicas of `tensor_parallel` devices.
    Per device (the largest rank, which binds: a replica's ranks hold the same requests): free memory = memory −
    the rank's weights.  The state reservation comes out of free memory first (the rule above, with one rank's
    state per request); what is left holds that rank's KV heads:
    ``kv_batch = ⌊(free − reservation) / (context_len · kv_per_token)⌋``.  A replica runs min(state, kv) requests;
    the layout dp x that.
    """
    if memory_bytes <= 0:
        raise ValueError(f"memory must be positive, got {memory_bytes}")
    if context_len <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context_len}")
    tp, dp = _tp(config, tensor_parallel), _plan().check_data_parallel(data_parallel)
    ranks = tuple(weight_bytes(config, weight_dtype, include_vision, tp, r) for r in range(tp))
    wb = weight_bytes(config, weight_dtype, include_vision, tp)  # the largest rank
    free = memory_bytes - wb
    per_req = state_bytes_per_request(config, state_dtype, tensor_parallel=tp)
    conv = config.num_linear_layers * conv_state_bytes_per_layer(config, state_dtype, tensor_parallel=tp)
    kv_tok = kv_bytes_per_token(config, kv_dtype, tp)
    kv_req = kv_tok * context_len
    rules = {}
    max_b = {}
    for rule, copies in RULES.items():
        if free <= 0:
            rules[rule] = {"state_max_batch": 0, "reserved_bytes": 0, "kv_max_batch": 0, "max_batch": 0,
                           "bound_by": "weights (they do not fit)", "total_max_batch": 0}
            max_b[rule] = 0
            continue
        state_b = replica_batch_size(config, free, rule, state_dtype, tensor_parallel=tp)
        reserved = copies * state_b * per_req
        left = free - reserved
        kv_b = left // kv_req if kv_req else state_b
        batch = max(min(state_b, kv_b), 0)
        bound = "state" if state_b <= kv_b else "KV cache"
        rules[rule] = {"state_max_batch": int(state_b), "reserved_bytes": int(reserved),
                       "kv_max_batch": int(max(kv_b, 0)), "max_batch": int(batch), "bound_by": bound,
                       "total_max_batch": int(dp * batch)}
        max_b[rule] = state_b
    return MemoryBudget(
        memory_bytes=int(memory_bytes), weight_bytes=int(wb), free_bytes=int(free), context_len=int(context_len),
        state_dtype=str(state_dtype), kv_dtype=str(kv_dtype), weight_dtype=str(weight_dtype),
        state_bytes_per_request=int(per_req), conv_state_bytes_per_request=int(conv),
        recurrent_state_bytes_per_request=int(per_req - conv), kv_bytes_per_token=int(kv_tok),
        kv_bytes_per_request=int(kv_req), kv_tokens_equal_to_state=(per_req / kv_tok) if kv_tok else float("inf"),
        max_batch_gather_scatter=int(max_b["gather_scatter"]), max_batch_in_place=int(max_b["in_place"]),
        rules=rules, tensor_parallel=tp, data_parallel=dp, devices=tp * dp,
        replicated_weight_bytes=int(replicated_weight_bytes(config, weight_dtype, include_vision)),
        rank_weight_bytes=ranks, total_memory_bytes=int(tp * dp * memory_bytes),
        total_weight_bytes=int(dp * sum(ranks)),
    )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str | int) -> int:
    """'80GiB' -> 85899345920; '80GB' -> 80e9; plain integers are bytes."""
    if isinstance(text, int):
        return text
    if isinstance(text, bool):
        raise ConfigError(f"a memory size must be a number of bytes or a string like '80GiB', got {text!r}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read a memory size from {text!r}; use e.g. 80GiB, 141GB, 24e9 "
                          f"(units: {', '.join(u for u in _UNITS if u)})")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value < 2**80:  # also catches inf (a literal like 1e400)
        raise ConfigError(f"memory size {text!r} is too large to be a device's memory")
    return int(value)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
