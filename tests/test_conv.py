"""Causal depthwise conv1d with a K-1 column state (reference/conv.py).

Guards pitfalls B13 (varlen: every packed sequence has its own state, lengths 1 and < K-1 included) and B14 (the
state is the last K-1 *pre-activation* inputs, oldest first; feeding 1, 2 or 3 tokens at a time == one shot; the
oldest column meets the oldest tap).  The outside oracle is Hugging Face's torch conv (K-column state).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _factory import random_cu_seqlens
from _tolerance import assert_close
from reference.conv import causal_conv1d, causal_conv1d_update


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _conv_by_definition(x, w, state):
    """y_t[c] = Σ_i w[c, i] · x_{t−(K−1)+i}[c], written per channel with np.convolve (an independent route).

    x [T, C], w [C, K], state [C, K-1]  ->  pre-activation y [T, C]."""
    T, C = x.shape
    y = np.zeros((T, C))
    for c in range(C):
        ext = np.concatenate([state[c], x[:, c]])  # [K-1+T]
        y[:, c] = np.convolve(ext, w[c, ::-1], mode="valid")  # convolve flips the kernel; flip it back
    return y


def _data(seed, T, C, K, N=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, C)), rng.standard_normal((C, K)), rng.standard_normal((N, C, K - 1))


# ------------------------------------------------------------------ the definition
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 12), C=st.integers(1, 6), K=st.integers(1, 5),
       with_state=st.booleans())
def test_matches_definition(seed, T, C, K, with_state):
    x, w, s = _data(seed, T, C, K)
    s = s if with_state else np.zeros_like(s)
    y, new = causal_conv1d(x, w, conv_state=s if with_state else None)
    assert_close("y", _silu(_conv_by_definition(x, w, s[0])), y, "f64_exact")
    y_raw, _ = causal_conv1d(x, w, conv_state=s, activation=None)
    assert_close("y (no activation)", _conv_by_definition(x, w, s[0]), y_raw, "f64_exact")
    assert new.shape == (1, C, K - 1)


def test_newest_input_meets_last_tap():
    """An impulse at the last token is scaled by w[:, K-1]; the oldest state column by w[:, 0] (vllm-ascend#8544)."""
    C, K = 3, 4
    w = np.arange(1.0, C * K + 1).reshape(C, K)
    x = np.zeros((1, C))
    x[0] = 1.0
    y, _ = causal_conv1d(x, w, activation=None)
    np.testing.assert_array_equal(y[0], w[:, K - 1])
    state = np.zeros((1, C, K - 1))
    state[0, :, 0] = 1.0  # only the oldest column is set
    y, _ = causal_conv1d(np.zeros((1, C)), w, conv_state=state, activation=None)
    np.testing.assert_array_equal(y[0], w[:, 0])


def test_weight_with_pytorch_depthwise_shape():
    x, w, s = _data(1, 7, 5, 4)
    y1, n1 = causal_conv1d(x, w, conv_state=s)
    y2, n2 = causal_conv1d(x, w[:, None, :], conv_state=s)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(n1, n2)


# ------------------------------------------------------------------ the state (B14)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 9), K=st.sampled_from([2, 3, 4, 5]))
def test_state_is_last_k_minus_1_preactivation_inputs(seed, T, K):
    x, w, s = _data(seed, T, 3, K)
    _, new = causal_conv1d(x, w, conv_state=s)
    history = np.concatenate([s[0].T, x], axis=0)  # [K-1+T, C]  everything seen, oldest first
    np.testing.assert_array_equal(new[0], history[-(K - 1):].T)  # raw inputs, not silu(conv)
    if T < K - 1:  # short prompt: older state columns shift left, they are not dropped or zeroed
        np.testing.assert_array_equal(new[0, :, :K - 1 - T], s[0, :, T:])


@pytest.mark.parametrize("step", [1, 2, 3])
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 14))
def test_feeding_tokens_in_pieces_equals_one_shot(step, seed, T):
    x, w, s = _data(seed, T, 4, 4)
    y, final = causal_conv1d(x, w, conv_state=s)
    state, parts = s, []
    for t0 in range(0, T, step):
        y_p, state = causal_conv1d(x[t0:t0 + step], w, conv_state=state)
        parts.append(y_p)
    np.testing.assert_array_equal(np.concatenate(parts), y)
    np.testing.assert_array_equal(state, final)


def test_update_equals_one_token_prefill():
    rng = np.random.default_rng(3)
    B, C, K = 3, 5, 4
    x, w, s = rng.standard_normal((B, C)), rng.standard_normal((C, 1, K)), rng.standard_normal((B, C, K - 1))
    s_copy = s.copy()
    y, new = causal_conv1d_update(x, w, conv_state=s)
    np.testing.assert_array_equal(s, s_copy)  # functional: the input state is untouched
    for b in range(B):
        y_b, n_b = causal_conv1d(x[b:b + 1], w, conv_state=s[b:b + 1])
        np.testing.assert_array_equal(y[b], y_b[0])
        np.testing.assert_array_equal(new[b], n_b[0])
    np.testing.assert_array_equal(new[:, :, -1], x)  # the newest column is the raw new input
    np.testing.assert_array_equal(new[:, :, :-1], s[:, :, 1:])


