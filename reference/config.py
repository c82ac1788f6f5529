"""Qwen3.5 configuration: one frozen dataclass with Hugging Face field names.

Reads the `config.json` of every Qwen3.5 flavour (docs/config_and_memory.md lists every field read):

| model_type          | form                                                          |
|---------------------|---------------------------------------------------------------|
| `qwen3_5`           | multimodal: LM fields under `text_config`, plus `vision_config` |
| `qwen3_5_text`      | text-only: the LM fields at the top level                      |
| `qwen3_5_moe`       | multimodal MoE                                                  |
| `qwen3_5_moe_text`  | text-only MoE                                                   |

`tie_word_embeddings` is read from the *top level* of a multimodal config (the text sub-config
inherits a generic default that would be wrong).  `layer_types` is derived from `full_attention_interval` when
absent (layer i is full attention iff (i+1) % interval == 0) and validated when present.

Everything else in qwen35 (reference and optimized) takes its sizes from here; nothing re-derives them.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from reference.errors import ConfigError
from reference.rope import RopeScaling

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_TYPES = (LINEAR, FULL)

TEXT_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text")
MULTIMODAL_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")
MODEL_TYPES = MULTIMODAL_MODEL_TYPES + TEXT_MODEL_TYPES
MOE_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")

PRESET_DIR = Path(__file__).parent / "presets"


def default_mrope_section(num_freqs: int) -> tuple[int, int, int]:
    """The (t, h, w) split that Hugging Face's fallback `[11, 11, 10]` produces for `num_freqs` frequencies.

    With the interleaved layout (docs/rope_and_mrope.md) frequency j belongs to axis j % 3, so the section sizes are the
    counts of j < num_freqs per residue.  For the published geometry (32 frequencies) that is [11, 11, 10].
    """
    return tuple(len(range(r, num_freqs, 3)) for r in range(3))  # type: ignore[return-value]


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's geometry (HF `Qwen3_5VisionConfig`)."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    rope_theta: float = 10000.0  # HF 5.x config carries it in rope_parameters
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _check_fields(self, _VISION_FIELDS, "vision_config.")
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported: the vision blocks "
                              "implement 'gelu_pytorch_tanh' only (the Qwen3.5 vision tower's activation)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) must be divisible by "
                f"vision_config.num_heads ({self.num_heads})")
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ConfigError(
                f"vision_config.num_position_embeddings ({self.num_position_embeddings}) must be a square "
                "(a learned side x side grid)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values`: C · T_p · P · P (3·2·16·16 = 1536)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LM token (2 x 2 = 4)."""
        return self.spatial_merge_size ** 2

    @property
    def num_grid_per_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "vision_config") -> VisionConfig:
        """Build from the `vision_config` object of a config.json; `where` is its path in error messages."""
        _check_object(where, d)
        kw = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        _check_fields(kw, _VISION_FIELDS, where + ".")
        rope = d.get("rope_parameters")
        if rope is not None:
            _check_object(f"{where}.rope_parameters", rope)
            if rope.get("rope_theta") is not None and "rope_theta" not in kw:
                kw["rope_theta"] = _rope_base(f"{where}.rope_parameters.rope_theta", rope["rope_theta"])
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        d = asdict(self)
        d.pop("rope_theta")
        d.pop("layer_norm_eps")
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "axial"}
        d["model_type"] = "qwen3_5_vision"
        d["deepstack_visual_indexes"] = []
        return d


# ----------------------------------------------------------------------------------------------------------------
# strict JSON types: every check names the field by its path in config.json and shows the bad value
# ----------------------------------------------------------------------------------------------------------------
MAX_SIZE = 2**31 - 1  # sizes, counts and token ids: the int32 range the kernels and the tokenizer index with
MAX_LAYERS = 2**16  # layer counts (layer_types is materialised, one entry per layer)


def _show(value) -> str:
    """repr of a bad value with its JSON-ish type, cut to 80 characters (a config may hold huge objects)."""
    r = repr(value)
    if len(r) > 80:
        r = r[:77] + "..."
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", tuple: "list",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{r} ({kind})"


def _check_object(path: str, value) -> Mapping:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must be a JSON object, got {_show(value)}")
    return value


