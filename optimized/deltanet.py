"""One Gated DeltaNet layer in PyTorch (as HF `Qwen3_5GatedDeltaNet`): projections → causal conv + SiLU → gates →
gated delta rule → gated RMSNorm → out_proj, for prefill (chunked, with carried states) and for decode (in place in
state pools).

The four input projections are fused into one [conv_dim + value_dim + 2·H_v, H] weight, so a layer reads x once
with one large matmul.  Weights that require grad (training, optimized.causal_lm) are not fused: concatenating
them would copy every weight on every step, and the fused weight's gradient would be split back into four; they
run as four products.  Kernel ops (delta rule, conv, gated norm) go through `optimized.backend` (`backend=`).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F

from optimized import backend as dispatch
from optimized.linear import linear

__all__ = ["TorchDeltaNetWeights", "gated_deltanet", "gated_deltanet_decode"]


@dataclass
class TorchDeltaNetWeights:
    """Torch twin of reference.deltanet.DeltaNetWeights, plus the fused input projection `in_proj_all` (the four
    input projections are then row views of it, so the layer holds each weight once)."""

    in_proj_qkv: torch.Tensor  # [conv_dim, H]
    in_proj_z: torch.Tensor  # [value_dim, H]
    in_proj_b: torch.Tensor  # [H_v, H]
    in_proj_a: torch.Tensor  # [H_v, H]
    conv1d: torch.Tensor  # [conv_dim, K]
    dt_bias: torch.Tensor  # [H_v] fp32
    A_log: torch.Tensor  # [H_v] fp32
    norm: torch.Tensor  # [D_v] fp32
    out_proj: torch.Tensor  # [H, value_dim]
    in_proj_all: torch.Tensor | None = None  # [conv_dim + value_dim + 2·H_v, H]; None for trained weights

    def __post_init__(self):
        if self.conv1d.dim() == 3:
            self.conv1d = self.conv1d[:, 0, :].contiguous()
        parts = (self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a)
        if self.in_proj_all is None and not any(t.requires_grad for t in parts):
            self.in_proj_all = torch.cat(parts, 0)
            # The four parts become row views of the fused weight: one copy of every weight is kept.
            self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a = torch.split(
                self.in_proj_all, [t.shape[0] for t in parts], 0)

    @classmethod
    def from_reference(cls, w, *, dtype=torch.float32, device="cpu") -> TorchDeltaNetWeights:
        def conv(name):
            a = torch.from_numpy(np.array(getattr(w, name)))
            # A_log, dt_bias and the gated-norm weight stay fp32 (float64 for float64 models) — as MAX does, pitfall B23
            keep = name in ("A_log", "dt_bias", "norm")
            dt = (torch.float64 if dtype == torch.float64 else torch.float32) if keep else dtype
            return a.to(device=device, dtype=dt).contiguous()

        return cls(**{n: conv(n) for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d",
                                           "dt_bias", "A_log", "norm", "out_proj")})


def _split_projection(x, w, config):
    """One matmul for qkv, z, b, a (four without a fused weight).
    x [T, H] -> qkv [T, conv_dim], z [T, value_dim], b [T, H_v], a [T, H_v]."""
    if w.in_proj_all is None:
        return tuple(linear(x, t) for t in (w.in_proj_qkv, w.in_proj_z, w.in_proj_b, w.in_proj_a))
    p = linear(x, w.in_proj_all)
    C, Vd, Hv = config.conv_dim, config.value_dim, config.linear_num_value_heads
    return torch.split(p, [C, Vd, Hv, Hv], dim=1)  # views; under autograd one concatenation back (not four zeros)


def _gates(b, a, w):
    """β = σ(b), g = −exp(A_log) · softplus(a + dt_bias), in fp32 (as HF's `Qwen3_5GatedDeltaNet`)."""
    cdt = w.A_log.dtype
    beta = torch.sigmoid(b.to(cdt))
    g = -torch.exp(w.A_log) * F.softplus(a.to(cdt) + w.dt_bias)
    return g, beta


def _split_qkv(mixed, config):
    T = mixed.shape[0]
    kd = config.key_dim
    H_k, H_v = config.linear_num_key_heads, config.linear_num_value_heads
    q, k, v = torch.split(mixed, [kd, kd, config.value_dim], dim=1)
    return (q.reshape(1, T, H_k, config.linear_key_head_dim), k.reshape(1, T, H_k, config.linear_key_head_dim),
            v.reshape(1, T, H_v, config.linear_value_head_dim))


def _output(o, z, w, config, backend):
    T = o.shape[0]
    H_v, D_v = config.linear_num_value_heads, config.linear_value_head_dim
    y = dispatch.gated_rms_norm(o.contiguous(), z.reshape(T, H_v, D_v).contiguous(), w.norm, config.rms_norm_eps,
                         backend=backend)
    return linear(y.reshape(T, H_v * D_v), w.out_proj)


# Prefills whose longest sequence has at most this many tokens run the per-token form under mode="auto": the
# chunked form pays for a whole chunk however short the input is (one C = 64 chunk: ~7 ms at H_v = 16, D = 128 on
# one CPU core), the recurrent form ~0.16 ms per token.  Measured crossover on CPU: T ≈ 40 (results/crossover.json,
# `qwen35 plot --measure-crossover`); fla switches at 64 on GPUs (pitfall B21).  Short chunks are common: the tail
# of a chunked prefill, speculative verification, a few tokens appended to a live request.
RECURRENT_MAX_TOKENS = 32


def _max_seq_len(x, cu_seqlens) -> int:
    if cu_seqlens is None:
        return x.shape[0]
    cu = cu_seqlens.tolist() if hasattr(cu_seqlens, "tolist") else list(cu_seqlens)
    return max((b - a for a, b in pairwise(cu)), default=0)


def gated_deltanet(x, w: TorchDeltaNetWeights, config, *, cu_seqlens=None, conv_state=None, recurrent_state=None,
                   mode: str = "chunk", chunk_size: int = 64, backend="auto"):
    """One GDN layer over packed sequences (same contract as reference.deltanet.gated_deltanet).

    Args:
        x:               [T_total, H]  (input_layernorm already applied)
        cu_seqlens:      [N+1] or None
        conv_state:      [N, conv_dim, K-1] or None;  recurrent_state: [N, H_v, D_k, D_v] (fp32) or None
        mode:            "chunk" | "recurrent" | "auto" (recurrent when the longest sequence has at most
                         RECURRENT_MAX_TOKENS tokens, chunked otherwise; the two agree to fp32 rounding)
    Returns:
        y [T_total, H], conv_state [N, conv_dim, K-1], recurrent_state [N, H_v, D_k, D_v] (fp32)
    """
    if mode not in ("chunk", "recurrent", "auto"):
        raise ValueError(f"gated_deltanet: mode must be 'chunk', 'recurrent' or 'auto', got {mode!r}")
    if mode == "auto":
        mode = "recurrent" if _max_seq_len(x, cu_seqlens) <= RECURRENT_MAX_TOKENS else "chunk"
    qkv, z, b, a = _split_projection(x, w, config)
    mixed, conv_state = dispatch.causal_conv1d(qkv, w.conv1d, conv_state=conv_state, cu_seqlens=cu_seqlens,
                                        activation="silu", backend=backend)
    q, k, v = _split_qkv(mixed, config)
    g, beta = _gates(b, a, w)
    kw = dict(g=g[None], beta=beta[None], initial_state=recurrent_state, output_final_state=True,
              use_qk_l2norm=True, cu_seqlens=cu_seqlens, backend=backend)
    if mode == "chunk":
        o, recurrent_state = dispatch.chunk_gated_delta_rule(q, k, v, chunk_size=chunk_size, **kw)
    else:
        o, recurrent_state = dispatch.recurrent_gated_delta_rule(q, k, v, **kw)
    return _output(o[0], z, w, config, backend), conv_state, recurrent_state


def gated_deltanet_decode(x, w: TorchDeltaNetWeights, config, *, conv_pool, state_pool, slot_ids, backend="auto"):
    """One decode token per row; conv and recurrent states updated IN PLACE in the pools at `slot_ids`.

    Args:
        x:          [B, H]
        conv_pool:  [S, conv_dim, K-1];  state_pool: [S, H_v, D_k, D_v] fp32;  slot_ids: [B] (−1 = padding)
    Returns:
        y [B, H]
    """
    qkv, z, b, a = _split_projection(x, w, config)
    mixed = dispatch.causal_conv1d_update(qkv, w.conv1d, conv_pool=conv_pool, slot_ids=slot_ids, backend=backend)
    q, k, v = _split_qkv(mixed, config)  # [1, B, ...] -> per-row tokens
    q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))  # [B, 1, H, D]
    g, beta = _gates(b, a, w)
    o = dispatch.fused_recurrent_gated_delta_rule_update(q, k, v, g=g[:, None], beta=beta[:, None],
                                                         state_pool=state_pool, slot_ids=slot_ids, use_qk_l2norm=True,
                                                         backend=backend)
    return _output(o[:, 0], z, w, config, backend)
