"""Semantics of the gated delta rule (reference/gated_delta.py): chunked == recurrent, special cases, q/k norm.

Guards pitfalls B1 (order of decay and delta; chunked vs sequential), B5 (L2-norm eps), B6 (g ≡ 0, g ≪ 0, β ∈ {0,1}),
B15 (tail chunk final state).  The outside oracle is Hugging Face's torch rules (marked `hf`).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _tolerance import assert_close
from qwen35.measure import gdn_inputs, rel_rms
from reference.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule

RULES = {"recurrent": recurrent_gated_delta_rule, "chunk": chunk_gated_delta_rule}


def _run(rule, x, g=None, beta=None, **kw):
    return rule(x.q, x.k, x.v, g=x.g if g is None else g, beta=x.beta if beta is None else beta,
                initial_state=x.h0, **kw)


# ------------------------------------------------------------------ chunked == recurrent (B1, B6, B15)
@given(
    seed=st.integers(0, 2**31 - 1),
    T=st.sampled_from([1, 2, 3, 63, 64, 65, 200]),
    chunk=st.sampled_from([16, 32, 64]),
    H_k=st.sampled_from([1, 2]),
    r=st.sampled_from([1, 2, 3]),
    D_k=st.sampled_from([3, 5, 8, 12]),
    D_v=st.sampled_from([4, 7, 10]),
    B=st.sampled_from([1, 2]),
    decay=st.sampled_from(["random", "zero", "strong"]),
    beta_mode=st.sampled_from(["random", "zero", "one"]),
    with_h0=st.booleans(),
)
def test_chunked_equals_recurrent(seed, T, chunk, H_k, r, D_k, D_v, B, decay, beta_mode, with_h0):
    x = gdn_inputs(seed, B, T, H_k, H_k * r, D_k, D_v, gate_normalizer=0.5, beta_mode=beta_mode, with_h0=with_h0)
    g = {"random": x.g, "zero": np.zeros_like(x.g), "strong": np.full_like(x.g, -20.0)}[decay]
    o_r, s_r = _run(recurrent_gated_delta_rule, x, g=g)
    o_c, s_c = _run(chunk_gated_delta_rule, x, g=g, chunk_size=chunk)
    assert np.all(np.isfinite(o_r)) and np.all(np.isfinite(s_r))
    assert_close("o", o_r, o_c, "f64_exact")
    assert_close("final_state", s_r, s_c, "f64_exact")


@pytest.mark.parametrize("decay", ["random", "zero", "strong"])
@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 2, 3, 63, 64, 65, 200])
def test_chunked_equals_recurrent_table(T, chunk, decay):
    """The explicit corner table (every T × chunk × decay regime), H_v = 2·H_k, D not a power of two, h0 ≠ 0."""
    x = gdn_inputs(T * 7 + chunk, 1, T, 2, 4, 5, 7, gate_normalizer=0.5)
    g = {"random": x.g, "zero": np.zeros_like(x.g), "strong": np.full_like(x.g, -20.0)}[decay]
    beta = np.where(np.arange(T)[None, :, None] % 3 == 0, 1.0, np.where(np.arange(T)[None, :, None] % 3 == 1,
                                                                         0.0, x.beta))  # β ∈ {1, 0, random}
    o_r, s_r = _run(recurrent_gated_delta_rule, x, g=g, beta=beta)
    o_c, s_c = _run(chunk_gated_delta_rule, x, g=g, beta=beta, chunk_size=chunk)
    assert_close("o", o_r, o_c, "f64_exact")
    assert_close("final_state", s_r, s_c, "f64_exact")


@pytest.mark.parametrize("chunk", [1, 7, 16, 100, 1000])
def test_chunked_any_chunk_size(chunk):
    """Chunk sizes that are not powers of two, 1, and larger than T (a single short chunk)."""
    x = gdn_inputs(3, 1, 130, 2, 4, 6, 5)
    o_r, s_r = _run(recurrent_gated_delta_rule, x)
    o_c, s_c = _run(chunk_gated_delta_rule, x, chunk_size=chunk)
    assert_close("o", o_r, o_c, "f64_exact")
    assert_close("final_state", s_r, s_c, "f64_exact")


def test_chunked_long_no_decay_full_write_stays_finite_and_exact():
    """g ≡ 0 and β ≡ 1 over many chunks: the regime where fla's chunked kernel lost accuracy (fla#104, #389; B6)."""
    x = gdn_inputs(5, 1, 300, 1, 2, 4, 4, beta_mode="one", mask_p=0.0)
    g = np.zeros_like(x.g)
    o_r, s_r = _run(recurrent_gated_delta_rule, x, g=g)
    o_c, s_c = _run(chunk_gated_delta_rule, x, g=g, chunk_size=64)
    assert_close("o", o_r, o_c, "f64_exact")
    assert_close("final_state", s_r, s_c, "f64_exact")


