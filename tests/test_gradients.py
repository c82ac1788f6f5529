"""Gradients of the differentiable path (optimized ops under autograd, optimized.Qwen35ForCausalLM), three ways.

(a) torch autograd in float64 vs central finite differences of the NumPy float64 oracle (reference.gradcheck)
    along random unit directions, per input and jointly: the chunked gated delta rule (q, k, v, g, β, initial
    state; outputs and final state), the causal conv (x, kernel, state), the gated RMSNorm, gated attention, the
    SwiGLU MLP, the sparse MoE block, a whole Gated DeltaNet layer, and whole dense and MoE models (every parameter
    tensor on its own, and all of them at once).  Budget `grad_fd` (tests/_tolerance.py).
(b) float32 gradients of every parameter equal transformers' autograd gradients on the same tiny checkpoint
    (tests/hf_checkpoints.py), dense and MoE (budget `grad_f32_vs_hf`), and, for a tied checkpoint whose fp32
    rounding is larger, within a few times transformers' own fp32 error against our float64 gradient.
(c) hypothesis over awkward shapes of the chunked rule: T not a multiple of the chunk, T < chunk, T = 1, GVA
    (H_v > H_k), strong decay, with and without an initial state, packed sequences.
Plus: the differentiable and the inference paths give the same values, and what is inference-only refuses grads.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.backend as dispatch
import optimized.gated_delta as ogd
import reference.gated_delta as rgd
from _tolerance import BUDGETS, assert_close, assert_directional
from hf_checkpoints import load_hf_model, make_hf_checkpoint, tiny_config
from optimized import Qwen35ForCausalLM
from optimized.attention import TorchAttentionWeights, gated_attention
from optimized.conv import causal_conv1d, causal_conv1d_update
from optimized.deltanet import TorchDeltaNetWeights, gated_deltanet
from optimized.mlp import TorchMoEWeights, sparse_moe_block, swiglu_mlp
from optimized.norms import gated_rms_norm
from qwen35.measure import gdn_inputs, rel_rms
from reference import attention as ratt
from reference import conv as rconv
from reference import deltanet as rdn
from reference import mlp as rmlp
from reference import norms as rnorms
from reference.errors import ConfigError
from reference.gradcheck import causal_lm_loss, directional_derivative, probe_loss, random_direction

torch.set_num_threads(1)
F64 = torch.float64


def check_op(name, torch_fn, ref_fn, inputs: dict, *, seed=0, eps=1e-6, joint_only=False) -> dict:
    """Autograd of Σ⟨outputs, probes⟩ through `torch_fn` vs the central finite difference of the same scalar
    through `ref_fn` (NumPy float64), along a random unit direction per input (unless `joint_only`) and one over
    all inputs.  Both functions take the inputs as keywords and return a tuple of outputs; the forward values
    must agree too.  Returns the autograd gradients (NumPy)."""
    tin = {n: torch.tensor(a, dtype=F64, requires_grad=True) for n, a in inputs.items()}
    outs = torch_fn(**tin)
    ref_outs = ref_fn(**inputs)
    rng = np.random.default_rng(seed)
    probes = [rng.standard_normal(tuple(o.shape)) for o in outs]
    for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
        assert_close(f"{name} output {i}", r, o.detach(), 1e-12)
    loss = sum((o * torch.from_numpy(p)).sum() for o, p in zip(outs, probes, strict=True))
    grads = dict(zip(tin, (g.numpy() for g in torch.autograd.grad(loss, list(tin.values()))), strict=True))

    def f(theta):
        return probe_loss(ref_fn(**theta), probes)

    supports = [] if joint_only else [[n] for n in inputs]
    for support in supports + [list(inputs)]:
        d = random_direction({n: inputs[n].shape for n in support}, seed)
        ad = sum(float(np.sum(grads[n] * d[n])) for n in support)
        norm = float(np.sqrt(sum(np.sum(grads[n] ** 2) for n in support)))
        assert_directional(f"{name} along {'+'.join(support)}", ad, directional_derivative(f, inputs, d, eps), norm)
    return grads


# ----------------------------------------------------------------------------------------------------------------
# (a) ops vs the float64 oracle's finite differences
# ----------------------------------------------------------------------------------------------------------------


def _rule_inputs(seed, B, T, H_k, H_v, D, *, h0=True, gate_normalizer=1.0, N=None):
    x = gdn_inputs(seed, B, T, H_k, H_v, D, D, with_h0=h0, gate_normalizer=gate_normalizer, N=N)
    inputs = {"q": x.q, "k": x.k, "v": x.v, "g": x.g, "beta": x.beta}
    if h0:
        inputs["initial_state"] = x.h0
    return inputs


def _rule(mod, chunk_size=None, cu_seqlens=None):
    def fn(q, k, v, g, beta, initial_state=None):
        kw = {} if chunk_size is None else {"chunk_size": chunk_size}
        return mod(q, k, v, g=g, beta=beta, initial_state=initial_state, cu_seqlens=cu_seqlens, **kw)
    return fn


def test_chunked_rule_gradients():
    # two sequences of 70 tokens, chunk 32: two full chunks and a partial one; GVA (H_v = 2 H_k); initial state
    inputs = _rule_inputs(1, 2, 70, 1, 2, 8)
    check_op("chunk_gated_delta_rule", _rule(ogd.chunk_gated_delta_rule, 32), _rule(rgd.chunk_gated_delta_rule, 32),
             inputs)


def test_per_token_rule_gradients():
    inputs = _rule_inputs(2, 1, 9, 2, 2, 8)
    check_op("recurrent_gated_delta_rule", _rule(ogd.recurrent_gated_delta_rule),
             _rule(rgd.recurrent_gated_delta_rule), inputs)


def test_causal_conv_gradients():
    rng = np.random.default_rng(3)
    cu = [0, 2, 9, 20]  # a sequence shorter than the window, and two longer ones
    inputs = {"x": rng.standard_normal((20, 6)), "weight": rng.standard_normal((6, 4)) / 2,
              "conv_state": rng.standard_normal((3, 6, 3))}

    def ours(x, weight, conv_state):
        return causal_conv1d(x, weight, conv_state=conv_state, cu_seqlens=cu)

    def ref(x, weight, conv_state):
        return rconv.causal_conv1d(x, weight, conv_state=conv_state, cu_seqlens=cu)

    check_op("causal_conv1d", ours, ref, inputs)


def test_gated_rms_norm_gradients():
    rng = np.random.default_rng(4)
    inputs = {"x": rng.standard_normal((7, 3, 8)), "z": rng.standard_normal((7, 3, 8)),
              "weight": 1 + 0.1 * rng.standard_normal(8)}
    check_op("gated_rms_norm", lambda x, z, weight: (gated_rms_norm(x, z, weight, 1e-6),),
             lambda x, z, weight: (rnorms.gated_rms_norm(x, z, weight, 1e-6),), inputs)


ATT_FIELDS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
MOE_FIELDS = ("gate", "gate_up_proj", "down_proj", "shared_gate_proj", "shared_up_proj", "shared_down_proj",
              "shared_expert_gate")


def test_gated_attention_gradients():
    cfg = tiny_config("dense")
    w = ratt.AttentionWeights.random(cfg, 5)
    rng = np.random.default_rng(5)
    cu = [0, 3, 11]
    inputs = {"x": rng.standard_normal((11, cfg.hidden_size)), **{n: getattr(w, n) for n in ATT_FIELDS}}

    def ours(x, **ws):
        return (gated_attention(x, TorchAttentionWeights(**ws), cfg, cu_seqlens=cu)[0],)

    def ref(x, **ws):
        return (ratt.gated_attention(x, ratt.AttentionWeights(**ws), cfg, cu_seqlens=cu)[0],)

    check_op("gated_attention", ours, ref, inputs)


def test_swiglu_mlp_gradients():
    rng = np.random.default_rng(6)
    inputs = {"x": rng.standard_normal((5, 12)), "gate_proj": rng.standard_normal((16, 12)) / 3,
              "up_proj": rng.standard_normal((16, 12)) / 3, "down_proj": rng.standard_normal((12, 16)) / 4}
    check_op("swiglu_mlp", lambda **a: (swiglu_mlp(**a),), lambda **a: (rmlp.swiglu_mlp(**a),), inputs)


def test_sparse_moe_gradients():
    cfg = tiny_config("moe")
    w = rmlp.MoEWeights.random(cfg, 7)
    x = np.random.default_rng(7).standard_normal((9, cfg.hidden_size))
    # The routing must not flip within ±ε: every token's k-th and (k+1)-th router probabilities are apart.
    p = np.sort(np.exp(x @ w.gate.T) / np.exp(x @ w.gate.T).sum(-1, keepdims=True), -1)[:, ::-1]
    k = cfg.num_experts_per_tok
    assert float((p[:, k - 1] - p[:, k]).min()) > 1e-3
    inputs = {"x": x, **{n: getattr(w, n) for n in MOE_FIELDS}}

    def ours(x, **ws):
        return (sparse_moe_block(x, TorchMoEWeights(**ws), cfg),)

    def ref(x, **ws):
        return (rmlp.sparse_moe_block(x, rmlp.MoEWeights(**ws), cfg),)

    check_op("sparse_moe_block", ours, ref, inputs)


DN_FIELDS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "dt_bias", "A_log", "norm", "out_proj")


def test_gated_deltanet_layer_gradients():
    cfg = tiny_config("dense")
    w = rdn.DeltaNetWeights.random(cfg, 8)
    rng = np.random.default_rng(8)
    cu = [0, 5, 30]
    inputs = {"x": rng.standard_normal((30, cfg.hidden_size)), **{n: getattr(w, n) for n in DN_FIELDS},
              "conv_state": rng.standard_normal((2, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1)),
              "recurrent_state": 0.5 * rng.standard_normal((2, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                                            cfg.linear_value_head_dim))}

    def ours(x, conv_state, recurrent_state, **ws):
        return gated_deltanet(x, TorchDeltaNetWeights(**ws), cfg, cu_seqlens=cu, conv_state=conv_state,
                              recurrent_state=recurrent_state, mode="chunk", chunk_size=16, backend="torch")

    def ref(x, conv_state, recurrent_state, **ws):
        return rdn.gated_deltanet(x, rdn.DeltaNetWeights(**ws), cfg, cu_seqlens=cu, conv_state=conv_state,
                                  recurrent_state=recurrent_state, mode="chunk", chunk_size=16)

    check_op("gated_deltanet", ours, ref, inputs)


# ----------------------------------------------------------------------------------------------------------------
# (a) whole models vs the float64 oracle's finite differences
# ----------------------------------------------------------------------------------------------------------------


def _spread_model(kind, seed, **over):
    """A float64 model with trained-looking spread weights (the init's 0.02 std would make every gradient tiny)."""
    m = Qwen35ForCausalLM(tiny_config(kind, **over), seed=seed, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=F64))
    return m


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_whole_model_gradients_match_finite_differences(kind):
    m = _spread_model(kind, 11)
    cfg = m.config
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, 5:9] = -100  # ignored positions
    loss = m(ids, labels=labels).loss
    loss.backward()
    theta = {n: p.detach().numpy().copy() for n, p in m.state_dict().items()}
    assert abs(causal_lm_loss(theta, cfg, ids.numpy(), labels.numpy()) - loss.item()) <= 1e-12 * loss.item()
    grads = {n: p.grad.numpy() for n, p in m.named_parameters()}
    assert set(grads) == set(theta)

    def f(th):
        return causal_lm_loss(th, cfg, ids.numpy(), labels.numpy())

    worst = 0.0
    for i, name in enumerate(sorted(theta)):  # every parameter tensor on its own
        d = random_direction({name: theta[name].shape}, i)
        worst = max(worst, assert_directional(name, float(np.sum(grads[name] * d[name])),
                                              directional_derivative(f, theta, d, 1e-6),
                                              float(np.linalg.norm(grads[name]))))
    for seed in range(2):  # all of them at once
        d = random_direction({n: a.shape for n, a in theta.items()}, 100 + seed)
        ad = sum(float(np.sum(grads[n] * d[n])) for n in d)
        norm = float(np.sqrt(sum(np.sum(g * g) for g in grads.values())))
        assert_directional(f"all parameters ({seed})", ad, directional_derivative(f, theta, d, 1e-6), norm)


