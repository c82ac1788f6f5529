"""SwiGLU MLP and the sparse MoE block in PyTorch (docs/mlp_and_moe.md).

MoE dispatch is grouped: tokens are sorted by expert once (one argsort of the [N·k] assignments), each expert
with tokens runs one [n_e, H] × [H, 2·I] and one [n_e, I] × [I, H] product on its contiguous slice, and the
weighted results are scattered back with one index_add_.  Router softmax in fp32 over all experts, top-k, then
renormalised (HF `Qwen3_5MoeTopKRouter`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from optimized.linear import linear

__all__ = ["swiglu_mlp", "TorchMoEWeights", "sparse_moe_block", "route"]


def swiglu_mlp(x: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
               gate_up: torch.Tensor | None = None) -> torch.Tensor:
    """y = (silu(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ.   x [..., H]; gate/up [I, H]; down [H, I] -> [..., H]

    `gate_up` ([2·I, H] = gate rows then up rows), when given, replaces the two input products by one.
    """
    if gate_up is not None:
        gu = linear(x, gate_up)
        I = gate_proj.shape[0]
        h = F.silu(gu[..., :I]) * gu[..., I:]
    else:
        h = F.silu(F.linear(x, gate_proj)) * F.linear(x, up_proj)
    return linear(h, down_proj)


@dataclass
class TorchMoEWeights:
    """Torch twin of reference.mlp.MoEWeights (same field names and shapes)."""

    gate: torch.Tensor  # [E, H]
    gate_up_proj: torch.Tensor  # [E, 2·I, H]
    down_proj: torch.Tensor  # [E, H, I]
    shared_gate_proj: torch.Tensor  # [I_s, H]
    shared_up_proj: torch.Tensor  # [I_s, H]
    shared_down_proj: torch.Tensor  # [H, I_s]
    shared_expert_gate: torch.Tensor  # [1, H]

    @classmethod
    def from_reference(cls, w, *, dtype=torch.float32, device="cpu") -> TorchMoEWeights:
        def conv(a):
            return torch.from_numpy(np.array(a)).to(device=device, dtype=dtype).contiguous()
        return cls(**{name: conv(getattr(w, name)) for name in cls.__dataclass_fields__})


def route(x: torch.Tensor, router_weight: torch.Tensor, k: int):
    """ℓ = x W_rᵀ; p = softmax(ℓ) in fp32 over all E; top-k; renormalise.  -> logits [N, E], w [N, k], idx [N, k]"""
    logits = F.linear(x, router_weight)  # [N, E]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = torch.softmax(logits.to(cdt), dim=-1)  # [N, E]
    vals, idx = torch.topk(p, k, dim=-1)  # [N, k]
    w = vals / vals.sum(-1, keepdim=True)
    return logits, w.to(x.dtype), idx


def sparse_moe_block(x: torch.Tensor, w: TorchMoEWeights, config, experts: tuple[int, int] | None = None
                     ) -> torch.Tensor:
    """Sparse MoE block.   x [N, H] -> [N, H]

        y = Σ_{e∈topk(x)} w_e(x) · Expert_e(x)  +  σ(x W_sgᵀ) · SharedMLP(x)

    experts=(start, stop): `w` holds only experts start..stop-1 (one tensor-parallel rank's; the router `w.gate`
    is whole): every token is still routed over all experts, and only the assignments to the held experts are
    computed — the rank's partial sum (reference.parallel).
    """
    N, H = x.shape
    k = config.num_experts_per_tok
    I = w.down_proj.shape[2]
    e0 = 0 if experts is None else experts[0]
    _, weights, idx = route(x, w.gate, k)  # [N, k], [N, k]
    flat_e = idx.reshape(-1) - e0  # [N·k]  held experts are 0 .. n_held-1
    n_held = w.gate_up_proj.shape[0]
    order = torch.argsort(flat_e, stable=True)  # assignments grouped by expert
    if experts is not None:
        held = (flat_e[order] >= 0) & (flat_e[order] < n_held)
        order = order[held]  # only the assignments to this rank's experts
    tok = order // k  # token of each sorted assignment
    counts = torch.bincount(flat_e[order], minlength=n_held).tolist()
    xs = x.index_select(0, tok)  # [n_assigned, H]  tokens in expert order
    out = torch.empty_like(xs)
    start = 0
    for e, n_e in enumerate(counts):
        if n_e == 0:
            continue
        seg = slice(start, start + n_e)
        gu = F.linear(xs[seg], w.gate_up_proj[e])  # [n_e, 2·I]  first half gate, second half up
        out[seg] = F.linear(F.silu(gu[:, :I]) * gu[:, I:], w.down_proj[e])  # [n_e, H]
        start += n_e
    out.mul_(weights.reshape(-1)[order][:, None])
    routed = torch.zeros_like(x).index_add_(0, tok, out)  # [N, H]
    shared = swiglu_mlp(x, w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj)
    return routed + torch.sigmoid(F.linear(x, w.shared_expert_gate)) * shared
