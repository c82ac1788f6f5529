"""qwen35's NumPy oracle of Qwen3.5 (Gated DeltaNet + gated full attention, text and vision).

    from reference import Qwen35Config, Qwen35Model, TextContext
    model = Qwen35Model.from_pretrained(path, max_batch_size=8)     # float64; dtype=np.float32 on request

Every component lives in its own module (config, norms, conv, gated_delta, deltanet, rope, attention, mlp,
vision, state_cache, weights, model; pipeline holds the request layer both engines share); docs/index.md is the
map.  Errors share one base class, `Qwen35Error`.
"""
from reference.config import Qwen35Config, VisionConfig
from reference.context import TextContext
from reference.errors import (
    CheckpointError,
    ConfigError,
    PoolFullError,
    Qwen35Error,
    RequestError,
    StateCacheError,
    UnknownRequestError,
    WeightLoadError,
)
from reference.model import ModelInputs, ModelOutputs, Qwen35Model, RequestSnapshot

__all__ = [
    "Qwen35Config", "VisionConfig", "Qwen35Model", "TextContext", "TextAndVisionContext", "ModelInputs",
    "ModelOutputs", "RequestSnapshot", "Qwen35Error", "ConfigError", "CheckpointError", "WeightLoadError",
    "RequestError", "StateCacheError", "PoolFullError", "UnknownRequestError",
]


def __getattr__(name):
    """`reference.TextAndVisionContext` without importing the vision path eagerly."""
    if name == "TextAndVisionContext":
        from reference.multimodal import TextAndVisionContext

        return TextAndVisionContext
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