# ------------------------------------------------------------------ varlen and batch (B12, B13)
@given(seed=st.integers(0, 2**31 - 1),
       lengths=st.lists(st.sampled_from([1, 2, 3, 4, 7]), min_size=3, max_size=6), with_state=st.booleans())
def test_varlen_equals_loop_over_sequences(seed, lengths, with_state):
    N, K = len(lengths), 4
    x, w, s = _data(seed, sum(lengths), 6, K, N=N)
    cu = random_cu_seqlens(seed, lengths)
    y, new = causal_conv1d(x, w, conv_state=s if with_state else None, cu_seqlens=cu)
    assert new.shape == (N, 6, K - 1)
    for n in range(N):
        a, b = cu[n], cu[n + 1]
        y_n, s_n = causal_conv1d(x[a:b], w, conv_state=s[n:n + 1] if with_state else None)
        np.testing.assert_array_equal(y[a:b], y_n, err_msg=f"sequence {n}")
        np.testing.assert_array_equal(new[n:n + 1], s_n, err_msg=f"state of sequence {n}")


def test_batched_rows_independent_bitwise_and_equal_packed():
    rng = np.random.default_rng(5)
    B, T, C, K = 3, 6, 4, 4
    x, w, s = rng.standard_normal((B, T, C)), rng.standard_normal((C, K)), rng.standard_normal((B, C, K - 1))
    y, new = causal_conv1d(x, w, conv_state=s)
    x2 = x.copy()
    x2[0] = 1e3
    x2[2] = -7.0  # change the neighbours of row 1
    s2 = s.copy()
    s2[[0, 2]] = 5.0
    y2, new2 = causal_conv1d(x2, w, conv_state=s2)
    np.testing.assert_array_equal(y[1], y2[1])
    np.testing.assert_array_equal(new[1], new2[1])
    y_p, new_p = causal_conv1d(x.reshape(B * T, C), w, conv_state=s, cu_seqlens=np.arange(0, B * T + 1, T))
    np.testing.assert_array_equal(y.reshape(B * T, C), y_p)
    np.testing.assert_array_equal(new, new_p)


def test_kernel_size_one_has_an_empty_state():
    x, w, _ = _data(0, 5, 3, 1)
    y, new = causal_conv1d(x, w)
    assert new.shape == (1, 3, 0)
    assert_close("y", _silu(x * w[:, 0]), y, "f64_exact")


def test_float32_mirror():
    x, w, s = _data(2, 20, 8, 4)
    y64, _ = causal_conv1d(x, w, conv_state=s)
    y32, n32 = causal_conv1d(x, w, conv_state=s, dtype=np.float32)
    assert y32.dtype == np.float32 and n32.dtype == np.float32
    assert_close("y", y64, y32, "f32")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=np.zeros((4, 3)), weight=np.zeros((5, 4))), "channels"),
        (dict(x=np.zeros((4, 5)), weight=np.zeros((5, 2, 4))), "weight"),
        (dict(x=np.zeros((4, 5)), weight=np.zeros((5, 4)), conv_state=np.zeros((1, 5, 4))), "conv_state"),
        (dict(x=np.zeros((4, 5)), weight=np.zeros((5, 4)), conv_state=np.zeros((1, 5, 3)),
              cu_seqlens=np.array([0, 2, 4])), "conv_state"),
        (dict(x=np.zeros((2, 4, 5)), weight=np.zeros((5, 4)), cu_seqlens=np.array([0, 4])), "one packed row"),
        (dict(x=np.zeros((4, 5)), weight=np.zeros((5, 4)), cu_seqlens=np.array([0, 5])), "cu_seqlens"),
        (dict(x=np.zeros((4, 5)), weight=np.zeros((5, 4)), activation="gelu"), "activation"),
    ],
)
def test_validation_errors(kwargs, message):
    x, w = kwargs.pop("x"), kwargs.pop("weight")
    with pytest.raises(ValueError, match=message):
        causal_conv1d(x, w, **kwargs)


# ------------------------------------------------------------------ outside oracle: Hugging Face's torch conv
@pytest.mark.hf
def test_matches_hugging_face_conv_prefill_and_update():
    """HF's causal_conv1d_fn (fresh prefill) and causal_conv1d_update (decode with a K-column state)."""
    torch = pytest.importorskip("torch")
    m = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    rng = np.random.default_rng(0)
    B, T, C, K = 2, 9, 6, 4
    x, w = rng.standard_normal((B, T, C)), rng.standard_normal((C, K))
    def t(a):
        return torch.tensor(a, dtype=torch.float32)
    y_hf = m.causal_conv1d_fn(t(x).transpose(1, 2), t(w), None, activation="silu").transpose(1, 2)
    y, state = causal_conv1d(x, w)
    assert_close("y vs HF causal_conv1d_fn", y, y_hf, "f32")
    # HF keeps K columns: [one column nobody reads | our K-1 columns].
    x_new = rng.standard_normal((B, C))
    hf_state = t(np.concatenate([rng.standard_normal((B, C, 1)), state], axis=2))
    y_hf1 = m.causal_conv1d_update(t(x_new)[:, :, None], hf_state, t(w), None, "silu")[:, :, 0]
    y1, state1 = causal_conv1d_update(x_new, w, conv_state=state)
    assert_close("y vs HF causal_conv1d_update", y1, y_hf1, "f32")
    assert_close("state vs HF (last K-1 of K columns)", state1, hf_state[:, :, 1:], "f32")
