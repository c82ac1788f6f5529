"""reference.model: the pipeline interface, its invariances and its errors (docs/pitfalls.md, B10–B12, B14).

* a stateful hypothesis test interleaves prefill chunks, decode steps, releases and slot reuse across requests

* chunked prefill of any split == one prefill == stateless logits (float64, to ~1e-12)
* a request's logits do not depend on what else is in its batch
* release then re-claim starts clean; slots are reused without leaking state
* every invalid request is an error naming it, raised before any state changes
"""
from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from _tolerance import assert_close
from hf_checkpoints import make_hf_checkpoint
from reference.model import (
    ModelInputs,
    PoolFullError,
    Qwen35Model,
    RequestError,
    TextContext,
    UnknownRequestError,
)
from reference.pipeline import sample_next_token

V = 97  # tiny vocabulary


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("model") / "dense", kind="dense", seed=11)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("model") / "moe", kind="moe", seed=12)


@pytest.fixture(scope="module")
def model(ckpt):
    return Qwen35Model.from_pretrained(ckpt, max_batch_size=4, return_logits="variable")


def _prompt(seed, n):
    return np.random.default_rng(seed).integers(0, V, n).tolist()


def _snapshot(m: Qwen35Model):
    """Every piece of per-request state, copied."""
    return ([p.copy() for p in m.state_cache.conv_pools], [p.copy() for p in m.state_cache.recurrent_pools],
            {r: [(k.copy(), v.copy()) for k, v in m.kv_cache._kv[r]] for r in m.kv_cache.active_requests},
            {r: m.seq_len(r) for r in m.active_requests})


