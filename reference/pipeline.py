"""The request layer both engines share: the step contract, the request checks, sampling and `generate`.

`reference.model.Qwen35Model` (NumPy, gather/scatter state) and `optimized.model.Qwen35Model` (PyTorch, in-place
slot pools) run different forward passes behind one interface (docs/pipeline_api.md).  What that interface is
lives here, once, top to bottom:

* the contract: `ModelInputs` (one step's packed tokens, positions and the engine's state payload),
  `ModelOutputs` (the selected logits), `RequestSnapshot` (a request's whole state), `RequestRecord` (an engine's
  per-request bookkeeping), `chunk_inputs` / `pack_chunks` (where a step's tokens sit) and `serialized` (every
  public call holds `model.lock`);
* `RequestChecks`, the base class of both engines: every check a pipeline call makes before it changes state;
* sampling: `sample_next_token` and the parameter checks;
* `generate`, the one loop over decode steps: both engines' `Qwen35Model.generate` and
  `qwen35.generation.generate_tokens` run it, through the public pipeline calls only.

The data flow of one request:

    TextContext(id, prompt)                           a TextAndVisionContext adds pixels
      -> model.prepare_initial_token_inputs([ctx])    checked (RequestChecks), state claimed, ModelInputs packed
      -> model.execute(inputs)                        embedding -> layers -> norm -> lm_head: ModelOutputs.logits
      -> sample_next_token(the last logit row)        the next token t
      -> model.prepare_next_token_inputs([t], inputs) -> execute -> sample ...      decode: one token per step
      -> model.release(id)

Errors are `RequestError` (defined in reference.errors, re-exported here) or its state-cache kin
(`PoolFullError`, `UnknownRequestError`); each names the request, or the prompt's index inside `generate`.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from reference.context import PromptId, TextContext, as_token_array, check_no_placeholders, request_name
from reference.errors import PoolFullError, RequestError, UnknownRequestError
from reference.rope import decode_position_ids

if TYPE_CHECKING:  # annotations only: the reference engine runs without torch
    import torch

__all__ = ["RequestError", "RETURN_LOGITS", "ModelInputs", "ModelOutputs", "RequestSnapshot", "RequestRecord",
           "chunk_inputs", "pack_chunks", "has_vision", "serialized", "RequestChecks", "check_sampling_params",
           "check_generation_params", "check_prompt_room", "sample_next_token", "host_logits", "StepReport",
           "generate"]

RETURN_LOGITS = ("last", "all", "variable")  # the engines' `return_logits` modes (see RequestChecks.return_counts)


# ====================================================================================================== the contract
@dataclass
class ModelInputs:
    """One step's packed inputs (MAX `Qwen3_5Inputs`, reduced to what these engines use), made by
    `prepare_initial_token_inputs` / `prepare_next_token_inputs` and consumed once by `execute`.

    Both engines fill the common fields.  Token and position fields are the engine's array kind (NumPy in the
    reference, torch tensors on the model's device in optimized); the host-side counts (`input_row_offsets`,
    `return_n_logits`, `start_lengths`, `epochs`) are int64 NumPy arrays in the reference and lists of ints in
    optimized.

    tokens:              [total] int64   the new tokens of every request, concatenated
    input_row_offsets:   [B+1]           request b owns tokens[offsets[b]:offsets[b+1]]
    request_ids:         list of B ids
    return_n_logits:     [B]             logits returned per request (the last n positions of its chunk)
    position_ids:        [3, total] int64  MRoPE (t, h, w) positions (text: three equal rows)
    start_lengths:       [B]             tokens each request had consumed when these inputs were prepared
    image_token_indices: [n] int64 | None  rows of `tokens` whose embeddings are replaced by ...
    lm_image_embeddings: [n, H] | None     ... these vision embeddings (model dtype)
    epochs:              [B]             each request's state epoch when prepared (a claim or a `restore` starts a
                                         new one; `execute` refuses inputs of an older one)
    model_tag:           the preparing model's private tag: `execute` and `prepare_next_token_inputs` refuse inputs
                         of another model instance
    executed:            set by `execute`: inputs run once, and only executed inputs have a next token

    The engine's state payload (the other engine leaves these None):

    conv_states:         reference: list over linear layers of [B, conv_dim, K-1], gathered from the pool
    recurrent_states:    reference: list over linear layers of [B, H_v, D_k, D_v], gathered from the pool
                         (`prepare_next_token_inputs` drops both from the inputs it continues)
    slot_ids:            optimized: [B] torch.long, the requests' state-pool rows (states are updated in place)
    host_tokens:         optimized: [total] int64 NumPy copy of `tokens` (no device read to commit the step)
    """

    tokens: np.ndarray | torch.Tensor
    input_row_offsets: np.ndarray | list
    request_ids: list
    return_n_logits: np.ndarray | list
    position_ids: np.ndarray | torch.Tensor
    start_lengths: np.ndarray | list
    image_token_indices: np.ndarray | torch.Tensor | None = None
    lm_image_embeddings: np.ndarray | torch.Tensor | None = None
    epochs: np.ndarray | list | None = None
    model_tag: object | None = None
    executed: bool = False
    conv_states: list | None = None
    recurrent_states: list | None = None
    slot_ids: torch.Tensor | None = None
    host_tokens: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return len(self.request_ids)

    @property
    def seq_lens(self) -> np.ndarray:
        """[B] int64: new tokens per request."""
        return np.diff(np.asarray(self.input_row_offsets, dtype=np.int64))

    @property
    def is_decode(self) -> bool:
        """Every request has one new token (the engines then take the recurrent / in-place decode path)."""
        return bool(np.all(self.seq_lens == 1))


@dataclass
class ModelOutputs:
    """What `execute` returns.

    logits:        [Σ n_b, V]  request b's rows are logits[logit_offsets[b]:logit_offsets[b+1]], oldest first
    logit_offsets: [B+1]       (an int64 array in the reference, a list in optimized)
    request_ids:   list of B ids, in the order of the inputs
    hidden_states: None, [B, H] (each request's last token) or [total, H] (every token): the final-normed hidden
                   state that feeds lm_head (reference only, `return_hidden_states`)
    Arrays are NumPy in the reference and torch tensors on the model's device in optimized (`host_logits`
    brings logits to the host).
    """

    logits: np.ndarray | torch.Tensor
    logit_offsets: np.ndarray | list
    request_ids: list
    hidden_states: np.ndarray | torch.Tensor | None = None

    def logits_for(self, request_id) -> np.ndarray | torch.Tensor:
        """Request `request_id`'s rows of `logits` [n, V]."""
        if request_id not in self.request_ids:
            raise RequestError(f"logits_for: request {request_id!r} is not in this batch "
                               f"({len(self.request_ids)} requests: {self.request_ids[:8]!r})")
        b = self.request_ids.index(request_id)
        return self.logits[self.logit_offsets[b]:self.logit_offsets[b + 1]]


