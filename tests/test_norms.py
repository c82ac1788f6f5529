"""Normalizations (reference/norms.py): zero-centred RMSNorm, gated RMSNorm, L2 norm, and the activations.

Guards pitfalls B4 (two RMSNorm conventions in one model; small-delta weights; norm before gate) and B5 (L2 norm
eps inside the sqrt, on the sum).  The outside oracle is Hugging Face's `Qwen3_5RMSNorm`, `Qwen3_5RMSNormGated` and
`l2norm` (marked `hf`).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _tolerance import assert_close
from qwen35.measure import rel_rms
from reference.norms import gated_rms_norm, l2_norm, rms_norm, sigmoid, silu, softplus

EPS = 1e-6


def _xhat(x, eps=EPS):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _bf16(a):
    """Round float32 values to bfloat16 (round to nearest even), returned as float32."""
    a = np.asarray(a, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


# ------------------------------------------------------------------ the convention table (B4)
# (site, function, weight at initialisation, what the output must be at initialisation)
CONVENTIONS = [
    ("input_layernorm / post_attention_layernorm / final norm / q_norm / k_norm: x̂·(1 + w), w init 0",
     lambda x, z, w: rms_norm(x, w, EPS), np.zeros, lambda x, z: _xhat(x)),
    ("linear_attn.norm (gated): [x̂·w]·silu(z), w init 1",
     lambda x, z, w: gated_rms_norm(x, z, w, EPS), np.ones, lambda x, z: _xhat(x) * z / (1 + np.exp(-z))),
]


@pytest.mark.parametrize("site, fn, init, expected", CONVENTIONS, ids=["zero-centred", "gated-plain"])
def test_convention_table_at_initialisation(site, fn, init, expected):
    rng = np.random.default_rng(0)
    x, z = rng.standard_normal((5, 16)), rng.standard_normal((5, 16))
    assert_close(site, expected(x, z), fn(x, z, init(16)), "f64_exact")


def test_the_two_conventions_differ_on_the_same_weight():
    """A checkpoint weight w means x̂·(1+w) in one place and x̂·w in the other: swapping them is garbage."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((4, 8)), 0.1 * rng.standard_normal(8)
    assert_close("zero-centred", _xhat(x) * (1 + w), rms_norm(x, w), "f64_exact")
    assert_close("gated (z → +∞ makes silu(z) = z)", _xhat(x) * w * 40.0,
                 gated_rms_norm(x, np.full_like(x, 40.0), w), 1e-15)
    assert rel_rms(rms_norm(x, w), _xhat(x) * w) > 0.5


@given(seed=st.integers(0, 2**31 - 1), D=st.sampled_from([1, 3, 16, 100]), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_rms_norm_formula(seed, D, scale):
    rng = np.random.default_rng(seed)
    x, w = scale * rng.standard_normal((3, 2, D)), rng.standard_normal(D)
    assert_close("rms_norm", x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + EPS) * (1 + w), rms_norm(x, w),
                 "f64_exact")


def test_small_delta_weight_survives_bf16_inputs():
    """|w| ~ 1e-3 under bf16 inputs: `1 + w` formed in fp32 keeps the delta (lmdeploy#4790; B4).

    Materialising 1 + w in bf16 (8 mantissa bits) would round w away; that wrong route must fail the same budget."""
    rng = np.random.default_rng(2)
    x = _bf16(rng.standard_normal((64, 256)))
    w = _bf16(1e-3 * rng.standard_normal(256))
    ref = rms_norm(x, w)  # float64 on the same bf16-valued inputs
    got = rms_norm(x, w, dtype=np.float32)
    assert got.dtype == np.float32
    assert_close("rms_norm fp32 vs fp64", ref, got, "f32")
    wrong = _xhat(x.astype(np.float64)) * _bf16(1.0 + w)  # (1 + w) rounded to bf16 first
    assert rel_rms(ref, wrong) > 10 * rel_rms(ref, got)
    # The weight's effect is visible: w = 0 differs from w by ~|w|.
    assert rel_rms(ref, rms_norm(x, np.zeros(256))) > 1e-4


# ------------------------------------------------------------------ gated norm: normalise before the gate (B4)
def test_gated_norm_normalises_before_gating():
    rng = np.random.default_rng(3)
    x, z, w = rng.standard_normal((6, 12)), 3 * rng.standard_normal((6, 12)), 1 + 0.2 * rng.standard_normal(12)
    y = gated_rms_norm(x, z, w)
    assert_close("gated", _xhat(x) * w * silu(z), y, "f64_exact")
    # Invariant to the scale of x (it is normalised), not to the scale of z (the gate comes after the norm).
    assert_close("scale of x (eps = 0)", gated_rms_norm(x, z, w, 0.0), gated_rms_norm(17.0 * x, z, w, 0.0), 1e-14)
    assert rel_rms(y, gated_rms_norm(x, 2.0 * z, w)) > 0.1
    gate_then_norm = _xhat(x * silu(z)) * w  # the wrong order cancels the gate's magnitude
    assert rel_rms(y, gate_then_norm) > 0.1