def _int(path: str, value, *, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """An integer in [minimum, maximum]; JSON booleans and floats (even 4.0) are refused."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{path} must be an integer, got {_show(value)}")
    if not minimum <= value <= maximum:
        raise ConfigError(f"{path} must be an integer in [{minimum}, {maximum}], got {value}")
    return value


def _number(path: str, value, *, positive: bool = True) -> float:
    """A finite JSON number (integer or float; not a boolean, not a numeric string), > 0 when `positive`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{path} must be a number, got {_show(value)}")
    try:
        x = float(value)
    except OverflowError:  # an integer beyond float range
        x = math.inf
    if not math.isfinite(x) or (positive and x <= 0):
        raise ConfigError(f"{path} must be a finite{' positive' if positive else ''} number, got {value!r}")
    return x


def _flag(path: str, value) -> bool:
    """A JSON boolean: the string "false" and the integer 0 are refused (bool("false") would be True)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{path} must be a JSON boolean (true or false), got {_show(value)}")
    return value


def _string(path: str, value) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path} must be a string, got {_show(value)}")
    return value


def _int_list(path: str, value, *, minimum: int = 0) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path} must be a list of integers, got {_show(value)}")
    return tuple(_int(f"{path}[{i}]", v, minimum=minimum) for i, v in enumerate(value))


def _token_ids(path: str, value) -> int | tuple[int, ...]:
    """eos_token_id: one id or a list of ids (generation stops at any of them)."""
    if isinstance(value, (list, tuple)):
        return _int_list(path, value)
    return _int(path, value, minimum=0)


def _layer_types(path: str, value) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path} must be a list of strings {list(LAYER_TYPES)}, got {_show(value)}")
    if len(value) > MAX_LAYERS:
        raise ConfigError(f"{path} has {len(value)} entries; at most {MAX_LAYERS} layers are supported")
    for i, t in enumerate(value):
        if t not in LAYER_TYPES:  # also refuses non-strings: a list or dict never equals a layer type
            raise ConfigError(f"{path}[{i}] = {_show(t)} is not a known layer type; accepted: {list(LAYER_TYPES)}")
    return tuple(value)


def _size(path, value):
    return _int(path, value)


def _count(path, value):  # may be 0 (MoE sizes of a dense config, the shared expert of a MoE one)
    return _int(path, value, minimum=0)


def _layers(path, value):
    return _int(path, value, maximum=MAX_LAYERS)


def _token_id(path, value):
    return _int(path, value, minimum=0)


def _rope_base(path, value):
    """RoPE θ: inv_freq_i = θ^(-2i/R) must fall from 1 (θ >= 1); a θ near 0 overflows the frequencies to inf."""
    x = _number(path, value)
    if x < 1.0:
        raise ConfigError(f"{path} must be a finite number >= 1 (the RoPE base θ of inv_freq = θ^(-2i/R)), "
                          f"got {value!r}")
    return x


def _fraction(path, value):
    x = _number(path, value)
    if x > 1.0:
        raise ConfigError(f"{path} must be in (0, 1], got {value!r}")
    return x


def _mrope_section(path, value):
    sec = _int_list(path, value)
    if len(sec) != 3:
        raise ConfigError(f"{path} must be three non-negative integers (t, h, w), got {_show(value)}")
    return sec


# field -> checker(path, value); a None value means "absent" (the default applies) and is not checked here.
_VISION_FIELDS = {
    "depth": _layers, "hidden_size": _size, "hidden_act": _string, "intermediate_size": _size,
    "num_heads": _size, "in_channels": _size, "patch_size": _size, "temporal_patch_size": _size,
    "spatial_merge_size": _size, "out_hidden_size": _size, "num_position_embeddings": _size,
    "rope_theta": _rope_base, "layer_norm_eps": _number,
}
_TEXT_FIELDS = {
    "model_type": _string, "vocab_size": _size, "hidden_size": _size, "intermediate_size": _count,
    "num_hidden_layers": _layers, "num_attention_heads": _size, "num_key_value_heads": _size, "head_dim": _size,
    "hidden_act": _string, "max_position_embeddings": _size, "rms_norm_eps": _number, "attention_bias": _flag,
    "rope_type": _string, "rope_theta": _rope_base, "partial_rotary_factor": _fraction,
    "mrope_section": _mrope_section, "mrope_interleaved": _flag,
    "linear_conv_kernel_dim": _size, "linear_key_head_dim": _size, "linear_value_head_dim": _size,
    "linear_num_key_heads": _size, "linear_num_value_heads": _size, "layer_types": _layer_types,
    "full_attention_interval": _size, "attn_output_gate": _flag, "tie_word_embeddings": _flag,
    "mamba_ssm_dtype": _string, "num_experts": _count, "num_experts_per_tok": _count,
    "moe_intermediate_size": _count, "shared_expert_intermediate_size": _count,
    "image_token_id": _token_id, "video_token_id": _token_id, "vision_start_token_id": _token_id,
    "vision_end_token_id": _token_id, "eos_token_id": _token_ids, "pad_token_id": _token_id,
    "bos_token_id": _token_id,
}
# The RoPE keys of a `rope_parameters` object (read by from_hf_dict under the same field names).
_ROPE_KEYS = ("rope_type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved")
# Read from the top level of a multimodal config (not from its text_config).
_TOP_LEVEL_FIELDS = ("tie_word_embeddings", "image_token_id", "video_token_id", "vision_start_token_id",
                     "vision_end_token_id", "eos_token_id", "pad_token_id", "bos_token_id")


def _check_fields(values, checkers: Mapping, prefix: str) -> None:
    """Run `checkers[name](prefix + name, value)` on every present, non-None field of `values`.

    `values` is a dict (raw config.json fields) or a config dataclass (its attributes)."""
    for name, check in checkers.items():
        v = values.get(name) if isinstance(values, Mapping) else getattr(values, name, None)
        if v is not None:
            check(prefix + name, v)


def _check_rope_section(text: Mapping, prefix: str) -> None:
    """Types of what the RoPE block of `Qwen35Config.from_hf_dict` reads: `rope_parameters` (or the older
    `rope_scaling`) must be an object, its keys of the right types, like the top-level rope_theta."""
    def no_null(section: Mapping, keys, where: str) -> None:  # the RoPE block reads a present key as a value
        for k in keys:
            if k in section and section[k] is None:
                accepted = ("a string" if k == "rope_type" else "a JSON boolean" if k == "mrope_interleaved"
                            else "a number")
                raise ConfigError(f"{where}{k} is null; give a value or leave the key out (accepted: {accepted})")

    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key)
        if rope is not None:
            _check_object(prefix + key, rope)
            _check_fields(rope, {k: _TEXT_FIELDS[k] for k in _ROPE_KEYS}, f"{prefix}{key}.")
            no_null(rope, [k for k in _ROPE_KEYS if k != "mrope_section"], f"{prefix}{key}.")
    _check_fields(text, {k: _TEXT_FIELDS[k] for k in ("rope_theta", "partial_rotary_factor")}, prefix)
    no_null(text, ("partial_rotary_factor",), prefix)


@dataclass(frozen=True)
class Qwen35Config:
    """Qwen3.5 language-model configuration (HF field names).

    Defaults are Hugging Face's `Qwen3_5TextConfig` defaults (a 9B-like geometry) except where a published
    checkpoint fixes a value the class default does not (rope_theta 1e7, mrope_section [11, 11, 10]).
    """

    model_type: str = "qwen3_5_text"
    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    # RoPE: `rope_parameters` in config.json; flattened here.  rope_scaling holds rope_type and the context
    # extension parameters (linear / dynamic / yarn; reference/rope.py, docs/rope_and_mrope.md).
    rope_scaling: RopeScaling = RopeScaling()
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, int, int] | None = None  # None -> default_mrope_section(rotary_dim // 2)
    mrope_interleaved: bool = True
    # Gated DeltaNet
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    # Layer map
    layer_types: tuple[str, ...] | None = None  # None -> derived from full_attention_interval
    full_attention_interval: int = 4
    attn_output_gate: bool = True
    tie_word_embeddings: bool = False
    mamba_ssm_dtype: str = "float32"
    # MoE; used when model_type is a MoE type.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    # Multimodal
    vision_config: VisionConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    # Special tokens (carried through when present)
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not a Qwen3.5 type; expected one of {MODEL_TYPES}")
        _check_fields(self, _TEXT_FIELDS, "")  # every field of its JSON type (bool is not an int, "false" no bool)
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported: the MLP implements 'silu' "
                              "(SwiGLU, what every Qwen3.5 checkpoint uses) only")
        if self.attention_bias:
            raise ConfigError("attention_bias true is not supported: the attention projections are bias-free "
                              "(every Qwen3.5 checkpoint has attention_bias false)")
        if not self.mrope_interleaved:
            raise ConfigError(
                "mrope_interleaved false is not supported: Qwen3.5 uses the interleaved MRoPE layout only, and "
                "transformers ignores this flag (it always computes the interleaved layout), so a checkpoint "
                "asking for the sectioned Qwen2-VL layout would silently get interleaved results there; "
                "accepted: true (or absent)")
        if self.is_moe:
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
                _int(name, getattr(self, name))
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})")
            # Every layer of a Qwen3.5 MoE model is MoE; HF's MoE config has no intermediate_size.
            object.__setattr__(self, "intermediate_size", 0)
        else:
            _int("intermediate_size", self.intermediate_size)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be divisible by "
                f"linear_num_key_heads ({self.linear_num_key_heads})")
        rd = self.head_dim * self.partial_rotary_factor
        if abs(rd - round(rd)) > 1e-9 or int(round(rd)) % 2 or int(round(rd)) <= 0:
            raise ConfigError(
                f"rotary dim = head_dim x partial_rotary_factor = {self.head_dim} x {self.partial_rotary_factor} "
                f"= {rd} must be a positive even integer")
        # Normalise sequences to tuples (the dataclass is frozen and hashable).
        if self.mrope_section is None:
            object.__setattr__(self, "mrope_section", default_mrope_section(self.rotary_dim // 2))
        else:
            sec = _mrope_section("mrope_section", self.mrope_section)
            if sum(sec) != self.rotary_dim // 2:
                raise ConfigError(
                    f"sum(mrope_section) = {sum(sec)} must equal rotary_dim // 2 = {self.rotary_dim // 2} "
                    f"(mrope_section={list(sec)}, rotary_dim={self.rotary_dim})")
            object.__setattr__(self, "mrope_section", sec)
        if isinstance(self.rope_scaling, Mapping):  # a rope_parameters-style dict, e.g. tiny(rope_scaling={...})
            object.__setattr__(self, "rope_scaling", RopeScaling.from_rope_parameters(
                self.rope_scaling, max_position_embeddings=self.max_position_embeddings))
        elif not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a RopeScaling or a rope_parameters mapping, got "
                              f"{type(self.rope_scaling).__name__}")
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", derive_layer_types(self.num_hidden_layers,
                                                                       self.full_attention_interval))
        else:
            lt = _layer_types("layer_types", self.layer_types)
            if len(lt) != self.num_hidden_layers:
                raise ConfigError(
                    f"layer_types has {len(lt)} entries but num_hidden_layers is {self.num_hidden_layers}")
            object.__setattr__(self, "layer_types", lt)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.is_multimodal and self.vision_config is None:
            raise ConfigError(f"model_type {self.model_type!r} is multimodal but vision_config is missing")
        if self.vision_config is not None:
            if not isinstance(self.vision_config, VisionConfig):
                raise ConfigError(f"vision_config must be a VisionConfig, got {type(self.vision_config).__name__}")
            if self.vision_config.out_hidden_size != self.hidden_size:
                raise ConfigError(
                    f"vision_config.out_hidden_size ({self.vision_config.out_hidden_size}) must equal the language "
                    f"model's hidden_size ({self.hidden_size}): merged image features replace token embeddings")

    # ------------------------------------------------------------------ derived sizes
    @property
    def is_moe(self) -> bool:
        return self.model_type in MOE_MODEL_TYPES

    @property
    def is_multimodal(self) -> bool:
        return self.model_type in MULTIMODAL_MODEL_TYPES

    @property
    def key_dim(self) -> int:
        """H_k · D_k: width of the Q block and of the K block of `in_proj_qkv`."""
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        """H_v · D_v: width of the V block, of `in_proj_z` and of `out_proj`'s input."""
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: 2·key_dim + value_dim (Q, K and V all go through it)."""
        return 2 * self.key_dim + self.value_dim

    @property
    def value_heads_per_key_head(self) -> int:
        """r = H_v / H_k: value head h reads key head h // r."""
        return self.linear_num_value_heads // self.linear_num_key_heads

    @property
    def rope_type(self) -> str:
        """rope_parameters.rope_type: default | linear | dynamic | yarn (`rope_scaling.rope_type`)."""
        return getattr(self.rope_scaling, "rope_type", "default")

    @property
    def rotary_dim(self) -> int:
        """R = head_dim · partial_rotary_factor (64 for every published size)."""
        return int(round(self.head_dim * self.partial_rotary_factor))

    @property
    def q_proj_rows(self) -> int:
        """Rows of a full-attention q_proj: nh·hd query rows, plus nh·hd gate rows when attn_output_gate
        (laid out per head, [q_h0 | gate_h0 | q_h1 | ...]); without the gate q_proj is [nh·hd, H], as in
        vLLM's Qwen3-Next attention (`num_heads * (1 + attn_output_gate)` heads of q_proj)."""
        return self.num_attention_heads * self.head_dim * (2 if self.attn_output_gate else 1)

    @property
    def attention_scale(self) -> float:
        """head_dim^-½ from the *explicit* head_dim (not hidden_size / heads, as HF `Qwen3_5Attention`)."""
        return self.head_dim ** -0.5

    @property
    def num_linear_layers(self) -> int:
        return sum(t == LINEAR for t in self.layer_types)

    @property
    def num_full_layers(self) -> int:
        return sum(t == FULL for t in self.layer_types)

    @property
    def linear_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LINEAR)

    @property
    def full_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not (0 <= layer < self.num_hidden_layers):
            raise IndexError(f"layer {layer!r} is out of range 0..{self.num_hidden_layers - 1}")

    def kv_cache_index(self, layer: int) -> int:
        """Sequential KV-cache index of a full-attention layer among full layers (layer 3 -> 0, 7 -> 1, ...).

        MAX allocates KV only for full layers and numbers them 0, 1, 2, ...
        """
        self._check_layer(layer)
        if self.layer_types[layer] != FULL:
            raise ValueError(
                f"layer {layer} is a {self.layer_types[layer]} layer and has no KV cache; "
                f"full-attention layers are {list(self.full_layer_indices)}")
        return self.layer_types[:layer].count(FULL)

    def linear_layer_index(self, layer: int) -> int:
        """Sequential state-cache index of a linear-attention layer among linear layers."""
        self._check_layer(layer)
        if self.layer_types[layer] != LINEAR:
            raise ValueError(
                f"layer {layer} is a {self.layer_types[layer]} layer and has no Gated DeltaNet state; "
                f"linear-attention layers are {list(self.linear_layer_indices)}")
        return self.layer_types[:layer].count(LINEAR)

    def resolve_max_seq_len(self, requested: int | None = None) -> int:
        """Max sequence length, like the documented `calculate_max_seq_len`: the request bounded above by the
        context window (a request above it is an error), or the window itself if none.

        The window follows the RoPE scaling (`RopeScaling.max_seq_len`): max_position_embeddings for `default`,
        ⌊factor · max_position_embeddings⌋ for `linear` and `dynamic`, and
        max(max_position_embeddings, ⌊factor · original_max_position_embeddings⌋) for `yarn`."""
        limit = self.rope_scaling.max_seq_len(self.max_position_embeddings)
        if requested is None:
            return limit
        if not isinstance(requested, int) or isinstance(requested, bool) or requested <= 0:
            raise ConfigError(f"max_length must be a positive int, got {requested!r}")
        if requested > limit:
            window = (f"max_position_embeddings ({self.max_position_embeddings})" if self.rope_type == "default"
                      else f"context window {limit} (max_position_embeddings {self.max_position_embeddings} under "
                           f"rope_type {self.rope_type!r}, factor {self.rope_scaling.factor:g})")
            raise ConfigError(
                f"Unable to infer max_length for Qwen3.5: the provided max_length ({requested}) exceeds the "
                f"model's {window}")
        return requested

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> Qwen35Config:
        """Build from a Hugging Face `config.json` dict (any of the four model types)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a JSON object (the parsed config.json), got {_show(d)}")
        model_type = d.get("model_type")
        if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not a Qwen3.5 type; expected one of {MODEL_TYPES}")
        top = d
        if model_type in MULTIMODAL_MODEL_TYPES:
            if d.get("text_config") is None:
                raise ConfigError(f"model_type {model_type!r} needs a text_config object (the language-model fields)")
            text = dict(_check_object("text_config", d["text_config"]))
            prefix = "text_config."
            _check_fields(top, {k: _TEXT_FIELDS[k] for k in _TOP_LEVEL_FIELDS}, "")
            text_fields = {k: c for k, c in _TEXT_FIELDS.items() if k not in _TOP_LEVEL_FIELDS}
        else:
            text, prefix, text_fields = dict(d), "", _TEXT_FIELDS
        # Types first, each error naming the field by its config.json path (text_config.hidden_size, ...).
        _check_fields(text, {k: c for k, c in text_fields.items() if k != "model_type"}, prefix)
        _check_rope_section(text, prefix)
        kw: dict[str, Any] = {"model_type": model_type}
        simple = [f.name for f in fields(cls) if f.name not in (
            "model_type", "rope_type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved",
            "vision_config", "layer_types", "tie_word_embeddings", "image_token_id", "video_token_id",
            "vision_start_token_id", "vision_end_token_id")]
        for name in simple:
            if name in text and text[name] is not None:
                kw[name] = text[name]
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if name in top and top[name] is not None and top is not text:
                kw[name] = top[name]
        # RoPE: MAX priority — top-level rope_theta, then rope_parameters.  The older key `rope_scaling`, when
        # present and non-empty, replaces rope_parameters (transformers' `convert_rope_params_to_dict`).
        rope_key = "rope_scaling" if text.get("rope_scaling") else "rope_parameters"
        rope = dict(text.get(rope_key) or {})
        if "rope_theta" in text and text["rope_theta"] is not None:
            kw["rope_theta"] = float(text["rope_theta"])
        elif "rope_theta" in rope:
            kw["rope_theta"] = float(rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            kw["partial_rotary_factor"] = float(rope["partial_rotary_factor"])
        elif "partial_rotary_factor" in text:
            kw["partial_rotary_factor"] = float(text["partial_rotary_factor"])
        # Scaling (rope_type, or its old alias `type`, and its parameters).  A top-level
        # original_max_position_embeddings wins over the one in rope_parameters, as transformers'
        # `standardize_rope_params` does when the yarn frequencies are computed.
        scaling = dict(rope)
        if text.get("original_max_position_embeddings") is not None:
            scaling["original_max_position_embeddings"] = text["original_max_position_embeddings"]
        kw["rope_scaling"] = RopeScaling.from_rope_parameters(
            scaling, source=("text_config." if model_type in MULTIMODAL_MODEL_TYPES else "") + rope_key,
            max_position_embeddings=kw.get(
                "max_position_embeddings", cls.__dataclass_fields__["max_position_embeddings"].default))
        if rope.get("mrope_section") is not None:
            kw["mrope_section"] = tuple(rope["mrope_section"])
        if "mrope_interleaved" in rope:
            kw["mrope_interleaved"] = bool(rope["mrope_interleaved"])
        if text.get("layer_types") is not None:
            kw["layer_types"] = tuple(text["layer_types"])
        # tie_word_embeddings from the top level (the text sub-config inherits a generic default that would be
        # wrong); a text-only config is its own top level.
        if top.get("tie_word_embeddings") is not None:
            kw["tie_word_embeddings"] = top["tie_word_embeddings"]
        if model_type in MULTIMODAL_MODEL_TYPES:
            vision = d.get("vision_config")
            kw["vision_config"] = VisionConfig.from_hf_dict({} if vision is None else vision)
            for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
                if d.get(name) is not None:
                    kw[name] = d[name]
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Qwen35Config:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except OSError as e:
            raise ConfigError(f"{path} cannot be read ({e.strerror or e})") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise ConfigError(f"{path} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
        return cls.from_hf_dict(d)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Qwen35Config:
        """Read `<dir>/config.json` (or a config.json path)."""
        p = Path(path)
        return cls.from_json_file(p / "config.json" if p.is_dir() else p)

    @classmethod
    def preset(cls, name: str) -> Qwen35Config:
        """A published size: 0.8b, 2b, 4b, 9b, 27b, 35b-a3b, 122b-a10b, 397b-a17b (files in reference/presets)."""
        key = name.lower().replace("qwen3.5-", "").replace("_", "-")
        path = PRESET_DIR / f"{key}.json"
        if not path.exists():
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
        d = json.loads(path.read_text())
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        return cls.from_hf_dict(d)

    @classmethod
    def tiny(cls, **overrides) -> Qwen35Config:
        """A tiny text-only geometry for tests (4 layers: L L L F), overridable field by field."""
        base = dict(
            model_type="qwen3_5_text", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=(2, 1, 1),
            linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4,
        )
        if overrides.get("model_type") in MOE_MODEL_TYPES:
            base.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        shared_expert_intermediate_size=16)
        if overrides.get("model_type") in MULTIMODAL_MODEL_TYPES:
            base.update(vision_config=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                   patch_size=4, out_hidden_size=32, num_position_embeddings=16),
                        image_token_id=90, video_token_id=91, vision_start_token_id=92, vision_end_token_id=93)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> Qwen35Config:
        return replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def text_hf_dict(self) -> dict:
        """The language-model part as a Hugging Face text config dict."""
        d: dict[str, Any] = {}
        skip = {"model_type", "rope_scaling", "rope_theta", "partial_rotary_factor", "mrope_section",
                "mrope_interleaved", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
                "vision_end_token_id", "layer_types", "eos_token_id", "pad_token_id", "bos_token_id"}
        for f in fields(self):
            if f.name in skip:
                continue
            if self.is_moe and f.name == "intermediate_size":
                continue
            if not self.is_moe and f.name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                                "shared_expert_intermediate_size"):
                continue
            d[f.name] = getattr(self, f.name)
        d["model_type"] = "qwen3_5_moe_text" if self.is_moe else "qwen3_5_text"
        d["layer_types"] = list(self.layer_types)
        d["rope_parameters"] = {
            **self.rope_scaling.to_rope_parameters(),  # rope_type and, for linear / dynamic / yarn, its keys
            "rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor,
            "mrope_section": list(self.mrope_section), "mrope_interleaved": self.mrope_interleaved,
        }
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            if v is not None:
                d[name] = list(v) if isinstance(v, tuple) else v
        return d

    def to_hf_dict(self) -> dict:
        """A `config.json` dict that `from_hf_dict` (and Hugging Face) read back to the same config."""
        text = self.text_hf_dict()
        if not self.is_multimodal:
            text["model_type"] = self.model_type
            text["architectures"] = ["Qwen3_5MoeForCausalLM" if self.is_moe else "Qwen3_5ForCausalLM"]
            return text
        text.pop("tie_word_embeddings")
        d: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": ["Qwen3_5MoeForConditionalGeneration" if self.is_moe
                              else "Qwen3_5ForConditionalGeneration"],
            "text_config": text,
            "vision_config": self.vision_config.to_hf_dict(),
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path

    # ------------------------------------------------------------------ human-readable
    def layer_map(self) -> list[dict]:
        """One row per layer: index, type, and the KV index (full) or state index (linear)."""
        rows = []
        for i, t in enumerate(self.layer_types):
            rows.append({"layer": i, "type": t,
                         "kv_cache_index": self.kv_cache_index(i) if t == FULL else None,
                         "state_index": self.linear_layer_index(i) if t == LINEAR else None})
        return rows


def derive_layer_types(num_layers: int, interval: int) -> tuple[str, ...]:
    """Layer i is full attention iff (i + 1) % interval == 0 (HF `Qwen3_5TextConfig`): [L, L, L, F] repeated for 4."""
    if interval <= 0:
        raise ConfigError(f"full_attention_interval must be a positive int, got {interval!r}")
    return tuple(FULL if (i + 1) % interval == 0 else LINEAR for i in range(num_layers))


def preset_names() -> list[str]:
    """The presets in reference/presets/ (published sizes, smallest first; any others after, sorted)."""
    order = ["0.8b", "2b", "4b", "9b", "27b", "35b-a3b", "122b-a10b", "397b-a17b"]
    have = {p.stem for p in PRESET_DIR.glob("*.json")}
    return [n for n in order if n in have] + sorted(have - set(order))


def preset_notes(name: str) -> dict:
    """The `_unconfirmed` / `_source` notes a preset file carries."""
    key = name.lower().replace("qwen3.5-", "").replace("_", "-")
    d = json.loads((PRESET_DIR / f"{key}.json").read_text())
    return {k: v for k, v in d.items() if k.startswith("_")}
