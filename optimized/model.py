"""The Qwen3.5 pipeline model in PyTorch: same API as `reference.model`, state pools updated IN PLACE by slot.

    model  = Qwen35Model.from_pretrained(path, device="cpu", dtype=torch.float32, backend="auto")
    inputs = model.prepare_initial_token_inputs([TextContext("a", [...]), ...], return_n_logits=1)
    out    = model.execute(inputs)                 # out.logits [Σ return_n_logits, V] (a torch tensor)
    inputs = model.prepare_next_token_inputs(next_tokens, inputs)
    model.release("a");  model.logits([[...]]);  model.generate([[...]], max_new_tokens=16)

What differs from the reference (which keeps MAX's documented gather/scatter design, SPEC §14.3):

* State lives in per-linear-layer pools `conv_pools[l] [S, conv_dim, K-1]` (model dtype) and
  `state_pools[l] [S, H_v, D_k, D_v]` (always fp32, PITFALLS B8).  A request owns a slot; `ModelInputs` carries
  slot ids, not gathered copies.  Decode updates the pools in place at the slot indices
  (`causal_conv1d_update`, `fused_recurrent_gated_delta_rule_update`).  Prefill chunks read their slots' states
  as the kernel's initial state and write the final states back into the same rows.  So the memory rule is
  `reference.memory`'s "in_place" one (1 × max_batch × per_req, not 3 ×).
* On CUDA, `max_batch_size=None` sizes the pool with `reference.memory.infer_optimal_batch_size(..., rule=
  "in_place")` from `torch.cuda.mem_get_info` (the documented fallback of 32 when the query fails), and a
  requested batch that does not fit is refused at start with a message that gives the numbers.
* Config, weight loading / name mapping, memory sizing, TextContext and token sampling come from `reference`.
* Text only: contexts with pixels are refused with a clear error (the vision tower runs in `reference`).

Not atomic: a decode step mutates the pools while it runs, so an exception inside `execute` can leave the
requests of that batch half-advanced (the reference commits only after success).  Release them after an error.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from optimized import backend as B
from optimized.attention import AttentionWeightsT, KVCache, gated_attention
from optimized.deltanet import DeltaNetWeightsT, gated_deltanet, gated_deltanet_decode
from optimized.linear import linear
from optimized.mlp import MoEWeightsT, sparse_moe_block, swiglu_mlp
from optimized.norms import rms_norm
from reference.config import LINEAR, Qwen35Config
from reference.context import TextContext, as_token_array
from reference.memory import FALLBACK_MAX_BATCH, infer_optimal_batch_size, state_bytes_per_request
from reference.model import RequestError, _has_vision, sample_next_token
from reference.rope import decode_position_ids
from reference.state_cache import PoolFullError, UnknownRequestError
from reference.weights import MLPWeights, load_weights

__all__ = ["Qwen35Model", "ModelInputs", "ModelOutputs", "TextContext", "RequestError", "PoolFullError",
           "UnknownRequestError", "STATE_RULE"]

STATE_RULE = "in_place"
RETURN_LOGITS = ("last", "all", "variable")


@dataclass
class ModelInputs:
    """One step's packed inputs.

    tokens [total] int64, input_row_offsets [B+1], request_ids, return_n_logits [B], position_ids [3, total],
    slot_ids [B] (state-pool rows of the requests — no gathered state copies), start_lengths [B].
    """

    tokens: torch.Tensor
    input_row_offsets: list
    request_ids: list
    return_n_logits: list
    position_ids: torch.Tensor
    slot_ids: torch.Tensor
    start_lengths: list
    executed: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.request_ids)

    @property
    def seq_lens(self) -> list:
        o = self.input_row_offsets
        return [b - a for a, b in zip(o, o[1:])]

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.seq_lens)


@dataclass
class ModelOutputs:
    """logits [Σ n_b, V] torch tensor; request b's rows are logits[logit_offsets[b]:logit_offsets[b+1]]."""

    logits: torch.Tensor
    logit_offsets: list
    request_ids: list
    hidden_states: torch.Tensor | None = None

    def logits_for(self, request_id) -> torch.Tensor:
        b = self.request_ids.index(request_id)
        return self.logits[self.logit_offsets[b]:self.logit_offsets[b + 1]]


@dataclass
class _Layer:
    layer_type: str
    input_layernorm: torch.Tensor
    post_attention_layernorm: torch.Tensor
    mixer: object  # DeltaNetWeightsT | AttentionWeightsT
    mlp: object  # dict of dense tensors | MoEWeightsT


@dataclass
class _Request:
    slot: int
    length: int = 0
    kv: list = field(default_factory=list)  # one KVCache per full-attention layer


