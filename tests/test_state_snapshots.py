"""Request snapshots in the reference model: prefix caching and speculative rollback (pitfall B16, B17).

`Qwen35Model.snapshot(id)` deep-copies a request's conv + recurrent state (every linear layer), its K/V (every
full layer), length, token ids and MRoPE offset; `restore(id, snapshot)` puts it into a live or a fresh slot.

* checkpoints at block boundaries: resuming from checkpoint c == the full run (logits and states, bitwise when the
  same blocks follow), also into a slot that held another request;
* negative tests: resuming from the wrong checkpoint, or a KV hit paired with an older recurrent checkpoint,
  gives a clearly different result (and the snapshot's tokens tell the prefixes apart);
* speculative decoding: verify k draft tokens, roll back to j <= k by snapshot + replay == processing the j
  tokens directly (state and next logits);
* a snapshot shares no memory with the model: later steps do not change it, changing it does not change the
  model, and it can be restored many times;
* restore checks everything first (errors change nothing), and inputs prepared before a restore are refused.
"""
from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _tolerance import assert_close
from hf_checkpoints import make_hf_checkpoint
from qwen35.measure import rel_rms
from reference.model import PoolFullError, Qwen35Model, RequestError, RequestSnapshot, TextContext, UnknownRequestError

V = 97  # tiny vocabulary


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("snap") / "dense", kind="dense", seed=23)


@pytest.fixture(scope="module")
def model(ckpt):
    return Qwen35Model.from_pretrained(ckpt, max_batch_size=4, return_logits="all")


def _tokens(seed, n):
    return np.random.default_rng(seed).integers(0, V, n).tolist()


def _release_all(m):
    for r in m.active_requests:
        m.release(r)


def _step(m, rid, toks):
    """Feed `toks` to request `rid` as one chunk; every position's logits [len, V]."""
    return m.execute(m.prepare_initial_token_inputs([TextContext(rid, list(toks))])).logits


def _arrays(s: RequestSnapshot):
    return s.conv_states + s.recurrent_states + [a for kv in s.kv for a in kv]


def _assert_same(a: RequestSnapshot, b: RequestSnapshot, budget=None):
    """Two snapshots hold the same state: bitwise (budget None) or within a relative-RMS budget."""
    assert a.length == b.length and a.rope_delta == b.rope_delta
    np.testing.assert_array_equal(a.tokens, b.tokens)
    for i, (x, y) in enumerate(zip(_arrays(a), _arrays(b), strict=True)):
        if budget is None:
            np.testing.assert_array_equal(x, y, err_msg=f"state array {i}")
        else:
            assert_close(f"state array {i}", x, y, budget)


# ---------------------------------------------------------------------------------------------- B16: prefix caching


@pytest.mark.parametrize("target", ["fresh", "live"])
@given(n=st.integers(9, 70), block=st.sampled_from([1, 3, 4, 8, 16]), seed=st.integers(0, 10**6),
       which=st.integers(0, 10**6))
def test_resume_from_a_block_checkpoint_equals_the_full_run(model, target, n, block, seed, which):
    _release_all(model)
    toks = _tokens(seed, n)
    bounds = list(range(0, n, block)) + [n]
    logits, ckpts = [], {}
    for s, e in pairwise(bounds):  # the full run, block by block, checkpointing at every boundary
        logits.append(_step(model, "full", toks[s:e]))
        ckpts[e] = model.snapshot("full")
    logits = np.concatenate(logits)
    final = ckpts[n]
    assert_close("blocked run vs one pass", model.logits([toks])[0], logits, "f64_exact")
    c = bounds[1:-1][which % len(bounds[1:-1])] if len(bounds) > 2 else bounds[1]
    snap = ckpts[c]
    assert snap.length == c and snap.tokens.tolist() == toks[:c]  # the prefix a cache would match
    if target == "live":  # a slot that holds another request's state: restore overwrites all of it
        _step(model, "resume", _tokens(seed + 1, 5))
    model.restore("resume", snap)
    assert model.seq_len("resume") == c
    got = [_step(model, "resume", toks[s:e]) for s, e in pairwise(bounds) if s >= c]
    got = np.concatenate(got) if got else np.zeros((0, V))
    np.testing.assert_array_equal(got, logits[c:])  # same blocks after the checkpoint: bitwise
    _assert_same(model.snapshot("resume"), final)
    if c < n:  # the rest in one chunk instead: equal to float64 rounding
        model.restore("resume", snap)
        assert_close("resume, rest in one chunk", logits[c:], _step(model, "resume", toks[c:]), "f64_exact")
        _assert_same(model.snapshot("resume"), final, "f64_exact")
    _release_all(model)


