"""The differentiable Qwen3.5 language model in PyTorch: `Qwen35ForCausalLM`, for training (docs/optimized.md,
"The differentiable model").

    model = Qwen35ForCausalLM(config, seed=0)                          # a reproducible training init
    model = Qwen35ForCausalLM.from_pretrained(dir, dtype=torch.float32, device="cpu")
    out = model(input_ids, labels=input_ids)                          # out.logits [B, T, V], out.loss (scalar)
    out.loss.backward()                                               # gradients in every parameter's .grad
    model.save_pretrained(dir, dtype="float32")                       # config.json + model.safetensors

    # tensor parallel, inside an initialised default process group of N ranks (torchrun --nproc-per-node N):
    model = Qwen35ForCausalLM.from_pretrained(dir, tensor_parallel=N)    # or Qwen35ForCausalLM(config, seed=0,
    out = model(input_ids, labels=input_ids)                          #   tensor_parallel=N); the same logits
    out.loss.backward()                                               # and loss on every rank; each rank's .grad
                                                                      # is its shard of the whole gradient

A `torch.nn.Module` whose parameter names are the checkpoint's tensor names, as transformers'
`Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` name them (`reference.checkpoint.checkpoint_names`):
`model.embed_tokens.weight`, `model.layers.{i}.input_layernorm.weight`, `model.layers.{i}.linear_attn.in_proj_qkv
.weight`, `...linear_attn.conv1d.weight` (PyTorch's depthwise layout [C, 1, K]), `...linear_attn.A_log`,
`...self_attn.q_proj.weight`, `...mlp.experts.gate_up_proj` (MoE, fused), `model.norm.weight`, `lm_head.weight`
(absent when `tie_word_embeddings`: the embedding matrix is then the output matrix too).  So `state_dict()` is a
Hugging Face checkpoint, and `save_pretrained` writes one that `transformers`, `optimized.Qwen35Model` and
`reference.model.Qwen35Model` all load.

The forward pass is the one of `optimized.model` (one implementation per concept): `optimized.deltanet
.gated_deltanet` (projections, `causal_conv1d`, gates, `chunk_gated_delta_rule`, `gated_rms_norm`),
`optimized.attention.gated_attention`, `optimized.mlp.swiglu_mlp` / `sparse_moe_block`, `optimized.norms.rms_norm`,
always on the torch ops (backend "torch"): those take their differentiable path when autograd records
(`optimized._checks.records_grad`), while the Triton kernels are inference-only.  A batch [B, T] of equal-length
sequences runs as B packed sequences (no padding; an `attention_mask` with a zero is refused).

Only the text-only model types (`qwen3_5_text`, `qwen3_5_moe_text`) are built: a multimodal config is refused
with a ConfigError naming its model_type (the vision tower has no differentiable twin).

Tensor parallelism (`tensor_parallel=N`, docs/parallel.md, "Training: Qwen35ForCausalLM across ranks"): each rank
holds only its shard of reference.parallel's plan — modules built in the `local_config` geometry, the embedding /
lm_head rows of its vocabulary block, its experts — under the checkpoint's names.  The forward pass is the
single-process one with Megatron-style autograd rules at the region boundaries: `_CopyToRegion` (identity;
backward: sum over ranks) on the replicated input of every rank-local region (each mixer, each MLP / MoE block,
the lm_head), `_ReduceFromRegion` (sum over ranks; backward: identity) on every partial output (the mixer's and
the MLP's output projections, the masked embedding lookup), and `_GatherVocab` (the vocabulary blocks side by
side; backward: this rank's columns) on the logits.  Replicated parameters used inside a region (q_norm, k_norm,
the gated-norm weight, the MoE router and the shared expert's gate) get their gradient summed over the ranks by a
hook, so after `loss.backward()` every rank holds exactly its shard of the single-process gradient, and the whole
gradient of every replicated parameter.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optimized.attention import TorchAttentionWeights, gated_attention
from optimized.deltanet import TorchDeltaNetWeights, gated_deltanet
from optimized.mlp import TorchMoEWeights, sparse_moe_block, swiglu_mlp
from optimized.norms import rms_norm
from reference.checkpoint import checkpoint_names, write_checkpoint
from reference.config import LINEAR, Qwen35Config
from reference.errors import ConfigError, RequestError
from reference.gradcheck import IGNORE_INDEX
from reference.mlp import MLPWeights
from reference.parallel import TensorShard, check_tensor_parallel, shard_index
from reference.safetensors_io import checkpoint_dir
from reference.weights import ModelWeights, load_weights

__all__ = ["Qwen35ForCausalLM", "CausalLMOutput", "checkpoint_tensors", "IGNORE_INDEX", "INITIALIZER_RANGE",
           "TEXT_MODEL_TYPES"]

INITIALIZER_RANGE = 0.02  # std of the normal init (transformers' Qwen3_5TextConfig.initializer_range default)
TEXT_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
SAVE_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", torch.float32: "float32", torch.bfloat16: "bfloat16"}


@dataclass
class CausalLMOutput:
    """What `Qwen35ForCausalLM.forward` returns: logits [B, T, V] (the model's dtype) and, with labels, the mean
    next-token cross entropy (a scalar tensor; None without labels)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# tensor parallelism: the region boundaries as autograd functions (group: optimized.parallel.TensorParallelGroup)
# ----------------------------------------------------------------------------------------------------------------


def _summed(group, t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t`, summed over the ranks of `group` (the input is left as it is)."""
    return group.all_reduce(t.clone(memory_format=torch.contiguous_format))


class _CopyToRegion(torch.autograd.Function):
    """Enter a rank-local region with a replicated tensor: forward the identity; backward the gradient summed over
    the ranks (each rank's region sees only its heads / columns / experts, so its gradient is a partial sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _summed(ctx.group, grad), None


class _ReduceFromRegion(torch.autograd.Function):
    """Leave a rank-local region with a partial result: forward the sum over the ranks (an all-reduce); backward
    the identity (the sum is replicated, so is its gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        return _summed(group, x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherVocab(torch.autograd.Function):
    """This rank's logits [n, V_r] of vocabulary rows [start, stop) -> the whole [n, V] (the blocks side by side;
    uneven blocks padded for the gather and trimmed).  Backward: the columns of this rank's block — every rank
    computes the same loss from the same logits, so the gradient of the whole logits is the same on every rank."""

    @staticmethod
    def forward(ctx, y, group, vocab_size, start, stop):
        ctx.block = (start, stop)
        return group.gather_vocab(y, vocab_size)

    @staticmethod
    def backward(ctx, grad):
        start, stop = ctx.block
        return grad[:, start:stop], None, None, None, None


def _copy_to(x, group):
    return x if group is None else _CopyToRegion.apply(x, group)


def _reduce_from(x, group):
    return x if group is None else _ReduceFromRegion.apply(x, group)


def _sum_grad_over_holders(group, spec, whole_len: int, grad: torch.Tensor) -> torch.Tensor:
    """The gradient hook of a parameter several ranks hold and use inside a region: this rank's partial gradient
    -> the sum of every holder's.  spec None (replicated): a plain all-reduce.  spec (axis, indices): rows that
    overlap between ranks (a KV head copied to several ranks) — the shard is put in place in a zero whole-size
    tensor, the whole is summed, and this rank's rows taken back."""
    if spec is None:
        return _summed(group, grad)
    axis, idx = spec[0], spec[1].to(grad.device)
    shape = list(grad.shape)
    shape[axis] = whole_len
    whole = grad.new_zeros(shape).index_copy_(axis, idx, grad)
    return group.all_reduce(whole).index_select(axis, idx)


# ----------------------------------------------------------------------------------------------------------------
# the module tree: attribute names are transformers' module names, so parameter names are checkpoint names
# ----------------------------------------------------------------------------------------------------------------


def _kept_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of A_log, dt_bias and the gated-norm weight (reference.weights.FP32_KEPT_SUFFIXES): float32, or
    float64 in a float64 model, whatever the model's dtype — pitfall B23."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Weight(nn.Module):
    """A module holding one parameter `weight` (the state-dict key `<module path>.weight`)."""

    def __init__(self, *shape: int, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))


class _GatedDeltaNet(nn.Module):
    """`linear_attn`: the Gated DeltaNet token mixer (forward: `optimized.deltanet.gated_deltanet`, chunked form)."""

    def __init__(self, c: Qwen35Config, dtype, device):
        super().__init__()
        H, H_v = c.hidden_size, c.linear_num_value_heads
        kept = _kept_dtype(dtype)
        self.in_proj_qkv = _Weight(c.conv_dim, H, dtype=dtype, device=device)
        self.in_proj_z = _Weight(c.value_dim, H, dtype=dtype, device=device)
        self.in_proj_b = _Weight(H_v, H, dtype=dtype, device=device)
        self.in_proj_a = _Weight(H_v, H, dtype=dtype, device=device)
        self.conv1d = _Weight(c.conv_dim, 1, c.linear_conv_kernel_dim, dtype=dtype, device=device)  # [C, 1, K]
        self.dt_bias = nn.Parameter(torch.empty(H_v, dtype=kept, device=device))
        self.A_log = nn.Parameter(torch.empty(H_v, dtype=kept, device=device))
        self.norm = _Weight(c.linear_value_head_dim, dtype=kept, device=device)
        self.out_proj = _Weight(H, c.value_dim, dtype=dtype, device=device)

    def forward(self, x, config, cu_seqlens):
        w = TorchDeltaNetWeights(
            in_proj_qkv=self.in_proj_qkv.weight, in_proj_z=self.in_proj_z.weight, in_proj_b=self.in_proj_b.weight,
            in_proj_a=self.in_proj_a.weight, conv1d=self.conv1d.weight, dt_bias=self.dt_bias, A_log=self.A_log,
            norm=self.norm.weight, out_proj=self.out_proj.weight)
        y, _, _ = gated_deltanet(x, w, config, cu_seqlens=cu_seqlens, mode="chunk", backend="torch")
        return y


class _Attention(nn.Module):
    """`self_attn`: gated full attention (forward: `optimized.attention.gated_attention`, no cache)."""

    def __init__(self, c: Qwen35Config, dtype, device):
        super().__init__()
        H, nh, nkv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = _Weight(c.q_proj_rows, H, dtype=dtype, device=device)  # per-head q | gate rows
        self.k_proj = _Weight(nkv * hd, H, dtype=dtype, device=device)
        self.v_proj = _Weight(nkv * hd, H, dtype=dtype, device=device)
        self.o_proj = _Weight(H, nh * hd, dtype=dtype, device=device)
        self.q_norm = _Weight(hd, dtype=dtype, device=device)
        self.k_norm = _Weight(hd, dtype=dtype, device=device)

    def forward(self, x, config, cu_seqlens):
        w = TorchAttentionWeights(q_proj=self.q_proj.weight, k_proj=self.k_proj.weight, v_proj=self.v_proj.weight,
                                  o_proj=self.o_proj.weight, q_norm=self.q_norm.weight, k_norm=self.k_norm.weight)
        y, _ = gated_attention(x, w, config, cu_seqlens=cu_seqlens)
        return y


class _MLP(nn.Module):
    """`mlp` (dense) or `mlp.shared_expert`: SwiGLU (forward: `optimized.mlp.swiglu_mlp`)."""

    def __init__(self, H: int, I: int, dtype, device):
        super().__init__()
        self.gate_proj = _Weight(I, H, dtype=dtype, device=device)
        self.up_proj = _Weight(I, H, dtype=dtype, device=device)
        self.down_proj = _Weight(H, I, dtype=dtype, device=device)

    def forward(self, x, config=None):
        return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class _Experts(nn.Module):
    """`mlp.experts`: the routed experts, fused as transformers holds them (gate rows, then up rows)."""

    def __init__(self, E: int, H: int, I: int, dtype, device):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.empty(E, H, I, dtype=dtype, device=device))


class _SparseMoE(nn.Module):
    """`mlp` of a MoE layer: router, experts, shared expert and its gate (forward: `optimized.mlp.sparse_moe_block`).
    `experts=(start, stop)`: only those experts are held (one tensor-parallel rank's); the router scores all."""

    def __init__(self, c: Qwen35Config, dtype, device, experts: tuple[int, int] | None = None):
        super().__init__()
        H = c.hidden_size
        self.expert_range = experts
        held = c.num_experts if experts is None else experts[1] - experts[0]
        self.gate = _Weight(c.num_experts, H, dtype=dtype, device=device)
        self.experts = _Experts(held, H, c.moe_intermediate_size, dtype, device)
        self.shared_expert = _MLP(H, c.shared_expert_intermediate_size, dtype, device)
        self.shared_expert_gate = _Weight(1, H, dtype=dtype, device=device)

    def forward(self, x, config):
        s = self.shared_expert
        w = TorchMoEWeights(gate=self.gate.weight, gate_up_proj=self.experts.gate_up_proj,
                            down_proj=self.experts.down_proj, shared_gate_proj=s.gate_proj.weight,
                            shared_up_proj=s.up_proj.weight, shared_down_proj=s.down_proj.weight,
                            shared_expert_gate=self.shared_expert_gate.weight)
        return sparse_moe_block(x, w, config, experts=self.expert_range)


class _DecoderLayer(nn.Module):
    """`model.layers.{i}`: x += mixer(rms_norm(x));  x += mlp(rms_norm(x)).  Under tensor parallelism (`group`),
    the mixer and the MLP are rank-local regions: their input enters with _CopyToRegion, their partial output
    leaves with _ReduceFromRegion."""

    def __init__(self, c: Qwen35Config, layer_type: str, dtype, device, experts: tuple[int, int] | None = None):
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = _Weight(c.hidden_size, dtype=dtype, device=device)
        self.post_attention_layernorm = _Weight(c.hidden_size, dtype=dtype, device=device)
        if layer_type == LINEAR:
            self.linear_attn = _GatedDeltaNet(c, dtype, device)
        else:
            self.self_attn = _Attention(c, dtype, device)
        self.mlp = (_SparseMoE(c, dtype, device, experts) if c.is_moe
                    else _MLP(c.hidden_size, c.intermediate_size, dtype, device))

    def forward(self, x, config, cu_seqlens, group=None):
        eps = config.rms_norm_eps
        mixer = self.linear_attn if self.layer_type == LINEAR else self.self_attn
        a = _copy_to(rms_norm(x, self.input_layernorm.weight, eps), group)
        x = x + _reduce_from(mixer(a, config, cu_seqlens), group)
        m = _copy_to(rms_norm(x, self.post_attention_layernorm.weight, eps), group)
        return x + _reduce_from(self.mlp(m, config), group)


class _TextModel(nn.Module):
    """`model`: embedding, decoder layers, final norm.  c: the geometry the modules are built in (a rank's
    `local_config` under tensor parallelism), with `vocab_rows` embedding rows and the experts `experts`."""

    def __init__(self, c: Qwen35Config, dtype, device, vocab_rows: int, experts: tuple[int, int] | None):
        super().__init__()
        self.embed_tokens = _Weight(vocab_rows, c.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(_DecoderLayer(c, kind, dtype, device, experts) for kind in c.layer_types)
        self.norm = _Weight(c.hidden_size, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------


class Qwen35ForCausalLM(nn.Module):
    """Qwen3.5 (dense or MoE, text-only) as a differentiable `torch.nn.Module`.

    Args:
        config: a text-only `reference.config.Qwen35Config` (model_type `qwen3_5_text` or `qwen3_5_moe_text`).
        seed: seeds the initialisation (a `torch.Generator` on the CPU, parameters drawn in sorted-name order in
            float32, then cast and moved: the same seed gives the same values on every device and dtype); None
            leaves the parameters uninitialised (`from_pretrained` fills them).
        dtype: torch.float32 (default), torch.float64 (gradient checks) or torch.bfloat16; A_log, dt_bias and the
            gated-norm weight are kept in float32 (float64 in a float64 model), pitfall B23.
        device: where the parameters live.
        initializer_range: the std of the normal init (transformers' default 0.02).
        tensor_parallel: N > 1 splits the model over the N ranks of the initialised default process group (world
            size N; `optimized.parallel.make_layout`) by reference.parallel's plan: this rank holds only its shard
            (`self.shard`, a TensorShard; modules in the `self.local` geometry) under the checkpoint's names.  A
            `tensor_parallel` the plan cannot split is its ConfigError.  Every rank must make the same calls with
            the same inputs; each gets the whole logits and loss, and its shard of the gradient.
        tensor_parallel_group: the `optimized.parallel.TensorParallelGroup` of N ranks to use instead of making
            one (what `from_pretrained` passes).

    The init follows transformers' `_init_weights` for Qwen3.5: every projection, the embedding, the conv kernel,
    the router and the experts N(0, initializer_range²); the zero-centred RMSNorm weights (the block norms, the
    final norm, q_norm and k_norm: x̂·(1 + w)) 0; the gated RMSNorm weight 1; dt_bias 1; A_log = log U(0.01, 16)
    (so the decay rate A = e^{A_log} never reaches 0); the embedding row of `pad_token_id` 0.  Under tensor
    parallelism each rank draws the whole model's values in the same order and keeps its shard, so the ranks'
    shards put together are the single-process init.
    """

    def __init__(self, config: Qwen35Config, *, seed: int | None = 0, dtype=torch.float32, device="cpu",
                 initializer_range: float = INITIALIZER_RANGE, tensor_parallel: int = 1,
                 tensor_parallel_group=None):
        super().__init__()
        if not isinstance(config, Qwen35Config):
            raise ConfigError(f"Qwen35ForCausalLM needs a reference.config.Qwen35Config, got {type(config).__name__}")
        _check_text_only(config)
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
        if not (isinstance(initializer_range, (int, float)) and math.isfinite(initializer_range)
                and initializer_range > 0):
            raise ConfigError(f"initializer_range must be a positive number, got {initializer_range!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ConfigError(f"seed must be a non-negative int or None, got {seed!r}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda'): {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r}: CUDA is not available on this machine (use device='cpu')")
        self.config = config
        self.tp_group = _tensor_parallel_group(config, tensor_parallel, tensor_parallel_group)
        self.shard = None if self.tp_group is None else TensorShard(config, self.tp_group.size, self.tp_group.rank)
        self.local = config if self.shard is None else self.shard.local  # the geometry this rank computes in
        rows = config.vocab_size if self.shard is None else self.shard.vocab[1] - self.shard.vocab[0]
        self.model = _TextModel(self.local, dtype, device, rows, None if self.shard is None else self.shard.experts)
        if not config.tie_word_embeddings:
            self.lm_head = _Weight(rows, config.hidden_size, dtype=dtype, device=device)
        self._whole_shapes = {} if self.shard is None else checkpoint_names(config)
        self._specs = {} if self.shard is None else {n: self._shard_spec(n) for n, _ in self.named_parameters()}
        self._grad_hooks = {} if self.shard is None else self._hook_partial_gradients()
        if seed is not None:
            self.reset_parameters(seed, initializer_range=initializer_range)

    # ------------------------------------------------------------------ parameters
    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def tensor_parallel(self) -> int:
        """The number of tensor-parallel ranks the model is split over (1: the whole model in this process)."""
        return 1 if self.tp_group is None else self.tp_group.size

    def output_embedding(self) -> torch.Tensor:
        """The [V, H] output matrix: `lm_head.weight`, or the embedding when tied (under tensor parallelism,
        this rank's vocabulary block [V_r, H])."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def _shard_spec(self, name: str):
        """Parameter `name`'s part on this rank: (axis, int64 CPU index tensor) along the whole tensor, or None."""
        spec = shard_index(self.config, _lm_name(name), self.shard.tensor_parallel, self.shard.rank)
        return None if spec is None else (spec[0], torch.from_numpy(spec[1]))

    def _whole_len(self, name: str) -> int:
        """The whole tensor's length along the axis parameter `name` is split on."""
        return self._whole_shapes[name][self._specs[name][0]]

    def _hook_partial_gradients(self) -> dict:
        """Register the gradient hooks of the parameters several ranks hold and use inside a rank-local region
        (replicated: q_norm, k_norm, the gated-norm weight, the MoE router and shared-expert gate; or rows that
        overlap between ranks: a KV head copied to several ranks): each rank's gradient there is only its heads'
        / experts' share, so the hook sums it over the ranks.  The block norms and the final norm act on the
        replicated stream, outside every region: their gradients are already whole.  Every rank's graph has the
        same collectives in the same order (region by region, from the last layer back), so the sums match.
        Returns {name: hook handle}."""
        tp, c = self.shard.tensor_parallel, self.config
        hooks = {}
        for name, p in self.named_parameters():
            lm = _lm_name(name)
            if lm == "norm.weight" or lm.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
                continue
            spec = self._specs[name]
            if spec is not None:
                held = np.concatenate([shard_index(c, lm, tp, r)[1] for r in range(tp)])
                if np.unique(held).size == held.size:  # a partition of the rows: each rank's gradient is whole
                    continue
            whole = 0 if spec is None else self._whole_len(name)
            hooks[name] = p.register_hook(functools.partial(_sum_grad_over_holders, self.tp_group, spec, whole))
        return hooks

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0, *, initializer_range: float = INITIALIZER_RANGE) -> None:
        """(Re)draw every parameter as the class docstring says, from `torch.Generator().manual_seed(seed)`
        (under tensor parallelism: the whole tensor, of which this rank keeps its shard)."""
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        for name, p in sorted(self.named_parameters()):
            shape = list(p.shape)
            spec = self._specs.get(name)
            if spec is not None:
                shape[spec[0]] = self._whole_len(name)
            shape = tuple(shape)
            if name.endswith("linear_attn.A_log"):
                v = torch.empty(shape).uniform_(0.01, 16.0, generator=gen).log_()
            elif name.endswith("linear_attn.dt_bias") or name.endswith("linear_attn.norm.weight"):
                v = torch.ones(shape)
            elif name.endswith("norm.weight"):  # zero-centred RMSNorm: x̂ · (1 + w)
                v = torch.zeros(shape)
            else:
                v = torch.empty(shape).normal_(0.0, initializer_range, generator=gen)
                if name == "model.embed_tokens.weight" and self.config.pad_token_id is not None:
                    v[self.config.pad_token_id] = 0.0  # as nn.Embedding(padding_idx=pad_token_id)
            p.copy_(v if spec is None else v.index_select(spec[0], spec[1]))

    # ------------------------------------------------------------------ the forward pass
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """Logits of every position and, with labels, the next-token loss.

        Args:
            input_ids: [B, T] integer token ids in [0, vocab_size) (moved to the model's device).
            labels: None or [B, T] integer ids in [0, vocab_size) or IGNORE_INDEX (−100).  As in transformers, the
                shift is done here: position t is scored against labels[:, t + 1] (so `labels=input_ids` trains
                next-token prediction) and the loss is the mean cross entropy over the scored positions (NaN when
                none is scored, as in transformers).
            attention_mask: None, or [B, T] of ones: sequences are equal-length, so nothing may be masked; a
                mask with a zero (padding) is refused.
        Returns:
            CausalLMOutput(logits [B, T, V] in the model's dtype, loss: scalar tensor or None) — under tensor
            parallelism the whole logits and the same loss on every rank.
        """
        c = self.config
        ids = _check_ids("input_ids", input_ids, c.vocab_size, self.device)
        B, T = ids.shape
        if attention_mask is not None:
            _check_mask(attention_mask, B, T)
        if self.tp_group is None:
            # Tied: the embedding's gradient is sparse (B·T rows) and is added into the dense gradient of the
            # output matrix, instead of a dense [V, H] zero tensor filled and then added to it.
            x = F.embedding(ids.reshape(-1), self.model.embed_tokens.weight, padding_idx=c.pad_token_id,
                            sparse=c.tie_word_embeddings)  # [B·T, H]
        else:
            x = self._parallel_embedding(ids.reshape(-1))
        cu = [b * T for b in range(B + 1)]  # B packed sequences of T tokens
        for layer in self.model.layers:
            x = layer(x, self.local, cu, self.tp_group)
        h = rms_norm(x, self.model.norm.weight, c.rms_norm_eps)  # [B·T, H]
        if self.tp_group is None:
            logits = F.linear(h, self.output_embedding())
        else:  # vocabulary-parallel lm_head: this rank's block [B·T, V_r], gathered
            v0, v1 = self.shard.vocab
            block = F.linear(_copy_to(h, self.tp_group), self.output_embedding())
            logits = _GatherVocab.apply(block, self.tp_group, c.vocab_size, v0, v1)
        logits = logits.view(B, T, c.vocab_size)
        loss = None
        if labels is not None:
            lab = _check_ids("labels", labels, c.vocab_size, self.device, shape=(B, T), ignore=True)
            target = F.pad(lab[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T]  position t predicts token t + 1
            wide = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
            loss = F.cross_entropy(wide.reshape(B * T, -1), target.reshape(-1), ignore_index=IGNORE_INDEX)
        return CausalLMOutput(logits=logits, loss=loss)

    def _parallel_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel lookup [N] -> [N, H]: this rank's rows for the tokens of its block, zero rows for
        the others (their lookups are masked out, so they get no gradient), summed over the ranks."""
        c, (v0, v1) = self.config, self.shard.vocab
        local = ids - v0
        held = (local >= 0) & (local < v1 - v0)
        pad = c.pad_token_id
        x = F.embedding(local.clamp(0, max(v1 - v0 - 1, 0)), self.model.embed_tokens.weight,
                        padding_idx=pad - v0 if pad is not None and v0 <= pad < v1 else None,
                        sparse=c.tie_word_embeddings)
        return _reduce_from(x * held[:, None].to(x.dtype), self.tp_group)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path, *, dtype=torch.float32, device="cpu", allow_nonfinite: bool = False,
                        tensor_parallel: int = 1) -> Qwen35ForCausalLM:
        """Load a Hugging Face checkpoint directory through `reference.weights.load_weights`: strict (one
        WeightLoadError lists every missing, unexpected, mis-shaped or non-float tensor), both name prefixes, fused
        or per-expert MoE, [C, 1, K] or [C, K] conv kernels, any float storage; a NaN / Inf weight is a
        CheckpointError unless `allow_nonfinite`.  A multimodal checkpoint is a ConfigError.

        tensor_parallel=N: inside an initialised default process group of world size N, each rank reads only its
        shard (`load_weights(..., shard=TensorShard)`); an error on any rank is raised on every rank
        (`optimized.parallel.agree`)."""
        layout = None
        if tensor_parallel != 1:
            from optimized.parallel import make_layout  # lazy: torch.distributed only for parallel runs

            layout = make_layout(_tensor_parallel_degree(tensor_parallel))

        def load():
            directory = checkpoint_dir(path)
            config = Qwen35Config.from_pretrained(directory)
            _check_text_only(config)  # before any tensor is read
            if dtype not in DTYPES:
                raise ConfigError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
            shard = {} if layout is None else {"shard": TensorShard(config, tensor_parallel, layout.tp_rank)}
            return config, load_weights(directory, config=config, allow_nonfinite=allow_nonfinite,
                                        dtype=np.float64 if dtype == torch.float64 else np.float32, **shard)

        if layout is None:
            config, weights = load()
        else:
            from optimized.parallel import _outcome, agree

            outcome = _outcome(load)
            agree(outcome)
            config, weights = outcome[1]
        model = cls(config, seed=None, dtype=dtype, device=device, tensor_parallel=tensor_parallel,
                    tensor_parallel_group=None if layout is None else layout.tp_group)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in checkpoint_tensors(weights).items()},
                              strict=True)
        return model

    def save_pretrained(self, directory, *, dtype="float32") -> Path:
        """Write config.json + model.safetensors in the Hugging Face layout (`reference.checkpoint.write_checkpoint`:
        the names of `state_dict()`, conv kernels [C, 1, K], fused MoE experts).  dtype "float32" or "bfloat16"
        (or the torch dtypes); in bfloat16 files A_log, dt_bias and the gated-norm weight stay float32.

        Under tensor parallelism every rank must call it: the whole tensors are gathered to rank 0, which alone
        writes the one whole checkpoint (the other ranks write nothing); a failed write raises on every rank."""
        if dtype not in SAVE_DTYPES:
            raise ConfigError(f"save_pretrained: dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if self.tp_group is None:
            tensors = {k: v.detach().to(device="cpu", dtype=torch.float32).numpy()
                       for k, v in self.state_dict().items()}
            return write_checkpoint(Path(directory), self.config, tensors=tensors, dtype=SAVE_DTYPES[dtype])
        from optimized.parallel import _outcome, agree

        tensors = self._gather_whole_tensors()
        outcome = _outcome(lambda: None if tensors is None else write_checkpoint(
            Path(directory), self.config, tensors=tensors, dtype=SAVE_DTYPES[dtype]))
        agree(outcome)
        return Path(directory)

    @torch.no_grad()
    def _gather_whole_tensors(self) -> dict[str, np.ndarray] | None:
        """The whole model's tensors in float32 on tensor-parallel rank 0 (None on the others): each sharded
        tensor's blocks gathered (padded to the largest block along the split axis) and put in place by the plan's
        indices, whole.index_copy_(axis, indices_r, block_r); a replicated tensor is rank 0's."""
        import torch.distributed as dist

        g, c, tp = self.tp_group, self.config, self.shard.tensor_parallel
        root = g.rank == 0
        out = {} if root else None
        for name, t in self.state_dict().items():  # the same order on every rank
            t = t.detach().to(torch.float32)
            spec = self._specs[name]
            if spec is None:
                if root:
                    out[name] = t.cpu().numpy()
                continue
            axis = spec[0]
            index = [torch.from_numpy(shard_index(c, _lm_name(name), tp, r)[1]) for r in range(tp)]
            width = max(len(i) for i in index)
            t = F.pad(t, [0, 0] * (t.dim() - 1 - axis) + [0, width - t.shape[axis]]).contiguous()
            blocks = [torch.empty_like(t) for _ in range(tp)] if root else None
            dist.gather(t, blocks, dst=g.ranks[0], group=g.group)
            if root:
                shape = list(t.shape)
                shape[axis] = self._whole_len(name)
                whole = t.new_empty(shape)
                for idx, b in zip(index, blocks, strict=True):
                    whole.index_copy_(axis, idx.to(t.device), b.narrow(axis, 0, len(idx)))
                out[name] = whole.cpu().numpy()
        return out


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _lm_name(name: str) -> str:
    """A parameter name without the `model.` prefix: the language-model name reference.parallel.shard_index takes."""
    return name[len("model."):] if name.startswith("model.") else name


def _tensor_parallel_degree(tp) -> int:
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"tensor_parallel must be a positive int, got {tp!r}")
    return tp


def _tensor_parallel_group(config: Qwen35Config, tensor_parallel, group):
    """None for the whole model in one process; else the TensorParallelGroup of `tensor_parallel` ranks (made
    over the default process group, or the given one), after the plan's check (a ConfigError on every rank before
    any collective)."""
    tp = _tensor_parallel_degree(tensor_parallel)
    if tp == 1 and group is None:
        return None
    check_tensor_parallel(config, tp)
    if group is None:
        from optimized.parallel import make_layout  # lazy: torch.distributed only for parallel runs

        group = make_layout(tp).tp_group
    if group.size != tp:
        raise ConfigError(f"tensor_parallel={tp}, but the tensor_parallel_group has {group.size} ranks")
    return group


def _check_text_only(config: Qwen35Config) -> None:
    if config.model_type not in TEXT_MODEL_TYPES:
        raise ConfigError(f"Qwen35ForCausalLM builds the text-only model types {TEXT_MODEL_TYPES}; model_type "
                          f"{config.model_type!r} is multimodal (its vision tower has no differentiable twin). "
                          "Use optimized.Qwen35Model to run it")


def _check_ids(what: str, ids, vocab: int, device, *, shape=None, ignore: bool = False) -> torch.Tensor:
    """`ids` as a long tensor [B, T] on `device`, every value in [0, vocab) (or IGNORE_INDEX when `ignore`)."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        kind = f"a {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise RequestError(f"{what} must be an integer torch tensor [B, T], got {kind}")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise RequestError(f"{what} must be [B, T] with B, T >= 1, got shape {tuple(ids.shape)}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise RequestError(f"{what} must have the shape of input_ids {tuple(shape)}, got {tuple(ids.shape)}")
    ok = (ids >= 0) & (ids < vocab)
    if ignore:
        ok |= ids == IGNORE_INDEX
    if not bool(ok.all()):
        b, t = (int(i) for i in torch.nonzero(~ok)[0])
        allowed = f"0..{vocab - 1}" + (f" or {IGNORE_INDEX}" if ignore else "")
        raise RequestError(f"{what}[{b}, {t}] = {int(ids[b, t])} is outside {allowed} (vocab_size {vocab})")
    return ids.to(device=device, dtype=torch.long)


def _check_mask(mask, B: int, T: int) -> None:
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise RequestError(f"attention_mask must be a tensor [B={B}, T={T}] or None, got {got}")
    if not bool((mask == 1).all()):
        raise RequestError("attention_mask masks a position, but Qwen35ForCausalLM runs equal-length sequences "
                           "without padding: pass sequences of one length and attention_mask=None (or all ones)")


def checkpoint_tensors(weights: ModelWeights) -> dict[str, np.ndarray]:
    """A `reference.weights.ModelWeights` under the names of `Qwen35ForCausalLM.state_dict()` (conv kernels
    [C, 1, K], MoE experts fused; no `lm_head.weight` when the config ties it)."""
    c = weights.config
    out = {"model.embed_tokens.weight": weights.embed_tokens, "model.norm.weight": weights.norm}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = weights.lm_head
    for i, lw in enumerate(weights.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = lw.input_layernorm
        out[p + "post_attention_layernorm.weight"] = lw.post_attention_layernorm
        m = lw.mixer
        if lw.layer_type == LINEAR:
            for name in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "norm", "out_proj"):
                out[p + f"linear_attn.{name}.weight"] = getattr(m, name)
            out[p + "linear_attn.conv1d.weight"] = np.asarray(m.conv1d)[:, None, :]  # [C, K] -> [C, 1, K]
            out[p + "linear_attn.dt_bias"], out[p + "linear_attn.A_log"] = m.dt_bias, m.A_log
        else:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
                out[p + f"self_attn.{name}.weight"] = getattr(m, name)
        mlp = lw.mlp
        if isinstance(mlp, MLPWeights):
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{name}.weight"] = getattr(mlp, name)
        else:
            out.update({p + "mlp.gate.weight": mlp.gate, p + "mlp.experts.gate_up_proj": mlp.gate_up_proj,
                        p + "mlp.experts.down_proj": mlp.down_proj,
                        p + "mlp.shared_expert.gate_proj.weight": mlp.shared_gate_proj,
                        p + "mlp.shared_expert.up_proj.weight": mlp.shared_up_proj,
                        p + "mlp.shared_expert.down_proj.weight": mlp.shared_down_proj,
                        p + "mlp.shared_expert_gate.weight": mlp.shared_expert_gate})
    return out