@dataclass
class RequestSnapshot:
    """A deep copy of everything one request's future depends on (`Qwen35Model.snapshot` / `restore`).

    Recurrent state cannot be truncated like a KV cache, so prefix caching (docs/pitfalls.md, B16) and
    speculative rollback (B17) keep copies of it: restore a snapshot, then replay the tokens after it.  State
    arrays are NumPy in the reference and torch tensors on the device in optimized; a snapshot restores only into
    a model of its own engine, shapes and dtype.

    request_id:       the request it was taken from (informational; restore may target any id)
    length:           tokens consumed when it was taken
    tokens:           [length] int64, the ids of those tokens (the prefix a prefix cache matches on)
    conv_states:      list over linear layers of [conv_dim, K-1]  (last K-1 pre-activation inputs)
    recurrent_states: list over linear layers of [H_v, D_k, D_v]
    kv:               list over full-attention layers (KV-index order) of (k [length, H_kv, D_h], v)
    rope_delta:       MRoPE offset of decode positions: token i (i >= prompt end) sits at i + rope_delta
    mm:               the multimodal prompt (MultimodalPrefill: placeholder rows, embeddings, positions) while
                      the request is still inside it, else None
    prompt:           [P] the whole prompt given with the first context (TextAndVisionContext) while the
                      request is still inside it, else None
    No array is shared with the model: later steps of the request do not change a snapshot, and restoring
    copies again, so one snapshot can be restored any number of times.
    """

    request_id: Hashable
    length: int
    tokens: np.ndarray
    conv_states: list
    recurrent_states: list
    kv: list
    rope_delta: int = 0
    mm: object | None = None
    prompt: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the copied state (conv + recurrent + K/V)."""
        return (sum(a.nbytes for a in self.conv_states) + sum(a.nbytes for a in self.recurrent_states)
                + sum(k.nbytes + v.nbytes for k, v in self.kv))

    def next_position_ids(self, num_tokens: int = 1) -> np.ndarray:
        """[3, num_tokens] MRoPE positions of the next tokens after the snapshot (prompt positions while the
        multimodal prompt is not consumed, then length + i + rope_delta)."""
        return chunk_inputs(self.mm, self.rope_delta, self.length, num_tokens)[2]


@dataclass
class RequestRecord:
    """An engine's bookkeeping of one live request (`model._requests[request_id]`), beyond its state arrays.

    length:     tokens consumed (committed by `execute`)
    tokens:     the ids of those tokens, in order (len == length)
    rope_delta: MRoPE offset of positions past the prompt (docs/rope_and_mrope.md)
    mm:         the MultimodalPrefill of the whole prompt, when it had pixels
    prompt:     [P] the whole prompt given with the first context, when that context was a TextAndVisionContext;
                later chunks must repeat its tokens[length:] (chunked prefill of an image prompt)
                (mm and prompt are dropped once the prompt is consumed: decode needs only rope_delta)
    epoch:      bumped by claim and restore, so inputs prepared before a restore cannot run after it
    slot:       optimized: the request's row in the state pools (the reference's state cache keeps its own map)
    kv:         optimized: one KVCache per full-attention layer (the reference keeps K/V in its KVCache)
    broken:     optimized: why the state is unusable (a decode step failed half-way, its pools updated on some
                layers), else None; the reference commits only whole steps, so its requests never break
    """

    length: int = 0
    tokens: list = field(default_factory=list)
    rope_delta: int = 0
    mm: object | None = None
    prompt: np.ndarray | None = None
    epoch: int = 0
    slot: int | None = None
    kv: list = field(default_factory=list)
    broken: str | None = None

    def commit(self, tokens: np.ndarray) -> None:
        """Record that a step consumed `tokens` [T] (host ids); the stored prompt and multimodal inputs are
        dropped once the prompt is consumed (freeing the embeddings)."""
        self.length += len(tokens)
        self.tokens.extend(tokens.tolist())
        if self.prompt is not None and self.length >= self.prompt.size:
            self.prompt = self.mm = None


def chunk_inputs(mm, rope_delta: int, start: int, T: int):
    """Tokens [start, start + T) of a request: (placeholder rows relative to `start` [n] | None, their vision
    embeddings [n, H] | None, MRoPE position_ids [3, T]).

    Inside a multimodal prompt the rows and positions are the prompt's slice (`MultimodalPrefill.chunk`, computed
    once for the whole prompt); past its end (or without one) tokens sit at i + rope_delta on all three axes.  A
    chunk may start or end anywhere, also inside a placeholder run, and may run past the prompt's end.
    """
    if mm is None or start >= mm.num_tokens:
        return None, None, decode_position_ids(start, T, rope_delta)
    end = min(start + T, mm.num_tokens)
    rows, emb, pos = mm.chunk(start, end)
    if start + T > end:
        pos = np.concatenate([pos, decode_position_ids(end, start + T - end, rope_delta)], axis=1)
    return rows, emb, pos


def pack_chunks(chunks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list]:
    """Where the tokens of a ragged step sit.

    chunks: per sequence (MultimodalPrefill | None, rope_delta, start, T): T new tokens from request position
    `start`.  Returns (input_row_offsets [B+1] int64, position_ids [3, total] int64, the placeholder rows into the
    packed tokens [n] int64 or None, their vision embeddings: a list of [n_b, H] in the engine's array kind, to
    concatenate).
    """
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    pos, rows, embs = [], [], []
    for b, (mm, rope_delta, start, T) in enumerate(chunks):
        offsets[b + 1] = offsets[b] + T
        r, e, p = chunk_inputs(mm, rope_delta, int(start), int(T))
        if r is not None and len(r):
            rows.append(r + offsets[b])
            embs.append(e)
        pos.append(p)  # [3, T]: the prompt's slice, then start + i + rope_delta
    positions = np.concatenate(pos, axis=1).astype(np.int64, copy=False)
    return offsets, positions, np.concatenate(rows).astype(np.int64) if rows else None, embs


def has_vision(ctx) -> bool:
    """The context carries pixels (a TextAndVisionContext with images or videos)."""
    return bool(getattr(ctx, "has_vision_inputs", False)) or any(
        getattr(ctx, a, None) is not None for a in ("pixel_values", "pixel_values_videos"))


def serialized(method):
    """Make a pipeline method hold the model's `lock` (a reentrant lock) while it runs.

    Every public call that reads or changes request state takes it, so calls on one model from several threads
    run one at a time, each seeing the state the previous one left; `generate` holds it for its whole loop.  A
    caller holds `model.lock` itself to make several calls one unit.
    """
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


def _as_batch(batch, who: str) -> list:
    """`batch` as a list of sequences: one context or one token list becomes a batch of one.  Anything else
    without a length (a bare token id, None) is a RequestError."""
    if isinstance(batch, (str, bytes)) or not hasattr(batch, "__len__") or (
            isinstance(batch, np.ndarray) and batch.ndim == 0):
        raise RequestError(f"{who}: expected a list of prompts (token lists or contexts), or one prompt, got "
                           f"{type(batch).__name__} {batch!r:.40}")
    if isinstance(batch, TextContext) or (len(batch) and np.ndim(batch[0]) == 0
                                          and not isinstance(batch[0], TextContext)):
        return [batch]
    return list(batch)


# ====================================================================================================== the checks
class RequestChecks:
    """The base class of both pipeline models: the request table's queries and every check a pipeline call makes
    before it changes state.  The `check_*` methods change nothing; each raises a RequestError (or
    PoolFullError / UnknownRequestError) naming the request.

    The engine provides:
        config, max_length, max_batch_size, return_logits (one of RETURN_LOGITS), lock (a `threading.RLock`,
        see `serialized`), `_tag` (a private object that marks the inputs it prepares), `_requests` (request id
        -> RequestRecord, in claim order), and two hooks for its own array kind:
        `multimodal_prefill(ctx)`: the MultimodalPrefill of a whole prompt with pixels (runs the vision tower);
        `check_snapshot_tensors(snapshot, n, fail)`: call `fail(message)` (which raises) unless every state
        array of the snapshot (n tokens) has this model's kind, shape and dtype.

    An engine's `prepare_initial_token_inputs` calls `check_contexts`, `return_counts` and `check_capacity`
    before it claims anything; `prepare_next_token_inputs` calls `check_next_tokens`; `execute` calls
    `check_own_inputs` and `check_current_inputs`; `restore` calls `check_snapshot`; `logits` packs its batch
    with `stateless_batch`.
    """

    @property
    def active_requests(self) -> list:
        """The live request ids, in claim order."""
        return list(self._requests)

    def seq_len(self, request_id) -> int:
        """Tokens the request has consumed so far (0 for an unknown id)."""
        r = self._requests.get(request_id)
        return 0 if r is None else r.length

    def check_usable(self, request_id) -> None:
        """The request (if live) can continue: not marked broken by a decode step that failed half-way."""
        req = self._requests.get(request_id)
        if req is not None and req.broken is not None:
            raise RequestError(f"{request_name(request_id)} cannot continue: {req.broken}; release it")

    def check_tokens(self, request_id, tokens) -> np.ndarray:
        """tokens as a [T] int64 array, non-empty and inside the vocabulary (errors name the request)."""
        arr = as_token_array(tokens, request_id=request_id, vocab_size=self.config.vocab_size)
        if arr.size == 0:
            raise RequestError(f"{request_name(request_id)} has no tokens (an empty request cannot be run)")
        return arr

    def check_capacity(self, request_ids) -> None:
        """The ids that are not live yet fit into the free slots."""
        new = [r for r in request_ids if r not in self._requests]
        free = self.max_batch_size - len(self._requests)
        if len(new) > free:
            raise PoolFullError(
                f"{len(new)} new request(s) {new[free:][:8]!r} do not fit: {len(self._requests)} of "
                f"{self.max_batch_size} slots are live (max_batch_size); release finished requests first")

    def check_contexts(self, contexts) -> tuple[list, list, list, dict]:
        """Validate a prefill batch: (contexts, request ids, token arrays to run now [T_b], {id: whole prompt}).

        A context whose id is live continues that request (checked against its stored prompt).  Pixels or a
        chunk_end are accepted only with a request's first context, which holds the whole prompt; only
        tokens[:chunk_end] run now.  On a multimodal model, placeholder ids without pixels are refused (the
        pixels' own placeholder checks run in the engine's `multimodal_prefill`, before any state changes).
        """
        if isinstance(contexts, TextContext):
            contexts = [contexts]
        contexts = list(contexts)
        if not contexts:
            raise RequestError("prepare_initial_token_inputs: empty batch (no contexts)")
        ids = [c.request_id for c in contexts]
        seen = set()
        for rid in ids:
            if rid in seen:
                raise RequestError(f"{request_name(rid)} appears twice in one batch")
            seen.add(rid)
        arrays, prompts = [], {}
        for ctx in contexts:
            rid = ctx.request_id
            self.check_usable(rid)
            arr = self.check_tokens(rid, ctx.tokens)
            chunk_end = getattr(ctx, "chunk_end", None)
            if has_vision(ctx) or chunk_end is not None:
                # the first context of a request that carries its whole prompt (pixels and/or a chunk end)
                if rid in self._requests:
                    raise RequestError(f"{request_name(rid)} is live: pixels and chunk_end are accepted only with the "
                                       "first context of a request (which holds the whole prompt); continue it "
                                       "with TextContexts holding the next tokens")
                if has_vision(ctx) and not self.config.is_multimodal:
                    raise RequestError(f"{request_name(rid)} carries pixels but the model "
                                       f"({self.config.model_type}) has no vision tower")
                self._check_length(rid, arr.size)  # the whole prompt will be consumed
                if not has_vision(ctx):
                    self._check_placeholders(rid, arr)  # a text prompt given whole (chunk_end)
                end = ctx.prompt_chunk_end() if chunk_end is not None else arr.size
                prompts[rid] = arr.copy()  # our own copy: the caller may reuse its array
                arr = arr[:end]
            else:
                self._check_length(rid, arr.size)
                self._check_prompt_continuation(rid, arr)
                self._check_placeholders(rid, arr)
            arrays.append(arr)
        return contexts, ids, arrays, prompts

    def return_counts(self, return_n_logits, seq_lens, request_ids) -> np.ndarray:
        """[B] int64 logits returned per request, checked against `return_logits` and each request's new tokens."""
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        B = len(seq_lens)
        if self.return_logits == "all":
            return seq_lens
        counts = np.asarray(return_n_logits, dtype=np.int64)
        if counts.ndim == 0:
            counts = np.full(B, int(counts), dtype=np.int64)
        elif self.return_logits != "variable":
            raise RequestError("per-request return_n_logits needs return_logits='variable'")
        if counts.shape != (B,):
            raise RequestError(f"return_n_logits has {counts.shape[0]} entries for {B} requests")
        for rid, n, T in zip(request_ids, counts, seq_lens, strict=True):
            if not 1 <= n <= T:
                raise RequestError(f"{request_name(rid)}: return_n_logits = {int(n)} must be between 1 and its "
                                   f"{int(T)} new tokens")
        return counts

    def check_next_tokens(self, next_tokens, prev, request_ids=None) -> tuple[list, list]:
        """Validate one decode step: (request ids, token arrays [1]).

        Token b continues prev.request_ids[b], or request_ids[b] when `request_ids` names some of prev's requests
        (each once; the others sit this step out).  `prev` must be this model's executed inputs; each token
        continues its request from where it is now.
        """
        self.check_own_inputs(prev, executed=True)
        tokens = np.asarray(next_tokens).reshape(-1)
        ids = list(prev.request_ids)
        if request_ids is not None:
            if isinstance(request_ids, (str, bytes, set, frozenset, dict)) or not isinstance(request_ids, Sequence):
                raise RequestError(f"prepare_next_token_inputs: request_ids must be a list or tuple of request ids "
                                   f"(an order: token b continues request_ids[b]), got {type(request_ids).__name__}")
            wanted = list(request_ids)
            if not wanted:
                raise RequestError("prepare_next_token_inputs: request_ids is empty; a decode step needs at least one "
                                   "request (release the finished ones instead)")
            for b, rid in enumerate(wanted):
                if rid not in ids:
                    raise RequestError(f"prepare_next_token_inputs: {request_name(rid)} is not one of these inputs' "
                                       f"requests {ids[:8]!r}")
                if rid in wanted[:b]:
                    raise RequestError(f"prepare_next_token_inputs: {request_name(rid)} appears twice in request_ids")
            ids = wanted
        if tokens.shape[0] != len(ids):
            raise RequestError(f"prepare_next_token_inputs: {tokens.shape[0]} next tokens for {len(ids)} requests")
        for rid in ids:
            if rid not in self._requests:
                raise UnknownRequestError(f"decode for {request_name(rid)}, which is not live (released, or never "
                                          "prefilled)")
            self.check_usable(rid)
        arrays = [self.check_tokens(rid, tokens[b:b + 1]) for b, rid in enumerate(ids)]
        for rid, arr in zip(ids, arrays, strict=True):
            self._check_length(rid, 1)
            self._check_prompt_continuation(rid, arr)
        return ids, arrays

    def check_own_inputs(self, inputs, *, executed: bool) -> None:
        """`inputs` were prepared by this model instance, and executed (for `prepare_next_token_inputs`) or not
        yet (for `execute`): inputs run once, and only a step that ran has a next token."""
        what = "prepare_next_token_inputs" if executed else "execute"
        if getattr(inputs, "model_tag", None) is not self._tag:
            raise RequestError(f"{what}: these inputs (requests {getattr(inputs, 'request_ids', '?')!r}) were not "
                               "prepared by this model instance (another model's, or built by hand); prepare them "
                               "with this model")
        if inputs.executed != executed:
            raise RequestError(
                f"prepare_next_token_inputs: these inputs (requests {inputs.request_ids!r}) were never executed; "
                "execute them first (their tokens are not in the requests' state yet)" if executed else
                f"execute: these inputs (requests {inputs.request_ids!r}) were already executed; prepare new ones "
                "(prepare_next_token_inputs)")

    def check_current_inputs(self, inputs) -> None:
        """Each request of `inputs` (for `execute`) is where they found it: live, the same epoch (no restore,
        release or new claim since) and the same length, so running them cannot feed a chunk twice or rewind a
        state."""
        B = len(inputs.request_ids)
        epochs = [] if inputs.epochs is None else inputs.epochs
        if not len(epochs) == len(inputs.start_lengths) == len(inputs.input_row_offsets) - 1 == B:
            raise RequestError(f"execute: these inputs are inconsistent ({B} request ids, {len(epochs)} epochs, "
                               f"{len(inputs.start_lengths)} start lengths); prepare new ones")
        for b, rid in enumerate(inputs.request_ids):
            req = self._requests.get(rid)
            if req is None:
                raise UnknownRequestError(f"{request_name(rid)} was released after its inputs were prepared")
            self.check_usable(rid)
            if req.epoch != epochs[b]:
                raise RequestError(f"execute: {request_name(rid)} was restored from a snapshot (or released and "
                                   "claimed again) after its inputs were prepared; prepare new inputs")
            if req.length != inputs.start_lengths[b]:
                raise RequestError(f"execute: {request_name(rid)} advanced since its inputs were prepared "
                                   f"({int(inputs.start_lengths[b])} -> {req.length} tokens)")

    def check_snapshot(self, request_id, snap) -> None:
        """A RequestSnapshot fits this model (layer counts, lengths, prompt; its arrays through the engine's
        `check_snapshot_tensors`)."""
        def fail(msg):
            raise RequestError(f"restore of request {request_id!r} from a snapshot of {snap.request_id!r}: {msg}")

        c = self.config
        n = int(snap.length)
        if n < 0 or n > self.max_length:
            fail(f"length {n} is outside [0, max_length {self.max_length}]")
        if np.shape(snap.tokens) != (n,):
            fail(f"tokens have shape {np.shape(snap.tokens)}, expected ({n},)")
        if len(snap.conv_states) != c.num_linear_layers or len(snap.recurrent_states) != c.num_linear_layers:
            fail(f"{len(snap.conv_states)} conv and {len(snap.recurrent_states)} recurrent states for "
                 f"{c.num_linear_layers} linear layers")
        if len(snap.kv) != c.num_full_layers:
            fail(f"{len(snap.kv)} (k, v) pairs for {c.num_full_layers} full-attention layers")
        self.check_snapshot_tensors(snap, n, fail)
        if snap.prompt is not None:
            m = min(n, len(snap.prompt))
            if not np.array_equal(np.asarray(snap.tokens)[:m], np.asarray(snap.prompt)[:m]):
                fail("its tokens and its prompt disagree")
        if snap.mm is not None:
            if snap.prompt is None:
                fail("it holds a multimodal prompt but no stored prompt")
            if snap.mm.num_tokens != len(snap.prompt):
                fail(f"its multimodal prompt covers {snap.mm.num_tokens} tokens but the prompt has "
                     f"{len(snap.prompt)}")

    def stateless_batch(self, batch) -> tuple[list, np.ndarray, np.ndarray, np.ndarray | None, list]:
        """Validate and pack a stateless `logits` batch (token lists or contexts, one of them alone allowed).

        Returns (token arrays [T_b] (a context's tokens[:chunk_end]), input_row_offsets [B+1], position_ids
        [3, total], placeholder rows into the packed tokens [n] or None, their vision embeddings (a list of
        [n_b, H])).  Every sequence is checked before any vision tower runs (the engine's `multimodal_prefill`).
        """
        items = _as_batch(batch, "logits")
        arrays = [self._check_stateless_item(b, item) for b, item in enumerate(items)]
        if not arrays:
            raise RequestError("logits: empty batch")
        chunks = []
        for b, (item, arr) in enumerate(zip(items, arrays, strict=True)):
            end = item.prompt_chunk_end() if getattr(item, "chunk_end", None) is not None else arr.size
            pre = self.multimodal_prefill(item) if has_vision(item) else None
            chunks.append((pre, 0 if pre is None else pre.rope_delta, 0, end))  # tokens[:chunk_end]
            arrays[b] = arr[:end]
        return (arrays, *pack_chunks(chunks))

    # ---------------------------------------------------------------------------- parts of the checks above
    def _check_length(self, request_id, new_tokens: int) -> None:
        total = self.seq_len(request_id) + new_tokens
        if total > self.max_length:
            raise RequestError(f"{request_name(request_id)} would hold {total} tokens ({self.seq_len(request_id)} "
                               f"consumed + {new_tokens} new), more than max_length {self.max_length}")

    def _check_prompt_continuation(self, request_id, tokens: np.ndarray) -> None:
        """A live request whose first context held its whole prompt (chunked prefill of an image prompt) must
        continue with that prompt's next tokens; tokens past the prompt's end are free (decode)."""
        req = self._requests.get(request_id)
        if req is None or req.prompt is None or req.length >= req.prompt.size:
            return
        s = req.length
        n = min(req.prompt.size - s, tokens.size)
        want = req.prompt[s:s + n]
        bad = np.flatnonzero(tokens[:n] != want)
        if bad.size:
            i = int(bad[0])
            raise RequestError(
                f"{request_name(request_id)}: token {int(tokens[i])} at position {i} of this chunk differs from its "
                f"prompt, which holds {int(want[i])} at prompt position {s + i}; the request has consumed {s} of its "
                f"{req.prompt.size} prompt tokens, so it must continue with prompt[{s}:] (given with its first "
                "context)")

    def _check_placeholders(self, request_id, tokens: np.ndarray) -> None:
        """Prefill tokens that no stored prompt covers (a text request's tokens, tokens past a stored prompt's
        end) may not be image / video placeholder ids on a multimodal model: no pixels come with them.

        Tokens inside a stored prompt are checked against it (`_check_prompt_continuation`), and that prompt's
        placeholders were matched to its pixels when it arrived.  Decode tokens are not checked: a sampled
        placeholder id is an ordinary token, as in Hugging Face's generate (pixels go with the first step only).
        """
        req = self._requests.get(request_id)
        start = self.seq_len(request_id)
        covered = 0 if req is None or req.prompt is None else max(0, min(req.prompt.size - start, tokens.size))
        check_no_placeholders(request_id, tokens[covered:], self.config, start=start + covered)

    def _check_stateless_item(self, b, item) -> np.ndarray:
        """One sequence of a stateless `logits` batch (a token list or a context): its token array."""
        rid = item.request_id if isinstance(item, TextContext) else f"batch[{b}]"
        arr = self.check_tokens(rid, item.tokens if isinstance(item, TextContext) else item)
        if arr.size > self.max_length:
            raise RequestError(f"{request_name(rid)} has {arr.size} tokens, more than max_length {self.max_length}")
        if has_vision(item) and not self.config.is_multimodal:
            raise RequestError(f"{request_name(rid)} carries pixels but the model ({self.config.model_type}) has "
                               "no vision tower")
        if not has_vision(item):
            check_no_placeholders(rid, arr, self.config)
        return arr