# ----------------------------------------------------------------------------------------------------------------
# (b) float32 gradients vs transformers
# ----------------------------------------------------------------------------------------------------------------


def _grads(model, ids, hf=False):
    if hf:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    else:
        model(ids, labels=ids).loss.backward()
    return {n: p.grad.double().numpy() for n, p in model.named_parameters()}


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_fp32_gradients_equal_transformers(tmp_path, kind):
    d = make_hf_checkpoint(tmp_path / kind, kind=kind, seed=1)
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(0))  # two chunks, one partial
    ours = _grads(Qwen35ForCausalLM.from_pretrained(d), ids)
    theirs = _grads(load_hf_model(d), ids, hf=True)
    assert set(ours) == set(theirs)
    for name in sorted(ours):
        assert_close(f"grad {name}", theirs[name], ours[name], "grad_f32_vs_hf")


@pytest.mark.hf
def test_fp32_gradients_of_a_tied_checkpoint_are_within_fp32_rounding_of_transformers(tmp_path):
    """A tied checkpoint with N(0, 1) embeddings gives logits in the tens (loss ~19): fp32 rounding of the
    gradients reaches 3e-4 in both implementations.  Ours must be as close to transformers' as transformers'
    own fp32 gradients are to the float64 truth (our float64 gradients, checked against finite differences
    above), within 4×, and never further than 1e-3."""
    d = make_hf_checkpoint(tmp_path / "tied", kind="dense", seed=1, tie_word_embeddings=True)
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(0))
    ours = _grads(Qwen35ForCausalLM.from_pretrained(d), ids)
    truth = _grads(Qwen35ForCausalLM.from_pretrained(d, dtype=F64), ids)
    theirs = _grads(load_hf_model(d), ids, hf=True)
    for name in sorted(ours):
        hf_err = rel_rms(truth[name], theirs[name])
        assert_close(f"grad {name}", theirs[name], ours[name], min(1e-3, max(BUDGETS["grad_f32_vs_hf"], 4 * hf_err)))