def test_gated_norm_is_per_row():
    """Applied per value head: each row of D_v values is normalised on its own."""
    rng = np.random.default_rng(4)
    x, z, w = rng.standard_normal((3, 4, 8)), rng.standard_normal((3, 4, 8)), rng.standard_normal(8)
    y = gated_rms_norm(x, z, w)
    x2 = x.copy()
    x2[1, 2] *= 1e4  # one head much larger
    y2 = gated_rms_norm(x2, z, w)
    mask = np.ones((3, 4), bool)
    mask[1, 2] = False
    np.testing.assert_array_equal(y[mask], y2[mask])
    assert_close("scaled row", y[1, 2], y2[1, 2], 1e-5)  # equal up to the eps = 1e-6 in the denominator


# ------------------------------------------------------------------ L2 norm (B5)
@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 1e-8, 1e-4, 1.0, 1e6])
@pytest.mark.parametrize("D", [1, 60, 128])
def test_l2_norm_eps_inside_sqrt_on_the_sum(magnitude, D):
    x = magnitude * np.random.default_rng(D).standard_normal((4, D))
    y = l2_norm(x)
    assert np.all(np.isfinite(y))
    assert_close("l2_norm", x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6), y, "f64_exact", atol=0.0)
    ss = np.sum(x * x, -1)
    if magnitude > 0:  # ‖x̂‖ = sqrt(Σx² / (Σx² + eps)): ≈ 1 far above eps, ≈ ‖x‖/sqrt(eps) far below
        assert_close("norm", np.sqrt(ss / (ss + 1e-6)), np.linalg.norm(y, axis=-1), 1e-12, atol=0.0)


def test_l2_norm_is_not_rmsnorm_or_f_normalize():
    """At |x| ~ 1e-4 and D = 128 the three conventions disagree by tens of percent (mlx-lm#1624)."""
    x = 1e-4 * np.random.default_rng(0).standard_normal((2, 128))
    y = l2_norm(x)
    as_rmsnorm = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) / np.sqrt(128)  # eps on the mean
    f_normalize = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    assert rel_rms(y, as_rmsnorm) > 0.1
    assert rel_rms(y, f_normalize) > 0.1
    np.testing.assert_array_equal(l2_norm(np.zeros((2, 5))), np.zeros((2, 5)))


# ------------------------------------------------------------------ activations
def test_activations_are_stable_at_extremes():
    x = np.array([-1e4, -750.0, -40.0, -1.0, 0.0, 1.0, 40.0, 750.0, 1e4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings either
        s, sp, si = sigmoid(x), softplus(x), silu(x)
    assert np.all(np.isfinite(s)) and np.all(np.isfinite(sp)) and np.all(np.isfinite(si))
    mid = slice(2, 7)
    assert_close("sigmoid", 1 / (1 + np.exp(-x[mid])), s[mid], "f64_exact")
    assert_close("softplus", np.log1p(np.exp(x[mid])), sp[mid], "f64_exact")
    assert s[0] == 0.0 and s[-1] == 1.0 and sp[-1] == x[-1] and sp[0] == 0.0
    assert_close("sigmoid(-40)", np.exp(-40.0) / (1 + np.exp(-40.0)), s[2], 1e-14)


def test_float32_mirror_dtypes():
    rng = np.random.default_rng(6)
    x, z, w = rng.standard_normal((3, 32)), rng.standard_normal((3, 32)), rng.standard_normal(32)
    for f64, f32 in [(rms_norm(x, w), rms_norm(x, w, dtype=np.float32)),
                     (gated_rms_norm(x, z, w), gated_rms_norm(x, z, w, dtype=np.float32)),
                     (l2_norm(x), l2_norm(x, dtype=np.float32))]:
        assert f32.dtype == np.float32
        assert_close("fp32 mirror", f64, f32, "f32")


def test_validation_errors():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(np.zeros((2, 4)), np.zeros(5))
    with pytest.raises(ValueError, match="z must"):
        gated_rms_norm(np.zeros((2, 4)), np.zeros((2, 5)), np.ones(4))
    with pytest.raises(ValueError, match="weight"):
        gated_rms_norm(np.zeros((2, 4)), np.zeros((2, 4)), np.ones((4, 1)))


# ------------------------------------------------------------------ outside oracle: Hugging Face modules
@pytest.mark.hf
def test_matches_hugging_face_norm_modules():
    torch = pytest.importorskip("torch")
    m = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    rng = np.random.default_rng(7)
    x, z = rng.standard_normal((2, 5, 64)), rng.standard_normal((2, 5, 64))
    w0, w1 = 0.3 * rng.standard_normal(64), 1 + 0.3 * rng.standard_normal(64)
    def t(a):
        return torch.tensor(a, dtype=torch.float32)
    with torch.no_grad():
        norm = m.Qwen3_5RMSNorm(64, eps=1e-6)
        norm.weight.copy_(t(w0))
        assert_close("rms_norm vs Qwen3_5RMSNorm", rms_norm(x, w0), norm(t(x)), "f32")
        gated = m.Qwen3_5RMSNormGated(64, eps=1e-6)
        gated.weight.copy_(t(w1))
        assert_close("gated_rms_norm vs Qwen3_5RMSNormGated", gated_rms_norm(x, z, w1), gated(t(x), t(z)), "f32")
        xs = 1e-4 * x
        assert_close("l2_norm vs l2norm", l2_norm(xs), m.l2norm(t(xs), dim=-1, eps=1e-6), "f32")
