"""The Qwen3.5 pipeline model in NumPy: ragged batches, chunked prefill, multi-step decode (docs/pipeline_api.md).

It follows the interface of MAX's documented Qwen3.5 pipeline model (`Qwen3_5Model`):

    model  = Qwen35Model.from_pretrained(path, max_batch_size=8)              # float64; dtype=np.float32 option
    inputs = model.prepare_initial_token_inputs([TextContext("a", [...]), ...], return_n_logits=1)
    out    = model.execute(inputs)                   # out.logits [Σ return_n_logits, V]; states scattered back
    inputs = model.prepare_next_token_inputs(next_tokens, inputs)            # one token per request: decode
    model.release("a")

A ragged batch is packed as `tokens [total]` + `input_row_offsets [B+1]`.  Per request the model keeps the
Gated DeltaNet conv + recurrent state in a `GatedDeltaNetStateCache` slot and the full-attention K/V in a
`KVCache`; a request id seen again continues from its stored state (chunked prefill, then decode).  The state
moves by the documented gather/scatter design: `prepare_*` claims slots and *gathers* dense copies into the
inputs, `execute` runs the layers on those copies and *scatters* the outputs back (3 x max_batch x per_req bytes
at peak; see docs/state_cache.md).

An image prompt may be prefilled in chunks too: its first context (`TextAndVisionContext`) holds the whole prompt
and `chunk_end`; the tower and the MRoPE positions are computed once, and later chunks (plain TextContexts) are
checked against the stored prompt.  `snapshot(id)` / `restore(id, snap)` copy a request's whole state out and
back in (prefix caching, speculative rollback: docs/state_cache.md).

Errors, not corruption: every request is validated (ids, token range, empty, length limit, capacity, released
ids) before any state is touched, and `execute` writes states only after the whole forward pass succeeded.

One forward step over the packed tokens (docs/gated_deltanet.md, docs/gated_attention.md):

    x = E[tokens]  (multimodal prefill: placeholder rows replaced by vision embeddings, docs/vision.md)
    for each layer:  x += mixer(rms_norm(x))     mixer = gated_deltanet (linear) | gated_attention (full)
                     x += mlp(rms_norm(x))       mlp = SwiGLU | sparse MoE
    h = rms_norm(x);  logits = h W_lmᵀ           (only for the rows that are returned)
"""
from __future__ import annotations

import copy
import functools
import itertools
import math
import numbers
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from reference.attention import gated_attention
from reference.config import LINEAR, Qwen35Config
from reference.context import PromptId, TextContext, as_token_array, check_no_placeholders, request_name
from reference.deltanet import gated_deltanet
from reference.errors import ConfigError, RequestError
from reference.mlp import sparse_moe_block, swiglu_mlp
from reference.norms import rms_norm
from reference.rope import decode_position_ids
from reference.state_cache import GatedDeltaNetStateCache, KVCache, PoolFullError, UnknownRequestError
from reference.weights import MLPWeights, ModelWeights, load_weights

__all__ = ["Qwen35Model", "ModelInputs", "ModelOutputs", "RequestSnapshot", "TextContext", "RequestError",
           "PoolFullError", "UnknownRequestError", "sample_next_token", "check_sampling_params",
           "check_generation_params", "check_prompt_room", "host_logits", "serialized", "RETURN_LOGITS",
           "RETURN_HIDDEN_STATES"]

RETURN_LOGITS = ("last", "all", "variable")
RETURN_HIDDEN_STATES = ("none", "last", "all")


@dataclass
class ModelInputs:
    """One step's packed inputs (MAX `Qwen3_5Inputs`, reduced to what the NumPy model uses).

    tokens:            [total] int64      the new tokens of every request, concatenated
    input_row_offsets: [B+1] int64        request b owns tokens[offsets[b]:offsets[b+1]]
    request_ids:       list of B ids
    return_n_logits:   [B] int64          logits returned per request (the last n positions of its chunk)
    position_ids:      [3, total] int64   MRoPE (t, h, w) positions (text: three equal rows)
    conv_states:       list over linear layers of [B, conv_dim, K-1]      gathered from the pool
    recurrent_states:  list over linear layers of [B, H_v, D_k, D_v]      gathered from the pool
    start_lengths:     [B] tokens each request had consumed when these inputs were prepared
    image_token_indices / lm_image_embeddings: rows of `tokens` replaced by vision embeddings [n], [n, H]
    epochs:            [B] each request's state epoch when these inputs were prepared (a claim or a `restore`
                       starts a new epoch; `execute` refuses inputs of an older one)
    model_tag:         the preparing model's private tag: `execute` and `prepare_next_token_inputs` refuse inputs
                       of another model instance
    executed:          set by `execute`: inputs run once, and only executed inputs have a next token
    """

    tokens: np.ndarray
    input_row_offsets: np.ndarray
    request_ids: list
    return_n_logits: np.ndarray
    position_ids: np.ndarray
    conv_states: list | None
    recurrent_states: list | None
    start_lengths: np.ndarray
    image_token_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lm_image_embeddings: np.ndarray | None = None
    epochs: np.ndarray | None = None
    model_tag: object | None = None
    executed: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.request_ids)

    @property
    def seq_lens(self) -> np.ndarray:
        return np.diff(self.input_row_offsets)

    @property
    def is_decode(self) -> bool:
        return bool(np.all(self.seq_lens == 1))


