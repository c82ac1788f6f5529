"""Feed-forward blocks of Qwen3.5: the dense SwiGLU MLP and the sparse MoE block of qwen3_5_moe (docs/mlp_and_moe.md).

Dense (HF `Qwen3_5MLP`):
    MLP(x) = ( silu(x W_gateᵀ) ⊙ (x W_upᵀ) ) W_downᵀ

Sparse MoE (HF `Qwen3_5MoeSparseMoeBlock`), per token x [H], E experts, top-k routing:
    ℓ = x W_rᵀ                       [E]   router logits
    p = softmax(ℓ)                   [E]   over ALL experts, fp32 semantics (float64 in the oracle)
    S = top-k indices of p,  w_e = p_e / Σ_{e'∈S} p_e'                 (always renormalised in Qwen3.5-MoE)
    y = Σ_{e∈S} w_e · Expert_e(x)  +  σ(x W_sgᵀ) · SharedMLP(x)
    Expert_e(x) = ( silu(g) ⊙ u ) W_down,eᵀ,   [g | u] = x W_gate_up,eᵀ   (first half gate, second half up)

One tensor-parallel rank holds a block of whole experts (docs/parallel.md): `sparse_moe_block(..., experts=(s, e))`
routes over all E experts as above and computes only the assignments to experts s..e-1, a partial sum that the
ranks add up.

Computation runs in x's dtype: float64 (oracle) or float32 (mirrors HF's fp32 path).
Shape legend: N tokens, H hidden, I intermediate, E experts, k = num_experts_per_tok, I_moe expert width,
I_s shared-expert width.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference.norms import sigmoid, silu


def _compute_dtype(x: np.ndarray, dtype=None) -> np.dtype:
    """The requested dtype, else x's dtype if it is float32/float64, else float64."""
    if dtype is None:
        return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def swiglu_mlp(x, gate_proj, up_proj, down_proj, *, dtype=None) -> np.ndarray:
    """Dense SwiGLU MLP:  y = (silu(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ.

    Args:
        x: [..., H].
        gate_proj: [I, H];  up_proj: [I, H];  down_proj: [H, I]   (PyTorch [out, in] layout, no biases).
        dtype: compute dtype; None = x's dtype (float32/float64), else float64.
    Returns:
        [..., H] in the compute dtype.
    """
    x = np.asarray(x)
    dt = _compute_dtype(x, dtype)
    x = x.astype(dt, copy=False)
    Wg, Wu, Wd = (np.asarray(a, dtype=dt) for a in (gate_proj, up_proj, down_proj))
    H = x.shape[-1]
    if Wg.ndim != 2 or Wg.shape[1] != H or Wu.shape != Wg.shape:
        raise ValueError(f"gate_proj and up_proj must both be [I, H={H}], got {Wg.shape} and {Wu.shape}")
    if Wd.shape != (H, Wg.shape[0]):
        raise ValueError(f"down_proj must be [H={H}, I={Wg.shape[0]}], got {Wd.shape}")
    h = silu(x @ Wg.T, dtype=dt) * (x @ Wu.T)  # [..., I]
    return h @ Wd.T  # [..., H]


@dataclass
class MLPWeights:
    """Weights of one dense SwiGLU MLP (checkpoint names `mlp.{gate,up,down}_proj.weight`, PyTorch [out, in]).

    gate_proj: [I, H]
    up_proj:   [I, H]
    down_proj: [H, I]
    """

    gate_proj: np.ndarray
    up_proj: np.ndarray
    down_proj: np.ndarray


