"""Tiny random Qwen3.5 checkpoints written by Hugging Face `transformers` itself (the outside oracle).

    make_hf_checkpoint(directory, kind="dense", seed=0, dtype="float32", **config_overrides) -> Path
    load_hf_model(directory) -> the HF model (eval mode, float32, attn_implementation="eager")

`kind` picks the class: "dense" -> Qwen3_5ForCausalLM, "moe" -> Qwen3_5MoeForCausalLM, "multimodal" ->
Qwen3_5ForConditionalGeneration, "multimodal_moe" -> Qwen3_5MoeForConditionalGeneration.  The geometry is
`Qwen35Config.tiny(...)` (4 layers L L L F, hidden 32, vocab 97; a tiny vision tower for the multimodal kinds),
with `config_overrides` applied field by field (e.g. `num_hidden_layers=8`, `tie_word_embeddings=True`).

Weights are drawn from a NumPy generator seeded by `seed` (independent of torch's RNG), scaled like a trained
network rather than HF's 0.02-std init, so logits are well spread and greedy decoding is not a coin toss:
projections ~ N(0, 1/fan_in), embeddings ~ N(0, 1), zero-centred norm weights ~ N(0, 0.1²), A_log = log U(1, 8),
dt_bias ~ U(0.5, 1.5), gated-norm weight 1 + N(0, 0.1²).  Then `save_pretrained` writes config.json +
model.safetensors exactly as for a real checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reference.config import Qwen35Config

KINDS = {
    "dense": ("qwen3_5_text", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM"),
    "moe": ("qwen3_5_moe_text", "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
    "multimodal": ("qwen3_5", "Qwen3_5Config", "Qwen3_5ForConditionalGeneration"),
    "multimodal_moe": ("qwen3_5_moe", "Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration"),
}
_ARCH_TO_KIND = {arch: kind for kind, (_, _, arch) in KINDS.items()}


def tiny_config(kind: str = "dense", **config_overrides) -> Qwen35Config:
    """The Qwen35Config that `make_hf_checkpoint(kind=..., **config_overrides)` writes."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return Qwen35Config.tiny(model_type=KINDS[kind][0], **config_overrides)


def _hf_config(config: Qwen35Config):
    import transformers

    kind = next(k for k, v in KINDS.items() if v[0] == config.model_type)
    cls = getattr(transformers, KINDS[kind][1])
    d = config.to_hf_dict()
    d.pop("model_type", None)
    d.pop("architectures", None)
    hf = cls(**d)
    hf.architectures = [KINDS[kind][2]]
    return hf, getattr(transformers, KINDS[kind][2])


def _random_value(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """A trained-looking random value for the parameter `name` (see the module docstring)."""
    if name.endswith("A_log"):
        return np.log(rng.uniform(1.0, 8.0, shape))
    if name.endswith("dt_bias"):
        return rng.uniform(0.5, 1.5, shape)
    if name.endswith("linear_attn.norm.weight"):  # plain-weight gated RMSNorm (init 1)
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if "visual" not in name and name.endswith("norm.weight"):  # zero-centred RMSNorm weights (1 + w applied)
        return 0.1 * rng.standard_normal(shape)
    if "visual" in name and ("norm" in name) and name.endswith(".weight"):  # LayerNorm (plain weight)
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith(".bias"):
        return 0.02 * rng.standard_normal(shape)
    if name.endswith("embed_tokens.weight") or name.endswith("pos_embed.weight"):
        return rng.standard_normal(shape)
    if name.endswith("conv1d.weight"):
        return rng.standard_normal(shape) / np.sqrt(shape[-1])
    if len(shape) >= 2:  # [out, in] (or [E, out, in], or a conv3d patch kernel): fan-in = all but the first axis
        fan_in = int(np.prod(shape[-1:])) if len(shape) == 3 and "experts" in name else int(np.prod(shape[1:]))
        return rng.standard_normal(shape) / np.sqrt(fan_in)
    return 0.1 * rng.standard_normal(shape)


def make_hf_checkpoint(directory, kind: str = "dense", seed: int = 0, dtype: str = "float32",
                       **config_overrides) -> Path:
    """Write a tiny random Qwen3.5 checkpoint with `transformers`' save_pretrained; return the directory.

    Args:
        directory: where to write (created if needed).
        kind: "dense" | "moe" | "multimodal" | "multimodal_moe".
        seed: seeds the NumPy generator that draws every weight (same seed, same checkpoint).
        dtype: "float32" or "bfloat16" (the safetensors dtype).
        **config_overrides: Qwen35Config fields (tiny() defaults otherwise).
    """
    import torch

    config = tiny_config(kind, **config_overrides)
    hf_config, model_cls = _hf_config(config)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(hf_config).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(torch.from_numpy(_random_value(name, tuple(p.shape), rng)).to(p.dtype))
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    model = model.to(getattr(torch, dtype))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_hf_model(directory):
    """Load a checkpoint directory with the HF class its config.json names: eval mode, float32, eager attention."""
    import torch
    import transformers

    d = json.loads((Path(directory) / "config.json").read_text())
    arch = (d.get("architectures") or [None])[0]
    if arch not in _ARCH_TO_KIND:
        mt = d.get("model_type")
        arch = next((v[2] for v in KINDS.values() if v[0] == mt), None)
        if arch is None:
            raise ValueError(f"{directory}: not a Qwen3.5 checkpoint (architectures {d.get('architectures')})")
    cls = getattr(transformers, arch)
    model = cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(model, input_ids) -> np.ndarray:
    """All-position logits of one sequence from an HF model, as float64 numpy [T, V]."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids)[None], dtype=torch.long), use_cache=False)
    return out.logits[0].double().numpy()