def test_resuming_from_the_wrong_checkpoint_is_detectable(model):
    _release_all(model)
    toks, block = _tokens(7, 48), 16
    ckpts, logits = {}, []
    for s in range(0, 48, block):
        logits.append(_step(model, "full", toks[s:s + block]))
        ckpts[s + block] = model.snapshot("full")
    logits = np.concatenate(logits)
    right, wrong = ckpts[32], ckpts[16]
    # the snapshot's own record tells which prefix it covers
    assert right.tokens.tolist() == toks[:32] and wrong.tokens.tolist() != toks[:32]
    model.restore("ok", right)
    ok = _step(model, "ok", toks[32:])
    np.testing.assert_array_equal(ok, logits[32:])
    model.restore("bad", wrong)  # a prefix-cache bug: resume at 32 from the checkpoint at 16
    bad = _step(model, "bad", toks[32:])
    err = rel_rms(logits[32:], bad)
    assert err > 1e-2, f"resuming from the wrong checkpoint gave relative RMS {err:.1e}: not detectable"
    # a KV hit at 32 paired with the recurrent/conv state of checkpoint 16 (ROCm/ATOM #1759): also detectable
    mixed = RequestSnapshot(request_id="mixed", length=32, tokens=right.tokens, conv_states=wrong.conv_states,
                            recurrent_states=wrong.recurrent_states, kv=right.kv)
    model.restore("mixed", mixed)
    err = rel_rms(logits[32:], _step(model, "mixed", toks[32:]))
    assert err > 1e-2, f"a stale recurrent checkpoint gave relative RMS {err:.1e}: not detectable"
    _release_all(model)


# ---------------------------------------------------------------------------------------------- B17: rollback


@given(p=st.integers(1, 30), k=st.integers(1, 8), data=st.data(), seed=st.integers(0, 10**6))
def test_rollback_of_speculative_tokens_equals_processing_j_directly(model, p, k, data, seed):
    j = data.draw(st.integers(0, k), label="accepted")
    _release_all(model)
    prompt, draft = _tokens(seed, p), _tokens(seed + 1, k)
    _step(model, "spec", prompt)
    before = model.snapshot("spec")
    verify = _step(model, "spec", draft)  # verify all k drafts in one chunk: logits after each of them
    assert model.seq_len("spec") == p + k
    model.restore("spec", before)  # roll back to the prompt, replay the j accepted tokens
    if j:
        replay = _step(model, "spec", draft[:j])
        assert_close("replayed logits vs verify", verify[:j], replay, "f64_exact")
    _step(model, "direct", prompt)  # the same j tokens, never speculated
    if j:
        _step(model, "direct", draft[:j])
    _assert_same(model.snapshot("spec"), model.snapshot("direct"))
    bonus = int(np.argmax(verify[j - 1])) if j else int(np.argmax(_step(model, "probe", prompt)[-1]))
    a = _step(model, "spec", [bonus])
    b = _step(model, "direct", [bonus])
    np.testing.assert_array_equal(a, b)  # next logits
    _assert_same(model.snapshot("spec"), model.snapshot("direct"))
    _release_all(model)


def test_rollback_by_per_token_snapshots_in_decode_mode(model):
    """Verify token by token (decode steps) keeping a snapshot after each; roll back to j by restoring one."""
    _release_all(model)
    prompt, draft = _tokens(3, 12), _tokens(4, 6)
    inputs = model.prepare_initial_token_inputs([TextContext("spec", prompt)])
    model.execute(inputs)
    snaps = [model.snapshot("spec")]
    for t in draft:
        inputs = model.prepare_next_token_inputs([t], inputs)
        model.execute(inputs)
        snaps.append(model.snapshot("spec"))
    for j in (0, 2, 6):
        model.restore("spec", snaps[j])
        direct = model.prepare_initial_token_inputs([TextContext(f"d{j}", prompt)])
        model.execute(direct)
        for t in draft[:j]:
            direct = model.prepare_next_token_inputs([t], direct)
            model.execute(direct)
        _assert_same(model.snapshot("spec"), model.snapshot(f"d{j}"))
        np.testing.assert_array_equal(_step(model, "spec", [5]), _step(model, f"d{j}", [5]))
        model.release(f"d{j}")
    _release_all(model)