def _assert_same_snapshot(a, b):
    for pa, pb in zip(a[0] + a[1], b[0] + b[1], strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert a[2].keys() == b[2].keys() and a[3] == b[3]
    for r in a[2]:
        for (ka, va), (kb, vb) in zip(a[2][r], b[2][r], strict=True):
            np.testing.assert_array_equal(ka, kb)
            np.testing.assert_array_equal(va, vb)


def _release_all(m):
    for r in m.active_requests:
        m.release(r)


@given(n=st.integers(2, 40), cuts=st.lists(st.integers(1, 39), max_size=4), seed=st.integers(0, 10**6))
def test_chunked_prefill_equals_one_prefill(model, n, cuts, seed):
    """prefill(a) + prefill(b) + ... == prefill(a + b + ...) for any split (docs/pitfalls.md, B10, B14), with the last
    pieces fed as decode steps (prefill(T-1) + decode(1) == full(T), B11)."""
    _release_all(model)
    tokens = _prompt(seed, n)
    full = model.logits([tokens])[0]  # [n, V]
    bounds = sorted({c for c in cuts if c < n - 1} | {0, n - 1})
    for s, e in pairwise(bounds):
        out = model.execute(model.prepare_initial_token_inputs([TextContext("r", tokens[s:e])],
                                                               return_n_logits=e - s))
        assert_close(f"chunk [{s}, {e})", full[s:e], out.logits, "f64_exact")
    inputs = model.prepare_initial_token_inputs([TextContext("r", tokens[n - 1:])])  # the last token: T = 1
    assert inputs.is_decode
    assert_close("last token", full[n - 1:], model.execute(inputs).logits, "f64_exact")
    assert model.seq_len("r") == n
    model.release("r")


@pytest.mark.parametrize("T", [2, 3, 4, 5, 63, 64, 65, 129])
def test_prefill_minus_one_plus_decode_equals_full(model, T):
    """prefill(T-1) + decode(1) == full(T) around the conv window and the 64-token chunk size (docs/pitfalls.md,
    B11)."""
    _release_all(model)
    tokens = _prompt(100 + T, T)
    full = model.logits([tokens])[0]
    inputs = model.prepare_initial_token_inputs([TextContext("r", tokens[:-1])])
    assert_close(f"prefill T-1={T - 1}", full[T - 2:T - 1], model.execute(inputs).logits, "f64_exact")
    inputs = model.prepare_next_token_inputs([tokens[-1]], inputs)
    assert_close(f"decode at T={T}", full[T - 1:], model.execute(inputs).logits, "f64_exact")
    model.release("r")


def test_decode_steps_equal_full_forward_moe(moe_ckpt):
    m = Qwen35Model.from_pretrained(moe_ckpt, max_batch_size=2)
    a, b = _prompt(1, 20), _prompt(2, 9)
    full_a, full_b = m.logits([a, b])
    inputs = m.prepare_initial_token_inputs([TextContext("a", a[:12]), TextContext("b", b[:4])])
    out = m.execute(inputs)
    assert_close("prefill a", full_a[11:12], out.logits_for("a"), "f64_exact")
    for step in range(5):
        inputs = m.prepare_next_token_inputs([a[12 + step], b[4 + step]], inputs)
        out = m.execute(inputs)
        assert_close(f"decode a {step}", full_a[12 + step:13 + step], out.logits_for("a"), "f64_exact")
        assert_close(f"decode b {step}", full_b[4 + step:5 + step], out.logits_for("b"), "f64_exact")


@given(seed=st.integers(0, 10**6), others=st.lists(st.integers(1, 30), min_size=0, max_size=3))
def test_logits_do_not_depend_on_the_batch(model, seed, others):
    _release_all(model)
    target = _prompt(seed, 17)
    alone = model.logits([target])[0]
    batch = [_prompt(seed + i + 1, n) for i, n in enumerate(others)]
    pos = seed % (len(batch) + 1)
    batch.insert(pos, target)
    assert_close("stateless, in a batch", alone, model.logits(batch)[pos], "f64_exact")
    ctxs = [TextContext(f"r{i}", t) for i, t in enumerate(batch)]
    out = model.execute(model.prepare_initial_token_inputs(ctxs, return_n_logits=[len(t) for t in batch]))
    assert_close("pipeline, in a batch", alone, out.logits_for(f"r{pos}"), "f64_exact")
    _release_all(model)


def test_release_then_reclaim_starts_clean(model):
    _release_all(model)
    x, y = _prompt(5, 12), _prompt(6, 8)
    model.execute(model.prepare_initial_token_inputs([TextContext("a", x)]))
    model.release("a")
    assert "a" not in model.active_requests and model.seq_len("a") == 0
    out = model.execute(model.prepare_initial_token_inputs([TextContext("a", y)], return_n_logits=len(y)))
    assert_close("re-claimed id", model.logits([y])[0], out.logits, "f64_exact")
    # The slot of a released request, handed to a different id, starts from zero too.
    model.release("a")
    out = model.execute(model.prepare_initial_token_inputs([TextContext("b", y)]))
    assert_close("reused slot", model.logits([y])[0][-1:], out.logits, "f64_exact")
    assert not model.release("never-seen")
    _release_all(model)


def test_errors_name_the_request_and_change_nothing(ckpt):
    m = Qwen35Model.from_pretrained(ckpt, max_batch_size=2, max_length=24, return_logits="variable")
    a = _prompt(7, 10)
    inputs = m.prepare_initial_token_inputs([TextContext("ok", a)])
    m.execute(inputs)
    before = _snapshot(m)
    cases = [
        ([TextContext("bad", [1, V])], RequestError, r"'bad'.*token id 97 at position 1.*vocabulary"),
        ([TextContext("neg", [-1, 2])], RequestError, r"'neg'.*token id -1"),
        ([TextContext("ok", [1]), TextContext("empty", [])], RequestError, r"'empty' has no tokens"),
        ([TextContext("ok", list(range(15)))], RequestError, r"'ok' would hold 25 tokens.*max_length 24"),
        ([TextContext("long", list(range(25)))], RequestError, r"'long' would hold 25"),
        ([TextContext("n1", [1]), TextContext("n2", [2])], PoolFullError, r"'n2'.*max_batch_size"),
        ([TextContext("d", [1]), TextContext("d", [2])], RequestError, r"'d' appears twice"),
        ([TextContext("f", [1.5])], ValueError, r"'f'.*integers"),
        ([TextContext("two", [[1, 2]])], ValueError, r"'two'.*1-D"),
    ]
    for contexts, err, pattern in cases:
        with pytest.raises(err, match=pattern):
            m.prepare_initial_token_inputs(contexts)
        _assert_same_snapshot(before, _snapshot(m))
    with pytest.raises(RequestError, match="return_n_logits = 3"):
        m.prepare_initial_token_inputs([TextContext("x", [1, 2])], return_n_logits=3)
    with pytest.raises(RequestError, match="empty batch"):
        m.prepare_initial_token_inputs([])
    # Decode for a released id; a bad decode token.
    nxt = m.prepare_next_token_inputs([3], inputs)
    with pytest.raises(RequestError, match=r"'ok'.*token id 500"):
        m.prepare_next_token_inputs([500], inputs)
    m.release("ok")
    with pytest.raises(UnknownRequestError, match="'ok'"):
        m.prepare_next_token_inputs([3], inputs)
    with pytest.raises(UnknownRequestError, match="'ok'.*released"):
        m.execute(nxt)
    assert m.active_requests == []
    # The refused calls left the model usable and correct.
    out = m.execute(m.prepare_initial_token_inputs([TextContext("ok", a)]))
    assert_close("after errors", m.logits([a])[0][-1:], out.logits, "f64_exact")


def test_inputs_are_consumed_once(model):
    _release_all(model)
    inputs = model.prepare_initial_token_inputs([TextContext("r", [1, 2, 3])])
    model.execute(inputs)
    with pytest.raises(RequestError, match="already executed"):
        model.execute(inputs)
    stale = model.prepare_next_token_inputs([4], inputs)
    fresh = model.prepare_next_token_inputs([4], inputs)
    model.execute(fresh)
    with pytest.raises(RequestError, match="advanced"):
        model.execute(stale)  # the request moved on: running these would corrupt its state
    assert inputs.conv_states is None  # prepare_next_token_inputs dropped the gathered copies
    _release_all(model)


def test_return_options(ckpt):
    tokens = [_prompt(8, 6), _prompt(9, 3)]
    ref = Qwen35Model.from_pretrained(ckpt).logits(tokens)
    m_all = Qwen35Model.from_pretrained(ckpt, return_logits="all", return_hidden_states="all")
    out = m_all.execute(m_all.prepare_initial_token_inputs([TextContext(i, t) for i, t in enumerate(tokens)]))
    np.testing.assert_array_equal(out.logit_offsets, [0, 6, 9])
    assert_close("all", np.concatenate(ref), out.logits, "f64_exact")
    assert out.hidden_states.shape == (9, 32)
    assert_close("hidden -> logits", out.logits, out.hidden_states @ m_all.weights.lm_head.T, "f64_exact")
    m_last = Qwen35Model.from_pretrained(ckpt, return_hidden_states="last")
    inputs = m_last.prepare_initial_token_inputs([TextContext(i, t) for i, t in enumerate(tokens)],
                                                 return_n_logits=2)
    out = m_last.execute(inputs)
    assert_close("last 2", np.concatenate([ref[0][-2:], ref[1][-2:]]), out.logits, "f64_exact")
    assert out.hidden_states.shape == (2, 32)
    with pytest.raises(RequestError, match="variable"):
        m_last.prepare_initial_token_inputs([TextContext("z", [1, 2])], return_n_logits=[1])
    m_none = Qwen35Model.from_pretrained(ckpt)
    assert m_none.execute(m_none.prepare_initial_token_inputs([TextContext(0, [1])])).hidden_states is None
    with pytest.raises(ValueError, match="return_logits"):
        Qwen35Model.from_pretrained(ckpt, return_logits="first")
    with pytest.raises(ValueError, match="dtype"):
        Qwen35Model.from_pretrained(ckpt, dtype=np.float16)


def test_float32_model_is_close_to_float64(ckpt):
    tokens = _prompt(10, 30)
    ref = Qwen35Model.from_pretrained(ckpt).logits([tokens])[0]
    m32 = Qwen35Model.from_pretrained(ckpt, dtype=np.float32)
    got = m32.logits([tokens])[0]
    assert got.dtype == np.float32
    assert_close("float32 logits", ref, got, "f32_logits")
    assert m32.state_cache.conv_pools[0].dtype == np.float32


def test_generate_greedy_equals_argmax_loop_and_stops(model):
    _release_all(model)
    prompt = _prompt(13, 9)
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(np.argmax(model.logits([seq])[0][-1])))
    expected = seq[len(prompt):]
    assert model.generate([prompt], max_new_tokens=6) == [expected]
    # More prompts than slots: processed in groups; results in prompt order; no live request left behind.
    many = model.generate([prompt] * 6, max_new_tokens=3)
    assert many == [expected[:3]] * 6 and model.active_requests == []
    # A stop token ends the request (and is included).
    assert model.generate([prompt], max_new_tokens=6, stop_token_ids=[expected[1]]) == [expected[:2]]
    assert model.generate([prompt], max_new_tokens=0) == [[]]
    a = model.generate([prompt], max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.95, seed=3)
    assert a == model.generate([prompt], max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.95, seed=3)
    assert model.active_requests == []