def test_tail_chunk_final_state_uses_last_real_token():
    """T % C != 0 with strong decay: the final state must decay by the real tokens only (cuLA#38; B15)."""
    x = gdn_inputs(11, 1, 70, 1, 1, 4, 3, gate_normalizer=0.05)
    o_r, s_r = _run(recurrent_gated_delta_rule, x)
    _, s_c = _run(chunk_gated_delta_rule, x, chunk_size=64)
    assert np.max(np.abs(s_c)) < 1e3
    assert_close("final_state", s_r, s_c, "f64_exact")


# ------------------------------------------------------------------ special cases (B1)
def _plain_deltanet(q, k, v, beta, S0, scale):
    """An independent plain DeltaNet (no decay): S ← S + β k̂ (v − Sᵀk̂)ᵀ, o = Sᵀ q̃, one head at a time."""
    B, T, H_k, D_k = q.shape
    H_v = v.shape[2]
    r = H_v // H_k
    o = np.zeros(v.shape)
    S_out = np.zeros(S0.shape)
    for b in range(B):
        for h in range(H_v):
            S = S0[b, h].copy()
            for t in range(T):
                kk = k[b, t, h // r] / np.sqrt(np.dot(k[b, t, h // r], k[b, t, h // r]) + 1e-6)
                qq = q[b, t, h // r] / np.sqrt(np.dot(q[b, t, h // r], q[b, t, h // r]) + 1e-6) * scale
                err = v[b, t, h] - S.T.dot(kk)
                S = S + beta[b, t, h] * np.outer(kk, err)
                o[b, t, h] = S.T.dot(qq)
            S_out[b, h] = S
    return o, S_out


@pytest.mark.parametrize("name", ["recurrent", "chunk"])
@given(seed=st.integers(0, 2**31 - 1), T=st.sampled_from([1, 5, 40]), r=st.sampled_from([1, 2]))
def test_alpha_one_is_plain_deltanet(name, seed, T, r):
    x = gdn_inputs(seed, 2, T, 2, 2 * r, 5, 3)
    o, S = _run(RULES[name], x, g=np.zeros_like(x.g), **({"chunk_size": 16} if name == "chunk" else {}))
    o_ref, S_ref = _plain_deltanet(x.q, x.k, x.v, x.beta, x.h0, 5 ** -0.5)
    assert_close("o", o_ref, o, "f64_exact")
    assert_close("final_state", S_ref, S, "f64_exact")


@pytest.mark.parametrize("name", ["recurrent", "chunk"])
def test_beta_zero_is_pure_decay(name):
    """β ≡ 0: nothing is written; S_t = exp(Σ_{τ≤t} g_τ) S0 and o_t = S_tᵀ q̃_t."""
    x = gdn_inputs(7, 2, 50, 2, 4, 6, 5, beta_mode="zero", gate_normalizer=4.0)
    o, S = _run(RULES[name], x, **({"chunk_size": 16} if name == "chunk" else {}))
    qn = x.q / np.sqrt(np.sum(x.q ** 2, -1, keepdims=True) + 1e-6) * 6 ** -0.5  # [B, T, H_k, D_k]
    qn = np.repeat(qn, 2, axis=2)  # [B, T, H_v, D_k]
    G = np.cumsum(x.g, axis=1)  # [B, T, H_v]
    o_ref = np.exp(G)[..., None] * np.einsum("bthk,bhkv->bthv", qn, x.h0)
    S_ref = np.exp(G[:, -1])[:, :, None, None] * x.h0
    assert_close("o", o_ref, o, "f64_exact")
    assert_close("final_state", S_ref, S, "f64_exact")


def test_decay_applies_before_delta_correction():
    """One token, S0 ≠ 0, α = 0.5, β = 1: u = v − (α S0)ᵀk̂, not v − S0ᵀk̂ (fla#885; B1)."""
    rng = np.random.default_rng(0)
    D = 4
    k = np.zeros((1, 1, 1, D))
    k[..., 0] = 1.0  # k̂ ≈ e_0
    q = k.copy()
    v = rng.standard_normal((1, 1, 1, 3))
    S0 = rng.standard_normal((1, 1, D, 3))
    g = np.full((1, 1, 1), np.log(0.5))
    _, S = recurrent_gated_delta_rule(q, k, v, g=g, beta=np.ones((1, 1, 1)), initial_state=S0)
    kh = k[0, 0, 0] / np.sqrt(1.0 + 1e-6)
    Sd = 0.5 * S0[0, 0]
    S_ref = Sd + np.outer(kh, v[0, 0, 0] - Sd.T @ kh)
    assert_close("final_state", S_ref, S[0, 0], "f64_exact")
    S_wrong = 0.5 * (S0[0, 0] + np.outer(kh, v[0, 0, 0] - S0[0, 0].T @ kh))  # delta first, then decay
    assert rel_rms(S_ref, S_wrong) > 1e-3  # the two orders are distinguishable on this input


# ------------------------------------------------------------------ q/k L2 norm (B5)
@pytest.mark.parametrize("name", ["recurrent", "chunk"])
@pytest.mark.parametrize("magnitude", [0.0, 1e-12, 1e-6, 1e-4])
def test_tiny_and_zero_qk_stay_finite_and_follow_the_formula(name, magnitude):
    x = gdn_inputs(2, 1, 20, 1, 2, 8, 4)
    q, k = x.q * magnitude, x.k * magnitude
    o, S = RULES[name](q, k, x.v, g=x.g, beta=x.beta, initial_state=x.h0)
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(S))
    # The same rule with the normalisation done outside, by the formula x · (Σx² + 1e-6)^(-1/2).
    qn = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
    kn = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
    o2, S2 = recurrent_gated_delta_rule(qn, kn, x.v, g=x.g, beta=x.beta, initial_state=x.h0, use_qk_l2norm=False)
    assert_close("o", o2, o, "f64_exact")
    assert_close("final_state", S2, S, "f64_exact")
    if magnitude == 0.0:  # k̂ = 0 writes nothing and q̃ = 0 reads nothing
        assert np.all(o == 0.0)
        assert_close("final_state", np.exp(np.sum(x.g, 1))[:, :, None, None] * x.h0, S, "f64_exact")


def test_l2norm_off_and_explicit_scale():
    x = gdn_inputs(4, 1, 9, 1, 1, 5, 5)
    o1, _ = recurrent_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, use_qk_l2norm=False, scale=1.0)
    o2, _ = recurrent_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, use_qk_l2norm=False, scale=0.5)
    assert_close("o", 0.5 * o1, o2, "f64_exact")  # o is linear in q̃ = q · scale
    o3, _ = chunk_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, use_qk_l2norm=False, scale=0.5,
                                   chunk_size=4)
    assert_close("o", o2, o3, "f64_exact")


