"""State invariants of the gated delta rule (reference/gated_delta.py): varlen, continuation, decode, batching.

Guards pitfalls B10 (multi-token continuation from a state), B11 (prefill + decode == full), B12 (a row is independent
of its neighbours, bitwise), B13 (cu_seqlens reaches the rule: no leakage between packed sequences), B15 (states
sized by N sequences, not by B).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _factory import random_cu_seqlens
from _tolerance import assert_close
from qwen35.measure import gdn_inputs
from reference.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule

RULES = {"recurrent": recurrent_gated_delta_rule, "chunk": chunk_gated_delta_rule}
CHUNK = 16  # small chunks so that short tests still cross chunk boundaries


def _rule(name):
    if name == "chunk":
        return lambda *a, **kw: chunk_gated_delta_rule(*a, chunk_size=kw.pop("chunk_size", CHUNK), **kw)
    return recurrent_gated_delta_rule


def _slice(x, s, e):
    """Tokens s:e of every per-token input of a GDNInputs, as a dict for the rule."""
    return dict(q=x.q[:, s:e], k=x.k[:, s:e], v=x.v[:, s:e], g=x.g[:, s:e], beta=x.beta[:, s:e])


def _call(rule, d, **kw):
    return rule(d["q"], d["k"], d["v"], g=d["g"], beta=d["beta"], **kw)


# ------------------------------------------------------------------ varlen == loop over sequences (B13, B15)
@pytest.mark.parametrize("name", ["recurrent", "chunk"])
@given(
    seed=st.integers(0, 2**31 - 1),
    lengths=st.lists(st.sampled_from([1, 2, 3, 5, 16, 17, 40]), min_size=3, max_size=6),
    with_h0=st.booleans(),
)
def test_varlen_equals_loop_over_sequences(name, seed, lengths, with_h0):
    rule = _rule(name)
    N, T = len(lengths), sum(lengths)
    x = gdn_inputs(seed, 1, T, 2, 4, 5, 3, N=N, with_h0=with_h0)  # h0: [N, H_v, D_k, D_v]
    cu = random_cu_seqlens(seed, lengths)
    o, S = _call(rule, _slice(x, 0, T), initial_state=x.h0, cu_seqlens=cu)
    assert S.shape == (N, 4, 5, 3)
    for n in range(N):
        s, e = cu[n], cu[n + 1]
        h0 = None if x.h0 is None else x.h0[n:n + 1]
        o_n, S_n = _call(rule, _slice(x, s, e), initial_state=h0)
        # Same arithmetic on the same slice: bitwise equal, so no neighbour can leak in.
        np.testing.assert_array_equal(o[:, s:e], o_n, err_msg=f"o of sequence {n}")
        np.testing.assert_array_equal(S[n:n + 1], S_n, err_msg=f"final_state of sequence {n}")


def test_varlen_many_sequences_more_than_batch():
    """N ≫ B: the initial/final state is indexed by sequence (FastDeploy#7024 sized it by B; B15)."""
    lengths = [1] * 5 + [3, 70, 2]
    x = gdn_inputs(1, 1, sum(lengths), 1, 2, 4, 4, N=len(lengths))
    cu = random_cu_seqlens(0, lengths)
    o_r, S_r = _call(recurrent_gated_delta_rule, _slice(x, 0, cu[-1]), initial_state=x.h0, cu_seqlens=cu)
    o_c, S_c = _call(chunk_gated_delta_rule, _slice(x, 0, cu[-1]), initial_state=x.h0, cu_seqlens=cu)
    assert_close("o", o_r, o_c, "f64_exact")
    assert_close("final_state", S_r, S_c, "f64_exact")
    with pytest.raises(ValueError, match=r"initial_state must be \[N=8"):
        _call(recurrent_gated_delta_rule, _slice(x, 0, cu[-1]), initial_state=x.h0[:1], cu_seqlens=cu)


def test_varlen_empty_sequence_passes_state_through():
    x = gdn_inputs(2, 1, 5, 1, 1, 3, 3, N=3)
    cu = np.array([0, 2, 2, 5])
    for rule in RULES.values():
        _, S = _call(rule, _slice(x, 0, 5), initial_state=x.h0, cu_seqlens=cu)
        np.testing.assert_array_equal(S[1], x.h0[1])


# ------------------------------------------------------------------ continuation: prefill(a) + prefill(b) (B10)
@pytest.mark.parametrize("first", ["recurrent", "chunk"])
@pytest.mark.parametrize("second", ["recurrent", "chunk"])
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(2, 80), data=st.data())
def test_prefill_split_equals_one_shot(first, second, seed, T, data):
    split = data.draw(st.integers(1, T - 1), label="split")
    x = gdn_inputs(seed, 2, T, 2, 4, 6, 5)
    o, S = _call(_rule("chunk"), _slice(x, 0, T), initial_state=x.h0)
    o_a, S_a = _call(_rule(first), _slice(x, 0, split), initial_state=x.h0)
    o_b, S_b = _call(_rule(second), _slice(x, split, T), initial_state=S_a)
    assert_close("o", o, np.concatenate([o_a, o_b], axis=1), "f64_exact")
    assert_close("final_state", S, S_b, "f64_exact")


