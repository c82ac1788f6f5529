"""The Qwen3.5 pipeline model in NumPy: ragged batches, chunked prefill, multi-step decode (docs/pipeline_api.md).

One forward step over the packed tokens of a batch (`Qwen35Model.forward`; docs/gated_deltanet.md,
docs/gated_attention.md):

    x = E[tokens]  (multimodal prefill: placeholder rows replaced by vision embeddings, docs/vision.md)
    for each layer:  x += mixer(rms_norm(x))     mixer = gated_deltanet (linear) | gated_attention (full)
                     x += mlp(rms_norm(x))       mlp = SwiGLU | sparse MoE
    h = rms_norm(x);  logits = h W_lmᵀ           (only for the rows that are returned)

Around it, the interface of MAX's documented Qwen3.5 pipeline model (`Qwen3_5Model`):

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

The request layer both engines share (the `ModelInputs` / `ModelOutputs` / `RequestSnapshot` contract, the
request checks, sampling and the generate loop) is reference.pipeline; the contract names are importable from
here too.  Errors, not corruption: every request is validated before any state is touched, and `execute` writes
states only after the whole forward pass succeeded.
"""
from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from reference import pipeline
from reference.attention import KVCache, gated_attention
from reference.config import LINEAR, Qwen35Config
from reference.context import TextContext, request_name
from reference.deltanet import gated_deltanet
from reference.errors import ConfigError, PoolFullError, RequestError, UnknownRequestError
from reference.mlp import MLPWeights, sparse_moe_block, swiglu_mlp
from reference.norms import rms_norm
from reference.pipeline import (
    RETURN_LOGITS,
    ModelInputs,
    ModelOutputs,
    RequestChecks,
    RequestRecord,
    RequestSnapshot,
    has_vision,
    pack_chunks,
    serialized,
)
from reference.state_cache import GatedDeltaNetStateCache
from reference.weights import ModelWeights, load_weights

__all__ = ["Qwen35Model", "ModelInputs", "ModelOutputs", "RequestSnapshot", "TextContext", "RequestError",
           "PoolFullError", "UnknownRequestError", "RETURN_LOGITS", "RETURN_HIDDEN_STATES"]

