"""Request contexts: what a caller hands the pipeline model for one request (docs/pipeline_api.md).

A context names a request and carries its tokens.  The model keeps per-request state (Gated DeltaNet conv and
recurrent state, the KV cache of the full-attention layers) under `request_id`, so the same id seen again
continues where it left off: its `tokens` are then the *new* tokens of the next prefill chunk.

`TextAndVisionContext` (reference/multimodal.py) subclasses `TextContext` and adds
pixel inputs in the form a Hugging Face Qwen processor emits.  The model recognises it by `has_vision_inputs`.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from reference.errors import RequestError

__all__ = ["TextContext", "PromptId", "as_token_array", "check_no_placeholders", "request_name"]


class PromptId:
    """The private request id `generate` gives its prompt number `index`.

    Compared by identity (it defines no `__eq__`), so it never equals a caller's id, live or future: `generate`
    cannot continue, corrupt or release a request it did not create.  Error messages call it "prompt <index>".
    """

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = int(index)

    def __repr__(self) -> str:
        return f"<generate prompt {self.index}>"


def request_name(request_id) -> str:
    """How error messages name a request: "request 'a'", or "prompt 2" for generate's prompt number 2."""
    if isinstance(request_id, PromptId):
        return f"prompt {request_id.index}"
    return f"request {request_id!r}"


def as_token_array(tokens, *, request_id="?", vocab_size: int | None = None) -> np.ndarray:
    """Tokens as a 1-D int64 array; a RequestError naming the request for anything else.

    Accepts a list / tuple / 1-D array of integers (numpy integer scalars included; floats when integral).  Ids
    are compared as exact integers before the cast, so an error reports the value given (uint64 2**64 - 1, not
    the -1 it would wrap to).  With `vocab_size` every id must lie in [0, vocab_size), else in int64.
    """
    who = request_name(request_id)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise RequestError(f"{who}: tokens must be a 1-D sequence of ints, got shape {arr.shape}")
    lo, hi = (0, vocab_size) if vocab_size is not None else (-2 ** 63, 2 ** 63)
    if arr.dtype.kind == "i":
        values = arr.astype(np.int64, copy=False)
        bad = np.flatnonzero((values < lo) | (values >= hi))
    elif arr.dtype.kind in "uf" or arr.dtype == object:  # ids that may not fit int64: compared as exact ints
        values = [_exact_int(who, t) for t in arr.tolist()]
        bad = [i for i, t in enumerate(values) if not lo <= t < hi]
    else:
        raise RequestError(f"{who}: tokens must be integers, got dtype {arr.dtype}")
    if len(bad):
        i = int(bad[0])
        where = f"the vocabulary [0, {vocab_size})" if vocab_size is not None else "int64"
        raise RequestError(f"{who}: token id {int(values[i])} at position {i} is outside {where}")
    return np.asarray(values, dtype=np.int64).reshape(-1)


def check_no_placeholders(request_id, tokens: np.ndarray, config, *, kinds=("image", "video"), start: int = 0,
                          where: str = "") -> None:
    """Refuse image / video placeholder ids in tokens that come without pixels (a multimodal model only).

    A placeholder's rows are meant to be overwritten by vision features; without pixels the model would embed
    the placeholder's own (untrained) row and, for an image prompt, place no (t, h, w) grid for it, so such a
    prompt is almost surely a caller's mistake (a prompt expanded for pixels that were then not passed).  HF's
    `Qwen3_5Model.forward` embeds them silently; here they are an error.  `start` is the request position of
    tokens[0] (for the message).  Text-only models have no placeholders: every id is a token.
    """
    if not getattr(config, "is_multimodal", False):
        return
    for kind in kinds:
        token_id = getattr(config, f"{kind}_token_id", None)
        if token_id is None:
            continue
        hits = np.flatnonzero(np.asarray(tokens) == token_id)
        if hits.size:
            raise RequestError(
                f"{request_name(request_id)}: token {token_id} at position {start + int(hits[0])}{where} is the "
                f"{kind} placeholder (config.{kind}_token_id; {hits.size} of them) but no {kind} pixels come with "
                f"it; pass the pixels with the request's first context (a TextAndVisionContext holding the whole "
                f"prompt), or drop the placeholders")


def _exact_int(who: str, t) -> int:
    """One token id (a Python / NumPy int, or an integral float) as an exact Python int."""
    if isinstance(t, numbers.Integral) and not isinstance(t, bool):
        return int(t)
    if isinstance(t, float) and t.is_integer():
        return int(t)
    raise RequestError(f"{who}: tokens must be integers, got {t!r}")


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