# ====================================================================================================== sampling
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_sampling_params(temperature, top_k, top_p) -> None:
    """RequestError unless temperature is a finite number >= 0 (0 = greedy), top_k an int >= 1 or None and top_p a
    number in (0, 1] or None (checked at temperature 0 too, so a bad value never waits for the first sample)."""
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise RequestError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):  # NaN fails the comparison
        raise RequestError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def check_generation_params(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids) -> frozenset:
    """Check `generate`'s parameters; returns the stop ids.

    max_new_tokens: int >= 0; temperature, top_k, top_p: `check_sampling_params`; seed: int >= 0 or None;
    stop_token_ids: None, one int or a collection of ints (an id outside the vocabulary is allowed: it is never
    sampled, as a tokenizer's end id beyond a small test vocabulary).
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise RequestError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling_params(temperature, top_k, top_p)
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise RequestError(f"seed must be an int >= 0 or None, got {seed!r}")
    if stop_token_ids is None:
        return frozenset()
    given = list(stop_token_ids) if isinstance(stop_token_ids, (set, frozenset)) else stop_token_ids
    stop = np.asarray(given, dtype=object).reshape(-1)  # one id or a collection, as Python objects
    bad = [t for t in stop if not _is_int(t)]
    if bad:
        raise RequestError(f"stop_token_ids must be ints, got {bad[0]!r} in {stop_token_ids!r}")
    return frozenset(int(t) for t in stop)


def check_prompt_room(request_id, n_tokens: int, max_length: int) -> None:
    """A prompt to generate from must leave room for one new token: a request holds at most max_length tokens,
    prompt and new ones together (the rule `generate` stops by)."""
    if n_tokens >= max_length:
        raise RequestError(f"{request_name(request_id)} has {n_tokens} tokens, but max_length is {max_length}: "
                           "prompt + new tokens must stay <= max_length, so there is no room for a new token")


def sample_next_token(logits: np.ndarray, *, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, rng: np.random.Generator | None = None, who: str = "logits") -> int:
    """One token from a logit row [V].

    temperature 0: argmax (ties -> lowest id).  Otherwise softmax(logits / temperature) restricted to the top_k
    largest logits and then to the smallest set whose probability reaches top_p (nucleus), renormalised, sampled
    with `rng`.  The parameters are checked (`check_sampling_params`), and so is the row: NaN, +inf or no finite
    value at all (every logit -inf) is a RequestError naming `who`, never a silent token 0.  -inf entries are
    masked tokens and allowed.
    """
    check_sampling_params(temperature, top_k, top_p)
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 1 or logits.size == 0:
        raise RequestError(f"{who}: expected one logit row [vocab], got shape {logits.shape}")
    nan, pos_inf, finite = int(np.isnan(logits).sum()), int(np.isposinf(logits).sum()), int(np.isfinite(logits).sum())
    if nan or pos_inf or not finite:
        raise RequestError(f"{who}: cannot sample from non-finite logits ({nan} NaN, {pos_inf} +inf, {finite} finite "
                           f"of {logits.size}); the forward pass produced non-finite values (check the weights)")
    if temperature == 0.0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore"):
        z = logits / temperature
    order = np.argsort(-z, kind="stable")  # descending
    if np.isposinf(z[order[0]]):  # a temperature so small that z overflows: its limit, greedy
        return int(np.argmax(logits))
    if top_k is not None:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if top_p is not None:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # smallest prefix with mass >= top_p
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    rng = rng if rng is not None else np.random.default_rng()
    return int(order[rng.choice(len(order), p=p)])


def host_logits(logits) -> np.ndarray:
    """Logits as a NumPy array on the host (the optimized model returns torch tensors, possibly bf16 on a GPU)."""
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits)


# ====================================================================================================== generate
@dataclass
class StepReport:
    """What `generate` tells its `on_step` hook after each step.

    phase:   "prefill" (a group's whole prompts) or "decode" (one token for each request still running)
    seconds: wall time of the step: prepare + execute + sampling
    prompts: the prompt indices that ran in it
    stopped: prompt index -> why it stopped at this step: "stop token" (included in its output),
             "max_new_tokens" or "max length" (prompt + new tokens reached max_length)
    """

    phase: str
    seconds: float
    prompts: list
    stopped: dict


def generate(model, prompts, *, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop_token_ids=None, request_ids=None,
             on_step: Callable[[StepReport], Any] | None = None) -> list[list[int]]:
    """Generate up to `max_new_tokens` tokens for each prompt (token lists or contexts, with pixels too) on a
    pipeline model; returns the new ids per prompt.

    The one generation loop of the code base, built on the public pipeline calls only: the prompts run in groups
    of at most the free slots; each group is one prefill (`prepare_initial_token_inputs` + `execute`), then decode
    steps (`prepare_next_token_inputs` + `execute`) for the requests that have not stopped, then `release`.  A
    request stops at any of `stop_token_ids` (included in its output), after max_new_tokens, or when prompt + new
    tokens reach the model's max_length.  `seed` makes sampling reproducible (temperature > 0; one generator for
    all prompts, sampled in prompt order).

    Everything (parameters, every prompt, with its pixels' placeholder plan) is checked before the first step,
    and errors name the request: "prompt 2: ..." for the private ids (`PromptId`) used by default, so a caller's
    live requests are never touched.  `request_ids` runs the prompts under the given ids instead (none of them
    may be live).  `on_step(StepReport)` is called after every step (timing, stop reasons).  Holds the model's
    lock throughout.
    """
    stop = check_generation_params(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids)
    with model.lock:
        items = _as_batch(prompts, "generate")
        ids = [PromptId(i) for i in range(len(items))] if request_ids is None else list(request_ids)
        if len(ids) != len(items):
            raise RequestError(f"generate: {len(ids)} request ids for {len(items)} prompts")
        live = [rid for rid in ids if rid in model.active_requests] if request_ids is not None else []
        if live:
            raise RequestError(f"generate: {request_name(live[0])} is live; pass ids of no live request "
                               "(generating under it would continue that request and then release it)")
        contexts = [_generate_context(p, rid) for p, rid in zip(items, ids, strict=True)]
        _check_prompts(model, contexts)
        results: list[list[int]] = [[] for _ in contexts]
        if max_new_tokens == 0 or not contexts:
            return results
        free = model.max_batch_size - len(model.active_requests)
        if free < 1:
            raise PoolFullError(f"generate: all {model.max_batch_size} slots are held by live requests")
        rng = np.random.default_rng(seed)
        for g0 in range(0, len(contexts), free):
            group = list(range(g0, min(g0 + free, len(contexts))))  # prompt indices
            try:
                t0 = time.perf_counter()
                inputs = _prefill_last_logits(model, [contexts[j] for j in group])
                live, phase = group, "prefill"
                while True:
                    out = model.execute(inputs)
                    rows = np.asarray(out.logit_offsets[1:], dtype=np.int64) - 1  # each request's last position
                    last = host_logits(out.logits[rows])  # [B, V]: picked on the device, then copied
                    still, stopped = [], {}
                    for row, j in enumerate(live):
                        t = sample_next_token(last[row], temperature=temperature, top_k=top_k, top_p=top_p, rng=rng,
                                              who=request_name(contexts[j].request_id))
                        results[j].append(t)
                        if t in stop:
                            stopped[j] = "stop token"
                        elif len(results[j]) >= max_new_tokens:
                            stopped[j] = "max_new_tokens"
                        elif len(contexts[j]) + len(results[j]) >= model.max_length:  # prompt + new <= max_length
                            stopped[j] = "max length"
                        else:
                            still.append(j)
                    if on_step is not None:
                        on_step(StepReport(phase, time.perf_counter() - t0, list(live), stopped))
                    if not still:
                        break
                    t0 = time.perf_counter()
                    inputs = model.prepare_next_token_inputs([results[j][-1] for j in still], inputs,
                                                             request_ids=[contexts[j].request_id for j in still])
                    live, phase = still, "decode"
            finally:
                for j in group:
                    model.release(contexts[j].request_id)
    return results


def _prefill_last_logits(model, contexts):
    """`prepare_initial_token_inputs` asking for each request's last logit row only, whatever the model's
    `return_logits` mode ("all" would compute [prompt length, V] per request, only to keep one row).  Runs under
    the model's lock, which `generate` holds, so no other call sees the mode switched."""
    saved, model.return_logits = model.return_logits, "last"
    try:
        return model.prepare_initial_token_inputs(contexts, return_n_logits=1)
    finally:
        model.return_logits = saved


def _generate_context(prompt, request_id) -> TextContext:
    """A private context for `generate`: a copy of `prompt` (a context or a token list) under `request_id`,
    without a chunk end (generate prefills the whole prompt in one step)."""
    ctx = copy.copy(prompt) if isinstance(prompt, TextContext) else TextContext(request_id, prompt)
    ctx.request_id = request_id
    if getattr(ctx, "chunk_end", None) is not None:
        ctx.chunk_end = None
    return ctx


def _check_prompts(model, contexts) -> None:
    """Every prompt of a `generate` call, before anything runs: tokens, room for a new token under max_length,
    the batch's pixels and placeholders (the placeholder / grid plan of a prompt with pixels too)."""
    for ctx in contexts:
        check_prompt_room(ctx.request_id, model.check_tokens(ctx.request_id, ctx.tokens).size, model.max_length)
    if contexts:
        model.check_contexts(contexts)
    for ctx in contexts:
        if has_vision(ctx):
            from reference.multimodal import plan_multimodal_prefill  # lazy: pixels only

            plan_multimodal_prefill(ctx, model.config)
