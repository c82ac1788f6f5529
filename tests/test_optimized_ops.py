"""Equivalence of every optimized torch op with its reference (NumPy, float64) twin, plus in-place / poison checks.

Budgets (tests/_tolerance.py): float32 ≤ 1e-5 relative RMS; bf16 inputs with an fp32 state ≤ 1e-2.  Shapes include
the awkward ones (T ∈ {1, 2, 3, 63, 64, 65, …}, D not a power of two, H_v > H_k, varlen N ≥ 3 with a length-1
sequence).  pitfall B9 (padding slot / other slots untouched), B13 (varlen), B14 (conv state), B15 (tail chunk,
NaN-poisoned scratch).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.backend as backend
import optimized.gated_delta as ogd
import reference.attention as ratt
import reference.conv as rconv
import reference.deltanet as rdn
import reference.gated_delta as rgd
import reference.mlp as rmlp
import reference.norms as rnorms
import reference.rope as rrope
from _factory import random_cu_seqlens
from _tolerance import BUDGETS, assert_close
from optimized import attention as oatt
from optimized import conv as oconv
from optimized import deltanet as odn
from optimized import mlp as omlp
from optimized import norms as onorms
from optimized import rope as orope
from qwen35.measure import gdn_inputs, rel_rms
from reference.config import Qwen35Config

torch.set_num_threads(1)
F32, BF16 = torch.float32, torch.bfloat16


def T(a, dtype=F32):
    return torch.tensor(np.asarray(a), dtype=dtype)


def bf16_round(a) -> np.ndarray:
    """The float64 values a bf16 tensor really holds (so the oracle sees the same inputs)."""
    return T(a, BF16).double().numpy()


def _rule_inputs(x, dtype):
    args = [T(a, dtype) for a in (x.q, x.k, x.v)]
    kw = dict(g=T(x.g), beta=T(x.beta), initial_state=None if x.h0 is None else T(x.h0))
    return args, kw


T_CASES = st.sampled_from([1, 2, 3, 5, 15, 16, 17, 63, 64, 65, 100, 130])
GEOM = st.sampled_from([(1, 1, 8, 8), (1, 2, 16, 12), (2, 4, 12, 20), (2, 2, 60, 36), (1, 3, 32, 16)])


# ----------------------------------------------------------------------------------------------------------------
# gated delta rule
# ----------------------------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), B=st.integers(1, 2), T_=T_CASES, geom=GEOM, chunk=st.sampled_from([16, 64]),
       with_h0=st.booleans(), norm=st.sampled_from([0.1, 1.0, 10.0]))
def test_chunk_and_recurrent_match_reference_fp32(seed, B, T_, geom, chunk, with_h0, norm):
    H_k, r, D_k, D_v = geom
    x = gdn_inputs(seed, B, T_, H_k, H_k * r, D_k, D_v, with_h0=with_h0, gate_normalizer=norm)
    ro, rs = rgd.recurrent_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.h0)
    args, kw = _rule_inputs(x, F32)
    o, s = ogd.chunk_gated_delta_rule(*args, **kw, chunk_size=chunk)
    assert o.dtype == F32 and s.dtype == F32
    assert_close("chunk o", ro, o, "f32")
    assert_close("chunk final_state", rs, s, "f32")
    o, s = ogd.recurrent_gated_delta_rule(*args, **kw)
    assert_close("recurrent o", ro, o, "f32")
    assert_close("recurrent final_state", rs, s, "f32")


@given(seed=st.integers(0, 2**16), lengths=st.lists(st.sampled_from([1, 2, 3, 17, 64, 65, 70]), min_size=3,
                                                    max_size=5), geom=GEOM)
def test_varlen_matches_reference(seed, lengths, geom):
    """Packed sequences never see each other (B13); N states, not B (B15)."""
    lengths = list(lengths)
    lengths[seed % len(lengths)] = 1  # always one length-1 sequence
    H_k, r, D_k, D_v = geom
    cu = random_cu_seqlens(seed, lengths)
    x = gdn_inputs(seed, 1, int(cu[-1]), H_k, H_k * r, D_k, D_v, N=len(lengths))
    ro, rs = rgd.recurrent_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.h0, cu_seqlens=cu)
    args, kw = _rule_inputs(x, F32)
    for fn, extra in ((ogd.chunk_gated_delta_rule, {"chunk_size": 16}), (ogd.recurrent_gated_delta_rule, {})):
        o, s = fn(*args, **kw, cu_seqlens=torch.tensor(cu), **extra)
        assert_close(f"{fn.__name__} varlen o", ro, o, "f32")
        assert_close(f"{fn.__name__} varlen state", rs, s, "f32")


@given(seed=st.integers(0, 2**16), T_=T_CASES, geom=GEOM)
def test_bf16_inputs_fp32_state(seed, T_, geom):
    H_k, r, D_k, D_v = geom
    x = gdn_inputs(seed, 1, T_, H_k, H_k * r, D_k, D_v)
    qr, kr, vr = bf16_round(x.q), bf16_round(x.k), bf16_round(x.v)
    ro, rs = rgd.recurrent_gated_delta_rule(qr, kr, vr, g=x.g, beta=x.beta, initial_state=x.h0)
    args = [T(a, BF16) for a in (x.q, x.k, x.v)]
    for fn in (ogd.chunk_gated_delta_rule, ogd.recurrent_gated_delta_rule):
        o, s = fn(*args, g=T(x.g), beta=T(x.beta), initial_state=T(x.h0))
        assert o.dtype == BF16 and s.dtype == F32  # state stays fp32 (pitfall B8)
        assert_close(f"{fn.__name__} bf16 o", ro, o, "bf16")
        assert_close(f"{fn.__name__} bf16 state", rs, s, "bf16")


def test_no_final_state_and_options():
    x = gdn_inputs(3, 1, 20, 2, 4, 16, 8)
    args, kw = _rule_inputs(x, F32)
    o, s = ogd.chunk_gated_delta_rule(*args, **kw, output_final_state=False, use_qk_l2norm=False, scale=0.3)
    assert s is None
    ro, _ = rgd.recurrent_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.h0,
                                           use_qk_l2norm=False, scale=0.3)
    assert_close("chunk no-l2 o", ro, o, 1e-4)  # un-normalised k: |A| up to ~D, fp32 solve error grows with it


def test_extreme_gates_finite():
    """g ≪ 0 (−20) and g ≡ 0, β ∈ {0, 1}: no overflow in e^{G_i − G_j} (pitfall B6)."""
    x = gdn_inputs(5, 1, 130, 2, 2, 16, 16, beta_mode="one")
    g = np.where(np.arange(130)[None, :, None] % 2 == 0, -20.0, 0.0) * np.ones_like(x.g)
    ro, rs = rgd.recurrent_gated_delta_rule(x.q, x.k, x.v, g=g, beta=x.beta, initial_state=x.h0)
    args, kw = _rule_inputs(x, F32)
    kw["g"] = T(g)
    o, s = ogd.chunk_gated_delta_rule(*args, **kw)
    assert_close("extreme o", ro, o, "f32")
    assert_close("extreme state", rs, s, "f32")


@pytest.fixture
def poison(monkeypatch):
    """Every uninitialised scratch buffer of optimized.gated_delta is NaN-filled (fla conftest trick, B15)."""
    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(ogd, "_empty", nan_empty)


@pytest.mark.parametrize("lengths", [[65], [1, 3, 64, 70], [2, 129, 5]])
def test_nan_poisoned_scratch(poison, lengths):
    cu = random_cu_seqlens(0, lengths)
    x = gdn_inputs(1, 1, int(cu[-1]), 2, 4, 12, 20, N=len(lengths))
    ro, rs = rgd.recurrent_gated_delta_rule(x.q, x.k, x.v, g=x.g, beta=x.beta, initial_state=x.h0, cu_seqlens=cu)
    args, kw = _rule_inputs(x, F32)
    for fn in (ogd.chunk_gated_delta_rule, ogd.recurrent_gated_delta_rule):
        o, s = fn(*args, **kw, cu_seqlens=cu)
        assert_close("poisoned o", ro, o, "f32")
        assert_close("poisoned state", rs, s, "f32")


def test_unit_lower_inverse_any_size():
    for C in (1, 5, 16, 17, 33, 64, 100):
        A = torch.tril(torch.randn(3, C, C, dtype=torch.float64) * 0.3, -1)
        Tinv = ogd.unit_lower_inverse(A)
        eye = torch.eye(C, dtype=torch.float64)
        assert torch.allclose(Tinv @ (eye + A), eye.expand(3, C, C), atol=1e-10), C
        garbage = A + torch.triu(torch.randn(3, C, C, dtype=torch.float64))  # diagonal and upper part: never read
        assert torch.equal(ogd.unit_lower_inverse(garbage), Tinv), C


# ----------------------------------------------------------------------------------------------------------------
# fused in-place decode update
# ----------------------------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), geom=GEOM, slots=st.sampled_from([[0], [3, 4, 5], [5, -1, 2, 3], [1, 0, -1],
                                                                     [-1, -1], [6, 7, 0, 2, 1]]),
       dtype=st.sampled_from([F32, BF16]))
def test_fused_update_in_place(seed, geom, slots, dtype):
    H_k, r, D_k, D_v = geom
    H_v, S, Bt = H_k * r, 8, len(slots)
    x = gdn_inputs(seed, Bt, 1, H_k, H_v, D_k, D_v, N=S)
    pool = T(x.h0).contiguous()  # [S, H_v, D_k, D_v] fp32
    before = pool.clone()
    slot_ids = torch.tensor(slots)
    q, k, v = (T(a, dtype) for a in (x.q, x.k, x.v))
    o = ogd.fused_recurrent_gated_delta_rule_update(q, k, v, g=T(x.g), beta=T(x.beta), state_pool=pool,
                                                    slot_ids=slot_ids)
    assert o.shape == (Bt, 1, H_v, D_v) and o.dtype == dtype
    budget = "f32" if dtype == F32 else "bf16"
    qn, kn, vn = (bf16_round(a) if dtype == BF16 else a for a in (x.q, x.k, x.v))
    for b, s in enumerate(slots):
        if s < 0:
            assert torch.all(o[b] == 0), "padding row must output zeros"
            continue
        ro, rs = rgd.recurrent_gated_delta_rule(qn[b:b + 1], kn[b:b + 1], vn[b:b + 1], g=x.g[b:b + 1],
                                                beta=x.beta[b:b + 1], initial_state=x.h0[s:s + 1])
        assert_close("update o", ro, o[b:b + 1], budget)
        assert_close("update state", rs, pool[s:s + 1], budget)
    untouched = [s for s in range(S) if s not in slots]
    assert torch.equal(pool[untouched], before[untouched]), "slots not in the batch must stay bit-identical (B9)"


def test_fused_update_rejects_bad_slots():
    x = gdn_inputs(0, 2, 1, 1, 1, 8, 8, N=4)
    pool = T(x.h0)
    args = [T(a) for a in (x.q, x.k, x.v)]
    for bad in ([0, 0], [4, 1], [-2, 1]):
        with pytest.raises(ValueError):
            ogd.fused_recurrent_gated_delta_rule_update(*args, g=T(x.g), beta=T(x.beta), state_pool=pool,
                                                        slot_ids=torch.tensor(bad))


# ----------------------------------------------------------------------------------------------------------------
# causal conv1d
# ----------------------------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       C=st.sampled_from([3, 8, 20]), K=st.sampled_from([1, 2, 4]), with_state=st.booleans(),
       packed=st.booleans())
def test_causal_conv1d_matches_reference(seed, lengths, C, K, with_state, packed):
    rng = np.random.default_rng(seed)
    N = len(lengths)
    x = rng.standard_normal((sum(lengths), C))
    w = rng.standard_normal((C, K))
    st0 = rng.standard_normal((N, C, K - 1)) if with_state else None
    cu = random_cu_seqlens(seed, lengths)
    if packed or len(set(lengths)) > 1:
        ry, rs = rconv.causal_conv1d(x, w, conv_state=st0, cu_seqlens=cu)
        y, s = oconv.causal_conv1d(T(x), T(w), conv_state=None if st0 is None else T(st0), cu_seqlens=cu)
    else:  # [B, T, C] form
        xb = x.reshape(N, lengths[0], C)
        ry, rs = rconv.causal_conv1d(xb, w, conv_state=st0)
        y, s = oconv.causal_conv1d(T(xb), T(w)[:, None, :], conv_state=None if st0 is None else T(st0))
    assert_close("conv y", ry, y, "f32")
    if K > 1:
        assert_close("conv state", rs, s, "f32")
    assert s.shape == (N, C, K - 1)


@given(seed=st.integers(0, 2**16), slots=st.sampled_from([[0], [2, 3], [3, -1, 0], [-1]]),
       K=st.sampled_from([2, 4]))
def test_causal_conv1d_update_in_place(seed, slots, K):
    rng = np.random.default_rng(seed)
    S, C, Bt = 5, 12, len(slots)
    pool_np = rng.standard_normal((S, C, K - 1))
    x = rng.standard_normal((Bt, C))
    w = rng.standard_normal((C, K))
    pool = T(pool_np).contiguous()
    before = pool.clone()
    y = oconv.causal_conv1d_update(T(x), T(w), conv_pool=pool, slot_ids=torch.tensor(slots))
    for b, s in enumerate(slots):
        if s < 0:
            assert torch.all(y[b] == 0)
            continue
        ry, rs = rconv.causal_conv1d_update(x[b:b + 1], w, conv_state=pool_np[s:s + 1])
        assert_close("conv update y", ry, y[b:b + 1], "f32")
        assert_close("conv update state", rs, pool[s:s + 1], "f32")
    untouched = [s for s in range(S) if s not in slots]
    assert torch.equal(pool[untouched], before[untouched])


# ----------------------------------------------------------------------------------------------------------------
# norms, rope, attention, mlp, moe, layer
# ----------------------------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), D=st.sampled_from([8, 100, 128]))
def test_norms_match_reference(seed, D):
    rng = np.random.default_rng(seed)
    x, z = rng.standard_normal((2, 7, D)), rng.standard_normal((2, 7, D))
    w = rng.standard_normal(D) * 0.1
    assert_close("rms_norm", rnorms.rms_norm(x, w), onorms.rms_norm(T(x), T(w)), "f32")
    assert_close("gated_rms_norm", rnorms.gated_rms_norm(x, z, 1 + w), onorms.gated_rms_norm(T(x), T(z), T(1 + w)),
                 "f32")
    assert_close("l2_norm", rnorms.l2_norm(x * 1e-4), onorms.l2_norm(T(x * 1e-4)), "f32")
    # bf16 activations, small-delta zero-centred weight (pitfall B4)
    xb = bf16_round(x)
    assert_close("rms_norm bf16", rnorms.rms_norm(xb, w * 1e-2), onorms.rms_norm(T(x, BF16), T(w * 1e-2)), "bf16")


@given(seed=st.integers(0, 2**16), Tn=st.integers(1, 9))
def test_mrope_matches_reference(seed, Tn):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 300000, size=(3, Tn))  # discriminating t ≠ h ≠ w, large positions (B18/B19)
    f_ref = rrope.inv_freq(16, 1e7)
    f = orope.inv_freq(16, 1e7, dtype=torch.float64)
    assert_close("inv_freq", f_ref, f, 1e-12)
    rc, rs = rrope.mrope_cos_sin(pos, f_ref, (3, 3, 2))
    c, s = orope.mrope_cos_sin(torch.tensor(pos), f, (3, 3, 2))
    assert_close("cos", rc, c, 1e-10)
    assert_close("sin", rs, s, 1e-10)
    x = rng.standard_normal((Tn, 3, 24))
    out = orope.apply_partial_rope(T(x), c, s)
    assert_close("rope", rrope.apply_partial_rope(x, rc, rs), out, "f32")
    assert torch.equal(out[..., 16:], T(x)[..., 16:]), "channels ≥ R pass through bit-exactly"


@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       past=st.lists(st.integers(0, 5), min_size=3, max_size=3), use_cache_objects=st.booleans())
def test_gated_attention_matches_reference(seed, lengths, past, use_cache_objects):
    cfg = Qwen35Config.tiny()
    rng = np.random.default_rng(seed)
    w = ratt.AttentionWeights.random(cfg, seed)
    N = len(lengths)
    x = rng.standard_normal((sum(lengths), cfg.hidden_size))
    cu = random_cu_seqlens(seed, lengths)
    pkv = [(rng.standard_normal((p, cfg.num_key_value_heads, cfg.head_dim)),
            rng.standard_normal((p, cfg.num_key_value_heads, cfg.head_dim))) for p in past[:N]]
    ry, rkv = ratt.gated_attention(x, w, cfg, cu_seqlens=cu, past_kv=pkv)
    wt = oatt.TorchAttentionWeights.from_reference(w)
    if use_cache_objects:
        caches = []
        for k, v in pkv:
            c = oatt.KVCache(cfg.num_key_value_heads, cfg.head_dim, dtype=F32, device="cpu", capacity=2)
            c.append(T(k), T(v))
            caches.append(c)
        y, kv = oatt.gated_attention(T(x), wt, cfg, cu_seqlens=cu, kv_caches=caches)
        kv = [(c.k[:c.length], c.v[:c.length]) for c in kv]
    else:
        y, kv = oatt.gated_attention(T(x), wt, cfg, cu_seqlens=cu, past_kv=[(T(k), T(v)) for k, v in pkv])
    assert_close("attention y", ry, y, "f32")
    for (rk, rv), (k, v) in zip(rkv, kv, strict=True):
        assert_close("k cache", rk, k, "f32")
        assert_close("v cache", rv, v, "f32")


@given(seed=st.integers(0, 2**16), n=st.integers(1, 12))
def test_mlp_and_moe_match_reference(seed, n):
    cfg = Qwen35Config.tiny(model_type="qwen3_5_moe_text")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg.hidden_size))
    gp, up, dp = (rng.standard_normal(s) * 0.2 for s in ((16, 32), (16, 32), (32, 16)))
    assert_close("swiglu", rmlp.swiglu_mlp(x, gp, up, dp), omlp.swiglu_mlp(T(x), T(gp), T(up), T(dp)), "f32")
    fused = torch.cat([T(gp), T(up)], 0)
    assert_close("swiglu fused", rmlp.swiglu_mlp(x, gp, up, dp),
                 omlp.swiglu_mlp(T(x), T(gp), T(up), T(dp), gate_up=fused), "f32")
    w = rmlp.MoEWeights.random(cfg, seed)
    assert_close("moe", rmlp.sparse_moe_block(x, w, cfg),
                 omlp.sparse_moe_block(T(x), omlp.TorchMoEWeights.from_reference(w), cfg), "f32")


@given(seed=st.integers(0, 2**16), lengths=st.lists(st.sampled_from([1, 2, 5, 19]), min_size=1, max_size=3),
       mode=st.sampled_from(["chunk", "recurrent"]))
def test_deltanet_layer_prefill_then_decode(seed, lengths, mode):
    cfg = Qwen35Config.tiny()
    rng = np.random.default_rng(seed)
    w = rdn.DeltaNetWeights.random(cfg, seed)
    wt = odn.TorchDeltaNetWeights.from_reference(w)
    N = len(lengths)
    cu = random_cu_seqlens(seed, lengths)
    x = rng.standard_normal((int(cu[-1]), cfg.hidden_size))
    ry, rc, rs = rdn.gated_deltanet(x, w, cfg, cu_seqlens=cu, mode=mode, chunk_size=16)
    y, c, s = odn.gated_deltanet(T(x), wt, cfg, cu_seqlens=cu, mode=mode, chunk_size=16, backend="torch")
    # Some inputs amplify float32 rounding (e.g. one token whose gated-norm input nearly cancels: seed 226, lengths
    # [1] reaches 1.5e-5 here and 1.9e-5 in the NumPy oracle run in float32), so y's budget is the f32 one or 4x what
    # the oracle itself reaches in float32 on the same input, whichever is larger.
    r32, _, _ = rdn.gated_deltanet(x.astype(np.float32), w, cfg, cu_seqlens=cu, mode=mode, chunk_size=16,
                                   dtype=np.float32)
    assert_close("layer y", ry, y, max(BUDGETS["f32"], 4 * rel_rms(ry, r32)))
    assert_close("layer conv", rc, c, "f32")
    assert_close("layer state", rs, s, "f32")
    # decode one token per sequence in place in pools, slots scattered with a padding row
    slots = [2 * i + 1 for i in range(N)] + [-1]
    conv_pool = torch.zeros(2 * N + 2, *c.shape[1:])
    state_pool = torch.zeros(2 * N + 2, *s.shape[1:])
    for i, sl in enumerate(slots[:-1]):
        conv_pool[sl], state_pool[sl] = c[i], s[i]
    xd = rng.standard_normal((N, cfg.hidden_size))
    ryd, _, _ = rdn.gated_deltanet(xd, w, cfg, cu_seqlens=np.arange(N + 1), conv_state=rc, recurrent_state=rs,
                                   mode="recurrent")
    yd = odn.gated_deltanet_decode(T(np.concatenate([xd, xd[:1]])), wt, cfg, conv_pool=conv_pool,
                                   state_pool=state_pool, slot_ids=torch.tensor(slots), backend="torch")
    assert_close("decode y", ryd, yd[:N], "f32")
    assert torch.equal(state_pool[0], torch.zeros_like(state_pool[0]))


# ----------------------------------------------------------------------------------------------------------------
# backend selection
# ----------------------------------------------------------------------------------------------------------------


def test_resolve_backend(monkeypatch, caplog):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.resolve_backend("auto", "cpu") == "torch"
    assert backend.resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError):
        backend.resolve_backend("cuda-magic", "cpu")
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.resolve_backend(None, "cpu") == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        backend.resolve_backend(None, "cpu")
    monkeypatch.delenv(backend.ENV_VAR)
    # triton on CPU without the interpreter: a visible warning, then the torch path
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backend, "_logged", set())
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET"):
        assert backend.resolve_backend("triton", "cpu") == "torch"


def test_backend_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(backend, "_logged", set())
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    with caplog.at_level(logging.INFO, logger="qwen35.optimized"):
        for _ in range(3):
            backend.resolve_backend("auto", "cpu")
    assert sum("torch ops on cpu" in r.message for r in caplog.records) == 1


def test_missing_triton_function_falls_back(monkeypatch):
    import types
    fake = types.ModuleType("fake_triton_mod")
    monkeypatch.setitem(backend.KERNEL_OPS, "gated_rms_norm", (onorms.gated_rms_norm, "fake_triton_mod"))
    monkeypatch.setitem(__import__("sys").modules, "fake_triton_mod", fake)
    monkeypatch.setattr(backend, "resolve_backend", lambda b, d: "triton")
    monkeypatch.setattr(backend, "_logged", set())
    with pytest.warns(RuntimeWarning, match="does not exist"):
        fn = backend.get_op("gated_rms_norm", "triton", "cpu")
    assert fn is onorms.gated_rms_norm


@pytest.mark.triton
def test_triton_backend_under_interpreter_matches_torch(monkeypatch):
    """With TRITON_INTERPRET=1 (tests/conftest.py), backend='triton' runs the kernels on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not backend.triton_available():
        pytest.skip("optimized.triton does not import here")
    assert backend.resolve_backend("triton", "cpu") == "triton"
    x = gdn_inputs(2, 1, 20, 1, 2, 16, 16)
    args, kw = _rule_inputs(x, F32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o_t, s_t = backend.chunk_gated_delta_rule(*args, **kw, chunk_size=16, backend="triton")
    o, s = backend.chunk_gated_delta_rule(*args, **kw, chunk_size=16, backend="torch")
    assert_close("triton vs torch o", o.double().numpy(), o_t, 1e-4)
    assert_close("triton vs torch state", s.double().numpy(), s_t, 1e-4)
