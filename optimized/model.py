"""The Qwen3.5 pipeline model in PyTorch: same API as `reference.model`, state pools updated IN PLACE by slot.

    model  = Qwen35Model.from_pretrained(path, device="cpu", dtype=torch.float32, backend="auto")
    inputs = model.prepare_initial_token_inputs([TextContext("a", [...]), ...], return_n_logits=1)
    out    = model.execute(inputs)                 # out.logits [Σ return_n_logits, V] (a torch tensor)
    inputs = model.prepare_next_token_inputs(next_tokens, inputs)
    model.release("a");  model.logits([[...]]);  model.generate([[...]], max_new_tokens=16)

What differs from the reference (which keeps the gather/scatter design of MAX's documented pipeline):

* State lives in per-linear-layer pools `conv_pools[l] [S, conv_dim, K-1]` (model dtype) and
  `state_pools[l] [S, H_v, D_k, D_v]` (always fp32, docs/pitfalls.md, B8).  A request owns a slot; `ModelInputs` carries
  slot ids, not gathered copies.  Decode updates the pools in place at the slot indices
  (`causal_conv1d_update`, `fused_recurrent_gated_delta_rule_update`).  Prefill chunks read their slots' states
  as the kernel's initial state and write the final states back into the same rows.  So the memory rule is
  `reference.memory`'s "in_place" one (1 × max_batch × per_req, not 3 ×).
* On CUDA, `max_batch_size=None` sizes the pool with `reference.memory.replica_batch_size(..., rule=
  "in_place")` from `torch.cuda.mem_get_info` (the documented fallback of 32 when the query fails), and a
  requested batch that does not fit is refused at start with a message that gives the numbers.
* Tensor parallelism: built from one rank's weights (`weights.shard`, loaded by `load_weights(..., shard=)`) and a
  `TensorParallelGroup`, the model computes in the rank's geometry (`self.local`: its heads, its MLP columns, its
  experts), holds only its heads' state, sums the partial outputs of every mixer, MLP and the embedding with one
  all-reduce, and gathers the vocabulary blocks of the logits.  `from_pretrained(..., tensor_parallel=N,
  data_parallel=M)` returns the `optimized.parallel.ParallelQwen35Model` that drives the ranks (docs/parallel.md).
* Config, weight loading / name mapping, memory sizing, TextContext and the multimodal plan (placeholder checks,
  MRoPE positions, per-chunk slices) come from `reference`; the request layer — the `ModelInputs` /
  `ModelOutputs` / `RequestSnapshot` contract, the request checks (`reference.pipeline.RequestChecks`: tokens,
  lengths, capacity, prompt continuation, return counts), sampling and the generate loop — is reference.pipeline,
  shared with the NumPy engine.

Multimodal prompts (`TextAndVisionContext`), as in reference.model: the first context of a request holds the whole
prompt; the PyTorch vision tower (`optimized.vision.VisionTower`, built once per model from the `model.visual.*`
weights, on the model's device and dtype) runs once for it through `optimized.vision.multimodal_prefill_inputs`;
each prefill chunk (`chunk_end`, then plain TextContexts checked against the stored prompt) writes its rows of the
vision embeddings over the placeholder rows and uses its slice of the prompt's MRoPE positions; decode continues at
tokens-so-far + rope_delta on all three axes.

Errors, not corruption: `prepare_*`, `execute`, `snapshot` and `restore` validate everything (ids, token range,
lengths, capacity, released ids, epochs, stored prompts, snapshot shapes) before any state changes.  Inside
`execute`, a prefill chunk writes its final states into the pools only after the whole forward pass (and the
logits) succeeded, and K/V appends are rolled back on an exception, so a failed prefill leaves every request as
it was.  A decode step updates the pools in place layer by layer (that is the point of the in-place design), so an
exception in the middle of one marks the requests of that batch as broken (any later use raises; release them);
every other request is untouched.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from optimized import backend as dispatch
from optimized.attention import KVCache, TorchAttentionWeights, gated_attention
from optimized.deltanet import TorchDeltaNetWeights, gated_deltanet, gated_deltanet_decode
from optimized.linear import linear
from optimized.mlp import TorchMoEWeights, sparse_moe_block, swiglu_mlp
from optimized.norms import rms_norm
from reference import pipeline
from reference.config import LINEAR, Qwen35Config
from reference.context import TextContext, request_name
from reference.errors import ConfigError, PoolFullError, RequestError, StateCacheError, UnknownRequestError
from reference.memory import FALLBACK_MAX_BATCH, replica_batch_size, state_bytes_per_request
from reference.mlp import MLPWeights

# The contract is the reference's; here its arrays are torch tensors on the model's device.
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
from reference.weights import load_weights

__all__ = ["Qwen35Model", "ModelInputs", "ModelOutputs", "RequestSnapshot", "TextContext", "RequestError",
           "PoolFullError", "UnknownRequestError", "STATE_RULE"]

STATE_RULE = "in_place"


@dataclass
class _Layer:
    layer_type: str
    input_layernorm: torch.Tensor
    post_attention_layernorm: torch.Tensor
    mixer: object  # TorchDeltaNetWeights | TorchAttentionWeights
    mlp: object  # dict of dense tensors | TorchMoEWeights


class PendingStep:
    """A step whose forward pass ran but whose results are not committed yet (`Qwen35Model.run_step`)."""

    def __init__(self, model, inputs, reqs, kv_lens):
        self.model, self.inputs, self.reqs, self.kv_lens = model, inputs, reqs, kv_lens
        self.writes: list = []  # prefill: (pool, slot ids, final states), written by commit()
        self.outputs: ModelOutputs | None = None
        self.done = False

    def commit(self) -> None:
        """Write the prefill's final states into the pools and advance the requests (once)."""
        if self.done:
            raise RequestError("this step was already committed or abandoned")
        with self.model.lock:
            for pool, slots, new in self.writes:
                pool.index_copy_(0, slots, new.to(pool.dtype))
            inputs = self.inputs
            host = inputs.host_tokens if inputs.host_tokens is not None else inputs.tokens.cpu().numpy()
            offs = inputs.input_row_offsets
            for b, r in enumerate(self.reqs):
                r.commit(host[offs[b]:offs[b + 1]])
            inputs.executed = True
            self.done = True

    def abandon(self, reason: str) -> None:
        """Undo what the step did: K/V appends dropped; a decode step (pools already updated in place) marks its
        requests broken (any later use raises; release them)."""
        if self.done:
            return
        with self.model.lock:
            for r, lens in zip(self.reqs, self.kv_lens, strict=True):
                for kv, n in zip(r.kv, lens, strict=True):
                    kv.length = n
            if self.inputs.is_decode:
                for r in self.reqs:
                    r.broken = f"a decode step failed half-way ({reason})"
            self.done = True