# ------------------------------------------------------------------ grouped value heads
@pytest.mark.parametrize("name", ["recurrent", "chunk"])
def test_value_head_reads_key_head_h_div_r(name):
    """H_v = 3·H_k: value head h uses key head h // 3 (repeat_interleave), not h % H_k (tile)."""
    x = gdn_inputs(8, 1, 12, 2, 6, 4, 3)
    o, S = RULES[name](x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.h0)
    def rep(a):  # [B, T, H_v, D_k], head h ← key head h // 3
        return np.repeat(a, 3, axis=2)
    o_ref, S_ref = RULES[name](rep(x.q), rep(x.k), x.v, g=x.g, beta=x.beta, initial_state=x.h0)
    assert_close("o", o_ref, o, "f64_exact")
    assert_close("final_state", S_ref, S, "f64_exact")
    def tile(a):  # the wrong (h % H_k) mapping
        return np.tile(a, (1, 1, 3, 1))
    o_wrong, _ = RULES[name](tile(x.q), tile(x.k), x.v, g=x.g, beta=x.beta, initial_state=x.h0)
    assert rel_rms(o_ref, o_wrong) > 1e-2


# ------------------------------------------------------------------ dtype and validation
@pytest.mark.parametrize("name", ["recurrent", "chunk"])
def test_float32_mirror_close_to_float64(name):
    x = gdn_inputs(9, 2, 70, 2, 4, 16, 16)
    o64, s64 = _run(RULES[name], x)
    o32, s32 = _run(RULES[name], x, dtype=np.float32)
    assert o32.dtype == np.float32 and s32.dtype == np.float32
    assert_close("o", o64, o32, "f32")
    assert_close("final_state", s64, s32, "f32")