RETURN_HIDDEN_STATES = ("none", "last", "all")


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
        self._requests: dict[Hashable, RequestRecord] = {}
        self._vision_weights = None
        self._epochs = itertools.count(1)
        self.lock = threading.RLock()  # held by every public pipeline call (see reference.pipeline.serialized)
        self._tag = object()  # marks the inputs this instance prepares

    @classmethod
    def from_pretrained(cls, path, *, max_batch_size: int = 8, dtype=np.float64, return_logits: str = "last",
                        return_hidden_states: str = "none", max_length: int | None = None,
                        config: Qwen35Config | None = None, allow_nonfinite: bool = False) -> Qwen35Model:
        """Load a Hugging Face checkpoint directory (config.json + safetensors; see reference.weights).

        A file path, a malformed checkpoint or a NaN / Inf weight is a CheckpointError naming the file
        (`allow_nonfinite=True` loads non-finite weights anyway)."""
        weights = load_weights(Path(path), config=config, dtype=_model_dtype(dtype), allow_nonfinite=allow_nonfinite)
        return cls(weights, max_batch_size=max_batch_size, dtype=dtype, return_logits=return_logits,
                   return_hidden_states=return_hidden_states, max_length=max_length)

    # ------------------------------------------------------------------ the forward pass
    def forward(self, tokens, offsets, position_ids, conv, rec, past_kv, image_rows=None, image_emb=None,
                hidden_trace: list | None = None):
        """The layers over packed tokens: embedding -> layers -> final norm (lm_head is `_logits`).

        tokens [total], offsets [B+1] (request b owns tokens[offsets[b]:offsets[b+1]]), position_ids [3, total];
        conv / rec: per linear layer the requests' states [B, ...]; past_kv: per full layer the requests' cached
        (k, v) (or None).  image_rows [n] / image_emb [n, H]: embedding rows replaced by vision embeddings.
        Returns (final-normed h [total, H], new conv, new rec, new K/V by layer); the inputs are not changed.
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

    def _logits(self, h) -> np.ndarray:
        """lm_head: [n, H] final-normed hidden states -> [n, V] logits."""
        return h @ self.weights.lm_head.T.astype(self.dtype, copy=False)

    def multimodal_prefill(self, ctx):
        """The MultimodalPrefill of a whole prompt with pixels (placeholder checks, vision tower, MRoPE plan)."""
        from reference import multimodal  # lazy: the vision path is only needed for pixels

        if self._vision_weights is None:
            self._vision_weights = multimodal.VisionWeights.from_state_dict(
                self.weights.visual, self.config.vision_config, dtype=self.dtype)
        return multimodal.multimodal_prefill_inputs(ctx, self._vision_weights, self.config, dtype=self.dtype)

    # ------------------------------------------------------------------ the pipeline interface
    @serialized
    def prepare_initial_token_inputs(self, contexts: Sequence[TextContext], return_n_logits=1) -> ModelInputs:
        """Pack a ragged batch of contexts, claim state for new requests and gather every request's state.

        A context whose request_id is live continues that request (its tokens are the next prefill chunk); a new
        id starts from zero state.  Multimodal contexts (pixels) are accepted for a request's first chunk: their
        tokens are the whole prompt, of which only tokens[:ctx.chunk_end] are processed now; the rest follows
        as plain TextContexts (checked against the stored prompt).
        """
        contexts, ids, token_arrays, prompts = self.check_contexts(contexts)
        counts = self.return_counts(return_n_logits, [a.size for a in token_arrays], ids)
        self.check_capacity(ids)
        # Vision tower first (it can still fail on bad pixels) — nothing has been claimed yet.
        mm = {ctx.request_id: self.multimodal_prefill(ctx) for ctx in contexts if has_vision(ctx)}

        # --- from here on, state changes ---
        for rid in ids:
            if rid not in self._requests:
                self.state_cache.claim(rid)
                self.kv_cache.claim(rid)
                self._requests[rid] = RequestRecord(epoch=next(self._epochs))
        for rid, prompt in prompts.items():
            self._requests[rid].prompt = prompt
        for rid, pre in mm.items():
            self._requests[rid].mm = pre
            self._requests[rid].rope_delta = int(pre.rope_delta)
        return self._build_inputs(ids, token_arrays, counts)

    @serialized
    def prepare_next_token_inputs(self, next_tokens, prev: ModelInputs, request_ids=None) -> ModelInputs:
        """Inputs for one decode step: token b continues request prev.request_ids[b].

        `prev` must be this model's executed inputs.  `request_ids` (some of prev's requests, each once)
        continues only those: token b then continues request_ids[b], and the others sit this step out (finished
        requests of a batch; `generate` does this).  The gathered states of `prev` are dropped first (MAX does the
        same to avoid a third copy).
        """
        ids, arrays = self.check_next_tokens(next_tokens, prev, request_ids)
        prev.conv_states = prev.recurrent_states = None
        return self._build_inputs(ids, arrays, np.ones(len(ids), dtype=np.int64))

    def _build_inputs(self, ids, token_arrays, counts) -> ModelInputs:
        reqs = [self._requests[r] for r in ids]
        starts = np.array([r.length for r in reqs], dtype=np.int64)
        offsets, positions, rows, embs = pack_chunks(
            [(r.mm, r.rope_delta, s, a.size) for r, s, a in zip(reqs, starts, token_arrays, strict=True)])
        conv, rec = self.state_cache.get_states(ids)  # gather: fresh [B, ...] copies
        return ModelInputs(
            tokens=np.concatenate(token_arrays).astype(np.int64), input_row_offsets=offsets, request_ids=list(ids),
            return_n_logits=counts, position_ids=positions, start_lengths=starts, image_token_indices=rows,
            lm_image_embeddings=np.concatenate(embs) if embs else None,
            epochs=np.array([r.epoch for r in reqs], dtype=np.int64), model_tag=self._tag,
            conv_states=conv, recurrent_states=rec)

    @serialized
    def execute(self, inputs: ModelInputs) -> ModelOutputs:
        """Run one step on prepared inputs, scatter the new states back, return the selected logits.

        Refused (nothing runs): inputs of another model instance, inputs already executed, or inputs whose
        requests were released, restored, re-claimed or advanced since they were prepared.
        """
        self.check_own_inputs(inputs, executed=False)
        self.check_current_inputs(inputs)
        ids = inputs.request_ids
        past_kv = {layer: self.kv_cache.get(ids, layer) for layer in self.config.full_layer_indices}
        h, conv, rec, new_kv = self.forward(
            inputs.tokens, inputs.input_row_offsets, inputs.position_ids, inputs.conv_states,
            inputs.recurrent_states, past_kv, inputs.image_token_indices, inputs.lm_image_embeddings)
        # Everything computed: now commit (scatter the states, store the K/V, advance the lengths).
        self.state_cache.update_states(ids, conv, rec)
        for layer, kv in new_kv.items():
            self.kv_cache.set(ids, layer, kv)
        off = inputs.input_row_offsets
        for b, rid in enumerate(ids):
            self._requests[rid].commit(inputs.tokens[off[b]:off[b + 1]])
        inputs.executed = True
        return self._outputs(h, off, inputs.return_n_logits, ids)

    def _outputs(self, h, offsets, counts, ids) -> ModelOutputs:
        rows = np.concatenate([np.arange(offsets[b + 1] - counts[b], offsets[b + 1]) for b in range(len(ids))])
        hidden = None
        if self.return_hidden_states == "all":
            hidden = h
        elif self.return_hidden_states == "last":
            hidden = h[offsets[1:] - 1]  # [B, H]
        return ModelOutputs(logits=self._logits(h[rows]),  # [Σ n_b, V]
                            logit_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                            request_ids=list(ids), hidden_states=hidden)

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
        self.check_snapshot(request_id, snapshot)
        if request_id not in self._requests:
            self.check_capacity([request_id])
        # --- checked: now commit ---
        self.state_cache.claim(request_id)
        self.kv_cache.claim(request_id)
        self.state_cache.update_states([request_id], [c[None] for c in snapshot.conv_states],
                                       [r[None] for r in snapshot.recurrent_states])  # copies into the pools
        for layer, (k, v) in zip(self.config.full_layer_indices, snapshot.kv, strict=True):
            self.kv_cache.set([request_id], layer, [(k.copy(), v.copy())])
        self._requests[request_id] = RequestRecord(
            length=int(snapshot.length), tokens=[int(t) for t in snapshot.tokens], rope_delta=int(snapshot.rope_delta),
            mm=copy.deepcopy(snapshot.mm), prompt=None if snapshot.prompt is None else np.array(snapshot.prompt),
            epoch=next(self._epochs))

    def check_snapshot_tensors(self, snap: RequestSnapshot, n: int, fail) -> None:
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

    # ------------------------------------------------------------------ conveniences
    @serialized
    def logits(self, batch) -> list[np.ndarray]:
        """Stateless: all-position logits [T_b, V] for each sequence (token lists or contexts) of `batch`.

        Uses zero initial state and no cache, and touches no live request.
        """
        arrays, offsets, positions, rows, embs = self.stateless_batch(batch)
        B = len(arrays)
        conv = [np.zeros((B,) + p.shape[1:], self.dtype) for p in self.state_cache.conv_pools]
        rec = [np.zeros((B,) + p.shape[1:], self.dtype) for p in self.state_cache.recurrent_pools]
        past = {layer: None for layer in self.config.full_layer_indices}
        h, *_ = self.forward(np.concatenate(arrays), offsets, positions, conv, rec, past, rows,
                             np.concatenate(embs) if embs else None)
        logits = self._logits(h)  # [total, V]
        return [logits[offsets[b]:offsets[b + 1]] for b in range(B)]

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_token_ids=None) -> list[list[int]]:
        """Generate up to `max_new_tokens` tokens for each prompt (token lists or contexts, with pixels too);
        returns the new ids per prompt.

        Runs `reference.pipeline.generate`: one prefill of each whole prompt (in groups of at most the free
        slots), then decode steps with the requests that have not stopped.  A request stops at any of
        `stop_token_ids` (included in its output), after max_new_tokens, or when prompt + new tokens reach
        max_length.  `seed` makes sampling reproducible (temperature > 0).  Everything is checked before the first
        step; errors name the prompt's index ("prompt 2: ..."); a caller's live requests are never touched; the
        model's lock is held throughout.
        """
        return pipeline.generate(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop_token_ids=stop_token_ids)


def _model_dtype(dtype) -> np.dtype:
    """The reference model's compute dtype: float64 (the oracle) or float32; anything else is a ConfigError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"dtype must be float64 or float32, got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise ConfigError(f"dtype must be float64 or float32, got {dt}")
    return dt


def __getattr__(name):
    """`reference.model.TextAndVisionContext` (docs/pipeline_api.md) without importing the vision path eagerly."""
    if name == "TextAndVisionContext":
        from reference.multimodal import TextAndVisionContext

        return TextAndVisionContext
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
