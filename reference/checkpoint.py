"""qwen35's own checkpoint writer: a Hugging Face-format directory (config.json + safetensors) from NumPy.

    write_checkpoint(directory, config, seed=0, dtype="float32")        # deterministic random init
    write_checkpoint(directory, config, tensors=state_dict)             # given tensors (checkpoint names)
    random_state_dict(config, seed=0) -> {checkpoint name: float32 array}

The names are those transformers writes: `model.` + `lm_head.` for the text-only types
(Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM), `model.language_model.` + `model.visual.` + `lm_head.` for the
multimodal types.  MoE experts are written fused (`mlp.experts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`)
or per expert (`moe_layout="per_expert"`, what transformers 5.x itself writes); reference.weights reads both.
The directory loads in transformers (`Qwen3_5ForCausalLM.from_pretrained(dir)`) and in reference.weights alike
(tests/test_weights.py checks both).

Random init is drawn from `numpy.random.default_rng(seed)` tensor by tensor in sorted-name order, so the same
(config, seed) always gives the same bytes.  The scales imitate a trained network rather than HF's 0.02-std init:
projections N(0, 1/fan_in), embeddings N(0, 1), zero-centred norm weights N(0, 0.1²) (1 + w is applied),
gated-norm / LayerNorm weights 1 + N(0, 0.1²), A_log = log U(1, 8), dt_bias U(0.5, 1.5), biases N(0, 0.02²).

bf16 files are written by rounding float32 to nearest-even (reference.safetensors_io.float32_to_bf16); A_log, dt_bias
and the gated-norm weight are then still written in float32 (as MAX's weight adapter keeps them; pitfall B23).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from reference.config import Qwen35Config
from reference.safetensors_io import INDEX_FILE, SINGLE_FILE, write_safetensors
from reference.weights import FP32_KEPT_SUFFIXES, VISION_PREFIX, expected_lm_shapes, expected_vision_shapes

__all__ = ["random_state_dict", "write_checkpoint", "checkpoint_names", "lm_prefix"]


def lm_prefix(config: Qwen35Config) -> str:
    """`model.language_model.` for multimodal checkpoints, `model.` for text-only ones (as transformers names them)."""
    return "model.language_model." if config.is_multimodal else "model."


def checkpoint_names(config: Qwen35Config) -> dict[str, tuple]:
    """Every tensor name a checkpoint of `config` holds (fused MoE layout), with its shape."""
    pre = lm_prefix(config)
    out = {(k if k == "lm_head.weight" else pre + k): s for k, s in expected_lm_shapes(config).items()}
    out.update({VISION_PREFIX + k: s for k, s in expected_vision_shapes(config).items()})
    return out


def _init(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    if name.endswith("A_log"):
        return np.log(rng.uniform(1.0, 8.0, shape))
    if name.endswith("dt_bias"):
        return rng.uniform(0.5, 1.5, shape)
    if name.endswith(".bias"):
        return 0.02 * rng.standard_normal(shape)
    if name.endswith("linear_attn.norm.weight") or (name.startswith(VISION_PREFIX) and "norm" in name):
        return 1.0 + 0.1 * rng.standard_normal(shape)  # plain-weight norms (gated RMSNorm, LayerNorm)
    if name.endswith("norm.weight"):
        return 0.1 * rng.standard_normal(shape)  # zero-centred RMSNorm: the stored w of x̂·(1 + w)
    if name.endswith(("embed_tokens.weight", "pos_embed.weight")):
        return rng.standard_normal(shape)
    if name.endswith("conv1d.weight"):
        return rng.standard_normal(shape) / np.sqrt(shape[-1])
    if len(shape) == 3 and ".experts." in name:  # [E, out, in]
        return rng.standard_normal(shape) / np.sqrt(shape[-1])
    if len(shape) >= 2:  # [out, in] or a conv3d patch kernel [out, C, T, P, P]
        return rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[1:])))
    return 0.1 * rng.standard_normal(shape)


def random_state_dict(config: Qwen35Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random float32 tensors under their checkpoint names (fused MoE layout, conv1d [C, 1, K])."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(checkpoint_names(config).items()):
        if name.endswith("conv1d.weight"):
            shape = (shape[0], 1, shape[1])  # PyTorch depthwise Conv1d layout, as transformers writes it
        out[name] = _init(name, shape, rng).astype(np.float32)
    return out


_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _per_expert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fused expert tensors -> `experts.{e}.{gate,up,down}_proj.weight` (gate rows first in gate_up)."""
    out = {}
    for name, arr in tensors.items():
        m = _FUSED.match(name)
        if not m:
            out[name] = arr
            continue
        base, which = m.groups()
        for e in range(arr.shape[0]):
            if which == "down_proj":
                out[f"{base}.{e}.down_proj.weight"] = arr[e]
            else:
                half = arr.shape[1] // 2
                out[f"{base}.{e}.gate_proj.weight"] = arr[e, :half]
                out[f"{base}.{e}.up_proj.weight"] = arr[e, half:]
    return out


def write_checkpoint(directory, config: Qwen35Config, *, tensors: dict[str, np.ndarray] | None = None, seed: int = 0,
                     dtype: str = "float32", moe_layout: str = "fused", max_shard_bytes: int | None = None,
                     extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors (or shards + model.safetensors.index.json) to `directory`.

    Args:
        config: the model config (written with `config.to_hf_dict()`).
        tensors: checkpoint-name -> array; default `random_state_dict(config, seed)`.
        dtype: "float32" or "bfloat16" storage (A_log, dt_bias, gated-norm weight stay float32).
        moe_layout: "fused" or "per_expert".
        max_shard_bytes: split into shards of at most this many bytes (one tensor per shard at least).
        extra_files: file name -> text, written alongside (tokenizer files, a README...).
    Returns:
        the directory.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if moe_layout not in ("fused", "per_expert"):
        raise ValueError(f"moe_layout must be 'fused' or 'per_expert', got {moe_layout!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = random_state_dict(config, seed) if tensors is None else dict(tensors)
    tensors = {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
               for k, v in tensors.items()}
    if moe_layout == "per_expert":
        tensors = _per_expert(tensors)
    bf16 = () if dtype == "float32" else tuple(
        k for k, v in tensors.items() if v.dtype.kind == "f" and not k.endswith(FP32_KEPT_SUFFIXES))

    cfg = config.to_hf_dict()
    cfg["dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for old in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        if old.exists():
            old.unlink()
    itemsize = {k: (2 if k in bf16 else v.dtype.itemsize) for k, v in tensors.items()}
    if max_shard_bytes is None:
        write_safetensors(directory / SINGLE_FILE, tensors, bf16=bf16)
    else:
        shards: list[list[str]] = [[]]
        size = 0
        for name in sorted(tensors):
            n = tensors[name].size * itemsize[name]
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += n
        weight_map = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(directory / fname, {k: tensors[k] for k in names}, bf16=tuple(k for k in names
                                                                                            if k in bf16))
            weight_map.update({k: fname for k in names})
        total = sum(tensors[k].size * itemsize[k] for k in tensors)
        (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": int(total)},
                                                        "weight_map": weight_map}, indent=2) + "\n")
    for fname, text in (extra_files or {}).items():
        (directory / fname).write_text(text)
    return directory
