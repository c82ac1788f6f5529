"""Chunked prefill of image / video prompts in the reference pipeline model (pitfall B10, B19 d).

A request's first context is a `TextAndVisionContext` holding the *whole* prompt and `chunk_end`; only
tokens[:chunk_end] run now.  Later chunks are plain `TextContext`s with the prompt's next tokens.  Checked:

* any split of an image (or video) prompt, also inside a placeholder run, gives the logits of one-shot prefill
  (float64, 1e-10) and both equal Hugging Face's `Qwen3_5ForConditionalGeneration` (fp32 budget);
* the vision tower runs once per request, whatever the number of chunks;
* a chunk that runs past the prompt's end and greedy decoding after a chunked prompt equal one-shot (and HF's
  greedy tokens); decode positions are tokens-so-far + rope_delta;
* continuation tokens that differ from the stored prompt raise a RequestError naming the request and change no
  state; pixels for a live request, bad chunk_end values are errors;
* a snapshot taken in the middle of an image prompt resumes it in another request.
"""
from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference.multimodal as mm_module
from reference.context import TextContext
from reference.model import Qwen35Model, RequestError
from reference.multimodal import TextAndVisionContext
from tests._mm_cases import CFG, IMG, VE, hf_kwargs, inside_placeholder_runs, prompt_case
from tests._tolerance import assert_close
from tests.hf_checkpoints import load_hf_model, make_hf_checkpoint

torch = pytest.importorskip("torch")

CASES = {name: prompt_case(name) for name in ("two-images", "video")}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("mm_chunked"), kind="multimodal", seed=5)


@pytest.fixture(scope="module")
def hf(ckpt):
    return load_hf_model(ckpt)


@pytest.fixture(scope="module")
def model(ckpt):
    return Qwen35Model.from_pretrained(ckpt, max_batch_size=4, return_logits="all")


@pytest.fixture(scope="module")
def hf_logits(hf):
    out = {}
    with torch.no_grad():
        for name, (toks, kw) in CASES.items():
            out[name] = hf(**hf_kwargs(toks, kw), use_cache=False).logits[0].double().numpy()
    return out


@pytest.fixture(scope="module")
def one_shot(model):
    """Stateless one-shot logits [T, V] of each prompt (float64)."""
    return {name: model.logits([TextAndVisionContext("x", toks, **kw)])[0] for name, (toks, kw) in CASES.items()}


def _release_all(m):
    for r in m.active_requests:
        m.release(r)


def _state(m, rid):
    """The request's committed state (snapshot arrays) and length."""
    s = m.snapshot(rid)
    return s.conv_states + s.recurrent_states + [a for kv in s.kv for a in kv], s.length


def _run_chunked(m, rid, toks, kw, bounds):
    """Feed the prompt as chunks [bounds[i], bounds[i+1]): the first as TextAndVisionContext(chunk_end=...), the
    others as TextContexts.  Returns every position's logits [T, V] (the model returns all positions)."""
    out = [m.execute(m.prepare_initial_token_inputs(
        [TextAndVisionContext(rid, toks, chunk_end=bounds[1], **kw)])).logits]
    for s, e in pairwise(bounds[1:]):
        out.append(m.execute(m.prepare_initial_token_inputs([TextContext(rid, toks[s:e])])).logits)
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------- any split == one shot


def test_hf_and_one_shot_agree(hf_logits, one_shot):
    """The two oracles of the property test below agree with each other first."""
    for name in CASES:
        assert_close(f"one-shot vs HF ({name})", hf_logits[name], one_shot[name], "f32_logits")


@pytest.mark.parametrize("name", list(CASES))
@given(data=st.data())
def test_any_split_equals_one_shot_and_hf(model, hf_logits, one_shot, name, data):
    toks, kw = CASES[name]
    T = len(toks)
    inside = data.draw(st.sampled_from(inside_placeholder_runs(toks)), label="cut inside a placeholder run")
    cuts = data.draw(st.lists(st.integers(1, T - 1), max_size=4), label="other cuts")
    bounds = sorted({0, T, inside, *cuts})
    _release_all(model)
    got = _run_chunked(model, "c", toks, kw, bounds)
    assert model.seq_len("c") == T
    assert_close(f"chunked {bounds} vs one-shot ({name})", one_shot[name], got, "f64_exact")
    assert_close(f"chunked {bounds} vs HF ({name})", hf_logits[name], got, "f32_logits")
    # the state after the prompt equals the one-shot pipeline's
    model.execute(model.prepare_initial_token_inputs([TextAndVisionContext("one", toks, **kw)]))
    (sa, la), (sb, lb) = _state(model, "c"), _state(model, "one")
    assert la == lb == T
    for a, b in zip(sa, sb, strict=True):
        assert_close("state after the prompt", b, a, "f64_exact")
    _release_all(model)


