"""qwen35's fast path: PyTorch ops (CPU-fast, GPU-ready) and Triton kernels (optimized/triton/) behind one dispatch.

    from optimized import Qwen35Model, resolve_backend
    model = Qwen35Model.from_pretrained(path, device="cpu", dtype=torch.float32, backend="auto")

    from optimized import Qwen35ForCausalLM            # the differentiable model, for training
    model = Qwen35ForCausalLM(config, seed=0);  out = model(input_ids, labels=input_ids);  out.loss.backward()

Config, memory sizing and checkpoint-name mapping come from `reference` (never duplicated here).  Guide:
docs/optimized.md.
"""
from optimized.backend import (
    causal_conv1d,
    causal_conv1d_update,
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule_update,
    gated_rms_norm,
    recurrent_gated_delta_rule,
    resolve_backend,
)
from optimized.causal_lm import CausalLMOutput, Qwen35ForCausalLM
from optimized.model import ModelInputs, ModelOutputs, Qwen35Model, RequestSnapshot, TextContext
from reference.config import Qwen35Config
from reference.errors import CheckpointError, ConfigError, Qwen35Error, RequestError

__all__ = [
    "Qwen35Config", "Qwen35Model", "ModelInputs", "ModelOutputs", "TextContext", "TextAndVisionContext",
    "RequestSnapshot", "Qwen35ForCausalLM", "CausalLMOutput",
    "resolve_backend", "Qwen35Error", "ConfigError", "CheckpointError", "RequestError",
    "chunk_gated_delta_rule", "recurrent_gated_delta_rule", "fused_recurrent_gated_delta_rule_update",
    "causal_conv1d", "causal_conv1d_update", "gated_rms_norm",
]


def __getattr__(name):
    """`optimized.TextAndVisionContext` (reference.multimodal's, as in reference.model) without importing the vision
    path eagerly."""
    if name == "TextAndVisionContext":
        from reference.multimodal import TextAndVisionContext

        return TextAndVisionContext
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