@dataclass
class MoEWeights:
    """Weights of one sparse MoE block (checkpoint names under `mlp.`, PyTorch [out, in] layout).

    gate:               [E, H]           router (`mlp.gate.weight`)
    gate_up_proj:       [E, 2·I_moe, H]  fused experts (`mlp.experts.gate_up_proj`): rows [:I_moe] gate, [I_moe:] up
    down_proj:          [E, H, I_moe]    (`mlp.experts.down_proj`)
    shared_gate_proj:   [I_s, H]         (`mlp.shared_expert.gate_proj.weight`)
    shared_up_proj:     [I_s, H]         (`mlp.shared_expert.up_proj.weight`)
    shared_down_proj:   [H, I_s]         (`mlp.shared_expert.down_proj.weight`)
    shared_expert_gate: [1, H]           scalar gate of the shared expert (`mlp.shared_expert_gate.weight`)
    """

    gate: np.ndarray
    gate_up_proj: np.ndarray
    down_proj: np.ndarray
    shared_gate_proj: np.ndarray
    shared_up_proj: np.ndarray
    shared_down_proj: np.ndarray
    shared_expert_gate: np.ndarray

    def validate(self, config, experts: tuple[int, int] | None = None) -> None:
        """Raise ValueError naming the first weight whose shape does not fit `config`.

        `experts=(start, stop)`: the expert tensors hold only experts start..stop-1 (one tensor-parallel rank's
        block, see `sparse_moe_block`), so they have stop - start rows on their first axis; the router still has
        all E."""
        H, E = config.hidden_size, config.num_experts
        I, I_s = config.moe_intermediate_size, config.shared_expert_intermediate_size
        start, stop = expert_block(experts, E)
        expected = {
            "gate": (E, H),
            "gate_up_proj": (stop - start, 2 * I, H),
            "down_proj": (stop - start, H, I),
            "shared_gate_proj": (I_s, H),
            "shared_up_proj": (I_s, H),
            "shared_down_proj": (H, I_s),
            "shared_expert_gate": (1, H),
        }
        for name, shape in expected.items():
            got = np.shape(getattr(self, name))
            if got != shape:
                raise ValueError(f"MoEWeights.{name} has shape {got}, expected {shape}")

    @classmethod
    def random(cls, config, seed: int = 0, *, std: float = 0.2) -> MoEWeights:
        """Random float64 weights of the right shapes (tests, notebooks)."""
        rng = np.random.default_rng(seed)
        H, E = config.hidden_size, config.num_experts
        I, I_s = config.moe_intermediate_size, config.shared_expert_intermediate_size
        return cls(
            gate=rng.standard_normal((E, H)) * std,
            gate_up_proj=rng.standard_normal((E, 2 * I, H)) * std,
            down_proj=rng.standard_normal((E, H, I)) * std,
            shared_gate_proj=rng.standard_normal((I_s, H)) * std,
            shared_up_proj=rng.standard_normal((I_s, H)) * std,
            shared_down_proj=rng.standard_normal((H, I_s)) * std,
            shared_expert_gate=rng.standard_normal((1, H)) * std,
        )


def expert_block(experts, num_experts: int) -> tuple[int, int]:
    """The experts (start, stop) a MoE weight set holds: all of them for None, else the given block, checked to be
    0 <= start <= stop <= num_experts (ValueError naming the block otherwise)."""
    if experts is None:
        return 0, num_experts
    try:
        start, stop = (int(e) for e in experts)
    except (TypeError, ValueError):
        raise ValueError(f"experts must be (start, stop), got {experts!r}") from None
    if not 0 <= start <= stop <= num_experts:
        raise ValueError(f"experts=({start}, {stop}) is not a block of the {num_experts} experts "
                         f"(need 0 <= start <= stop <= {num_experts})")
    return start, stop


def top_k(p: np.ndarray, k: int):
    """The k largest entries of each row, largest first; ties go to the lower expert index.

    A stable sort of −p keeps equal values in index order, so the choice is deterministic.  torch.topk documents
    no tie order; on CPU it also returns the lower index first in the cases we tested (exact ties between
    distinct experts essentially never occur with real-valued router logits).

    Args:
        p: [N, E];  k: 1 <= k <= E.
    Returns:
        values [N, k], indices [N, k] int64.
    """
    if not 1 <= k <= p.shape[-1]:
        raise ValueError(f"top-k needs 1 <= k <= E = {p.shape[-1]}, got k = {k}")
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]  # [N, k]
    return np.take_along_axis(p, idx, axis=-1), idx.astype(np.int64)