# ------------------------------------------------------------------ prefill(T-1) + decode(1) == full(T) (B11)
@pytest.mark.parametrize("T", [2, 3, 4, 5, 63, 64, 65, 129])
def test_prefill_then_decode_equals_full(T):
    x = gdn_inputs(T, 2, T, 2, 4, 8, 8, with_h0=False)
    o_full, S_full = _call(_rule("chunk"), _slice(x, 0, T), chunk_size=64)
    _, S_pre = _call(_rule("chunk"), _slice(x, 0, T - 1), chunk_size=64)
    o_dec, S_dec = _call(recurrent_gated_delta_rule, _slice(x, T - 1, T), initial_state=S_pre)
    assert_close("o[last]", o_full[:, -1:], o_dec, "f64_exact")
    assert_close("final_state", S_full, S_dec, "f64_exact")


def test_token_by_token_decode_equals_prefill():
    """A whole sequence decoded one token at a time (the decode path) equals one chunked prefill."""
    x = gdn_inputs(4, 1, 40, 1, 3, 4, 6)
    o_full, S_full = _call(_rule("chunk"), _slice(x, 0, 40), initial_state=x.h0)
    S = x.h0
    outs = []
    for t in range(40):
        o_t, S = _call(recurrent_gated_delta_rule, _slice(x, t, t + 1), initial_state=S)
        outs.append(o_t)
    assert_close("o", o_full, np.concatenate(outs, axis=1), "f64_exact")
    assert_close("final_state", S_full, S, "f64_exact")


# ------------------------------------------------------------------ batch independence (B12)
@pytest.mark.parametrize("name", ["recurrent", "chunk"])
def test_row_independent_of_batch_neighbours_bitwise(name):
    rule = _rule(name)
    x = gdn_inputs(6, 3, 33, 2, 4, 5, 6)
    o, S = _call(rule, _slice(x, 0, 33), initial_state=x.h0)
    # Perturb rows 0 and 2 drastically; row 1 must not change by a single bit.
    y = gdn_inputs(99, 3, 33, 2, 4, 5, 6)
    mixed = {k: np.concatenate([getattr(y, k)[:1], getattr(x, k)[1:2], getattr(y, k)[2:]]) for k in
             ("q", "k", "v", "g", "beta")}
    h0 = np.concatenate([y.h0[:1], x.h0[1:2], y.h0[2:]])
    o2, S2 = _call(rule, mixed, initial_state=h0)
    np.testing.assert_array_equal(o[1], o2[1])
    np.testing.assert_array_equal(S[1], S2[1])
    # And the row alone gives the same bits.
    o1, S1 = _call(rule, {k: v[1:2] for k, v in _slice(x, 0, 33).items()}, initial_state=x.h0[1:2])
    np.testing.assert_array_equal(o[1:2], o1)
    np.testing.assert_array_equal(S[1:2], S1)


def test_batch_equals_varlen_packing():
    """B rows of equal length == the same rows packed with cu_seqlens."""
    x = gdn_inputs(8, 3, 10, 1, 2, 4, 4)
    for rule in (_rule("recurrent"), _rule("chunk")):
        o, S = _call(rule, _slice(x, 0, 10), initial_state=x.h0)
        packed = {k: v.reshape(1, 30, *v.shape[2:]) for k, v in _slice(x, 0, 10).items()}
        o_p, S_p = _call(rule, packed, initial_state=x.h0, cu_seqlens=np.array([0, 10, 20, 30]))
        np.testing.assert_array_equal(o.reshape(o_p.shape), o_p)
        np.testing.assert_array_equal(S, S_p)


def test_input_state_is_not_modified():
    x = gdn_inputs(10, 1, 20, 1, 1, 3, 3)
    h0 = x.h0.copy()
    for rule in RULES.values():
        _call(rule, _slice(x, 0, 20), initial_state=x.h0)
        np.testing.assert_array_equal(x.h0, h0)