def test_vision_tower_runs_once_per_request(model, monkeypatch):
    toks, kw = CASES["two-images"]
    calls = []
    real = mm_module.vision_tower
    monkeypatch.setattr(mm_module, "vision_tower", lambda *a, **k: calls.append(1) or real(*a, **k))
    _release_all(model)
    bounds = [0, 3, 5, 9, 14, len(toks)]  # 5 chunks, two of them end inside the first image's run
    _run_chunked(model, "t", toks, kw, bounds)
    assert len(calls) == 1  # one tower call for both images of the prompt, none for the later chunks
    model.release("t")


def test_chunks_in_a_ragged_batch_with_other_requests(model, one_shot):
    """Row offsets of the replaced embeddings and the positions are per request inside a packed batch."""
    _release_all(model)
    (ti, kwi), (tv, kwv) = CASES["two-images"], CASES["video"]
    text = [7, 8, 9, 10, 11]
    text_alone = model.logits([text])[0]
    a = model.execute(model.prepare_initial_token_inputs(
        [TextContext("txt", text[:2]), TextAndVisionContext("img", ti, chunk_end=6, **kwi)]))
    b = model.execute(model.prepare_initial_token_inputs(
        [TextContext("txt", text[2:]), TextAndVisionContext("vid", tv, chunk_end=9, **kwv),
         TextContext("img", ti[6:])]))
    c = model.execute(model.prepare_initial_token_inputs([TextContext("vid", tv[9:])]))
    assert_close("text request", text_alone, np.concatenate([a.logits_for("txt"), b.logits_for("txt")]), "f64_exact")
    assert_close("image request", one_shot["two-images"],
                 np.concatenate([a.logits_for("img"), b.logits_for("img")]), "f64_exact")
    assert_close("video request", one_shot["video"], np.concatenate([b.logits_for("vid"), c.logits]), "f64_exact")
    _release_all(model)


def test_stateless_logits_honour_chunk_end(model, one_shot):
    toks, kw = CASES["two-images"]
    got = model.logits([TextAndVisionContext("s", toks, chunk_end=7, **kw)])[0]
    assert got.shape == (7, CFG.vocab_size)
    assert_close("logits of tokens[:7]", one_shot["two-images"][:7], got, "f64_exact")


# ---------------------------------------------------------------------------------------------- decode after chunks


def test_greedy_continuation_after_a_chunked_prompt_equals_one_shot(ckpt, hf):
    toks, kw = CASES["two-images"]
    T, n_new = len(toks), 6
    m = Qwen35Model.from_pretrained(ckpt, max_batch_size=2)  # last-position logits
    want = m.generate([TextAndVisionContext("g", toks, **kw)], max_new_tokens=n_new)[0]
    with torch.no_grad():
        hf_out = hf.generate(**hf_kwargs(toks, kw), max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)
    assert want == hf_out[0, T:].tolist()
    full = m.logits([TextAndVisionContext("x", toks + want, **kw)])[0]  # one stateless pass over prompt + output

    inputs = m.prepare_initial_token_inputs([TextAndVisionContext("c", toks, chunk_end=5, **kw)])
    m.execute(inputs)
    inputs = m.prepare_initial_token_inputs([TextContext("c", toks[5:])])  # ends at the prompt's end
    logits = m.execute(inputs).logits
    snap = m.snapshot("c")
    delta = mm_module.plan_multimodal_prefill(TextAndVisionContext("c", toks, **kw), CFG).rope_delta
    assert snap.rope_delta == delta < 0
    assert snap.mm is None and snap.prompt is None  # prompt consumed: only rope_delta is kept
    got = []
    for i in range(n_new):
        assert_close(f"logits before token {i}", full[T - 1 + i:T + i], logits, "f64_exact")
        got.append(int(np.argmax(logits[-1])))
        inputs = m.prepare_next_token_inputs([got[-1]], inputs)
        np.testing.assert_array_equal(inputs.position_ids, np.full((3, 1), T + i + delta))  # past_len + rope_delta
        logits = m.execute(inputs).logits
    assert got == want


def test_a_chunk_may_run_past_the_prompt_end(model, one_shot):
    """The last prompt tokens and the first generated tokens in one chunk (speculative verify after a prompt)."""
    toks, kw = CASES["video"]
    T = len(toks)
    extra = [20, 21, 22]
    full = model.logits([TextAndVisionContext("x", toks + extra, **kw)])[0]
    _release_all(model)
    a = _run_chunked(model, "p", toks, kw, [0, T - 3])  # only the first chunk
    inputs = model.prepare_initial_token_inputs([TextContext("p", toks[T - 3:] + extra)])
    pre = mm_module.multimodal_prefill_inputs(TextAndVisionContext("x", toks, **kw), model._vision_weights, CFG)
    np.testing.assert_array_equal(inputs.position_ids[:, :3], pre.position_ids[:, T - 3:])
    np.testing.assert_array_equal(inputs.position_ids[:, 3:], pre.decode_position_ids(T, 3))
    b = model.execute(inputs).logits
    assert_close("prompt + 3 tokens", full, np.concatenate([a, b]), "f64_exact")
    model.release("p")