class Qwen35Model:
    """Qwen3.5 language model (dense or MoE) in PyTorch, float32 or bfloat16, CPU or CUDA.

    Args:
        weights: reference.weights.ModelWeights (NumPy; converted here).
        device, dtype: where and in which dtype the weights and activations live (the recurrent state is fp32).
        backend: "auto" | "torch" | "triton" (see optimized.backend; QWEN35_BACKEND overrides "auto").
        max_batch_size: state-pool slots; None = sized from free device memory (CUDA) or the fallback 32.
        return_logits: "last" | "variable" | "all" (as reference.model).
        max_length: longest request; default config.max_position_embeddings.
    """

    def __init__(self, weights, *, device="cpu", dtype=torch.float32, backend="auto", max_batch_size=None,
                 return_logits: str = "last", max_length: int | None = None):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if return_logits not in RETURN_LOGITS:
            raise ValueError(f"return_logits must be one of {RETURN_LOGITS}, got {return_logits!r}")
        self.config: Qwen35Config = weights.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.backend = B.resolve_backend(backend, self.device)
        self.return_logits = return_logits
        self.max_length = self.config.resolve_max_seq_len(max_length)
        self._load(weights)
        self.max_batch_size = self._size_pool(max_batch_size)
        c = self.config
        S = self.max_batch_size
        K = c.linear_conv_kernel_dim
        H_v, D_k, D_v = c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        self.conv_pools = [torch.zeros(S, c.conv_dim, K - 1, dtype=dtype, device=self.device)
                           for _ in range(c.num_linear_layers)]
        self.state_pools = [torch.zeros(S, H_v, D_k, D_v, dtype=torch.float32, device=self.device)
                            for _ in range(c.num_linear_layers)]
        self._free = list(range(S - 1, -1, -1))  # pop() hands out slot 0 first
        self._requests: dict[Hashable, _Request] = {}
        self._tmp_ids = itertools.count()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=torch.float32, backend="auto", max_batch_size=None,
                        return_logits: str = "last", max_length: int | None = None,
                        config: Qwen35Config | None = None) -> "Qwen35Model":
        """Load a Hugging Face checkpoint directory through reference.weights (names, prefixes, dtype rules)."""
        weights = load_weights(Path(path), config=config, dtype=np.float32)
        return cls(weights, device=device, dtype=dtype, backend=backend, max_batch_size=max_batch_size,
                   return_logits=return_logits, max_length=max_length)

    def _t(self, a, dtype=None):
        return torch.from_numpy(np.array(a)).to(device=self.device, dtype=dtype or self.dtype)  # a writable copy

    def _load(self, w):
        dt, dev = self.dtype, self.device
        self.embed_tokens = self._t(w.embed_tokens)
        self.norm = self._t(w.norm, torch.float32)
        self.lm_head = self.embed_tokens if w.lm_head is w.embed_tokens else self._t(w.lm_head)
        self.layers = []
        for lw in w.layers:
            if lw.layer_type == LINEAR:
                mixer = DeltaNetWeightsT.from_reference(lw.mixer, dtype=dt, device=dev)
            else:
                mixer = AttentionWeightsT.from_reference(lw.mixer, dtype=dt, device=dev)
                mixer.q_norm, mixer.k_norm = self._t(lw.mixer.q_norm, torch.float32), self._t(lw.mixer.k_norm,
                                                                                             torch.float32)
            if isinstance(lw.mlp, MLPWeights):
                g, u, d = (self._t(a) for a in (lw.mlp.gate_proj, lw.mlp.up_proj, lw.mlp.down_proj))
                mlp = {"gate_proj": g, "up_proj": u, "down_proj": d, "gate_up": torch.cat([g, u], 0)}
            else:
                mlp = MoEWeightsT.from_reference(lw.mlp, dtype=dt, device=dev)
            self.layers.append(_Layer(lw.layer_type, self._t(lw.input_layernorm, torch.float32),
                                      self._t(lw.post_attention_layernorm, torch.float32), mixer, mlp))

    def state_bytes_per_request(self) -> int:
        """Bytes of pooled state per request: conv in the model dtype, recurrent state in fp32 (reference.memory)."""
        conv = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]
        return state_bytes_per_request(self.config, "float32", conv_dtype=conv)

    def _size_pool(self, requested) -> int:
        per_req = self.state_bytes_per_request()
        free = None
        if self.device.type == "cuda":
            try:
                free = int(torch.cuda.mem_get_info(self.device)[0])
            except Exception:  # a failed query: the documented fallback
                free = None
        if self.config.num_linear_layers == 0:
            return int(requested or 1)
        allowed = infer_optimal_batch_size(self.config, free, rule=STATE_RULE, state_dtype="float32")
        self.memory_report = {"rule": STATE_RULE, "state_bytes_per_request": per_req, "free_bytes": free,
                              "max_batch_allowed": allowed}
        if requested is None:
            return allowed if free is not None else FALLBACK_MAX_BATCH
        requested = int(requested)
        if requested < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {requested}")
        if free is not None and requested > allowed:
            raise RuntimeError(
                f"max_batch_size={requested} does not fit on {self.device}: each request holds {per_req:,} bytes of "
                f"Gated DeltaNet state, the '{STATE_RULE}' rule of reference.memory gives the state pool 15 % of the "
                f"{free:,} free bytes, which allows at most {allowed} requests. Lower max_batch_size (or pass None "
                "to size it automatically).")
        return requested

    # ------------------------------------------------------------------ bookkeeping
    @property
    def active_requests(self) -> list:
        return list(self._requests)

    def seq_len(self, request_id) -> int:
        r = self._requests.get(request_id)
        return 0 if r is None else r.length

    def release(self, request_id) -> bool:
        """Free the request's slot and KV cache; unknown ids are a no-op (returns False)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._free.append(req.slot)
        return True

    def _claim(self, rid) -> _Request:
        if not self._free:
            raise PoolFullError(f"no free state slot for request {rid!r} (max_batch_size={self.max_batch_size})")
        slot = self._free.pop()
        for p in self.conv_pools + self.state_pools:
            p[slot].zero_()  # a fresh request starts from zero state
        c = self.config
        kv = [KVCache(c.num_key_value_heads, c.head_dim, dtype=self.dtype, device=self.device)
              for _ in range(c.num_full_layers)]
        req = _Request(slot=slot, kv=kv)
        self._requests[rid] = req
        return req

    def _check_tokens(self, request_id, tokens) -> np.ndarray:
        arr = as_token_array(tokens, request_id=request_id)
        if arr.size == 0:
            raise RequestError(f"request {request_id!r} has no tokens (an empty request cannot be run)")
        bad = (arr < 0) | (arr >= self.config.vocab_size)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RequestError(f"request {request_id!r}: token id {int(arr[i])} at position {i} is outside the "
                               f"vocabulary [0, {self.config.vocab_size})")
        if self.seq_len(request_id) + arr.size > self.max_length:
            raise RequestError(f"request {request_id!r} would exceed max_length {self.max_length}")
        return arr

    def _return_counts(self, return_n_logits, seq_lens, request_ids) -> list:
        Bn = len(seq_lens)
        if self.return_logits == "all":
            return list(seq_lens)
        counts = np.asarray(return_n_logits, dtype=np.int64)
        if counts.ndim == 0:
            counts = np.full(Bn, int(counts), dtype=np.int64)
        elif self.return_logits != "variable":
            raise RequestError("per-request return_n_logits needs return_logits='variable'")
        if counts.shape != (Bn,):
            raise RequestError(f"return_n_logits has {counts.shape[0]} entries for {Bn} requests")
        for rid, n, T in zip(request_ids, counts, seq_lens):
            if not 1 <= n <= T:
                raise RequestError(f"request {rid!r}: return_n_logits = {int(n)} must be between 1 and {int(T)}")
        return [int(n) for n in counts]

    # ------------------------------------------------------------------ the pipeline interface
    def prepare_initial_token_inputs(self, contexts: Sequence[TextContext], return_n_logits=1) -> ModelInputs:
        """Pack a ragged batch; claim slots for new requests (a live id continues: chunked prefill)."""
        if isinstance(contexts, TextContext):
            contexts = [contexts]
        contexts = list(contexts)
        if not contexts:
            raise RequestError("prepare_initial_token_inputs: empty batch (no contexts)")
        ids = [c.request_id for c in contexts]
        if len(set(ids)) != len(ids):
            raise RequestError(f"a request appears twice in one batch: {ids}")
        for ctx in contexts:
            if _has_vision(ctx):
                raise RequestError(f"request {ctx.request_id!r} carries pixels: the optimized model is text-only "
                                   "(run multimodal prompts through reference.model)")
        arrays = [self._check_tokens(c.request_id, c.tokens) for c in contexts]
        counts = self._return_counts(return_n_logits, [a.size for a in arrays], ids)
        new = [r for r in ids if r not in self._requests]
        if len(new) > len(self._free):
            raise PoolFullError(f"{len(new)} new request(s) do not fit: {len(self._requests)} of "
                                f"{self.max_batch_size} slots are live; release finished requests first")
        for rid in new:
            self._claim(rid)
        return self._build_inputs(ids, arrays, counts)

    def prepare_next_token_inputs(self, next_tokens, prev: ModelInputs) -> ModelInputs:
        """Inputs for one decode step: token b continues request prev.request_ids[b]."""
        if isinstance(next_tokens, torch.Tensor):
            next_tokens = next_tokens.detach().cpu().numpy()
        tokens = np.asarray(next_tokens).reshape(-1)
        ids = list(prev.request_ids)
        if tokens.shape[0] != len(ids):
            raise RequestError(f"prepare_next_token_inputs: {tokens.shape[0]} next tokens for {len(ids)} requests")
        for rid in ids:
            if rid not in self._requests:
                raise UnknownRequestError(f"decode for request {rid!r}, which is not live")
        arrays = [self._check_tokens(rid, tokens[b:b + 1]) for b, rid in enumerate(ids)]
        return self._build_inputs(ids, arrays, [1] * len(ids))

    def _build_inputs(self, ids, arrays, counts) -> ModelInputs:
        lens = [a.size for a in arrays]
        offsets = [0] + list(itertools.accumulate(lens))
        starts = [self._requests[r].length for r in ids]
        pos = np.concatenate([decode_position_ids(s, n, 0) for s, n in zip(starts, lens)], axis=1)
        return ModelInputs(
            tokens=torch.as_tensor(np.concatenate(arrays).astype(np.int64), device=self.device),
            input_row_offsets=offsets, request_ids=list(ids), return_n_logits=list(counts),
            position_ids=torch.as_tensor(pos.astype(np.int64), device=self.device),
            slot_ids=torch.tensor([self._requests[r].slot for r in ids], dtype=torch.long, device=self.device),
            start_lengths=starts)

    @torch.inference_mode()
    def execute(self, inputs: ModelInputs) -> ModelOutputs:
        """Run one step: states updated in place in the pools, K/V appended; returns the selected logits."""
        if inputs.executed:
            raise RequestError("these inputs were already executed; prepare new ones")
        for b, rid in enumerate(inputs.request_ids):
            req = self._requests.get(rid)
            if req is None:
                raise UnknownRequestError(f"request {rid!r} was released after its inputs were prepared")
            if req.length != inputs.start_lengths[b] or req.slot != int(inputs.slot_ids[b]):
                raise RequestError(f"request {rid!r} advanced since its inputs were prepared")
        reqs = [self._requests[r] for r in inputs.request_ids]
        h = self._forward(inputs.tokens, inputs.input_row_offsets, inputs.position_ids, inputs.slot_ids,
                          [r.kv for r in reqs], inputs.is_decode)
        for b, r in enumerate(reqs):
            r.length += inputs.seq_lens[b]
        inputs.executed = True
        offs, counts = inputs.input_row_offsets, inputs.return_n_logits
        rows = torch.cat([torch.arange(offs[b + 1] - counts[b], offs[b + 1]) for b in range(len(reqs))]).to(
            self.device)
        logits = linear(h.index_select(0, rows), self.lm_head)
        return ModelOutputs(logits=logits, logit_offsets=[0] + list(itertools.accumulate(counts)),
                            request_ids=list(inputs.request_ids))

    # ------------------------------------------------------------------ the forward pass
    def _mlp(self, m, mlp):
        if isinstance(mlp, dict):
            return swiglu_mlp(m, mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"], gate_up=mlp["gate_up"])
        return sparse_moe_block(m, mlp, self.config)

    def _forward(self, tokens, offsets, position_ids, slot_ids, kv_lists, is_decode, stateless=False):
        """Layers over packed tokens; returns the final-normed hidden states [total, H].

        stateless: zero initial states, nothing written to the pools (model.logits).
        """
        c, eps, bk = self.config, self.config.rms_norm_eps, self.backend
        x = self.embed_tokens.index_select(0, tokens)  # [total, H]
        cu = torch.tensor(offsets, dtype=torch.long)
        full_i = 0
        for i, layer in enumerate(self.layers):
            a = rms_norm(x, layer.input_layernorm, eps)
            if layer.layer_type == LINEAR:
                li = c.linear_layer_index(i)
                cp, sp = self.conv_pools[li], self.state_pools[li]
                if stateless:
                    y, _, _ = gated_deltanet(a, layer.mixer, c, cu_seqlens=cu, backend=bk)
                elif is_decode:
                    y = gated_deltanet_decode(a, layer.mixer, c, conv_pool=cp, state_pool=sp, slot_ids=slot_ids,
                                              backend=bk)
                else:
                    # prefill chunk: the slots' states are the kernel's initial state; the final ones go back
                    y, cs, rs = gated_deltanet(a, layer.mixer, c, cu_seqlens=cu, backend=bk,
                                               conv_state=cp.index_select(0, slot_ids),
                                               recurrent_state=sp.index_select(0, slot_ids))
                    cp.index_copy_(0, slot_ids, cs.to(cp.dtype))
                    sp.index_copy_(0, slot_ids, rs.to(sp.dtype))
            else:
                y, _ = gated_attention(a, layer.mixer, c, position_ids=position_ids, cu_seqlens=offsets,
                                       kv_caches=[kv[full_i] for kv in kv_lists])
                full_i += 1
            x = x + y
            x = x + self._mlp(rms_norm(x, layer.post_attention_layernorm, eps), layer.mlp)
        return rms_norm(x, self.norm, eps)

    # ------------------------------------------------------------------ conveniences
    @torch.inference_mode()
    def logits(self, batch) -> list[torch.Tensor]:
        """Stateless all-position logits [T_b, V] per sequence (token lists or TextContexts); no live state used."""
        if isinstance(batch, TextContext) or (len(batch) and np.ndim(batch[0]) == 0
                                               and not isinstance(batch[0], TextContext)):
            batch = [batch]
        arrays = []
        for b, item in enumerate(batch):
            if _has_vision(item):
                raise RequestError("the optimized model is text-only (pixels given)")
            rid = item.request_id if isinstance(item, TextContext) else f"batch[{b}]"
            arr = as_token_array(item.tokens if isinstance(item, TextContext) else item, request_id=rid)
            if arr.size == 0 or arr.min() < 0 or arr.max() >= self.config.vocab_size:
                raise RequestError(f"request {rid!r}: empty or out-of-vocabulary tokens")
            arrays.append(arr)
        if not arrays:
            raise RequestError("logits: empty batch")
        lens = [a.size for a in arrays]
        offsets = [0] + list(itertools.accumulate(lens))
        pos = np.concatenate([decode_position_ids(0, n, 0) for n in lens], axis=1)
        c = self.config
        kv = [[KVCache(c.num_key_value_heads, c.head_dim, dtype=self.dtype, device=self.device)
               for _ in range(c.num_full_layers)] for _ in arrays]
        h = self._forward(torch.as_tensor(np.concatenate(arrays).astype(np.int64), device=self.device), offsets,
                          torch.as_tensor(pos, device=self.device), None, kv, False, stateless=True)
        logits = F.linear(h, self.lm_head)
        return [logits[offsets[b]:offsets[b + 1]] for b in range(len(arrays))]

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_token_ids=None) -> list[list[int]]:
        """Generate up to max_new_tokens per prompt (one prefill, then decode steps); returns the new ids."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if isinstance(prompts, TextContext) or (len(prompts) and np.ndim(prompts[0]) == 0
                                                 and not isinstance(prompts[0], TextContext)):
            prompts = [prompts]
        stop = set() if stop_token_ids is None else (
            {int(stop_token_ids)} if np.ndim(stop_token_ids) == 0 else {int(t) for t in stop_token_ids})
        rng = np.random.default_rng(seed)
        results: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens == 0:
            return results
        free = len(self._free)
        if free < 1:
            raise PoolFullError(f"generate: all {self.max_batch_size} slots are held by live requests")
        for g0 in range(0, len(prompts), free):
            group = list(range(g0, min(g0 + free, len(prompts))))
            contexts = []
            for i in group:
                p = prompts[i]
                rid = ("__generate__", next(self._tmp_ids))
                ctx = copy.copy(p) if isinstance(p, TextContext) else TextContext(rid, p)
                ctx.request_id = rid
                contexts.append(ctx)
            saved, self.return_logits = self.return_logits, "last"
            try:
                inputs = self.prepare_initial_token_inputs(contexts, return_n_logits=1)
                live = list(range(len(contexts)))
                while True:
                    out = self.execute(inputs)
                    last = out.logits.float().cpu().numpy()  # [B, V]: one row per live request
                    nxt, still = [], []
                    for row, j in enumerate(live):
                        t = sample_next_token(last[row], temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
                        results[group[j]].append(t)
                        if (t not in stop and len(results[group[j]]) < max_new_tokens
                                and self.seq_len(contexts[j].request_id) < self.max_length):
                            still.append(j)
                            nxt.append(t)
                    if not still:
                        break
                    live = still
                    ids = [contexts[j].request_id for j in live]
                    inputs = self._build_inputs(ids, [np.array([t], np.int64) for t in nxt], [1] * len(ids))
            finally:
                self.return_logits = saved
                for ctx in contexts:
                    self.release(ctx.request_id)
        return results
