"""reference/mlp.py: dense SwiGLU MLP and the Qwen3.5-MoE sparse block (docs/mlp_and_moe.md).

Properties: SwiGLU equals an element loop; router weights are the renormalised top-k of a softmax over ALL
experts and sum to 1; the block equals a naive per-token loop; the fused gate_up_proj is split [gate | up];
the shared expert is scaled by σ(x W_sgᵀ); ties are broken towards the lower expert index.  The HF cases compare
with transformers' Qwen3_5MLP and Qwen3_5MoeSparseMoeBlock.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.config import Qwen35Config
from reference.mlp import MoEWeights, route, sparse_moe_block, swiglu_mlp, top_k
from tests._tolerance import assert_close


def moe_cfg(**kw):
    """H = 32, E = 4, k = 2, I_moe = 16, I_s = 16 unless overridden."""
    return Qwen35Config.tiny(model_type="qwen3_5_moe_text", **kw)


def _silu(a):
    return a / (1.0 + math.exp(-a))


def naive_swiglu(x, Wg, Wu, Wd):
    """Element loops: y_o = Σ_i Wd[o, i] · silu(Σ_h Wg[i, h] x_h) · (Σ_h Wu[i, h] x_h)."""
    I, H = Wg.shape
    y = np.zeros(H)
    for i in range(I):
        g = sum(Wg[i, h] * x[h] for h in range(H))
        u = sum(Wu[i, h] * x[h] for h in range(H))
        a = _silu(g) * u
        for o in range(H):
            y[o] += Wd[o, i] * a
    return y


def naive_moe_token(x, w: MoEWeights, k):
    """One token, written from the equations of docs/mlp_and_moe.md with Python loops and sorted()."""
    E = w.gate.shape[0]
    I = w.down_proj.shape[2]
    logits = [float(np.dot(w.gate[e], x)) for e in range(E)]
    m = max(logits)
    ex = [math.exp(v - m) for v in logits]
    p = [v / sum(ex) for v in ex]
    chosen = sorted(range(E), key=lambda e: (-p[e], e))[:k]
    norm = sum(p[e] for e in chosen)
    y = np.zeros_like(x)
    for e in chosen:
        y += (p[e] / norm) * naive_swiglu(x, w.gate_up_proj[e, :I], w.gate_up_proj[e, I:], w.down_proj[e])
    sg = 1.0 / (1.0 + math.exp(-float(np.dot(w.shared_expert_gate[0], x))))
    y += sg * naive_swiglu(x, w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj)
    return y, chosen, [p[e] / norm for e in chosen]


# ---------------------------------------------------------------------------------------------------- dense


@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 3), H=st.integers(1, 6), I=st.integers(1, 7))
def test_swiglu_equals_element_loop(seed, N, H, I):
    rng = np.random.default_rng(seed)
    x, Wg, Wu, Wd = (rng.standard_normal(s) for s in ((N, H), (I, H), (I, H), (H, I)))
    y = swiglu_mlp(x, Wg, Wu, Wd)
    ref = np.stack([naive_swiglu(x[n], Wg, Wu, Wd) for n in range(N)])
    assert_close("swiglu", ref, y, "f64_exact")
    # gate and up are not interchangeable: silu(g)·u ≠ silu(u)·g in general.
    assert_close("swiglu f32", ref, swiglu_mlp(x.astype(np.float32), Wg, Wu, Wd), "f32")


def test_swiglu_shape_errors():
    with pytest.raises(ValueError, match="down_proj"):
        swiglu_mlp(np.zeros((2, 4)), np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="gate_proj and up_proj"):
        swiglu_mlp(np.zeros((2, 4)), np.zeros((3, 5)), np.zeros((3, 5)), np.zeros((4, 3)))


# ---------------------------------------------------------------------------------------------------- router


@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 6), E=st.integers(1, 12), data=st.data())
def test_router_weights_are_renormalised_top_k_of_full_softmax(seed, N, E, data):
    k = data.draw(st.integers(1, E))
    rng = np.random.default_rng(seed)
    x, Wr = rng.standard_normal((N, 5)), rng.standard_normal((E, 5)) * 2.0
    logits, weights, idx = route(x, Wr, k)
    assert logits.shape == (N, E) and weights.shape == (N, k) and idx.shape == (N, k)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=0, atol=1e-14)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for n in range(N):
        assert len(set(idx[n])) == k
        # every chosen prob >= every unchosen one, chosen in descending order
        chosen = p[n, idx[n]]
        rest = np.delete(p[n], idx[n])
        assert np.all(np.diff(chosen) <= 0)
        assert rest.size == 0 or chosen.min() >= rest.max()
        # ratios between kept weights equal ratios of the FULL softmax (softmax first, then top-k)
        assert_close("renormalised", chosen / chosen.sum(), weights[n], "f64_exact")


def test_top_k_breaks_ties_towards_lower_index():
    p = np.array([[0.1, 0.3, 0.3, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25, 0.0], [0.0, 0.5, 0.0, 0.5, 0.0]])
    vals, idx = top_k(p, 2)
    assert idx.tolist() == [[1, 2], [0, 1], [1, 3]]
    assert vals.tolist() == [[0.3, 0.3], [0.25, 0.25], [0.5, 0.5]]
    with pytest.raises(ValueError, match="top-k"):
        top_k(p, 6)


# ---------------------------------------------------------------------------------------------------- block


@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 5), E=st.integers(2, 6), data=st.data())
def test_moe_block_equals_per_token_loop(seed, N, E, data):
    k = data.draw(st.integers(1, E))
    cfg = moe_cfg(hidden_size=8, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=3,
                  shared_expert_intermediate_size=4)
    w = MoEWeights.random(cfg, seed, std=0.5)
    x = np.random.default_rng(seed + 1).standard_normal((N, 8))
    y, logits, weights, idx = sparse_moe_block(x, w, cfg, return_router=True)
    for n in range(N):
        y_n, chosen, wts = naive_moe_token(x[n], w, k)
        assert_close(f"token {n}", y_n, y[n], "f64_exact")
        assert idx[n].tolist() == chosen
        assert_close("weights", np.array(wts), weights[n], "f64_exact")


def test_fused_gate_up_is_gate_then_up():
    """Swapping the two halves of gate_up_proj changes the result (the split is [gate | up], as in HF
    `Qwen3_5MoeExperts`)."""
    cfg = moe_cfg()
    w = MoEWeights.random(cfg, 3)
    x = np.random.default_rng(4).standard_normal((6, cfg.hidden_size))
    I = cfg.moe_intermediate_size
    swapped = MoEWeights(**{**w.__dict__, "gate_up_proj": np.concatenate(
        [w.gate_up_proj[:, I:], w.gate_up_proj[:, :I]], axis=1)})
    assert np.max(np.abs(sparse_moe_block(x, w, cfg) - sparse_moe_block(x, swapped, cfg))) > 1e-3


def test_shared_expert_gate_scales_the_shared_mlp():
    """shared_expert_gate → −∞ removes the shared expert; → +∞ adds it at full weight."""
    cfg = moe_cfg()
    w = MoEWeights.random(cfg, 5)
    x = np.random.default_rng(6).standard_normal((4, cfg.hidden_size))
    x[:, 0] = 1.0
    shared = swiglu_mlp(x, w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj)
    off = np.zeros((1, cfg.hidden_size))
    off[0, 0] = -800.0
    on = -off
    y_off = sparse_moe_block(x, MoEWeights(**{**w.__dict__, "shared_expert_gate": off}), cfg)
    y_on = sparse_moe_block(x, MoEWeights(**{**w.__dict__, "shared_expert_gate": on}), cfg)
    assert_close("shared at σ = 1", y_off + shared, y_on, "f64_exact")


def test_moe_float32_path_and_validation():
    cfg = moe_cfg()
    w = MoEWeights.random(cfg, 7)
    x = np.random.default_rng(8).standard_normal((9, cfg.hidden_size))
    y32 = sparse_moe_block(x.astype(np.float32), w, cfg)
    assert y32.dtype == np.float32
    assert_close("moe f32", sparse_moe_block(x, w, cfg), y32, "f32")
    assert np.array_equal(sparse_moe_block(x, w, cfg, dtype=np.float32), y32)
    with pytest.raises(ValueError, match="gate_up_proj"):
        sparse_moe_block(x, MoEWeights(**{**w.__dict__, "gate_up_proj": w.gate_up_proj[:, :16]}), cfg)
    with pytest.raises(ValueError, match=r"\[N, H"):
        sparse_moe_block(x[None], w, cfg)


# ---------------------------------------------------------------------------------------------------- HF oracle


@pytest.mark.hf
def test_hf_dense_mlp():
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5MLP

    H, I = 24, 40
    mlp = Qwen3_5MLP(Qwen3_5TextConfig(hidden_size=H, intermediate_size=I), intermediate_size=I).eval()
    rng = np.random.default_rng(9)
    Wg, Wu, Wd = rng.standard_normal((I, H)) * 0.3, rng.standard_normal((I, H)) * 0.3, rng.standard_normal((H, I)) * 0.3
    x = rng.standard_normal((7, H))
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(torch.from_numpy(Wg).float())
        mlp.up_proj.weight.copy_(torch.from_numpy(Wu).float())
        mlp.down_proj.weight.copy_(torch.from_numpy(Wd).float())
        y_hf = mlp(torch.from_numpy(x).float()).numpy()
    assert_close("HF MLP vs f64", swiglu_mlp(x, Wg, Wu, Wd), y_hf, "f32")


@pytest.mark.hf
def test_hf_sparse_moe_block():
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    H, E, k, I, I_s, N = 32, 8, 3, 16, 24, 21
    hf_cfg = Qwen3_5MoeTextConfig(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I,
                                  shared_expert_intermediate_size=I_s)
    hf_cfg._experts_implementation = "eager"  # the plain per-expert loop (a standalone block has no dispatch)
    block = Qwen3_5MoeSparseMoeBlock(hf_cfg).eval()
    cfg = moe_cfg(hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I,
                  shared_expert_intermediate_size=I_s)
    w = MoEWeights.random(cfg, 10, std=0.3)
    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).float()
    with torch.no_grad():
        block.gate.weight.copy_(t(w.gate))
        block.experts.gate_up_proj.copy_(t(w.gate_up_proj))
        block.experts.down_proj.copy_(t(w.down_proj))
        block.shared_expert.gate_proj.weight.copy_(t(w.shared_gate_proj))
        block.shared_expert.up_proj.weight.copy_(t(w.shared_up_proj))
        block.shared_expert.down_proj.weight.copy_(t(w.shared_down_proj))
        block.shared_expert_gate.weight.copy_(t(w.shared_expert_gate))
        x = np.random.default_rng(11).standard_normal((N, H))
        y_hf = block(t(x)[None])[0].numpy()
        _, scores_hf, idx_hf = block.gate(t(x))
    y64, _, weights, idx = sparse_moe_block(x, w, cfg, return_router=True)
    assert np.array_equal(idx, idx_hf.numpy())  # same experts, same order (no ties with random logits)
    assert_close("HF router weights", weights, scores_hf.numpy(), "f32")
    assert_close("HF MoE vs f64", y64, y_hf, "f32")
    assert_close("HF MoE vs f32", y_hf, sparse_moe_block(x.astype(np.float32), w, cfg), "f32")