class Qwen35Model(RequestChecks):
    """Qwen3.5 (dense or MoE, text-only or multimodal) in PyTorch, float32 or bfloat16, CPU or CUDA.

    Args:
        weights: reference.weights.ModelWeights (NumPy; converted here; `weights.visual` builds the vision tower on
            the first request with pixels).
        device, dtype: where and in which dtype the weights and activations live (the recurrent state is fp32).
        backend: "auto" | "torch" | "triton" (see optimized.backend; QWEN35_BACKEND overrides "auto").
        max_batch_size: state-pool slots; None = sized from free device memory (CUDA) or the fallback 32.
        return_logits: "last" | "variable" | "all" (as reference.model).
        max_length: longest request; default config.max_position_embeddings.
    """

    def __init__(self, weights, *, device="cpu", dtype=torch.float32, backend="auto", max_batch_size=None,
                 return_logits: str = "last", max_length: int | None = None, tensor_parallel_group=None):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if return_logits not in RETURN_LOGITS:
            raise ConfigError(f"return_logits must be one of {RETURN_LOGITS}, got {return_logits!r}")
        self.config: Qwen35Config = weights.config
        # One tensor-parallel rank's weights (reference.parallel): `local` is the geometry this rank computes
        # with (its heads); the partial block outputs are summed over `tensor_parallel` (optimized.parallel).
        self.shard = weights.shard
        self.local: Qwen35Config = self.config if self.shard is None else self.shard.local
        self.tensor_parallel = _tensor_parallel_group(self.shard, tensor_parallel_group)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine (use device='cpu')")
        self.dtype = dtype
        self.backend = dispatch.resolve_backend(backend, self.device)
        self.return_logits = return_logits
        self.max_length = self.config.resolve_max_seq_len(max_length)
        self._load(weights)
        self._requests: dict[Hashable, RequestRecord] = {}
        self.make_pools(self._size_pool(max_batch_size))
        self._epochs = itertools.count(1)
        self.lock = threading.RLock()  # held by every public pipeline call (reference.pipeline.serialized)
        self._tag = object()  # marks the inputs this instance prepares
        self._vision_tower = None  # built on the first request with pixels (optimized.vision.VisionTower)

    def make_pools(self, slots: int) -> None:
        """(Re)allocate the state pools with `slots` slots, all free (only while no request is live).  Each
        linear layer: conv [S, conv_dim, K-1] (model dtype), recurrent [S, H_v, D_k, D_v] (fp32), with this rank's
        conv channels and value heads under tensor parallelism."""
        if self._requests:
            raise StateCacheError(f"make_pools: {len(self._requests)} requests are live; release them first")
        c = self.local
        K = c.linear_conv_kernel_dim
        H_v, D_k, D_v = c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        self.max_batch_size = slots
        self.conv_pools = [torch.zeros(slots, c.conv_dim, K - 1, dtype=self.dtype, device=self.device)
                           for _ in range(c.num_linear_layers)]
        self.state_pools = [torch.zeros(slots, H_v, D_k, D_v, dtype=torch.float32, device=self.device)
                            for _ in range(c.num_linear_layers)]
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=torch.float32, backend="auto", max_batch_size=None,
                        return_logits: str = "last", max_length: int | None = None,
                        config: Qwen35Config | None = None, allow_nonfinite: bool = False,
                        tensor_parallel: int = 1, data_parallel: int = 1, shard=None,
                        tensor_parallel_group=None):
        """Load a Hugging Face checkpoint directory through reference.weights (names, prefixes, dtype rules, the
        strict checks: CheckpointError for a file path, a malformed checkpoint or a NaN / Inf weight unless
        `allow_nonfinite=True`).

        tensor_parallel=N, data_parallel=M (either > 1): inside an initialised default process group of N × M
        ranks, every rank loads only its shard and the call returns an `optimized.parallel.ParallelQwen35Model`
        (the same pipeline API; docs/parallel.md).  `shard` (a reference.parallel.TensorShard) with
        `tensor_parallel_group` loads one rank's replica directly (what optimized.parallel does)."""
        if shard is None and (tensor_parallel != 1 or data_parallel != 1):
            from optimized import parallel  # lazy: torch.distributed only for parallel runs

            return parallel.from_pretrained(
                path, tensor_parallel=tensor_parallel, data_parallel=data_parallel, device=device, dtype=dtype,
                backend=backend, max_batch_size=max_batch_size, return_logits=return_logits, max_length=max_length,
                config=config, allow_nonfinite=allow_nonfinite)
        weights = load_weights(Path(path), config=config, dtype=np.float32, allow_nonfinite=allow_nonfinite,
                               **({} if shard is None else {"shard": shard}))
        return cls(weights, device=device, dtype=dtype, backend=backend, max_batch_size=max_batch_size,
                   return_logits=return_logits, max_length=max_length, tensor_parallel_group=tensor_parallel_group)

    def _t(self, a, dtype=None):
        return torch.from_numpy(np.array(a)).to(device=self.device, dtype=dtype or self.dtype)  # a writable copy

    def _load(self, w):
        dt, dev = self.dtype, self.device
        self.embed_tokens = self._t(w.embed_tokens)
        self.norm = self._t(w.norm, torch.float32)
        self.lm_head = self.embed_tokens if w.lm_head is w.embed_tokens else self._t(w.lm_head)
        self._visual_weights = dict(getattr(w, "visual", None) or {})  # model.visual.* (NumPy), until the tower
        self.layers = []
        for lw in w.layers:
            if lw.layer_type == LINEAR:
                mixer = TorchDeltaNetWeights.from_reference(lw.mixer, dtype=dt, device=dev)
            else:
                mixer = TorchAttentionWeights.from_reference(lw.mixer, dtype=dt, device=dev)
                mixer.q_norm, mixer.k_norm = self._t(lw.mixer.q_norm, torch.float32), self._t(lw.mixer.k_norm,
                                                                                             torch.float32)
            if isinstance(lw.mlp, MLPWeights):
                gate_up = self._t(np.concatenate([lw.mlp.gate_proj, lw.mlp.up_proj], 0))  # one [2·I, H] product
                g, u = torch.split(gate_up, lw.mlp.gate_proj.shape[0], 0)  # row views: each weight held once
                mlp = {"gate_proj": g, "up_proj": u, "down_proj": self._t(lw.mlp.down_proj), "gate_up": gate_up}
            else:
                mlp = TorchMoEWeights.from_reference(lw.mlp, dtype=dt, device=dev)
            self.layers.append(_Layer(lw.layer_type, self._t(lw.input_layernorm, torch.float32),
                                      self._t(lw.post_attention_layernorm, torch.float32), mixer, mlp))

    @property
    def _tp_degree(self) -> int:
        return 1 if getattr(self, "shard", None) is None else self.shard.tensor_parallel

    def state_bytes_per_request(self) -> int:
        """Bytes of pooled state per request: conv in the model dtype, recurrent state in fp32 (reference.memory;
        this rank's heads under tensor parallelism)."""
        conv = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]
        return state_bytes_per_request(self.config, "float32", conv_dtype=conv, tensor_parallel=self._tp_degree)

    def _size_pool(self, requested) -> int:
        """Pool slots: `requested` (checked against free CUDA memory) or, for None, what the in-place rule allows
        (FALLBACK_MAX_BATCH when free memory is unknown).  Fills `self.memory_report`."""
        if requested is not None:
            if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
                raise ConfigError(f"max_batch_size must be a positive int or None, got {requested!r}")
        per_req = self.state_bytes_per_request()
        free = None
        if self.device.type == "cuda":
            try:
                free = int(torch.cuda.mem_get_info(self.device)[0])
            except Exception:  # a failed query: the documented fallback
                free = None
        if self.config.num_linear_layers == 0:  # no Gated DeltaNet state: nothing to size
            self.memory_report = {"rule": STATE_RULE, "state_bytes_per_request": per_req, "free_bytes": free,
                                  "max_batch_allowed": None}
            return requested or 1
        allowed = replica_batch_size(self.config, free, rule=STATE_RULE, state_dtype="float32",
                                     tensor_parallel=self._tp_degree)
        self.memory_report = {"rule": STATE_RULE, "state_bytes_per_request": per_req, "free_bytes": free,
                              "max_batch_allowed": allowed}
        if requested is None:
            return allowed if free is not None else FALLBACK_MAX_BATCH
        if free is not None and requested > allowed:
            raise StateCacheError(
                f"max_batch_size={requested} does not fit on {self.device}: each request holds {per_req:,} bytes of "
                f"Gated DeltaNet state, the '{STATE_RULE}' rule of reference.memory gives the state pool 15 % of the "
                f"{free:,} free bytes, which allows at most {allowed} requests. Lower max_batch_size (or pass None "
                "to size it automatically).")
        return requested

    # ------------------------------------------------------------------ bookkeeping
    @serialized
    def release(self, request_id) -> bool:
        """Free the request's slot and KV cache; unknown ids are a no-op (returns False)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._free.append(req.slot)
        return True

    def _new_kv(self) -> list:
        c = self.local
        return [KVCache(c.num_key_value_heads, c.head_dim, dtype=self.dtype, device=self.device)
                for _ in range(c.num_full_layers)]

    def _claim(self, rid) -> RequestRecord:
        if not self._free:
            raise PoolFullError(f"no free state slot for request {rid!r} (max_batch_size={self.max_batch_size})")
        slot = self._free.pop()
        for p in self.conv_pools + self.state_pools:
            p[slot].zero_()  # a fresh request starts from zero state
        req = RequestRecord(slot=slot, kv=self._new_kv(), epoch=next(self._epochs))
        self._requests[rid] = req
        return req

    # ------------------------------------------------------------------ the vision path
    @serialized
    def vision_tower(self):
        """The PyTorch vision tower on the model's device and dtype, built on first use from the checkpoint's
        `model.visual.*` tensors (which are then dropped from the host: the tower holds the only copy)."""
        if self._vision_tower is None:
            from optimized.vision import VisionTower  # lazy: only pixels need it

            if not self.config.is_multimodal or self.config.vision_config is None:
                raise RequestError(f"the model ({self.config.model_type}) has no vision tower")
            self._vision_tower = VisionTower.from_state_dict(self._visual_weights, self.config.vision_config,
                                                             device=self.device, dtype=self.dtype)
            self._visual_weights = {}
        return self._vision_tower

    def multimodal_prefill(self, ctx):
        """MultimodalPrefill of a whole prompt: the placeholder checks and MRoPE plan (reference), the tower once
        (optimized.vision), embeddings as a tensor on the model's device and dtype."""
        from optimized.vision import multimodal_prefill_inputs
        from reference.multimodal import plan_multimodal_prefill

        plan = plan_multimodal_prefill(ctx, self.config)  # placeholder / pixel checks before the tower is built
        pre = multimodal_prefill_inputs(ctx, self.vision_tower(), self.config, plan=plan)  # (planned once)
        return dataclasses.replace(pre, embeddings=pre.embeddings.to(device=self.device, dtype=self.dtype))

    # ------------------------------------------------------------------ the pipeline interface
    @serialized
    def prepare_initial_token_inputs(self, contexts: Sequence[TextContext], return_n_logits=1) -> ModelInputs:
        """Pack a ragged batch; claim slots for new requests (a live id continues: chunked prefill).

        A `TextAndVisionContext` (pixels and/or `chunk_end`) starts a request with its whole prompt, of which
        tokens[:chunk_end] run now; the vision tower runs here, once.  Later chunks are TextContexts holding the
        prompt's next tokens (checked).  Everything is validated before any slot is claimed.
        """
        contexts, ids, arrays, prompts = self.check_contexts(contexts)
        counts = self.return_counts(return_n_logits, [a.size for a in arrays], ids)
        self.check_capacity(ids)
        # The tower (placeholder checks first) can still fail on bad pixels: nothing has been claimed yet.
        mm = {ctx.request_id: self.multimodal_prefill(ctx) for ctx in contexts if has_vision(ctx)}
        # --- validated: from here on, state changes ---
        for rid in ids:
            if rid not in self._requests:
                self._claim(rid)
        for rid, prompt in prompts.items():
            self._requests[rid].prompt = prompt
        for rid, pre in mm.items():
            self._requests[rid].mm = pre
            self._requests[rid].rope_delta = int(pre.rope_delta)
        return self._build_inputs(ids, arrays, counts)

    @serialized
    def prepare_next_token_inputs(self, next_tokens, prev: ModelInputs, request_ids=None) -> ModelInputs:
        """Inputs for one decode step: token b continues request prev.request_ids[b] (validated; no state
        changes): `prev` must be this model's executed inputs.  `request_ids` (some of prev's requests, each once)
        continues only those, token b then continuing request_ids[b] (as reference.model)."""
        if isinstance(next_tokens, torch.Tensor):
            next_tokens = next_tokens.detach().cpu().numpy()
        ids, arrays = self.check_next_tokens(next_tokens, prev, request_ids)
        return self._build_inputs(ids, arrays, [1] * len(ids))

    def _build_inputs(self, ids, arrays, counts) -> ModelInputs:
        reqs = [self._requests[r] for r in ids]
        starts = [r.length for r in reqs]
        offsets, positions, rows, embs = pack_chunks(
            [(r.mm, r.rope_delta, s, a.size) for r, s, a in zip(reqs, starts, arrays, strict=True)])
        host = np.concatenate(arrays).astype(np.int64)
        dev = self.device
        return ModelInputs(
            tokens=torch.as_tensor(host, device=dev), input_row_offsets=offsets.tolist(), request_ids=list(ids),
            return_n_logits=[int(n) for n in counts], position_ids=torch.as_tensor(positions, device=dev),
            start_lengths=starts, image_token_indices=None if rows is None else torch.as_tensor(rows, device=dev),
            lm_image_embeddings=torch.cat(embs) if embs else None, epochs=[r.epoch for r in reqs],
            model_tag=self._tag, slot_ids=torch.tensor([r.slot for r in reqs], dtype=torch.long, device=dev),
            host_tokens=host)

    @serialized
    @torch.inference_mode()
    def execute(self, inputs: ModelInputs) -> ModelOutputs:
        """Run one step: states updated in place in the pools, K/V appended; returns the selected logits.

        Validated first (`RequestChecks`: another model's inputs, executed twice, released, restored /
        re-claimed since, advanced since; a slot changes only with a claim, which starts a new epoch).  A
        prefill chunk commits its final states only after the forward pass and the logits succeeded.
        """
        step = self.run_step(inputs)
        step.commit()
        return step.outputs

    @serialized
    @torch.inference_mode()
    def run_step(self, inputs: ModelInputs) -> PendingStep:
        """`execute` in two halves: the checks and the forward pass now, the commit when `.commit()` is called —
        or `.abandon(reason)`, which leaves every request as it was (a prefill: its K/V appends dropped, its final
        states never written) or, for a decode step whose pools were updated in place, marks the requests broken.
        What optimized.parallel uses to commit only once every rank's step succeeded.  A step that raises here
        has already been abandoned."""
        self.check_own_inputs(inputs, executed=False)
        self.check_current_inputs(inputs)
        reqs = [self._requests[r] for r in inputs.request_ids]
        step = PendingStep(self, inputs, reqs, [[kv.length for kv in r.kv] for r in reqs])
        try:
            h = self._forward(inputs.tokens, inputs.input_row_offsets, inputs.position_ids, inputs.slot_ids,
                              [r.kv for r in reqs], inputs.is_decode, image_rows=inputs.image_token_indices,
                              image_emb=inputs.lm_image_embeddings, writes=step.writes)
            offs, counts = inputs.input_row_offsets, inputs.return_n_logits
            rows = torch.cat([torch.arange(offs[b + 1] - counts[b], offs[b + 1]) for b in range(len(reqs))]).to(
                self.device)
            logits = self._lm_logits(h.index_select(0, rows))
        except BaseException as exc:
            step.abandon(f"{type(exc).__name__}: {exc}")
            raise
        step.outputs = ModelOutputs(logits=logits, logit_offsets=[0] + list(itertools.accumulate(counts)),
                                    request_ids=list(inputs.request_ids))
        return step

    # ------------------------------------------------------------------ the forward pass
    def _mlp(self, m, mlp):
        if isinstance(mlp, dict):
            return swiglu_mlp(m, mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"], gate_up=mlp["gate_up"])
        return sparse_moe_block(m, mlp, self.local, experts=None if self.shard is None else self.shard.experts)

    def _embed(self, tokens):
        """Token embeddings [total, H]; under tensor parallelism each rank looks up the tokens of its vocabulary
        block (zero rows for the others) and the blocks are summed."""
        if self.shard is None:
            return self.embed_tokens.index_select(0, tokens)
        v0, v1 = self.shard.vocab
        local = tokens - v0
        held = (local >= 0) & (local < v1 - v0)
        x = self.embed_tokens.index_select(0, local.clamp(0, max(v1 - v0 - 1, 0)))
        x = x * held[:, None].to(x.dtype)
        return self.tensor_parallel.all_reduce(x)

    def _lm_logits(self, h):
        """lm_head: [n, H] -> [n, V] (under tensor parallelism, this rank's vocabulary block, gathered)."""
        y = linear(h, self.lm_head)
        return y if self.shard is None else self.tensor_parallel.gather_vocab(y, self.config.vocab_size)

    def _forward(self, tokens, offsets, position_ids, slot_ids, kv_lists, is_decode, stateless=False,
                image_rows=None, image_emb=None, writes=None):
        """Layers over packed tokens (embedding -> layers -> final norm); returns the final-normed hidden states
        [total, H].  Private: unlike the reference's `forward` it writes the requests' states in place (decode
        steps update the pools as they go), so only the locked, checked pipeline calls run it.

        stateless: zero initial states, nothing written to the pools (model.logits).
        image_rows [n] / image_emb [n, H]: embedding rows replaced by vision embeddings.
        writes: a list receiving the prefill chunk's (pool, slot_ids, final states) to commit later; None writes
        them into the pools right away.
        """
        c, eps, bk = self.local, self.config.rms_norm_eps, self.backend
        tp = self.tensor_parallel
        x = self._embed(tokens)  # [total, H]
        if image_rows is not None and image_rows.numel():
            x.index_copy_(0, image_rows, image_emb.to(x.dtype))  # vision embeddings replace the placeholders
        cu = torch.tensor(offsets, dtype=torch.long)
        full_i = 0
        for i, layer in enumerate(self.layers):
            a = rms_norm(x, layer.input_layernorm, eps)
            if layer.layer_type == LINEAR:
                li = c.linear_layer_index(i)
                cp, sp = self.conv_pools[li], self.state_pools[li]
                if stateless:
                    y, _, _ = gated_deltanet(a, layer.mixer, c, cu_seqlens=cu, mode="auto", backend=bk)
                elif is_decode:
                    y = gated_deltanet_decode(a, layer.mixer, c, conv_pool=cp, state_pool=sp, slot_ids=slot_ids,
                                              backend=bk)
                else:
                    # prefill chunk: the slots' states are the kernel's initial state; the final ones go back
                    y, cs, rs = gated_deltanet(a, layer.mixer, c, cu_seqlens=cu, mode="auto", backend=bk,
                                               conv_state=cp.index_select(0, slot_ids),
                                               recurrent_state=sp.index_select(0, slot_ids))
                    if writes is None:
                        cp.index_copy_(0, slot_ids, cs.to(cp.dtype))
                        sp.index_copy_(0, slot_ids, rs.to(sp.dtype))
                    else:
                        writes += [(cp, slot_ids, cs), (sp, slot_ids, rs)]
            else:
                y, _ = gated_attention(a, layer.mixer, c, position_ids=position_ids, cu_seqlens=offsets,
                                       kv_caches=[kv[full_i] for kv in kv_lists])
                full_i += 1
            x = x + tp.all_reduce(y)  # tensor parallel: the ranks' partial outputs summed (a no-op for one)
            x = x + tp.all_reduce(self._mlp(rms_norm(x, layer.post_attention_layernorm, eps), layer.mlp))
        return rms_norm(x, self.norm, eps)

    # ------------------------------------------------------------------ snapshots (prefix caching, rollback)
    @serialized
    def snapshot(self, request_id) -> RequestSnapshot:
        """A deep copy of the request's committed state (reference.pipeline.RequestSnapshot, with torch tensors on
        the model's device): the slot's conv and recurrent rows of every linear layer (copied out of the in-place
        pools), the K/V of every full-attention layer, tokens consumed and their ids, rope_delta, and the
        multimodal prompt while the request is inside it.  Nothing is shared with the model."""
        req = self._requests.get(request_id)
        if req is None:
            raise UnknownRequestError(f"snapshot of {request_name(request_id)}, which is not live")
        self.check_usable(request_id)
        n = req.length
        mm = None
        if req.mm is not None:
            mm = dataclasses.replace(req.mm, image_rows=req.mm.image_rows.copy(),
                                     embeddings=req.mm.embeddings.clone(), position_ids=req.mm.position_ids.copy())
        return RequestSnapshot(
            request_id=request_id, length=n, tokens=np.array(req.tokens, dtype=np.int64).reshape(-1),
            conv_states=[p[req.slot].clone() for p in self.conv_pools],
            recurrent_states=[p[req.slot].clone() for p in self.state_pools],
            kv=[(kv.k[:n].clone(), kv.v[:n].clone()) for kv in req.kv], rope_delta=int(req.rope_delta), mm=mm,
            prompt=None if req.prompt is None else req.prompt.copy())

    @serialized
    def restore(self, request_id, snapshot: RequestSnapshot) -> None:
        """Make `request_id` continue from `snapshot` (copied in; the snapshot stays reusable).

        A live id keeps its slot and has its state overwritten; a new id claims a free slot (PoolFullError when
        none is left).  Everything is checked first (nothing changes on an error).  Inputs prepared for
        `request_id` before the restore are refused by `execute` afterwards (a new epoch).
        """
        if not isinstance(snapshot, RequestSnapshot):
            raise TypeError(f"restore: expected a RequestSnapshot, got {type(snapshot).__name__}")
        self.check_snapshot(request_id, snapshot)
        if request_id not in self._requests:
            self.check_capacity([request_id])
        # --- checked: now commit ---
        req = self._requests.get(request_id)
        if req is None:
            req = self._claim(request_id)
        for pool, st in zip(self.conv_pools + self.state_pools, snapshot.conv_states + snapshot.recurrent_states,
                            strict=True):
            pool[req.slot].copy_(st)
        req.kv = self._new_kv()
        for kv, (k, v) in zip(req.kv, snapshot.kv, strict=True):
            kv.append(k, v)  # copies into the cache's own buffers
        mm = snapshot.mm
        if mm is not None:
            mm = dataclasses.replace(mm, image_rows=np.array(mm.image_rows), position_ids=np.array(mm.position_ids),
                                     embeddings=mm.embeddings.to(device=self.device, dtype=self.dtype, copy=True))
        req.length, req.tokens = int(snapshot.length), [int(t) for t in np.asarray(snapshot.tokens)]
        req.rope_delta, req.mm = int(snapshot.rope_delta), mm
        req.prompt = None if snapshot.prompt is None else np.array(snapshot.prompt, dtype=np.int64)
        req.epoch, req.broken = next(self._epochs), None

    def check_snapshot_tensors(self, snap: RequestSnapshot, n: int, fail) -> None:
        """Each state of `snap` (n tokens) is a torch tensor of this model's shape, dtype and device type (the
        recurrent state fp32), and its vision embeddings, if any, a tensor [n_img_rows, H]."""
        c = self.local
        kv_shape = (n, c.num_key_value_heads, c.head_dim)
        checks = [("conv state", a, tuple(self.conv_pools[0].shape[1:]), self.dtype) for a in snap.conv_states]
        checks += [("recurrent state", a, tuple(self.state_pools[0].shape[1:]), torch.float32)
                   for a in snap.recurrent_states]
        checks += [(what, a, kv_shape, self.dtype) for kv in snap.kv for what, a in zip("kv", kv, strict=True)]
        for what, a, shape, dt in checks:
            if not (torch.is_tensor(a) and tuple(a.shape) == shape and a.dtype == dt
                    and a.device.type == self.device.type):
                desc = (f"{a.dtype} {tuple(a.shape)} on {a.device}" if torch.is_tensor(a)
                        else f"{type(a).__name__} {np.shape(a)}")
                fail(f"a {what} is {desc}, this model needs a torch tensor {dt} {shape} on {self.device}")
        if snap.mm is not None:
            e = snap.mm.embeddings
            if not torch.is_tensor(e) or tuple(e.shape) != (len(snap.mm.image_rows), c.hidden_size):
                fail(f"its vision embeddings are {type(e).__name__} {tuple(np.shape(e))}, expected a tensor "
                     f"[{len(snap.mm.image_rows)}, {c.hidden_size}]")

    # ------------------------------------------------------------------ conveniences
    @serialized
    @torch.inference_mode()
    def logits(self, batch) -> list[torch.Tensor]:
        """Stateless all-position logits [T_b, V] per sequence (token lists or contexts, with pixels too; a
        context's `chunk_end` is honoured); no live state used or changed."""
        arrays, offsets, positions, rows, embs = self.stateless_batch(batch)  # checked, then the tower (pixels)
        offsets = offsets.tolist()
        kv = [self._new_kv() for _ in arrays]
        dev = self.device
        h = self._forward(torch.as_tensor(np.concatenate(arrays).astype(np.int64), device=dev), offsets,
                         torch.as_tensor(positions, device=dev), None, kv, False, stateless=True,
                         image_rows=None if rows is None else torch.as_tensor(rows, device=dev),
                         image_emb=torch.cat(embs) if embs else None)
        logits = self._lm_logits(h)
        return [logits[offsets[b]:offsets[b + 1]] for b in range(len(arrays))]

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_token_ids=None) -> list[list[int]]:
        """Generate up to `max_new_tokens` tokens for each prompt (token lists or contexts, with pixels too);
        returns the new ids per prompt.

        Runs `reference.pipeline.generate`, the loop both engines share (prompts grouped by free slots, private
        request ids, errors naming "prompt i", the stop rules of reference.model.Qwen35Model.generate, everything
        checked before the first step, the model's lock held throughout).
        """
        return pipeline.generate(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop_token_ids=stop_token_ids)


def _tensor_parallel_group(shard, group):
    """The TensorParallelGroup of a rank's weights (a single-rank one without a shard), checked against it."""
    from optimized.parallel import TensorParallelGroup

    if shard is None:
        if group is not None and group.size != 1:
            raise ConfigError(f"a tensor_parallel_group of {group.size} ranks needs one rank's weights "
                              "(weights.shard, reference.parallel.shard_weights)")
        return TensorParallelGroup(1, 0)
    if group is None or group.size != shard.tensor_parallel or group.rank != shard.rank:
        got = "none" if group is None else f"rank {group.rank} of {group.size}"
        raise ConfigError(f"the weights are rank {shard.rank} of tensor_parallel={shard.tensor_parallel}, but the "
                          f"tensor_parallel_group is {got}")
    return group


def __getattr__(name):
    """`optimized.model.TextAndVisionContext` (reference.multimodal's) without importing the vision path eagerly."""
    if name == "TextAndVisionContext":
        from reference.multimodal import TextAndVisionContext

        return TextAndVisionContext
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
