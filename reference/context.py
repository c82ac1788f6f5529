"""Request contexts: what a caller hands the pipeline model for one request (ARCHITECTURE.md, model API).

A context names a request and carries its tokens.  The model keeps per-request state (Gated DeltaNet conv and
recurrent state, the KV cache of the full-attention layers) under `request_id`, so the same id seen again
continues where it left off: its `tokens` are then the *new* tokens of the next prefill chunk.

`TextAndVisionContext` (reference/multimodal.py, the vision engineer's module) subclasses `TextContext` and adds
pixel inputs in the form a Hugging Face Qwen processor emits.  The model recognises it by `has_vision_inputs`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TextContext", "as_token_array"]


def as_token_array(tokens, *, request_id: str = "?") -> np.ndarray:
    """Tokens as a 1-D int64 array; a clear error (naming the request) for anything else.

    Accepts a list / tuple / 1-D array of integers (numpy integer scalars included).  Range checks against the
    vocabulary happen in the model, which knows the vocabulary size.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"request {request_id!r}: tokens must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            return arr.astype(np.int64)
        raise ValueError(f"request {request_id!r}: tokens must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


@dataclass
class TextContext:
    """One text request.

    Attributes:
        request_id: the key of the request's state in the model's caches.  Any hashable value works; a str
            is the usual choice.
        tokens: the token ids to feed now: the whole prompt, a prefill chunk of it, or (for a request seen
            before) the continuation.  list[int] or a 1-D integer array.
    """

    request_id: str
    tokens: list[int] | np.ndarray

    @property
    def token_array(self) -> np.ndarray:
        """`tokens` as a 1-D int64 array (validated)."""
        return as_token_array(self.tokens, request_id=self.request_id)

    @property
    def has_vision_inputs(self) -> bool:
        """A text context carries no pixels; `TextAndVisionContext` overrides this."""
        return False

    def __len__(self) -> int:
        return int(np.asarray(self.tokens).shape[0]) if np.ndim(self.tokens) else 0