def test_output_final_state_false_returns_none():
    x = gdn_inputs(1, 1, 5, 1, 1, 3, 3)
    for rule in RULES.values():
        o, S = rule(x.q, x.k, x.v, g=x.g, beta=x.beta, output_final_state=False)
        assert S is None and o.shape == x.v.shape


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(k=d["k"][:, :, :, :-1]), "k must"),
        (lambda d: d.update(v=d["v"][:, :-1]), "v must"),
        (lambda d: d.update(v=d["v"][:, :, :3]), "multiple of key heads"),
        (lambda d: d.update(g=d["g"][..., :-1]), "g must"),
        (lambda d: d.update(beta=d["beta"][:, :-1]), "beta must"),
        (lambda d: d.update(initial_state=np.zeros((2, 4, 5, 3))), "initial_state must"),
        (lambda d: d.update(cu_seqlens=np.array([0, 3, 7])), "batch must be 1"),
    ],
)
def test_validation_errors_name_the_tensor(change, message):
    x = gdn_inputs(0, 2, 6, 2, 4, 3, 5)
    args = dict(q=x.q, k=x.k, v=x.v, g=x.g, beta=x.beta, initial_state=None, cu_seqlens=None)
    change(args)
    for rule in RULES.values():
        with pytest.raises(ValueError, match=message):
            rule(args["q"], args["k"], args["v"], g=args["g"], beta=args["beta"],
                 initial_state=args["initial_state"], cu_seqlens=args["cu_seqlens"])


def test_cu_seqlens_validation():
    x = gdn_inputs(0, 1, 6, 1, 1, 3, 3)
    for bad in ([0, 7], [1, 6], [0, 4, 2, 6], [[0, 6]]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            recurrent_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, cu_seqlens=np.array(bad))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, chunk_size=0)


# ------------------------------------------------------------------ outside oracle: Hugging Face's torch rules
def _hf():
    torch = pytest.importorskip("torch")
    m = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    return torch, m


@pytest.mark.hf
@pytest.mark.parametrize("hf_name", ["torch_recurrent_gated_delta_rule", "torch_chunk_gated_delta_rule"])
@pytest.mark.parametrize("T", [1, 65, 130])
def test_matches_hugging_face_torch_rule(hf_name, T):
    """HF's fp32 torch rule vs our float64 rule: equal within fp32 rounding (budget `f32`)."""
    torch, m = _hf()
    x = gdn_inputs(T, 2, T, 2, 4, 16, 12)
    def t(a):
        return torch.tensor(a, dtype=torch.float32)
    o_hf, s_hf = getattr(m, hf_name)(t(x.q), t(x.k), t(x.v), g=t(x.g), beta=t(x.beta), initial_state=t(x.h0),
                                     output_final_state=True, use_qk_l2norm_in_kernel=True)
    for rule in RULES.values():
        o, s = _run(rule, x)
        assert_close(f"o vs HF {hf_name}", o, o_hf, "f32")
        assert_close(f"final_state vs HF {hf_name}", s, s_hf, "f32")


@pytest.mark.parametrize("T", [600, 1000])
def test_chunked_equals_recurrent_at_model_dims(T):
    """Checkpoint head dims (D_k = D_v = 128, r = 3) over many chunks, strong and weak decay mixed."""
    x = gdn_inputs(T, 1, T, 1, 3, 128, 128, gate_normalizer=0.2, mask_p=0.3)
    o_r, s_r = _run(recurrent_gated_delta_rule, x)
    o_c, s_c = _run(chunk_gated_delta_rule, x, chunk_size=64)
    assert_close("o", o_r, o_c, "f64_exact")
    assert_close("final_state", s_r, s_c, "f64_exact")
