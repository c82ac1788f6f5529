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
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

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
FALLBACK_MAX_BATCH = 32  # "safe for Qwen3.5-27B on H100/A100 80 GB" when the device query fails (MAX)


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


def conv_state_shape(config: Qwen35Config, conv_columns: int | None = None) -> tuple[int, int]:
    """Per-request conv state of one linear layer: [conv_dim, K-1] (MAX/fla keep K-1 columns; HF keeps K)."""
    cols = config.linear_conv_kernel_dim - 1 if conv_columns is None else conv_columns
    return (config.conv_dim, cols)


def recurrent_state_shape(config: Qwen35Config) -> tuple[int, int, int]:
    """Per-request recurrent state of one linear layer: [H_v, D_k, D_v] (K-major)."""
    return (config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim)


def conv_state_bytes_per_layer(config: Qwen35Config, dtype="bfloat16", conv_columns: int | None = None) -> int:
    """Bytes of one request's conv state [conv_dim, K_conv-1] (or `conv_columns` columns) in one linear layer."""
    c, k = conv_state_shape(config, conv_columns)
    return c * k * dtype_bytes(dtype)


def recurrent_state_bytes_per_layer(config: Qwen35Config, dtype="bfloat16") -> int:
    """Bytes of one request's recurrent state [H_v, D_k, D_v] in one linear layer."""
    h, dk, dv = recurrent_state_shape(config)
    return h * dk * dv * dtype_bytes(dtype)


def state_bytes_per_request(config: Qwen35Config, dtype="bfloat16", *, conv_dtype=None,
                            conv_columns: int | None = None) -> int:
    """Bytes of Gated DeltaNet state one request holds across all linear layers.

    `dtype` is the recurrent-state dtype; `conv_dtype` defaults to it (MAX keeps both in the model dtype;
    vLLM keeps conv in bf16 and the recurrent state in fp32 — pitfall B8).  27B in bf16: 78,446,592 bytes.
    """
    conv_dtype = dtype if conv_dtype is None else conv_dtype
    per_layer = (conv_state_bytes_per_layer(config, conv_dtype, conv_columns)
                 + recurrent_state_bytes_per_layer(config, dtype))
    return config.num_linear_layers * per_layer


def kv_bytes_per_token(config: Qwen35Config, dtype="bfloat16") -> int:
    """KV-cache bytes one token adds: full-attention layers only."""
    return config.num_full_layers * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes(dtype)


# ---------------------------------------------------------------------- weights
def parameter_counts(config: Qwen35Config, include_vision: bool = True) -> dict[str, int]:
    """Parameter count per component (the checkpoint's tensors; `mtp.*` excluded)."""
    c = config
    H, V = c.hidden_size, c.vocab_size
    counts: dict[str, int] = {}
    counts["embed_tokens"] = V * H
    counts["lm_head"] = 0 if c.tie_word_embeddings else V * H
    counts["final_norm"] = H
    linear = (c.conv_dim * H  # in_proj_qkv
              + c.value_dim * H  # in_proj_z
              + 2 * c.linear_num_value_heads * H  # in_proj_b, in_proj_a
              + c.conv_dim * c.linear_conv_kernel_dim  # conv1d
              + 2 * c.linear_num_value_heads  # dt_bias, A_log
              + c.linear_value_head_dim  # gated norm
              + H * c.value_dim)  # out_proj
    full = (c.q_proj_rows * H  # q_proj (q, plus the gate rows when attn_output_gate)
            + 2 * c.num_key_value_heads * c.head_dim * H  # k_proj, v_proj
            + H * c.num_attention_heads * c.head_dim  # o_proj
            + 2 * c.head_dim)  # q_norm, k_norm
    if c.is_moe:
        mlp = (c.num_experts * H  # router
               + c.num_experts * 3 * c.moe_intermediate_size * H  # gate_up_proj + down_proj
               + 3 * c.shared_expert_intermediate_size * H + H)  # shared expert + its gate
    else:
        mlp = 3 * c.intermediate_size * H
    norms = 2 * H
    counts["linear_attention_layers"] = c.num_linear_layers * linear
    counts["full_attention_layers"] = c.num_full_layers * full
    counts["mlp"] = c.num_hidden_layers * mlp
    counts["layer_norms"] = c.num_hidden_layers * norms
    if include_vision and c.vision_config is not None:
        v = c.vision_config
        Hv, I = v.hidden_size, v.intermediate_size
        block = 4 * Hv + (3 * Hv * Hv + 3 * Hv) + (Hv * Hv + Hv) + (Hv * I + I) + (I * Hv + Hv)
        Hm = Hv * v.merge_unit
        counts["vision"] = ((v.patch_dim * Hv + Hv) + v.num_position_embeddings * Hv + v.depth * block
                            + 2 * Hv + (Hm * Hm + Hm) + (v.out_hidden_size * Hm + v.out_hidden_size))
    return counts


def fp32_parameter_count(config: Qwen35Config) -> int:
    """Parameters kept in float32 whatever the weight dtype: A_log, dt_bias, gated-norm weight (pitfall B23)."""
    return config.num_linear_layers * (2 * config.linear_num_value_heads + config.linear_value_head_dim)


