"""The Gated DeltaNet layer (reference/deltanet.py): wiring, modes, and the conv + recurrent state across calls.

Guards pitfalls B3 (Qwen3.5's four flat projections, flat [Q|K|V] split), B10 (continued prefill from a state),
B11 (prefill(T-1) + decode(1) == full(T)), B12 (batch independence), B13 (varlen), B14 (the conv state is the raw
projected qkv).  The outside oracle is Hugging Face's `Qwen3_5GatedDeltaNet` module with copied weights (`hf`).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _factory import random_cu_seqlens
from _tolerance import assert_close
from reference.config import Qwen35Config
from reference.deltanet import DeltaNetWeights, gated_deltanet

# H_v = 2·H_k, D_k ≠ D_v, neither a power of two.
CFG = Qwen35Config.tiny(hidden_size=24, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=6,
                        linear_value_head_dim=5, linear_conv_kernel_dim=4)
K = CFG.linear_conv_kernel_dim


def _x(seed, T, H=CFG.hidden_size):
    return np.random.default_rng(seed).standard_normal((T, H))


def _weights(seed=0):
    return DeltaNetWeights.random(CFG, seed)


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _layer_by_spec(x, w, cfg):
    """HF `Qwen3_5GatedDeltaNet` written out once more, token by token, with the explicit formulas (an independent
    wiring check)."""
    T = x.shape[0]
    H_k, H_v, D_k, D_v = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                          cfg.linear_value_head_dim)
    Kc = cfg.linear_conv_kernel_dim
    qkv = x @ w.in_proj_qkv.T
    pad = np.concatenate([np.zeros((Kc - 1, qkv.shape[1])), qkv])
    c = np.stack([(pad[t:t + Kc] * w.conv1d.T).sum(0) for t in range(T)])
    c = c * _sigmoid(c)
    q = c[:, :H_k * D_k].reshape(T, H_k, D_k)
    k = c[:, H_k * D_k:2 * H_k * D_k].reshape(T, H_k, D_k)
    v = c[:, 2 * H_k * D_k:].reshape(T, H_v, D_v)
    beta = _sigmoid(x @ w.in_proj_b.T)
    g = -np.exp(w.A_log) * np.log1p(np.exp(x @ w.in_proj_a.T + w.dt_bias))
    z = (x @ w.in_proj_z.T).reshape(T, H_v, D_v)
    out = np.zeros((T, H_v, D_v))
    for h in range(H_v):
        S = np.zeros((D_k, D_v))
        for t in range(T):
            kk = k[t, h * H_k // H_v]
            qq = q[t, h * H_k // H_v]
            kk = kk / np.sqrt(kk @ kk + 1e-6)
            qq = qq / np.sqrt(qq @ qq + 1e-6) / np.sqrt(D_k)
            S = np.exp(g[t, h]) * S
            S = S + np.outer(kk, beta[t, h] * (v[t, h] - S.T @ kk))
            o = S.T @ qq
            n = o / np.sqrt(np.mean(o * o) + cfg.rms_norm_eps) * w.norm
            out[t, h] = n * z[t, h] * _sigmoid(z[t, h])
    return out.reshape(T, H_v * D_v) @ w.out_proj.T


# ------------------------------------------------------------------ wiring and modes
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_layer_matches_spec_written_out(mode):
    w, x = _weights(1), _x(1, 11)
    y, _, _ = gated_deltanet(x, w, CFG, mode=mode, chunk_size=4)
    assert_close("y", _layer_by_spec(x, w, CFG), y, "f64_exact")


@given(seed=st.integers(0, 2**31 - 1), T=st.sampled_from([1, 3, 17, 70]), chunk=st.sampled_from([16, 64]))
def test_chunk_mode_equals_recurrent_mode(seed, T, chunk):
    w, x = _weights(seed % 7), _x(seed, T)
    y_c, c_c, s_c = gated_deltanet(x, w, CFG, mode="chunk", chunk_size=chunk)
    y_r, c_r, s_r = gated_deltanet(x, w, CFG, mode="recurrent")
    assert_close("y", y_r, y_c, "f64_exact")
    np.testing.assert_array_equal(c_c, c_r)
    assert_close("recurrent_state", s_r, s_c, "f64_exact")
    assert y_c.shape == (T, CFG.hidden_size)
    assert c_c.shape == (1, CFG.conv_dim, K - 1)
    assert s_c.shape == (1, CFG.linear_num_value_heads, CFG.linear_key_head_dim, CFG.linear_value_head_dim)


def test_flat_qkv_split_routes_blocks():
    """Zeroing the Q block of in_proj_qkv zeroes the output; zeroing K with a fresh state too; zeroing V too
    (flat [Q|K|V] blocks, not Qwen3-Next's per-key-head grouping; B3)."""
    kd = CFG.key_dim
    for block in (slice(0, kd), slice(kd, 2 * kd), slice(2 * kd, CFG.conv_dim)):
        w = _weights(2)
        w.in_proj_qkv[block] = 0.0
        y, _, _ = gated_deltanet(_x(2, 9), w, CFG)
        np.testing.assert_array_equal(y, 0.0)
    y, _, _ = gated_deltanet(_x(2, 9), _weights(2), CFG)
    assert np.all(np.abs(y).sum(-1) > 0)


def test_conv_state_is_raw_projected_qkv():
    """The conv state holds the last K-1 rows of x W_qkvᵀ (pre-conv, pre-activation; B14)."""
    w, x = _weights(3), _x(3, 10)
    _, conv_state, _ = gated_deltanet(x, w, CFG)
    assert_close("conv_state", (x @ w.in_proj_qkv.T)[-(K - 1):].T, conv_state[0], "f64_exact")


# ------------------------------------------------------------------ state across calls (B10, B11)
@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 12, 20])  # inside the conv window (< K-1, = K-1) and outside
def test_prefill_split_equals_one_shot(split):
    w, x = _weights(4), _x(4, 21)
    y, c, s = gated_deltanet(x, w, CFG, chunk_size=8)
    y_a, c_a, s_a = gated_deltanet(x[:split], w, CFG, chunk_size=8)
    y_b, c_b, s_b = gated_deltanet(x[split:], w, CFG, conv_state=c_a, recurrent_state=s_a, chunk_size=8)
    assert_close("y", y, np.concatenate([y_a, y_b]), "f64_exact")
    assert_close("conv_state", c, c_b, "f64_exact")
    assert_close("recurrent_state", s, s_b, "f64_exact")


