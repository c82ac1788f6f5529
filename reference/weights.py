"""Loading a Hugging Face Qwen3.5 checkpoint directory into NumPy (docs/config_and_memory.md; pitfall B23).

    weights = load_weights(directory, config=None, dtype=np.float64, *, allow_nonfinite=False)  # ModelWeights
    rank = load_weights(directory, shard=TensorShard(config, tp, r))   # one tensor-parallel rank's part only

The files are read by `reference.safetensors_io` (format, index and shard rules, bf16 decoding); this module maps
the tensors it finds onto the model: the names and shapes a config expects, the dtype each is used in, and the
`ModelWeights` / `LayerWeights` the models take.

What is accepted:

* Both name prefixes: `model.` (Qwen3_5ForCausalLM) and `model.language_model.` (Qwen3_5ForConditionalGeneration;
  checked first, as MAX's adapter does).  `model.visual.*` is returned, prefix stripped, in `ModelWeights.visual`
  for the vision path; `mtp.*` (multi-token-prediction head) is skipped.
* Dense and MoE; MoE experts either fused (`mlp.experts.gate_up_proj [E, 2·I, H]`, `mlp.experts.down_proj
  [E, H, I]`) or per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`, what transformers 5.x writes), which
  are stacked into the fused form (gate rows first, then up rows).
* `conv1d.weight` as `[C, 1, K]` (PyTorch depthwise Conv1d) or `[C, K]`; stored as `[C, K]`.
* Any float storage dtype: F64, F32, F16, BF16.
* Tied embeddings when the config says so (`lm_head.weight` then optional and unused: HF ties it to the embedding).

Dtype rule: every tensor is cast to `dtype`, except `A_log`, `dt_bias` and the gated-norm weight
(`linear_attn.norm.weight`), which are kept in float32 or wider whatever `dtype` is (HF: "If the model is loaded in
fp16, without the .float() here, A might be -inf"; MAX casts them to fp32).

Full key coverage: every expected tensor must be present with the expected shape and a float dtype, and nothing
unexpected may be left over, else ONE `WeightLoadError` lists the missing, unexpected, mis-shaped and wrongly typed
names (all of them, not just the first).  `attn_output_gate: false` expects q_proj [nh·hd, H] (no gate rows).

Every tensor the model uses must be finite in the requested dtype (no NaN / ±Inf, no overflow to float16), unless
`allow_nonfinite=True` (else a `CheckpointError` naming the tensor and its file).  The directory, index and file
refusals are those of `reference.safetensors_io`.

Sharded loading (`shard=reference.parallel.TensorShard(config, tp, rank)`): the result equals
`reference.parallel.shard_weights(load_weights(directory), tp, rank)` bit for bit, but each tensor is read from the
memory-mapped files only where `reference.parallel.shard_index` says the rank holds it (BF16 decoded lazily, per-
expert MoE tensors stacked for the rank's experts only), so no rank ever holds a whole split tensor.  The name and
shape checks still cover the whole model (from the headers, no data read) and fail with the same WeightLoadError
on every rank; the finiteness check runs on what the rank loads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from reference.attention import AttentionWeights
from reference.config import LINEAR, Qwen35Config
from reference.deltanet import DeltaNetWeights
from reference.errors import CheckpointError, ConfigError, WeightLoadError
from reference.mlp import MLPWeights, MoEWeights
from reference.safetensors_io import checkpoint_dir, read_checkpoint

if TYPE_CHECKING:  # reference.parallel builds on this module (ModelWeights): imported where a shard is given
    from reference.parallel import TensorShard

__all__ = [
    "WeightLoadError", "LayerWeights", "ModelWeights", "load_weights", "weights_from_state_dict",
    "expected_lm_shapes", "expected_vision_shapes", "FP32_KEPT_SUFFIXES", "LM_PREFIXES", "VISION_PREFIX",
]

LM_PREFIXES = ("model.language_model.", "model.")  # checked in this order (as MAX's weight adapter does)
VISION_PREFIX = "model.visual."
SKIPPED_PREFIXES = ("mtp.",)
# Kept in float32 or wider whatever the requested dtype (pitfall B23; HF upcasts A_log with .float()).
FP32_KEPT_SUFFIXES = ("linear_attn.A_log", "linear_attn.dt_bias", "linear_attn.norm.weight")


# ----------------------------------------------------------------------------------------------------------------
# expected names and shapes (as transformers names the parameters), relative to the LM prefix / the vision prefix
# ----------------------------------------------------------------------------------------------------------------
def expected_lm_shapes(config: Qwen35Config) -> dict[str, tuple]:
    """Every language-model tensor (prefix stripped; `lm_head.weight` as is; MoE experts in fused form)."""
    c = config
    H, V = c.hidden_size, c.vocab_size
    shapes: dict[str, tuple] = {"embed_tokens.weight": (V, H), "norm.weight": (H,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i, kind in enumerate(c.layer_types):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        if kind == LINEAR:
            for name, shape in DeltaNetWeights.expected_shapes(c).items():
                suffix = "" if name in ("dt_bias", "A_log") else ".weight"
                shapes[p + f"linear_attn.{name}{suffix}"] = shape
        else:
            nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
            shapes.update({
                p + "self_attn.q_proj.weight": (c.q_proj_rows, H),  # q and gate interleaved per head (or q)
                p + "self_attn.k_proj.weight": (nkv * hd, H),
                p + "self_attn.v_proj.weight": (nkv * hd, H),
                p + "self_attn.o_proj.weight": (H, nh * hd),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
            })
        if c.is_moe:
            E, I, I_s = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
            shapes.update({
                p + "mlp.gate.weight": (E, H),
                p + "mlp.experts.gate_up_proj": (E, 2 * I, H),
                p + "mlp.experts.down_proj": (E, H, I),
                p + "mlp.shared_expert.gate_proj.weight": (I_s, H),
                p + "mlp.shared_expert.up_proj.weight": (I_s, H),
                p + "mlp.shared_expert.down_proj.weight": (H, I_s),
                p + "mlp.shared_expert_gate.weight": (1, H),
            })
        else:
            I = c.intermediate_size
            shapes.update({p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                           p + "mlp.down_proj.weight": (H, I)})
    return shapes


def expected_vision_shapes(config: Qwen35Config) -> dict[str, tuple]:
    """Every vision-tower tensor, prefix `model.visual.` stripped; {} for text-only configs."""
    v = config.vision_config
    if v is None:
        return {}
    Hv, I, P, Tp = v.hidden_size, v.intermediate_size, v.patch_size, v.temporal_patch_size
    Hm = Hv * v.merge_unit
    shapes: dict[str, tuple] = {
        "patch_embed.proj.weight": (Hv, v.in_channels, Tp, P, P), "patch_embed.proj.bias": (Hv,),
        "pos_embed.weight": (v.num_position_embeddings, Hv),
        "merger.norm.weight": (Hv,), "merger.norm.bias": (Hv,),
        "merger.linear_fc1.weight": (Hm, Hm), "merger.linear_fc1.bias": (Hm,),
        "merger.linear_fc2.weight": (v.out_hidden_size, Hm), "merger.linear_fc2.bias": (v.out_hidden_size,),
    }
    for i in range(v.depth):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (Hv,), p + "norm1.bias": (Hv,), p + "norm2.weight": (Hv,), p + "norm2.bias": (Hv,),
            p + "attn.qkv.weight": (3 * Hv, Hv), p + "attn.qkv.bias": (3 * Hv,),
            p + "attn.proj.weight": (Hv, Hv), p + "attn.proj.bias": (Hv,),
            p + "mlp.linear_fc1.weight": (I, Hv), p + "mlp.linear_fc1.bias": (I,),
            p + "mlp.linear_fc2.weight": (Hv, I), p + "mlp.linear_fc2.bias": (Hv,),
        })
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# the loaded model
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LayerWeights:
    """One decoder layer: the two zero-centred norms, the token mixer (by layer type) and the MLP / MoE block."""

    layer_type: str  # "linear_attention" | "full_attention"
    input_layernorm: np.ndarray  # [H]
    post_attention_layernorm: np.ndarray  # [H]
    mixer: DeltaNetWeights | AttentionWeights
    mlp: MLPWeights | MoEWeights


@dataclass
class ModelWeights:
    """A whole Qwen3.5 language model (plus the raw vision tensors) in NumPy.

    `lm_head` is the same array as `embed_tokens` when the config ties them.  `visual` holds the `model.visual.*`
    tensors with the prefix stripped (empty for text-only checkpoints).  `source_dtypes` maps checkpoint names to
    their stored dtype ("BF16", "F32", ...); `prefix` is the LM prefix the checkpoint used.
    """

    config: Qwen35Config
    embed_tokens: np.ndarray  # [V, H]
    norm: np.ndarray  # [H]
    lm_head: np.ndarray  # [V, H]
    layers: list[LayerWeights]
    visual: dict[str, np.ndarray] = field(default_factory=dict)
    prefix: str = "model."
    source_dtypes: dict[str, str] = field(default_factory=dict)
    shard: object = None  # reference.parallel.TensorShard when these are one tensor-parallel rank's weights

    @property
    def dtype(self) -> np.dtype:
        return self.embed_tokens.dtype


def _split_prefix(names) -> str:
    """The LM prefix this checkpoint uses: `model.language_model.` if any name has it, else `model.`."""
    return LM_PREFIXES[0] if any(n.startswith(LM_PREFIXES[0]) for n in names) else LM_PREFIXES[1]


_PER_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _dtype_of(arr) -> np.dtype:
    """The dtype of a checkpoint tensor (an array, a memory-mapped view or a lazy one) without reading its data."""
    dt = getattr(arr, "dtype", None)
    return dt if isinstance(dt, np.dtype) else np.asarray(arr).dtype


class _FusedExperts:
    """Per-expert checkpoint tensors seen as one fused [E, rows, cols] tensor, stacked only where it is read.

    `parts[e]` lists expert e's tensors, stacked along their rows: [gate_proj [I, H], up_proj [I, H]] for
    `gate_up_proj` [E, 2I, H] (gate rows first, as transformers fuses them), [down_proj [H, I]] for `down_proj`
    [E, H, I].  `t[key]` builds only the experts `key[0]` selects (then applies the rest of the key);
    `np.asarray(t)` builds them all.
    """

    def __init__(self, parts: list[list]):
        self.parts = parts
        first = parts[0]
        self.shape = (len(parts), sum(np.shape(p)[0] for p in first), *np.shape(first[0])[1:])
        self.ndim = len(self.shape)
        # one dtype for any selection: that of stacking every expert (a float promotion, so exact)
        self.dtype = np.result_type(*(_dtype_of(p) for ps in parts for p in ps))

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        chosen = np.arange(len(self.parts))[key[0] if key else slice(None)]
        rest = key[1:]
        if chosen.ndim == 0:  # one expert, its own axes
            return self[(np.array([chosen]),)][(0, *rest)]
        out = np.empty((len(chosen), *self.shape[1:]), dtype=self.dtype)
        for j, e in enumerate(chosen):
            row = 0
            for part in self.parts[e]:
                n = np.shape(part)[0]
                out[j, row:row + n] = part  # one expert's tensor decoded at a time
                row += n
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError("per-expert tensors cannot be viewed as one fused array without a copy")
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


def _select(arr, spec):
    """The part `spec` = (axis, indices) of checkpoint tensor `arr` (None: all of it).  On a memory-mapped view, a
    BF16Tensor or a _FusedExperts only the selected elements are read (and decoded)."""
    if spec is None:
        return arr
    axis, idx = spec
    return arr[(slice(None),) * axis + (idx,)]


def weights_from_state_dict(tensors: dict[str, np.ndarray], config: Qwen35Config, dtype=np.float64, *,
                            source_dtypes: dict[str, str] | None = None, where: str = "checkpoint",
                            allow_nonfinite: bool = False, files: dict | None = None,
                            shard: TensorShard | None = None) -> ModelWeights:
    """Map checkpoint tensors (names as stored) onto a ModelWeights, checking full key coverage.

    `tensors` values may be arrays, memory-mapped views or lazy array-likes (`reference.safetensors_io.BF16Tensor`:
    anything with `shape`, `dtype`, `__getitem__` and `__array__`); only their shapes and dtypes are looked at
    until the checks pass.

    Every tensor the model uses must be finite in the requested `dtype` (NaN / ±Inf in the file, or a value
    beyond float16's range when dtype is float16), else CheckpointError naming the tensor and its file
    (`files`: name -> path); `allow_nonfinite=True` lets them through (to study a broken checkpoint).

    `shard` (a `reference.parallel.TensorShard` of `config`): return only that tensor-parallel rank's part, equal
    to `reference.parallel.shard_weights` of the whole model, reading each tensor only at the rank's rows /
    columns / experts (`reference.parallel.shard_index`).  The name and shape checks are the whole model's.

    Raises WeightLoadError listing missing, unexpected, mis-shaped and non-float tensors together; ConfigError
    when `shard` belongs to another config.
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a float dtype, got {dtype}")
    if shard is not None:
        from reference.parallel import TensorShard, shard_index

        if not isinstance(shard, TensorShard):
            raise TypeError(f"shard must be a reference.parallel.TensorShard or None, got {type(shard).__name__}")
        if shard.config != config:
            raise ConfigError(f"shard (rank {shard.rank} of tensor_parallel={shard.tensor_parallel}) was made for "
                              f"another config than the one {where} is loaded with; build the TensorShard from the "
                              "same config")
    source_dtypes = dict(source_dtypes or {})
    prefix = _split_prefix(tensors)
    lm: dict[str, np.ndarray] = {}  # stripped name -> array
    full_name: dict[str, str] = {}  # stripped name -> checkpoint name (for messages)
    visual: dict[str, np.ndarray] = {}
    unexpected: list[str] = []
    for name, arr in tensors.items():
        if name.startswith(SKIPPED_PREFIXES):
            continue  # multi-token-prediction head: not part of the base forward
        if name.startswith(VISION_PREFIX):
            visual[name[len(VISION_PREFIX):]] = arr
        elif name == "lm_head.weight":
            lm[name], full_name[name] = arr, name
        elif name.startswith(prefix):
            lm[name[len(prefix):]], full_name[name[len(prefix):]] = arr, name
        else:
            unexpected.append(name)

    missing: list[str] = []
    mis_shaped: list[tuple[str, tuple, tuple]] = []
    wrong_dtype: list[tuple[str, str]] = []

    def is_float(name: str, arr) -> bool:
        if _dtype_of(arr).kind != "f":
            wrong_dtype.append((name, source_dtypes.get(name, str(_dtype_of(arr)))))
            return False
        return True

    # Per-expert MoE names -> fused [E, 2I, H] / [E, H, I] (gate rows first, then up, as HF fuses them), stacked
    # when read (a rank stacks only its experts).
    reported: set[str] = set()  # fused names whose per-expert parts were already reported as wrong
    if config.is_moe:
        E, I, H = config.num_experts, config.moe_intermediate_size, config.hidden_size
        per_expert: dict[str, dict[tuple[int, str], str]] = {}
        for key in list(lm):
            m = _PER_EXPERT.match(key)
            if m:
                per_expert.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = key
        for base, parts in per_expert.items():
            if f"{base}.gate_up_proj" in lm or f"{base}.down_proj" in lm:
                continue  # fused names present too: the per-expert ones are left over and reported unexpected
            want = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
            ok = True
            for e in range(E):
                for proj, shape in want.items():
                    key = parts.get((e, proj))
                    if key is None:
                        missing.append(f"{prefix}{base}.{e}.{proj}.weight")
                        ok = False
                    elif not is_float(full_name[key], lm[key]):
                        ok = False
                    elif tuple(np.shape(lm[key])) != shape:
                        mis_shaped.append((full_name[key], shape, tuple(np.shape(lm[key]))))
                        ok = False
            if not ok:
                reported.update({f"{base}.gate_up_proj", f"{base}.down_proj"})
                for key in parts.values():  # reported above where wrong; don't also call them unexpected
                    lm.pop(key, None)
                continue
            gate_up = _FusedExperts([[lm[parts[(e, "gate_proj")]], lm[parts[(e, "up_proj")]]]
                                     for e in range(E)])  # [E, 2I, H]
            down = _FusedExperts([[lm[parts[(e, "down_proj")]]] for e in range(E)])  # [E, H, I]
            for key in [k for k in parts.values() if int(_PER_EXPERT.match(k).group(2)) < E]:
                lm.pop(key)
            lm[f"{base}.gate_up_proj"], full_name[f"{base}.gate_up_proj"] = gate_up, f"{prefix}{base}.*"
            lm[f"{base}.down_proj"], full_name[f"{base}.down_proj"] = down, f"{prefix}{base}.*"

    expected = expected_lm_shapes(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()

    def ckpt_name(key: str) -> str:
        return full_name.get(key, key if key == "lm_head.weight" else prefix + key)

    for key, shape in expected.items():
        if key in reported:
            continue
        if key not in lm:
            missing.append(ckpt_name(key))
            continue
        arr = lm[key]
        if not is_float(ckpt_name(key), arr):
            continue
        got = tuple(np.shape(arr))
        if key.endswith("conv1d.weight") and len(got) == 3 and got[1] == 1:
            got = (got[0], got[2])  # PyTorch depthwise [C, 1, K] -> [C, K]
        if got != shape:
            mis_shaped.append((ckpt_name(key), shape, tuple(np.shape(arr))))
    for key in lm:
        if key not in expected and key not in optional:
            unexpected.append(ckpt_name(key))

    v_expected = expected_vision_shapes(config)
    if v_expected:
        for key, shape in v_expected.items():
            if key not in visual:
                missing.append(VISION_PREFIX + key)
            elif is_float(VISION_PREFIX + key, visual[key]) and tuple(np.shape(visual[key])) != shape:
                mis_shaped.append((VISION_PREFIX + key, shape, tuple(np.shape(visual[key]))))
        unexpected.extend(VISION_PREFIX + k for k in visual if k not in v_expected)
    # A text-only config ignores model.visual.* (HF Qwen3_5ForCausalLM does the same), but returns them.

    if missing or unexpected or mis_shaped or wrong_dtype:
        lines = [f"{where} does not match the {config.model_type} config "
                 f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, LM prefix {prefix!r}):"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(sorted(missing)))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
        if mis_shaped:
            lines.append(f"  mis-shaped ({len(mis_shaped)}): " + ", ".join(
                f"{n} expected {list(e)} got {list(g)}" for n, e, g in sorted(mis_shaped)))
        if wrong_dtype:
            lines.append(f"  not floating point ({len(wrong_dtype)}): " + ", ".join(
                f"{n} ({d})" for n, d in sorted(wrong_dtype)))
        q_name = next((n for n, _, g in mis_shaped if n.endswith("self_attn.q_proj.weight")), None)
        if q_name is not None:
            got_rows = next(g for n, _, g in mis_shaped if n == q_name)[0]
            nhd = config.num_attention_heads * config.head_dim
            if got_rows == 2 * nhd and not config.attn_output_gate:
                lines.append(f"  note: {q_name} has 2·nh·hd = {got_rows} rows (query and gate rows) but the config "
                             "says attn_output_gate false (q_proj of nh·hd rows); set attn_output_gate true")
            elif got_rows == nhd and config.attn_output_gate:
                lines.append(f"  note: {q_name} has nh·hd = {got_rows} rows (no gate rows) but the config says "
                             "attn_output_gate true (q_proj of 2·nh·hd rows); set attn_output_gate false")
        raise WeightLoadError("\n".join(lines), missing=sorted(missing), unexpected=sorted(unexpected),
                              mis_shaped=sorted(mis_shaped), wrong_dtype=sorted(wrong_dtype))

    def finite(name: str, src, out: np.ndarray) -> np.ndarray:
        """`out` (the cast copy of checkpoint tensor `name`) if every value is finite, else CheckpointError."""
        if allow_nonfinite or np.isfinite(out).all():
            return out
        src = np.asarray(src)
        bad = int(np.count_nonzero(~np.isfinite(src)))
        file = (files or {}).get(name, where)
        why = (f"{bad} of its {src.size} values are NaN or infinite" if bad else
               f"its values exceed the range of {out.dtype} (the requested dtype); load in float32")
        raise CheckpointError(f"{file}: tensor {name!r} is not finite: {why}. Pass allow_nonfinite=True (the "
                              "qwen35 commands: --allow-nonfinite) to load it anyway")

    def get(key: str) -> np.ndarray:
        """Tensor `key` (the rank's part of it, with a shard) as a C-contiguous copy in its load dtype."""
        wide = np.promote_types(dtype, np.float32) if key.endswith(FP32_KEPT_SUFFIXES) else dtype
        spec = None if shard is None else shard_index(config, key, shard.tensor_parallel, shard.rank)
        arr = _select(lm[key], spec)  # rows of conv1d [C, 1, K] are its channels, as of [C, K]
        if key.endswith("conv1d.weight") and arr.ndim == 3:
            arr = arr[:, 0, :]  # [C, 1, K] -> [C, K]
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow to float16 is reported by finite()
            out = np.array(arr, dtype=wide, order="C")  # always a copy: never a view into the mapped file
        return finite(ckpt_name(key), arr, out)

    layers = []
    for i, kind in enumerate(config.layer_types):
        p = f"layers.{i}."
        if kind == LINEAR:
            mixer = DeltaNetWeights(**{
                name: get(p + f"linear_attn.{name}" + ("" if name in ("dt_bias", "A_log") else ".weight"))
                for name in DeltaNetWeights.expected_shapes(config)})
        else:
            mixer = AttentionWeights(**{name: get(p + f"self_attn.{name}.weight")
                                        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")})
        if config.is_moe:
            mlp = MoEWeights(
                gate=get(p + "mlp.gate.weight"), gate_up_proj=get(p + "mlp.experts.gate_up_proj"),
                down_proj=get(p + "mlp.experts.down_proj"),
                shared_gate_proj=get(p + "mlp.shared_expert.gate_proj.weight"),
                shared_up_proj=get(p + "mlp.shared_expert.up_proj.weight"),
                shared_down_proj=get(p + "mlp.shared_expert.down_proj.weight"),
                shared_expert_gate=get(p + "mlp.shared_expert_gate.weight"))
        else:
            mlp = MLPWeights(**{n: get(p + f"mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")})
        layers.append(LayerWeights(layer_type=kind, input_layernorm=get(p + "input_layernorm.weight"),
                                   post_attention_layernorm=get(p + "post_attention_layernorm.weight"),
                                   mixer=mixer, mlp=mlp))
    embed = get("embed_tokens.weight")
    # Tied: HF points lm_head at the embedding; a stored lm_head.weight is then ignored.
    lm_head = embed if config.tie_word_embeddings else get("lm_head.weight")
    return ModelWeights(config=config, embed_tokens=embed, norm=get("norm.weight"), lm_head=lm_head, layers=layers,
                        visual={k: finite(VISION_PREFIX + k, v, np.array(v)) for k, v in visual.items()},
                        prefix=prefix, source_dtypes=source_dtypes, shard=shard)


def load_weights(directory, config: Qwen35Config | None = None, dtype=np.float64, *,
                 allow_nonfinite: bool = False, shard: TensorShard | None = None) -> ModelWeights:
    """Load a checkpoint directory (config.json + safetensors) into a ModelWeights.

    Args:
        directory: a Hugging Face checkpoint directory (a file path is refused: CheckpointError).
        config: the config to check against (default: read `<directory>/config.json`).
        dtype: the weight dtype (float64 for the oracle, float32 to mirror fp32, float16 allowed);
            A_log, dt_bias and the gated-norm weight stay float32 or wider.
        allow_nonfinite: load tensors holding NaN / ±Inf (by default a CheckpointError naming tensor and file).
        shard: a `reference.parallel.TensorShard` (of this config): load only that tensor-parallel rank's part
            (= `shard_weights(load_weights(directory, ...), tp, rank)`), read from the mapped files at its rows /
            columns / experts only.  None: the whole model.
    Raises:
        ConfigError (config.json; a shard of another config), CheckpointError (directory, index, safetensors
        files, non-finite values), WeightLoadError (the tensors do not fit the config).
    """
    directory = checkpoint_dir(directory)
    if config is None:
        config = Qwen35Config.from_pretrained(directory)
    # Lazily: memory-mapped views, BF16 decoded only where get() reads (all of a tensor, or a rank's part).
    tensors, dtypes, files = read_checkpoint(directory, lazy=True)
    return weights_from_state_dict(tensors, config, dtype, source_dtypes=dtypes, where=str(directory),
                                   allow_nonfinite=allow_nonfinite, files={k: str(v) for k, v in files.items()},
                                   shard=shard)