@dataclass
class ModelOutputs:
    """logits [Σ n_b, V] (request b's rows are logits[logit_offsets[b]:logit_offsets[b+1]], oldest first);
    hidden_states: None, [B, H] (each request's last token) or [total, H] (every token): the final-normed
    hidden state that feeds lm_head.  optimized.Qwen35Model returns the same container holding torch tensors."""

    logits: np.ndarray
    logit_offsets: np.ndarray
    request_ids: list
    hidden_states: np.ndarray | None = None

    def logits_for(self, request_id) -> np.ndarray:
        if request_id not in self.request_ids:
            raise RequestError(f"logits_for: request {request_id!r} is not in this batch "
                               f"({len(self.request_ids)} requests: {self.request_ids[:8]!r})")
        b = self.request_ids.index(request_id)
        return self.logits[self.logit_offsets[b]:self.logit_offsets[b + 1]]


@dataclass
class _Request:
    """Per-request bookkeeping beyond the caches.

    length:     tokens consumed (committed by `execute`)
    tokens:     the ids of those tokens, in order (len == length)
    rope_delta: MRoPE offset of decode positions (docs/rope_and_mrope.md)
    mm:         reference.multimodal.MultimodalPrefill of the whole prompt, when it had pixels
    prompt:     [P] the whole prompt given with the first context, when that context was a TextAndVisionContext;
                later chunks must repeat its tokens[length:] (chunked prefill of an image prompt)
                (mm and prompt are dropped once the prompt is consumed: decode needs only rope_delta)
    epoch:      bumped by claim and restore, so inputs prepared before a restore cannot run after it
    """

    length: int = 0
    tokens: list = field(default_factory=list)
    rope_delta: int = 0
    mm: object | None = None
    prompt: np.ndarray | None = None
    epoch: int = 0