@pytest.mark.parametrize("T", [2, 3, 4, 5, 63, 64, 65, 129])
def test_prefill_then_decode_equals_full(T):
    w, x = _weights(5), _x(T, T)
    y, c, s = gated_deltanet(x, w, CFG)
    _, c_p, s_p = gated_deltanet(x[:-1], w, CFG)
    y_d, c_d, s_d = gated_deltanet(x[-1:], w, CFG, conv_state=c_p, recurrent_state=s_p, mode="recurrent")
    assert_close("y[last]", y[-1:], y_d, "f64_exact")
    assert_close("conv_state", c, c_d, "f64_exact")
    assert_close("recurrent_state", s, s_d, "f64_exact")


def test_decode_of_many_requests_in_one_call():
    """N requests decoded together (one token each, cu_seqlens = 0..N) == each decoded alone."""
    w = _weights(6)
    prompts = [_x(10 + n, L) for n, L in enumerate([1, 2, 7])]
    states = [gated_deltanet(p, w, CFG)[1:] for p in prompts]
    new = _x(20, 3)
    y, c, s = gated_deltanet(new, w, CFG, cu_seqlens=np.arange(4), mode="recurrent",
                             conv_state=np.concatenate([st_[0] for st_ in states]),
                             recurrent_state=np.concatenate([st_[1] for st_ in states]))
    for n in range(3):
        y_n, c_n, s_n = gated_deltanet(new[n:n + 1], w, CFG, conv_state=states[n][0], recurrent_state=states[n][1],
                                       mode="recurrent")
        assert_close("conv_state", c_n, c[n:n + 1], "f64_exact")  # BLAS may round 1-row and 3-row products apart
        assert_close("y", y_n, y[n:n + 1], "f64_exact")
        assert_close("recurrent_state", s_n, s[n:n + 1], "f64_exact")


# ------------------------------------------------------------------ varlen and batch (B12, B13)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@given(seed=st.integers(0, 2**31 - 1),
       lengths=st.lists(st.sampled_from([1, 2, 3, 4, 9, 20]), min_size=3, max_size=5), with_state=st.booleans())
def test_varlen_equals_loop_over_sequences(mode, seed, lengths, with_state):
    w, N = _weights(seed % 5), len(lengths)
    x = _x(seed, sum(lengths))
    cu = random_cu_seqlens(seed, lengths)
    rng = np.random.default_rng(seed)
    c0 = rng.standard_normal((N, CFG.conv_dim, K - 1)) if with_state else None
    s0 = 0.3 * rng.standard_normal((N, CFG.linear_num_value_heads, CFG.linear_key_head_dim,
                                    CFG.linear_value_head_dim)) if with_state else None
    y, c, s = gated_deltanet(x, w, CFG, cu_seqlens=cu, conv_state=c0, recurrent_state=s0, mode=mode, chunk_size=8)
    for n in range(N):
        a, b = cu[n], cu[n + 1]
        y_n, c_n, s_n = gated_deltanet(x[a:b], w, CFG, mode=mode, chunk_size=8,
                                       conv_state=None if c0 is None else c0[n:n + 1],
                                       recurrent_state=None if s0 is None else s0[n:n + 1])
        # The projections see a different number of rows, so BLAS may round differently: not bitwise here.
        assert_close(f"y[{n}]", y_n, y[a:b], "f64_exact")
        assert_close(f"conv_state[{n}]", c_n, c[n:n + 1], "f64_exact")
        assert_close(f"recurrent_state[{n}]", s_n, s[n:n + 1], "f64_exact")