def test_sampling_filters():
    logits = np.array([0.0, 5.0, 4.9, -3.0, 1.0])
    assert sample_next_token(logits) == 1
    rng = np.random.default_rng(0)
    draws = {sample_next_token(logits, temperature=1.0, top_k=2, rng=rng) for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample_next_token(logits, temperature=1.0, top_p=0.3, rng=rng) for _ in range(100)}
    assert draws == {1}  # the top token alone holds >= 30 % of the mass
    with pytest.raises(ValueError):
        sample_next_token(logits, temperature=-1)


def test_model_inputs_packing(model):
    _release_all(model)
    inputs = model.prepare_initial_token_inputs([TextContext("a", [5, 6, 7]), TextContext("b", [8])],
                                                return_n_logits=[2, 1])
    assert isinstance(inputs, ModelInputs)
    np.testing.assert_array_equal(inputs.tokens, [5, 6, 7, 8])
    np.testing.assert_array_equal(inputs.input_row_offsets, [0, 3, 4])
    np.testing.assert_array_equal(inputs.position_ids, [[0, 1, 2, 0]] * 3)
    assert len(inputs.conv_states) == model.config.num_linear_layers
    assert inputs.recurrent_states[0].shape == (2, 4, 8, 8)
    out = model.execute(inputs)
    assert out.logits.shape == (3, V)
    nxt = model.prepare_next_token_inputs(np.array([1, 2]), inputs)
    np.testing.assert_array_equal(nxt.position_ids, [[3, 1]] * 3)
    _release_all(model)