@dataclass
class RequestSnapshot:
    """A deep copy of everything one request's future depends on (`Qwen35Model.snapshot` / `restore`).

    Recurrent state cannot be truncated like a KV cache, so prefix caching (docs/pitfalls.md, B16) and
    speculative rollback (B17) keep copies of it: restore a snapshot, then replay the tokens after it.

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
        return _chunk_inputs(self.mm, self.rope_delta, self.length, num_tokens)[2]


def _chunk_inputs(mm, rope_delta: int, start: int, T: int):
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


def _has_vision(ctx) -> bool:
    return bool(getattr(ctx, "has_vision_inputs", False)) or any(
        getattr(ctx, a, None) is not None for a in ("pixel_values", "pixel_values_videos"))


def _as_batch(batch) -> list:
    """`batch` as a list of sequences: one context or one token list becomes a batch of one."""
    if isinstance(batch, TextContext) or (len(batch) and np.ndim(batch[0]) == 0
                                          and not isinstance(batch[0], TextContext)):
        return [batch]
    return list(batch)


def serialized(method):
    """Make a pipeline method hold the model's `lock` (a reentrant lock) while it runs.

    Every public call that reads or changes request state takes it, so calls on one model from several threads
    run one at a time, each seeing the state the previous one left; `generate` holds it for its whole loop.  A
    caller holds `model.lock` itself to make several calls one unit (qwen35.generation.generate_tokens does).
    """
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


def host_logits(logits) -> np.ndarray:
    """Logits as a NumPy array on the host (the optimized model returns torch tensors, possibly bf16 on a GPU)."""
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits)


def _generate_context(prompt, request_id) -> TextContext:
    """A private context for `generate`: a copy of `prompt` (a context or a token list) under `request_id` (a
    `PromptId`), without a chunk end (generate prefills the whole prompt in one step)."""
    ctx = copy.copy(prompt) if isinstance(prompt, TextContext) else TextContext(request_id, prompt)
    ctx.request_id = request_id
    if getattr(ctx, "chunk_end", None) is not None:
        ctx.chunk_end = None
    return ctx


class RequestChecks:
    """What both pipeline models (this module's and optimized.model's) share: request validation (the `_check_*`
    methods change nothing) and the `generate` loop, which drives the host's pipeline calls.

    The host class provides `config`, `max_length`, `max_batch_size`, `return_logits`, `lock` (a
    `threading.RLock`, see `serialized`), `_tag` (a private object that marks the inputs it prepares) and
    `_requests` (request id -> an object with `length`, the tokens consumed, `epoch`, and `prompt`, the whole
    prompt of a first TextAndVisionContext or None), `prepare_initial_token_inputs`, `execute`, `release`,
    `_build_inputs(ids, token arrays, counts)`, `_multimodal_prefill(ctx)` and `_check_snapshot_tensors(snap, n,
    fail)` for its own array type.
    """

    @property
    def active_requests(self) -> list:
        return list(self._requests)

    def seq_len(self, request_id) -> int:
        """Tokens the request has consumed so far (0 for an unknown id)."""
        r = self._requests.get(request_id)
        return 0 if r is None else r.length

    def _check_usable(self, request_id) -> None:
        """Raise if the request's state cannot be used.  The reference commits state only after a whole step
        succeeded, so its requests are always usable; optimized.model overrides this (a failed in-place decode)."""

    def _check_tokens(self, request_id, tokens) -> np.ndarray:
        """tokens as a [T] int64 array, non-empty and inside the vocabulary (errors name the request)."""
        arr = as_token_array(tokens, request_id=request_id, vocab_size=self.config.vocab_size)
        if arr.size == 0:
            raise RequestError(f"{request_name(request_id)} has no tokens (an empty request cannot be run)")
        return arr

    def _check_length(self, request_id, new_tokens: int) -> None:
        total = self.seq_len(request_id) + new_tokens
        if total > self.max_length:
            raise RequestError(f"{request_name(request_id)} would hold {total} tokens ({self.seq_len(request_id)} "
                               f"consumed + {new_tokens} new), more than max_length {self.max_length}")

    def _check_capacity(self, request_ids) -> None:
        new = [r for r in request_ids if r not in self._requests]
        free = self.max_batch_size - len(self._requests)
        if len(new) > free:
            raise PoolFullError(
                f"{len(new)} new request(s) {new[free:][:8]!r} do not fit: {len(self._requests)} of "
                f"{self.max_batch_size} slots are live (max_batch_size); release finished requests first")

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

    def _check_own_inputs(self, inputs, *, executed: bool) -> None:
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

    def _check_current_inputs(self, inputs) -> None:
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
            self._check_usable(rid)
            if req.epoch != epochs[b]:
                raise RequestError(f"execute: {request_name(rid)} was restored from a snapshot (or released and "
                                   "claimed again) after its inputs were prepared; prepare new inputs")
            if req.length != inputs.start_lengths[b]:
                raise RequestError(f"execute: {request_name(rid)} advanced since its inputs were prepared "
                                   f"({int(inputs.start_lengths[b])} -> {req.length} tokens)")

    def _return_counts(self, return_n_logits, seq_lens, request_ids) -> np.ndarray:
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
        for rid, n, T in zip(request_ids, counts, seq_lens):
            if not 1 <= n <= T:
                raise RequestError(f"{request_name(rid)}: return_n_logits = {int(n)} must be between 1 and its "
                                   f"{int(T)} new tokens")
        return counts

    def _check_contexts(self, contexts) -> tuple[list, list, list, dict]:
        """Validate a prefill batch: (contexts, request ids, token arrays to run now [T_b], {id: whole prompt}).

        A context whose id is live continues that request (checked against its stored prompt).  Pixels or a
        chunk_end are accepted only with a request's first context, which holds the whole prompt; only
        tokens[:chunk_end] run now.  On a multimodal model, placeholder ids without pixels are refused (the
        pixels' own placeholder checks run in the host's `_multimodal_prefill`, before any state changes).
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
            self._check_usable(rid)
            arr = self._check_tokens(rid, ctx.tokens)
            chunk_end = getattr(ctx, "chunk_end", None)
            if _has_vision(ctx) or chunk_end is not None:
                # the first context of a request that carries its whole prompt (pixels and/or a chunk end)
                if rid in self._requests:
                    raise RequestError(f"{request_name(rid)} is live: pixels and chunk_end are accepted only with the "
                                       "first context of a request (which holds the whole prompt); continue it "
                                       "with TextContexts holding the next tokens")
                if _has_vision(ctx) and not self.config.is_multimodal:
                    raise RequestError(f"{request_name(rid)} carries pixels but the model "
                                       f"({self.config.model_type}) has no vision tower")
                self._check_length(rid, arr.size)  # the whole prompt will be consumed
                if not _has_vision(ctx):
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

    def _check_next_tokens(self, next_tokens, prev) -> tuple[list, list]:
        """Validate one decode step (token b continues prev.request_ids[b]): (request ids, token arrays [1]).

        `prev` must be this model's executed inputs; each token continues its request from where it is now.
        """
        self._check_own_inputs(prev, executed=True)
        tokens = np.asarray(next_tokens).reshape(-1)
        ids = list(prev.request_ids)
        if tokens.shape[0] != len(ids):
            raise RequestError(f"prepare_next_token_inputs: {tokens.shape[0]} next tokens for {len(ids)} requests")
        for rid in ids:
            if rid not in self._requests:
                raise UnknownRequestError(f"decode for {request_name(rid)}, which is not live (released, or never "
                                          "prefilled)")
            self._check_usable(rid)
        arrays = [self._check_tokens(rid, tokens[b:b + 1]) for b, rid in enumerate(ids)]
        for rid, arr in zip(ids, arrays):
            self._check_length(rid, 1)
            self._check_prompt_continuation(rid, arr)
        return ids, arrays

    def _check_snapshot(self, request_id, snap) -> None:
        """A RequestSnapshot fits this model (layer counts, lengths, prompt); the host class checks its arrays in
        `_check_snapshot_tensors(snap, n, fail)` (NumPy in the reference, torch tensors in optimized)."""
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
        self._check_snapshot_tensors(snap, n, fail)
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

    def _stateless_batch(self, batch) -> tuple[list, list, list, list]:
        """Validate and pack a stateless `logits` batch (token lists or contexts, one of them alone allowed).

        Returns (token arrays [T_b] (a context's tokens[:chunk_end]), placeholder rows into the packed tokens [n_b]
        and their vision embeddings [n_b, H] for each sequence with pixels, MRoPE positions [3, T_b] per
        sequence).  Every sequence is checked before any vision tower runs (the host's `_multimodal_prefill`).
        """
        items = _as_batch(batch)
        arrays = [self._check_stateless_item(b, item) for b, item in enumerate(items)]
        if not arrays:
            raise RequestError("logits: empty batch")
        rows, embs, pos, offset = [], [], [], 0
        for b, (item, arr) in enumerate(zip(items, arrays)):
            end = item.prompt_chunk_end() if getattr(item, "chunk_end", None) is not None else arr.size
            pre = self._multimodal_prefill(item) if _has_vision(item) else None
            r, e, p = _chunk_inputs(pre, 0 if pre is None else pre.rope_delta, 0, end)  # tokens[:chunk_end]
            arrays[b] = arr[:end]
            if r is not None and len(r):
                rows.append(r + offset)
                embs.append(e)
            pos.append(p)
            offset += end
        return arrays, rows, embs, pos

    def _check_stateless_item(self, b, item) -> np.ndarray:
        """One sequence of a stateless `logits` batch (a token list or a context): its token array."""
        rid = item.request_id if isinstance(item, TextContext) else f"batch[{b}]"
        arr = self._check_tokens(rid, item.tokens if isinstance(item, TextContext) else item)
        if arr.size > self.max_length:
            raise RequestError(f"{request_name(rid)} has {arr.size} tokens, more than max_length {self.max_length}")
        if _has_vision(item) and not self.config.is_multimodal:
            raise RequestError(f"{request_name(rid)} carries pixels but the model ({self.config.model_type}) has "
                               "no vision tower")
        if not _has_vision(item):
            check_no_placeholders(rid, arr, self.config)
        return arr

    # ------------------------------------------------------------------ generation (shared by both engines)
    @serialized
    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_token_ids=None) -> list[list[int]]:
        """Generate up to `max_new_tokens` tokens for each prompt (token lists or contexts, with pixels too);
        returns the new ids per prompt.

        Runs the pipeline: one prefill of each whole prompt (in groups of at most the free slots), then decode
        steps with the requests that have not stopped.  A request stops at any of `stop_token_ids` (included in
        its output), after max_new_tokens, or when prompt + new tokens reach max_length.  `seed` makes sampling
        reproducible (temperature > 0).  Everything (parameters, every prompt) is checked before the first step;
        errors name the prompt's index ("prompt 2: ...").  Its requests have private ids (`PromptId`), so a
        caller's live requests are never touched, and it holds the model's lock throughout.
        """
        stop = check_generation_params(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids)
        contexts = [_generate_context(p, PromptId(i)) for i, p in enumerate(_as_batch(prompts))]
        self._check_generate_prompts(contexts)
        results: list[list[int]] = [[] for _ in contexts]
        if max_new_tokens == 0 or not contexts:
            return results
        free = self.max_batch_size - len(self._requests)
        if free < 1:
            raise PoolFullError(f"generate: all {self.max_batch_size} slots are held by live requests")
        rng = np.random.default_rng(seed)
        for g0 in range(0, len(contexts), free):
            group = contexts[g0:g0 + free]
            try:
                self._generate_group(group, results[g0:g0 + free], max_new_tokens,
                                     dict(temperature=temperature, top_k=top_k, top_p=top_p, rng=rng), stop)
            finally:
                for ctx in group:
                    self.release(ctx.request_id)
        return results

    def _check_generate_prompts(self, contexts) -> None:
        """Every prompt of a `generate` call, before anything runs: tokens, room for a new token under
        max_length, pixels and placeholders (the placeholder / grid plan of a prompt with pixels too)."""
        for ctx in contexts:
            check_prompt_room(ctx.request_id, self._check_tokens(ctx.request_id, ctx.tokens).size, self.max_length)
        if contexts:
            self._check_contexts(contexts)
        for ctx in contexts:
            if _has_vision(ctx):
                from reference.multimodal import plan_multimodal_prefill  # lazy: pixels only

                plan_multimodal_prefill(ctx, self.config)

    def _generate_group(self, contexts, outs, max_new_tokens, sampling: dict, stop) -> None:
        """Prefill `contexts` (at most the free slots), then decode until each has stopped; appends to `outs`."""
        saved, self.return_logits = self.return_logits, "last"
        try:
            inputs = self.prepare_initial_token_inputs(contexts, return_n_logits=1)
        finally:
            self.return_logits = saved
        prompt_lens = [len(ctx) for ctx in contexts]
        live = list(range(len(contexts)))
        while True:
            last = host_logits(self.execute(inputs).logits)  # [B, V]: each live request's last position
            nxt, still = [], []
            for row, j in enumerate(live):
                t = sample_next_token(last[row], **sampling, who=request_name(contexts[j].request_id))
                outs[j].append(t)
                room = prompt_lens[j] + len(outs[j]) < self.max_length  # prompt + new tokens <= max_length
                if t not in stop and len(outs[j]) < max_new_tokens and room:
                    still.append(j)
                    nxt.append(t)
            if not still:
                return
            live = still
            del inputs  # drop the executed step (the reference's gathered state copies) before gathering again
            inputs = self._build_inputs([contexts[j].request_id for j in live], [np.array([t], np.int64) for t in nxt],
                                        np.ones(len(live), np.int64))


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
    """Check `generate`'s parameters (both engines' and qwen35.generation.generate_tokens'); returns the stop ids.

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
    prompt and new ones together (the rule `generate` and `generate_tokens` stop by)."""
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