# ---------------------------------------------------------------------------------------------- no aliasing


def test_a_snapshot_is_independent_of_later_mutation(model):
    _release_all(model)
    toks = _tokens(11, 20)
    _step(model, "a", toks[:12])
    snap = model.snapshot("a")
    frozen = [x.copy() for x in _arrays(snap)] + [snap.tokens.copy()]
    pool_arrays = model.state_cache.conv_pools + model.state_cache.recurrent_pools
    kv_arrays = [x for layer in model.config.full_layer_indices for kv in model.kv_cache.get(["a"], layer) for x in kv]
    for x in _arrays(snap) + [snap.tokens]:
        assert not any(np.shares_memory(x, y) for y in pool_arrays + kv_arrays)
    _step(model, "a", toks[12:])  # the request moves on ...
    _step(model, "a", [2])  # a decode step (one token)
    for x, y in zip(_arrays(snap) + [snap.tokens], frozen, strict=True):  # ... the snapshot does not
        np.testing.assert_array_equal(x, y)
    # restored twice, with the snapshot scribbled on in between: both copies run like the original
    model.restore("b", snap)
    for x in _arrays(snap):
        x[...] = np.nan
    snap.tokens[...] = 0
    nl = model.config.num_linear_layers
    kv = frozen[2 * nl:-1]
    pristine = RequestSnapshot(request_id="a", length=12, tokens=frozen[-1], conv_states=frozen[:nl],
                               recurrent_states=frozen[nl:2 * nl], kv=list(zip(kv[0::2], kv[1::2], strict=True)))
    model.restore("c", pristine)
    lb, lc = _step(model, "b", toks[12:]), _step(model, "c", toks[12:])
    np.testing.assert_array_equal(lb, lc)
    assert np.all(np.isfinite(lb))
    assert_close("restored copy vs one pass", model.logits([toks])[0][12:], lb, "f64_exact")
    for x in pristine.conv_states + pristine.recurrent_states:  # restore copied in, not aliased
        assert not any(np.shares_memory(x, y) for y in pool_arrays)
    _release_all(model)


def test_snapshot_bytes_equal_the_state_and_kv_it_copies(model):
    _release_all(model)
    _step(model, "a", _tokens(1, 33))
    snap = model.snapshot("a")
    assert snap.nbytes == model.state_cache.bytes_per_slot + model.kv_cache.nbytes("a")
    _release_all(model)


# ---------------------------------------------------------------------------------------------- errors


def test_restore_checks_first_and_refuses_stale_inputs(ckpt, model):
    _release_all(model)
    toks = _tokens(5, 10)
    _step(model, "a", toks)
    snap = model.snapshot("a")
    with pytest.raises(UnknownRequestError, match="'nope'"):
        model.snapshot("nope")
    with pytest.raises(TypeError, match="RequestSnapshot"):
        model.restore("a", {"length": 3})
    m32 = Qwen35Model.from_pretrained(ckpt, max_batch_size=1, dtype=np.float32)
    _step(m32, "x", toks)
    with pytest.raises(RequestError, match="restore of request 'a'.*float64"):
        model.restore("a", m32.snapshot("x"))
    short = Qwen35Model.from_pretrained(ckpt, max_batch_size=1, max_length=8)
    with pytest.raises(RequestError, match="length 10 is outside"):
        short.restore("a", snap)
    broken = RequestSnapshot(request_id="a", length=10, tokens=snap.tokens, conv_states=snap.conv_states,
                             recurrent_states=snap.recurrent_states[:-1], kv=snap.kv)
    with pytest.raises(RequestError, match="recurrent states for 3 linear layers"):
        model.restore("a", broken)
    for r in "bcd":
        _step(model, r, [1])
    with pytest.raises(PoolFullError):
        model.restore("e", snap)
    assert "e" not in model.active_requests
    _assert_same(model.snapshot("a"), snap)  # nothing above changed "a"
    # inputs prepared before a restore cannot run after it (they would write back the pre-restore state)
    inputs = model.prepare_initial_token_inputs([TextContext("a", [3, 4])])
    model.restore("a", snap)
    with pytest.raises(RequestError, match="'a' was restored"):
        model.execute(inputs)
    _assert_same(model.snapshot("a"), snap)
    _release_all(model)