class PipelineMachine(RuleBasedStateMachine):
    """Random interleavings of prefill chunks, decode steps, releases and slot reuse across requests, checked at
    every step against stateless logits of each request's whole history (no state ever reaches another request)."""

    weights = None  # set by the fixture below (a checkpoint is written once per module)

    @initialize()
    def start(self):
        self.m = Qwen35Model(PipelineMachine.weights, max_batch_size=3, return_logits="variable")
        self.history: dict[str, list[int]] = {}
        self.rng = np.random.default_rng(0)

    @rule(data=st.data())
    def step(self, data):
        live = sorted(self.history)
        candidates = live + [r for r in ("a", "b", "c", "d") if r not in self.history][:3 - len(live)]
        ids = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True))
        lengths = [data.draw(st.integers(1, 9)) for _ in ids]
        new = {r: self.rng.integers(0, V, n).tolist() for r, n in zip(ids, lengths, strict=True)}
        out = self.m.execute(self.m.prepare_initial_token_inputs([TextContext(r, new[r]) for r in ids],
                                                                 return_n_logits=lengths))
        for r in ids:
            self.history.setdefault(r, []).extend(new[r])
            full = self.m.logits([self.history[r]])[0]
            assert_close(f"request {r}", full[-len(new[r]):], out.logits_for(r), "f64_exact")

    @rule(data=st.data())
    def release(self, data):
        if self.history:
            r = data.draw(st.sampled_from(sorted(self.history)))
            assert self.m.release(r)
            del self.history[r]

    @invariant()
    def bookkeeping(self):
        if hasattr(self, "m"):
            assert sorted(self.m.active_requests) == sorted(self.history)
            for r, h in self.history.items():
                assert self.m.seq_len(r) == len(h) == self.m.kv_cache.seq_len(r)


@pytest.fixture
def pipeline_weights(ckpt):
    from reference.weights import load_weights

    PipelineMachine.weights = load_weights(ckpt)
    yield
    PipelineMachine.weights = None


def test_pipeline_state_machine(pipeline_weights):
    run_state_machine_as_test(PipelineMachine, settings=settings(settings(), stateful_step_count=12))