def _model_dtype(dtype) -> np.dtype:
    """The reference model's compute dtype: float64 (the oracle) or float32; anything else is a ConfigError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"dtype must be float64 or float32, got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise ConfigError(f"dtype must be float64 or float32, got {dt}")
    return dt


class Qwen35Model(RequestChecks):
    """Qwen3.5 language model (dense or MoE; multimodal checkpoints through their text path plus vision hook).

    Args:
        weights: ModelWeights (reference.weights.load_weights).
        max_batch_size: state-pool slots = requests alive at once.
        dtype: compute dtype, np.float64 (the oracle) or np.float32.
        return_logits: "last" (the last `return_n_logits` positions of each request, one int for all),
            "variable" (like "last", but `return_n_logits` may differ per request) or "all" (every position).
        return_hidden_states: "none", "last" (each request's last token) or "all" (every token).
        max_length: longest request (tokens consumed, prompt + generated); default max_position_embeddings.
    """

    def __init__(self, weights: ModelWeights, *, max_batch_size: int = 8, dtype=np.float64,
                 return_logits: str = "last", return_hidden_states: str = "none", max_length: int | None = None):
        if return_logits not in RETURN_LOGITS:
            raise ConfigError(f"return_logits must be one of {RETURN_LOGITS}, got {return_logits!r}")
        if return_hidden_states not in RETURN_HIDDEN_STATES:
            raise ConfigError(f"return_hidden_states must be one of {RETURN_HIDDEN_STATES}, "
                             f"got {return_hidden_states!r}")
        dtype = _model_dtype(dtype)
        self.config: Qwen35Config = weights.config
        self.weights = weights
        self.dtype = dtype
        self.return_logits = return_logits
        self.return_hidden_states = return_hidden_states
        if not isinstance(max_batch_size, (int, np.integer)) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.max_batch_size = int(max_batch_size)
        self.max_length = self.config.resolve_max_seq_len(max_length)
        self.state_cache = GatedDeltaNetStateCache(self.config, self.max_batch_size, dtype=dtype)
        self.kv_cache = KVCache(self.config, dtype=dtype)
        self._requests: dict[Hashable, _Request] = {}
        self._vision_weights = None
        self._epochs = itertools.count(1)
        self.lock = threading.RLock()  # held by every public pipeline call (see `serialized`)
        self._tag = object()  # marks the inputs this instance prepares

    @classmethod
    def from_pretrained(cls, path, *, max_batch_size: int = 8, dtype=np.float64, return_logits: str = "last",
                        return_hidden_states: str = "none", max_length: int | None = None,
                        config: Qwen35Config | None = None, allow_nonfinite: bool = False) -> "Qwen35Model":
        """Load a Hugging Face checkpoint directory (config.json + safetensors; see reference.weights).

        A file path, a malformed checkpoint or a NaN / Inf weight is a CheckpointError naming the file
        (`allow_nonfinite=True` loads non-finite weights anyway)."""
        weights = load_weights(Path(path), config=config, dtype=_model_dtype(dtype), allow_nonfinite=allow_nonfinite)
        return cls(weights, max_batch_size=max_batch_size, dtype=dtype, return_logits=return_logits,
                   return_hidden_states=return_hidden_states, max_length=max_length)

    # ------------------------------------------------------------------ bookkeeping (and RequestChecks)
    @serialized
    def release(self, request_id) -> bool:
        """Free the request's state slot and KV cache.  Unknown ids are a no-op (returns False), as in MAX."""
        known = self._requests.pop(request_id, None) is not None
        self.state_cache.release(request_id)
        self.kv_cache.release(request_id)
        return known

    # ------------------------------------------------------------------ snapshots (prefix caching, rollback)
    @serialized
    def snapshot(self, request_id) -> RequestSnapshot:
        """A deep copy of the request's committed state: the conv and recurrent state of every linear layer, the
        K/V of every full-attention layer, tokens consumed, MRoPE offset and multimodal prompt.

        Taken between steps (what `execute` committed; inputs prepared but not executed are not part of it).
        Raises UnknownRequestError for an id that is not live.
        """
        req = self._requests.get(request_id)
        if req is None:
            raise UnknownRequestError(f"snapshot of {request_name(request_id)}, which is not live")
        conv, rec = self.state_cache.get_states([request_id])  # fresh copies [1, ...]
        kv = [(k.copy(), v.copy()) for k, v in
              (self.kv_cache.get([request_id], layer)[0] for layer in self.config.full_layer_indices)]
        return RequestSnapshot(
            request_id=request_id, length=req.length, tokens=np.array(req.tokens, dtype=np.int64).reshape(-1),
            conv_states=[c[0].copy() for c in conv], recurrent_states=[r[0].copy() for r in rec], kv=kv,
            rope_delta=req.rope_delta, mm=copy.deepcopy(req.mm),
            prompt=None if req.prompt is None else req.prompt.copy())

    @serialized
    def restore(self, request_id, snapshot: RequestSnapshot) -> None:
        """Make `request_id` continue from `snapshot` (copied in; the snapshot stays reusable).

        A live id keeps its slot and has its state overwritten; a new id claims a free slot (PoolFullError when
        none is left).  The snapshot may come from another request id (a shared prefix).  Everything is checked
        (layer counts, shapes, dtype, lengths) before any state changes.  Inputs prepared for `request_id`
        before the restore are refused by `execute` afterwards.
        """
        if not isinstance(snapshot, RequestSnapshot):
            raise TypeError(f"restore: expected a RequestSnapshot, got {type(snapshot).__name__}")
        self._check_snapshot(request_id, snapshot)
        if request_id not in self._requests:
            self._check_capacity([request_id])
        # --- checked: now commit ---
        self.state_cache.claim(request_id)
        self.kv_cache.claim(request_id)
        self.state_cache.update_states([request_id], [c[None] for c in snapshot.conv_states],
                                       [r[None] for r in snapshot.recurrent_states])  # copies into the pools
        for layer, (k, v) in zip(self.config.full_layer_indices, snapshot.kv):
            self.kv_cache.set([request_id], layer, [(k.copy(), v.copy())])
        self._requests[request_id] = _Request(
            length=int(snapshot.length), tokens=[int(t) for t in snapshot.tokens], rope_delta=int(snapshot.rope_delta),
            mm=copy.deepcopy(snapshot.mm), prompt=None if snapshot.prompt is None else np.array(snapshot.prompt),
            epoch=next(self._epochs))

    def _check_snapshot_tensors(self, snap: RequestSnapshot, n: int, fail) -> None:
        """Each state array of `snap` (n tokens) is a NumPy array of this model's shape and dtype."""
        c = self.config
        kv_shape = (n, c.num_key_value_heads, c.head_dim)
        for what, arrays, shape in (
                ("conv state", snap.conv_states, self.state_cache.conv_pools[0].shape[1:] if c.num_linear_layers
                 else None),
                ("recurrent state", snap.recurrent_states,
                 self.state_cache.recurrent_pools[0].shape[1:] if c.num_linear_layers else None),
                ("k", [k for k, _ in snap.kv], kv_shape), ("v", [v for _, v in snap.kv], kv_shape)):
            for i, a in enumerate(arrays):
                if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != self.dtype:
                    fail(f"{what} {i} is {getattr(a, 'dtype', type(a).__name__)} {np.shape(a)}, this model needs "
                         f"{self.dtype} {shape}")

    # ------------------------------------------------------------------ the pipeline interface
    @serialized
    def prepare_initial_token_inputs(self, contexts: Sequence[TextContext], return_n_logits=1) -> ModelInputs:
        """Pack a ragged batch of contexts, claim state for new requests and gather every request's state.

        A context whose request_id is live continues that request (its tokens are the next prefill chunk); a new
        id starts from zero state.  Multimodal contexts (pixels) are accepted for a request's first chunk: their
        tokens are the whole prompt, of which only tokens[:ctx.chunk_end] are processed now; the rest follows
        as plain TextContexts (checked against the stored prompt).
        """
        contexts, ids, token_arrays, prompts = self._check_contexts(contexts)
        seq_lens = np.array([a.size for a in token_arrays], dtype=np.int64)
        counts = self._return_counts(return_n_logits, seq_lens, ids)
        self._check_capacity(ids)
        # Vision tower first (it can still fail on bad pixels) — nothing has been claimed yet.
        mm = {ctx.request_id: self._multimodal_prefill(ctx) for ctx in contexts if _has_vision(ctx)}

        # --- from here on, state changes ---
        for rid in ids:
            if rid not in self._requests:
                self.state_cache.claim(rid)
                self.kv_cache.claim(rid)
                self._requests[rid] = _Request(epoch=next(self._epochs))
        for rid, prompt in prompts.items():
            self._requests[rid].prompt = prompt
        for rid, pre in mm.items():
            self._requests[rid].mm = pre
            self._requests[rid].rope_delta = int(pre.rope_delta)
        return self._build_inputs(ids, token_arrays, counts)

    @serialized
    def prepare_next_token_inputs(self, next_tokens, prev: ModelInputs) -> ModelInputs:
        """Inputs for one decode step: token b continues request prev.request_ids[b].

        `prev` must be this model's executed inputs.  Their gathered states are dropped first (MAX does the same
        to avoid a third copy).
        """
        ids, arrays = self._check_next_tokens(next_tokens, prev)
        prev.conv_states = prev.recurrent_states = None
        return self._build_inputs(ids, arrays, np.ones(len(ids), dtype=np.int64))

    def _build_inputs(self, ids, token_arrays, counts) -> ModelInputs:
        seq_lens = np.array([a.size for a in token_arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int64)
        starts = np.array([self._requests[r].length for r in ids], dtype=np.int64)
        pos, rows, embs = [], [], []
        for b, rid in enumerate(ids):
            req = self._requests[rid]
            r, e, p = _chunk_inputs(req.mm, req.rope_delta, int(starts[b]), int(seq_lens[b]))
            if r is not None and len(r):
                rows.append(r + offsets[b])
                embs.append(e)
            pos.append(p)  # [3, T]: the prompt's slice, then s + i + rope_delta
        conv, rec = self.state_cache.get_states(ids)  # gather: fresh [B, ...] copies
        return ModelInputs(
            tokens=np.concatenate(token_arrays).astype(np.int64), input_row_offsets=offsets, request_ids=list(ids),
            return_n_logits=counts, position_ids=np.concatenate(pos, axis=1).astype(np.int64),
            conv_states=conv, recurrent_states=rec, start_lengths=starts,
            image_token_indices=np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64),
            lm_image_embeddings=np.concatenate(embs) if embs else None,
            epochs=np.array([self._requests[r].epoch for r in ids], dtype=np.int64), model_tag=self._tag)

    @serialized
    def execute(self, inputs: ModelInputs) -> ModelOutputs:
        """Run one step on prepared inputs, scatter the new states back, return the selected logits.

        Refused (nothing runs): inputs of another model instance, inputs already executed, or inputs whose
        requests were released, restored, re-claimed or advanced since they were prepared.
        """
        self._check_own_inputs(inputs, executed=False)
        self._check_current_inputs(inputs)
        ids = inputs.request_ids
        past_kv = {layer: self.kv_cache.get(ids, layer) for layer in self.config.full_layer_indices}
        h, conv, rec, new_kv = self._forward(
            inputs.tokens, inputs.input_row_offsets, inputs.position_ids, inputs.conv_states,
            inputs.recurrent_states, past_kv, inputs.image_token_indices, inputs.lm_image_embeddings)
        # Everything computed: now commit (scatter the states, store the K/V, advance the lengths).
        self.state_cache.update_states(ids, conv, rec)
        for layer, kv in new_kv.items():
            self.kv_cache.set(ids, layer, kv)
        off = inputs.input_row_offsets
        for b, rid in enumerate(ids):
            req = self._requests[rid]
            req.length += int(inputs.seq_lens[b])
            req.tokens.extend(inputs.tokens[off[b]:off[b + 1]].tolist())
            if req.prompt is not None and req.length >= req.prompt.size:
                req.prompt = req.mm = None  # prompt consumed: decode needs only rope_delta (frees the embeddings)
        inputs.executed = True
        return self._outputs(h, inputs.input_row_offsets, inputs.return_n_logits, ids)

    def _outputs(self, h, offsets, counts, ids) -> ModelOutputs:
        rows = np.concatenate([np.arange(offsets[b + 1] - counts[b], offsets[b + 1]) for b in range(len(ids))])
        logits = h[rows] @ self.weights.lm_head.T.astype(self.dtype, copy=False)  # [Σ n_b, V]
        hidden = None
        if self.return_hidden_states == "all":
            hidden = h
        elif self.return_hidden_states == "last":
            hidden = h[offsets[1:] - 1]  # [B, H]
        return ModelOutputs(logits=logits, logit_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                            request_ids=list(ids), hidden_states=hidden)

    # ------------------------------------------------------------------ the forward pass
    def _forward(self, tokens, offsets, position_ids, conv, rec, past_kv, image_rows=None, image_emb=None,
                 hidden_trace: list | None = None):
        """The layers over packed tokens.  Returns (final-normed h [total, H], conv, rec, new K/V by layer).

        `hidden_trace`, if a list, receives the residual stream after the embedding and after every layer
        (reference.divergence uses it).
        """
        c, w, dt = self.config, self.weights, self.dtype
        x = w.embed_tokens[tokens].astype(dt)  # [total, H]
        if image_rows is not None and len(image_rows):
            x[image_rows] = np.asarray(image_emb, dtype=dt)  # vision embeddings replace placeholder rows
        if hidden_trace is not None:
            hidden_trace.append(x.copy())
        seq_lens = np.diff(offsets)
        mode = "recurrent" if np.all(seq_lens == 1) else "chunk"  # decode: per-token loop; prefill: WY chunks
        new_conv, new_rec, new_kv = list(conv), list(rec), {}
        eps = c.rms_norm_eps
        for i, layer in enumerate(w.layers):
            a = rms_norm(x, layer.input_layernorm, eps, dtype=dt)  # [total, H]
            if layer.layer_type == LINEAR:
                li = c.linear_layer_index(i)
                y, new_conv[li], new_rec[li] = gated_deltanet(
                    a, layer.mixer, c, cu_seqlens=offsets, conv_state=conv[li], recurrent_state=rec[li],
                    mode=mode, dtype=dt)
            else:
                y, new_kv[i] = gated_attention(a, layer.mixer, c, position_ids=position_ids, cu_seqlens=offsets,
                                               past_kv=past_kv[i])
            x = x + y
            m = rms_norm(x, layer.post_attention_layernorm, eps, dtype=dt)
            if isinstance(layer.mlp, MLPWeights):
                x = x + swiglu_mlp(m, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
            else:
                x = x + sparse_moe_block(m, layer.mlp, c)
            if hidden_trace is not None:
                hidden_trace.append(x.copy())
        h = rms_norm(x, w.norm, eps, dtype=dt)  # [total, H]
        return h, new_conv, new_rec, new_kv

    def _multimodal_prefill(self, ctx):
        from reference import multimodal  # lazy: the vision path is only needed for pixels

        if self._vision_weights is None:
            self._vision_weights = multimodal.VisionWeights.from_state_dict(
                self.weights.visual, self.config.vision_config, dtype=self.dtype)
        return multimodal.multimodal_prefill_inputs(ctx, self._vision_weights, self.config, dtype=self.dtype)

    # ------------------------------------------------------------------ conveniences
    @serialized
    def logits(self, batch) -> list[np.ndarray]:
        """Stateless: all-position logits [T_b, V] for each sequence (token lists or contexts) of `batch`.

        Uses zero initial state and no cache, and touches no live request.
        """
        arrays, rows, embs, pos = self._stateless_batch(batch)
        B = len(arrays)
        offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int64)
        conv = [np.zeros((B,) + p.shape[1:], self.dtype) for p in self.state_cache.conv_pools]
        rec = [np.zeros((B,) + p.shape[1:], self.dtype) for p in self.state_cache.recurrent_pools]
        past = {layer: None for layer in self.config.full_layer_indices}
        h, *_ = self._forward(np.concatenate(arrays), offsets, np.concatenate(pos, axis=1), conv, rec, past,
                              np.concatenate(rows) if rows else None, np.concatenate(embs) if embs else None)
        logits = h @ self.weights.lm_head.T.astype(self.dtype, copy=False)  # [total, V]
        return [logits[offsets[b]:offsets[b + 1]] for b in range(B)]


def __getattr__(name):
    """`reference.model.TextAndVisionContext` (docs/pipeline_api.md) without importing the vision path eagerly."""
    if name == "TextAndVisionContext":
        from reference.multimodal import TextAndVisionContext

        return TextAndVisionContext
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