def route(x, router_weight, k: int, *, dtype=None):
    """Router of the MoE block (HF `Qwen3_5MoeTopKRouter`).

        ℓ = x W_rᵀ,  p = softmax(ℓ) over all E,  (v, S) = topk(p, k),  w = v / Σ v

    Args:
        x: [N, H];  router_weight: [E, H];  k: experts per token.
    Returns:
        logits [N, E], weights [N, k] (each row sums to 1), indices [N, k] int64.
    """
    x = np.asarray(x)
    dt = _compute_dtype(x, dtype)
    logits = x.astype(dt, copy=False) @ np.asarray(router_weight, dtype=dt).T  # [N, E]
    # softmax over ALL experts before the top-k (not over the selected k); fp32 semantics as HF (float64 here
    # when the oracle runs in float64).
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p = p / p.sum(axis=-1, keepdims=True)  # [N, E]
    vals, idx = top_k(p, k)  # [N, k] each
    weights = vals / vals.sum(axis=-1, keepdims=True)  # renormalise the kept probabilities to sum 1
    return logits, weights.astype(dt, copy=False), idx


def sparse_moe_block(x, w: MoEWeights, config, return_router: bool = False, *, dtype=None, experts=None):
    """Sparse MoE block of Qwen3.5-MoE.

        y = Σ_{e∈topk(x)} w_e(x) · Expert_e(x)  +  σ(x W_sgᵀ) · SharedMLP(x)

    Experts are evaluated one at a time on the tokens routed to them (the grouped-GEMM order); the result is
    the same sum as a per-token loop, up to float addition order.

    Expert parallelism (`experts=(start, stop)`, docs/parallel.md): `w.gate_up_proj` / `w.down_proj` hold only
    experts start..stop-1 ([stop - start, ...]; the router `w.gate` is whole [E, H]).  The router still scores
    all E experts and picks the top-k over all of them, with the same weights; only the assignments to the held
    experts are computed, so the routed term is this block's part of the sum over e ∈ topk(x).  With the shared
    expert split by columns too (`config.shared_expert_intermediate_size` the local width), the outputs of the
    blocks of a partition of the experts add up to the whole block's output.

    Args:
        x: [N, H] float32 or float64.
        w: MoEWeights.
        config: num_experts, num_experts_per_tok, moe_intermediate_size, shared_expert_intermediate_size,
            hidden_size.
        return_router: also return (router logits [N, E], weights [N, k], indices [N, k]) — over all E experts.
        dtype: compute dtype; None = x's dtype (float32/float64), else float64.
        experts: None (w holds every expert) or (start, stop), the block of experts w holds.
    Returns:
        y [N, H]; or (y, logits, weights, indices) when return_router.
    """
    x = np.asarray(x)
    dt = _compute_dtype(x, dtype)
    x = x.astype(dt, copy=False)
    H, E, k = config.hidden_size, config.num_experts, config.num_experts_per_tok
    if x.ndim != 2 or x.shape[1] != H:
        raise ValueError(f"x must be [N, H={H}] (flatten batch and time first), got shape {x.shape}")
    start, stop = expert_block(experts, E)
    w.validate(config, experts=(start, stop))
    I = config.moe_intermediate_size

    logits, weights, idx = route(x, w.gate, k, dtype=dt)  # [N, E], [N, k], [N, k]  (over all E experts)

    routed = np.zeros_like(x)  # [N, H]
    for e in range(start, stop):  # the held experts only; w's row e - start is expert e
        token, slot = np.nonzero(idx == e)  # tokens routed to expert e, and which of their k slots
        if token.size == 0:
            continue
        W_gu = np.asarray(w.gate_up_proj[e - start], dtype=dt)  # [2·I, H]
        W_d = np.asarray(w.down_proj[e - start], dtype=dt)  # [H, I]
        gu = x[token] @ W_gu.T  # [n_e, 2·I]
        h = silu(gu[:, :I], dtype=dt) * gu[:, I:]  # [n_e, I]  first half gate, second half up
        out = (h @ W_d.T) * weights[token, slot][:, None]  # [n_e, H]
        np.add.at(routed, token, out)

    shared = swiglu_mlp(x, w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj, dtype=dt)  # [N, H]
    shared_gate = sigmoid(x @ np.asarray(w.shared_expert_gate, dtype=dt).T, dtype=dt)  # [N, 1]
    y = routed + shared_gate * shared  # [N, H]
    if return_router:
        return y, logits, weights, idx
    return y