def weight_bytes(config: Qwen35Config, dtype="bfloat16", include_vision: bool = True) -> int:
    """Bytes of the weights in `dtype`, with A_log / dt_bias / gated-norm weight kept in float32 or wider."""
    n = sum(parameter_counts(config, include_vision).values())
    n32 = fp32_parameter_count(config)
    b = dtype_bytes(dtype)
    return (n - n32) * b + n32 * max(b, 4)


# ---------------------------------------------------------------------- batch-size rules
def _check_rule(rule: str) -> int:
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not known; expected one of {sorted(RULES)}")
    return RULES[rule]


def infer_optimal_batch_size(config: Qwen35Config, free_bytes: int | None, rule: str = "gather_scatter",
                             state_dtype="bfloat16") -> int:
    """The largest batch whose state reservation fits in 15 % of free memory (MAX's rule).

    gather_scatter: ``max(1, ⌊0.15·free⌋ // (3·per_req))`` (pool + input copies + output copies);
    in_place:       ``max(1, ⌊0.15·free⌋ // (1·per_req))`` (pool only).
    Free memory unknown (None, or a failed query reported as <= 0): the documented fallback, 32.
    A model with no linear layers needs no state: 0.
    """
    copies = _check_rule(rule)
    per_req = state_bytes_per_request(config, state_dtype)
    if per_req == 0:
        return 0
    if free_bytes is None or free_bytes <= 0:
        return FALLBACK_MAX_BATCH
    return max(1, int(STATE_BUDGET_FRACTION * free_bytes) // (copies * per_req))


def estimate_activation_memory(config: Qwen35Config, free_bytes: int | None = None, max_batch_size: int | None = None,
                               rule: str = "gather_scatter", state_dtype="bfloat16") -> int:
    """Bytes to reserve for Gated DeltaNet state before the KV allocator runs.

    Consistent with `infer_optimal_batch_size`: copies x max_batch x per_req, where max_batch is the given
    `max_batch_size` or the one inferred from `free_bytes` (so gather_scatter reserves ≈ 15 % of free memory).
    """
    copies = _check_rule(rule)
    if max_batch_size is None:
        max_batch_size = infer_optimal_batch_size(config, free_bytes, rule, state_dtype)
    return copies * max_batch_size * state_bytes_per_request(config, state_dtype)


@dataclass(frozen=True)
class MemoryBudget:
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

    def as_dict(self) -> dict:
        return asdict(self)


def memory_budget(config: Qwen35Config, memory_bytes: int, context_len: int = 8192, *, state_dtype="bfloat16",
                  kv_dtype="bfloat16", weight_dtype="bfloat16", include_vision: bool = True) -> MemoryBudget:
    """A device-memory budget: what the weights take, the state and KV per request, and for each rule the
    batch the state rule allows, the batch the KV cache allows at `context_len`, and which of the two binds.

    Free memory = memory − weights.  The state reservation comes out of free memory first (the rule above);
    what is left holds KV: ``kv_batch = ⌊(free − reservation) / (context_len · kv_per_token)⌋``.
    """
    if memory_bytes <= 0:
        raise ValueError(f"memory must be positive, got {memory_bytes}")
    if context_len <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context_len}")
    wb = weight_bytes(config, weight_dtype, include_vision)
    free = memory_bytes - wb
    per_req = state_bytes_per_request(config, state_dtype)
    conv = config.num_linear_layers * conv_state_bytes_per_layer(config, state_dtype)
    kv_tok = kv_bytes_per_token(config, kv_dtype)
    kv_req = kv_tok * context_len
    rules = {}
    max_b = {}
    for rule, copies in RULES.items():
        if free <= 0:
            rules[rule] = {"state_max_batch": 0, "reserved_bytes": 0, "kv_max_batch": 0, "max_batch": 0,
                           "bound_by": "weights (they do not fit)"}
            max_b[rule] = 0
            continue
        state_b = infer_optimal_batch_size(config, free, rule, state_dtype)
        reserved = copies * state_b * per_req
        left = free - reserved
        kv_b = left // kv_req if kv_req else state_b
        batch = min(state_b, kv_b)
        bound = "state" if state_b <= kv_b else "KV cache"
        rules[rule] = {"state_max_batch": int(state_b), "reserved_bytes": int(reserved),
                       "kv_max_batch": int(max(kv_b, 0)), "max_batch": int(max(batch, 0)), "bound_by": bound}
        max_b[rule] = state_b
    return MemoryBudget(
        memory_bytes=int(memory_bytes), weight_bytes=int(wb), free_bytes=int(free), context_len=int(context_len),
        state_dtype=str(state_dtype), kv_dtype=str(kv_dtype), weight_dtype=str(weight_dtype),
        state_bytes_per_request=int(per_req), conv_state_bytes_per_request=int(conv),
        recurrent_state_bytes_per_request=int(per_req - conv), kv_bytes_per_token=int(kv_tok),
        kv_bytes_per_request=int(kv_req), kv_tokens_equal_to_state=(per_req / kv_tok) if kv_tok else float("inf"),
        max_batch_gather_scatter=int(max_b["gather_scatter"]), max_batch_in_place=int(max_b["in_place"]),
        rules=rules,
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