# ----------------------------------------------------------------------------------------------------------------
# (c) the chunked rule's gradient over awkward shapes
# ----------------------------------------------------------------------------------------------------------------


@given(T=st.sampled_from([1, 2, 3, 5, 15, 16, 17, 40, 64, 65, 100]), C=st.sampled_from([16, 64]),
       H_k=st.sampled_from([1, 2]), r=st.sampled_from([1, 2, 3]), D=st.sampled_from([4, 8, 12]),
       gate_normalizer=st.sampled_from([1.0, 0.1, 0.02]), h0=st.booleans(), packed=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_chunked_rule_gradient_on_awkward_shapes(T, C, H_k, r, D, gate_normalizer, h0, packed, seed):
    """gate_normalizer 0.02: g ≈ −35 per step on average (e^g ≈ 1e-15, the state is forgotten at every token)."""
    if packed and T >= 3:  # three packed sequences, one of them a single token
        cu = [0, 1, T // 2, T]
        inputs = _rule_inputs(seed, 1, T, H_k, H_k * r, D, h0=h0, gate_normalizer=gate_normalizer, N=3)
    else:
        cu = None
        inputs = _rule_inputs(seed, 2, T, H_k, H_k * r, D, h0=h0, gate_normalizer=gate_normalizer)
    grads = check_op("chunk_gated_delta_rule", _rule(ogd.chunk_gated_delta_rule, C, cu),
                     _rule(rgd.recurrent_gated_delta_rule, None, cu), inputs, seed=seed, joint_only=True)
    # and the same gradients as the per-token form's autograd
    tin = {n: torch.tensor(a, dtype=F64, requires_grad=True) for n, a in inputs.items()}
    o, S = _rule(ogd.recurrent_gated_delta_rule, None, cu)(**tin)
    rng = np.random.default_rng(seed)
    probes = [torch.from_numpy(rng.standard_normal(tuple(t.shape))) for t in (o, S)]
    loss = (o * probes[0]).sum() + (S * probes[1]).sum()
    for n, g in zip(tin, torch.autograd.grad(loss, list(tin.values())), strict=True):
        assert_close(f"d/d{n} chunked vs per-token", g, grads[n], "f64_exact")


# ----------------------------------------------------------------------------------------------------------------
# the two paths agree; inference-only ops refuse
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn,C", [(ogd.chunk_gated_delta_rule, 16), (ogd.chunk_gated_delta_rule, 64),
                                  (ogd.recurrent_gated_delta_rule, None)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_differentiable_path_equals_the_inference_path(fn, C, dtype):
    x = _rule_inputs(12, 1, 90, 2, 4, 8, N=3)
    cu = torch.tensor([0, 1, 40, 90])
    t = {n: torch.tensor(a, dtype=dtype) for n, a in x.items()}
    kw = {} if C is None else {"chunk_size": C}
    with torch.no_grad():
        o_inf, s_inf = fn(t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"], initial_state=t["initial_state"],
                          cu_seqlens=cu, **kw)
    leaves = {n: a.clone().requires_grad_() for n, a in t.items()}
    o_ad, s_ad = fn(leaves["q"], leaves["k"], leaves["v"], g=leaves["g"], beta=leaves["beta"],
                    initial_state=leaves["initial_state"], cu_seqlens=cu, **kw)
    assert o_ad.requires_grad and s_ad.requires_grad and not o_inf.requires_grad
    assert o_ad.dtype == o_inf.dtype == dtype and s_ad.dtype == s_inf.dtype
    budget = "f64_exact" if dtype == F64 else 1e-6
    assert_close("o", o_inf, o_ad.detach(), budget)
    assert_close("final state", s_inf, s_ad.detach(), budget)


def test_trained_gdn_layer_equals_the_fused_inference_layer():
    """Weights that require grad run the four input projections as four products (no fused weight); the layer's
    outputs and states equal the fused inference layer's."""
    cfg = tiny_config("dense")
    w = rdn.DeltaNetWeights.random(cfg, 16)
    x = torch.from_numpy(np.random.default_rng(16).standard_normal((40, cfg.hidden_size))).float()
    fused = TorchDeltaNetWeights.from_reference(w)
    trained = TorchDeltaNetWeights(**{n: getattr(fused, n).clone().requires_grad_() for n in DN_FIELDS})
    assert fused.in_proj_all is not None and trained.in_proj_all is None
    with torch.no_grad():
        ref = gated_deltanet(x, fused, cfg, cu_seqlens=[0, 7, 40], mode="chunk", backend="torch")
    got = gated_deltanet(x, trained, cfg, cu_seqlens=[0, 7, 40], mode="chunk", backend="torch")
    for name, a, b in zip(("y", "conv state", "recurrent state"), ref, got, strict=True):
        assert_close(name, a, b.detach(), "f32")  # fp32 rounding of two summation orders
    assert got[0].requires_grad


def test_inference_calls_do_not_take_the_differentiable_path(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the differentiable path ran without autograd")

    monkeypatch.setattr(ogd, "_chunk_differentiable", refuse)
    t = {n: torch.tensor(a, dtype=torch.float32, requires_grad=True)
         for n, a in _rule_inputs(13, 1, 70, 2, 2, 8, h0=False).items()}
    with torch.no_grad():
        ogd.chunk_gated_delta_rule(t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"])
    ogd.chunk_gated_delta_rule(*(a.detach() for a in (t["q"], t["k"], t["v"])), g=t["g"].detach(),
                               beta=t["beta"].detach())
    with pytest.raises(AssertionError, match="differentiable path ran"):
        ogd.chunk_gated_delta_rule(t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"])


def test_unit_lower_inverse_paths_agree():
    A = torch.randn(6, 37, 37, dtype=F64).tril(-1) * 0.3
    with torch.no_grad():
        ref = ogd.unit_lower_inverse(A)
    Ag = A.clone().requires_grad_()
    got = ogd.unit_lower_inverse(Ag)
    assert_close("inverse", ref, got.detach(), "f64_exact")
    assert_close("(I + A) T = I", torch.eye(37, dtype=F64).expand(6, 37, 37), (torch.eye(37, dtype=F64) + A) @ ref,
                 "f64_exact")
    assert torch.autograd.gradcheck(lambda a: ogd.unit_lower_inverse(a.tril(-1)), (Ag[:2, :11, :11].detach()
                                                                                     .requires_grad_(),))


def test_in_place_decode_ops_refuse_inputs_that_require_grad():
    x = gdn_inputs(14, 2, 1, 1, 2, 4, 4)
    t = {n: torch.tensor(getattr(x, n), dtype=torch.float32, requires_grad=True) for n in ("q", "k", "v", "g", "beta")}
    pool = torch.zeros(4, 2, 4, 4)
    with pytest.raises(ValueError, match="inference-only"):
        ogd.fused_recurrent_gated_delta_rule_update(t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"],
                                                    state_pool=pool, slot_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="inference-only"):
        causal_conv1d_update(torch.randn(2, 6, requires_grad=True), torch.randn(6, 4), conv_pool=torch.zeros(3, 6, 3),
                             slot_ids=torch.tensor([0, 2]))
    with torch.no_grad():  # without autograd they run as always
        ogd.fused_recurrent_gated_delta_rule_update(t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"],
                                                    state_pool=pool, slot_ids=torch.tensor([0, 1]))


@pytest.mark.triton
def test_triton_backend_refuses_inputs_that_require_grad():
    # triton is in the test extra and tests/conftest.py sets TRITON_INTERPRET=1, so the backend must resolve here
    assert dispatch.resolve_backend("triton", "cpu") == "triton", "the Triton backend (interpreter) did not resolve"
    x = gdn_inputs(15, 1, 5, 1, 1, 4, 4, with_h0=False)
    t = {n: torch.tensor(getattr(x, n), dtype=torch.float32) for n in ("q", "k", "v", "g", "beta")}
    t["v"].requires_grad_()
    with pytest.raises(ConfigError, match="inference-only.*backend='torch'"):
        dispatch.chunk_gated_delta_rule(t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"], backend="triton")
    with pytest.raises(ConfigError, match="causal_conv1d.*inference-only"):
        dispatch.causal_conv1d(torch.randn(5, 4, requires_grad=True), torch.randn(4, 4), backend="triton")
    with torch.no_grad():  # the kernels still run for inference
        dispatch.chunk_gated_delta_rule(t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"], backend="triton")
    o, _ = dispatch.chunk_gated_delta_rule(t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"], backend="torch")
    assert o.requires_grad