def test_sequence_output_independent_of_packed_neighbours():
    """Changing the other packed sequences changes nothing in sequence 1 (B12)."""
    w = _weights(7)
    cu = np.array([0, 5, 12, 14])
    x = _x(7, 14)
    y, c, s = gated_deltanet(x, w, CFG, cu_seqlens=cu)
    x2 = x.copy()
    x2[:5] = 50.0
    x2[12:] = -3.0
    y2, c2, s2 = gated_deltanet(x2, w, CFG, cu_seqlens=cu)
    np.testing.assert_array_equal(y[5:12], y2[5:12])
    np.testing.assert_array_equal(c[1], c2[1])
    np.testing.assert_array_equal(s[1], s2[1])


# ------------------------------------------------------------------ dtype, weights, validation
def test_float32_mirror():
    w, x = _weights(8), _x(8, 40)
    y64, _, s64 = gated_deltanet(x, w, CFG)
    y32, c32, s32 = gated_deltanet(x, w, CFG, dtype=np.float32)
    assert y32.dtype == c32.dtype == s32.dtype == np.float32
    assert_close("y", y64, y32, "f32")
    assert_close("recurrent_state", s64, s32, "f32")


def test_weights_validation_and_pytorch_conv_shape():
    w = _weights(9)
    w3 = DeltaNetWeights(**{**w.__dict__, "conv1d": w.conv1d[:, None, :]})  # PyTorch [C, 1, K]
    np.testing.assert_array_equal(gated_deltanet(_x(0, 4), w3, CFG)[0], gated_deltanet(_x(0, 4), w, CFG)[0])
    bad = DeltaNetWeights(**{**w.__dict__, "in_proj_z": w.in_proj_z[:-1]})
    with pytest.raises(ValueError, match="in_proj_z"):
        gated_deltanet(_x(0, 4), bad, CFG)
    with pytest.raises(ValueError, match="x must"):
        gated_deltanet(_x(0, 4, H=7), w, CFG)
    with pytest.raises(ValueError, match="mode"):
        gated_deltanet(_x(0, 4), w, CFG, mode="fused")


# ------------------------------------------------------------------ outside oracle: HF Qwen3_5GatedDeltaNet
def _hf_layer(w):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    hc = transformers.Qwen3_5TextConfig(
        hidden_size=CFG.hidden_size, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=CFG.linear_num_key_heads, linear_num_value_heads=CFG.linear_num_value_heads,
        linear_key_head_dim=CFG.linear_key_head_dim, linear_value_head_dim=CFG.linear_value_head_dim,
        linear_conv_kernel_dim=K, rms_norm_eps=CFG.rms_norm_eps, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=32, vocab_size=50,
    )
    layer = m.Qwen3_5GatedDeltaNet(hc, 0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            src = getattr(w, name.removesuffix(".weight"))
            p.copy_(torch.tensor(np.asarray(src).reshape(p.shape), dtype=torch.float32))
    return torch, transformers, hc, layer


@pytest.mark.hf
def test_matches_hugging_face_layer_prefill_continue_and_decode():
    """HF fp32 module vs our float64 layer: fresh prefill, continued prefill and one decode step through HF's cache;
    outputs, conv state (HF keeps K columns: compare its last K-1) and recurrent state."""
    w = _weights(10)
    torch, transformers, hc, layer = _hf_layer(w)
    x = _x(10, 2 * 9)
    x_b = x.reshape(2, 9, CFG.hidden_size)  # two rows of 9 tokens: 6 prefill + 2 continued + 1 decode
    cache = transformers.DynamicCache(config=hc)
    def t(a):
        return torch.tensor(a, dtype=torch.float32)
    with torch.no_grad():
        hf_outs = [layer(t(x_b[:, s:e]), cache=cache).numpy() for s, e in [(0, 6), (6, 8), (8, 9)]]
    hf_y = np.concatenate(hf_outs, axis=1)  # [2, 9, H]
    hf_conv = cache.get_conv_state(0, state_idx=0).numpy()  # [2, conv_dim, K]
    hf_rec = cache.get_recurrent_state(0, state_idx=0).numpy()  # [2, H_v, D_k, D_v]

    cu = np.array([0, 9, 18])
    packed = x_b.reshape(18, -1)
    y, c, s = gated_deltanet(packed, w, CFG, cu_seqlens=cu)  # one shot
    assert_close("y vs HF", y, hf_y.reshape(18, -1), "f32")
    assert_close("conv_state vs HF[..., 1:]", c, hf_conv[:, :, 1:], "f32")
    assert_close("recurrent_state vs HF", s, hf_rec, "f32")
    # And our own three-step path, against the same HF outputs.
    c_, s_ = None, None
    for (a, b), mode in zip([(0, 6), (6, 8), (8, 9)], ["chunk", "chunk", "recurrent"], strict=True):
        rows = np.concatenate([x_b[0, a:b], x_b[1, a:b]])
        y_, c_, s_ = gated_deltanet(rows, w, CFG, cu_seqlens=np.array([0, b - a, 2 * (b - a)]), conv_state=c_,
                                    recurrent_state=s_, mode=mode)
        assert_close(f"y[{a}:{b}] vs HF", y_, hf_y[:, a:b].reshape(2 * (b - a), -1), "f32")
    assert_close("recurrent_state vs HF (stepwise)", s_, hf_rec, "f32")