# ---------------------------------------------------------------------------------------------- errors, no corruption


def _everything(m):
    """All model state, copied: the whole pools, and each live request's snapshot (state, K/V, bookkeeping)."""
    pools = [p.copy() for p in m.state_cache.conv_pools + m.state_cache.recurrent_pools]
    return pools, {r: m.snapshot(r) for r in m.active_requests}


def _assert_unchanged(before, after):
    (pa, sa), (pb, sb) = before, after
    for a, b in zip(pa, pb, strict=True):
        np.testing.assert_array_equal(a, b)
    assert sa.keys() == sb.keys()
    for r in sa:
        x, y = sa[r], sb[r]
        assert (x.length, x.rope_delta) == (y.length, y.rope_delta)
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.prompt, y.prompt)
        for a, b in zip(x.conv_states + x.recurrent_states + [a for kv in x.kv for a in kv],
                        y.conv_states + y.recurrent_states + [b for kv in y.kv for b in kv], strict=True):
            np.testing.assert_array_equal(a, b)


def test_mismatched_continuation_raises_and_changes_nothing(model, one_shot):
    toks, kw = CASES["two-images"]
    _release_all(model)
    k = inside_placeholder_runs(toks)[2]
    first = model.prepare_initial_token_inputs([TextAndVisionContext("m", toks, chunk_end=k, **kw)])
    model.execute(first)
    model.execute(model.prepare_initial_token_inputs([TextContext("other", [1, 2, 3])]))
    before = _everything(model)
    wrong = list(toks[k:k + 4])
    wrong[2] = 7  # a text token where the prompt holds a placeholder
    with pytest.raises(RequestError, match=rf"request 'm'.*token 7 at position 2.*holds {IMG} at prompt position "
                                           rf"{k + 2}"):
        model.prepare_initial_token_inputs([TextContext("other", [4]), TextContext("m", wrong)])
    with pytest.raises(RequestError, match="request 'm'.*differs from its prompt"):  # with a new request in the batch
        model.prepare_initial_token_inputs([TextContext("new", [1]), TextContext("m", [VE])])
    with pytest.raises(RequestError, match="request 'm'.*differs"):  # a decode step that skips the prompt's rest
        model.prepare_next_token_inputs([3], first)
    with pytest.raises(RequestError, match="request 'm' is live: pixels"):  # pixels again for a live request
        model.prepare_initial_token_inputs([TextAndVisionContext("m", toks, **kw)])
    _assert_unchanged(before, _everything(model))
    assert sorted(model.active_requests) == ["m", "other"]
    # the right continuation still gives one-shot logits
    got = model.execute(model.prepare_initial_token_inputs([TextContext("m", toks[k:])])).logits
    assert_close("continuation after the errors", one_shot["two-images"][k:], got, "f64_exact")
    _release_all(model)


def test_bad_chunk_end_values():
    toks, kw = CASES["two-images"]
    for bad in (0, len(toks) + 1, -1, True, 2.0):
        with pytest.raises(ValueError, match="chunk_end must be an int"):
            TextAndVisionContext("b", toks, chunk_end=bad, **kw)


def test_text_prompt_with_chunk_end_is_checked_too(model):
    """A TextAndVisionContext without pixels but with chunk_end: plain chunked prefill, continuation checked."""
    _release_all(model)
    toks = [5, 6, 7, 8, 9, 10]
    full = model.logits([toks])[0]
    a = model.execute(model.prepare_initial_token_inputs([TextAndVisionContext("t", toks, chunk_end=2)])).logits
    with pytest.raises(RequestError, match="request 't'.*token 1 at position 0.*holds 7"):
        model.prepare_initial_token_inputs([TextContext("t", [1, 8])])
    b = model.execute(model.prepare_initial_token_inputs([TextContext("t", toks[2:])])).logits
    assert_close("text chunks", full, np.concatenate([a, b]), "f64_exact")
    model.release("t")


# ---------------------------------------------------------------------------------------------- snapshots mid-prompt


def test_snapshot_inside_an_image_run_resumes_in_another_request(model, one_shot):
    toks, kw = CASES["two-images"]
    _release_all(model)
    k = inside_placeholder_runs(toks)[0]
    first = _run_chunked(model, "src", toks, kw, [0, k])
    snap = model.snapshot("src")
    assert snap.length == k and snap.mm is not None and snap.prompt is not None
    model.release("src")
    model.restore("dst", snap)
    with pytest.raises(RequestError, match="request 'dst'.*differs"):
        model.prepare_initial_token_inputs([TextContext("dst", [1] + toks[k + 1:])])
    rest = model.execute(model.prepare_initial_token_inputs([TextContext("dst", toks[k:])])).logits
    assert_close("resumed image prompt", one_shot["two-images"], np.concatenate([first, rest]), "f64_exact")
    model.release("dst")
