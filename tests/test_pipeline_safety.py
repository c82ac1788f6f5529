"""Pipeline calls that cannot be misused, in both engines (reference.model and optimized.model).

Every misuse below is a RequestError (or its UnknownRequestError / PoolFullError kin) that names the request or
the prompt's index and leaves every request's state bit-identical (docs/pipeline_api.md, "What the API refuses"):

* calls on one model serialize (a reentrant lock): concurrent independent requests give the sequential results,
  and every public call waits while another thread holds the lock
* inputs run once: executed twice, prepared twice and both executed, stale after another step, or from before a
  restore — refused; `prepare_next_token_inputs` on inputs that never ran — refused (the prompt would be lost)
* inputs of another model instance (or the other engine) are refused by `execute` and `prepare_next_token_inputs`
* image / video placeholder ids without pixels are refused in every prefill of a multimodal model (a decode token
  that happens to be a placeholder id is an ordinary token, as in Hugging Face's generate)
* `generate` uses private request ids (a caller's live request of any id is untouched) and its errors name the
  prompt's index; its parameters (and `generate_tokens`' and `sample_next_token`'s) are checked up front;
  non-finite logits are an error, not token 0 forever
* `generate` and `generate_tokens` stop at the same total (prompt + new <= max_length) and refuse a prompt at or
  over max_length, or a uint64 id, with the same message (the id unwrapped)
"""
from __future__ import annotations

import re
import threading
from functools import partial

import numpy as np
import pytest
import torch

import optimized.model as OM
import reference.model as RM
from hf_checkpoints import make_hf_checkpoint
from qwen35.generation import generate_tokens
from reference.context import TextContext
from reference.errors import RequestError
from reference.multimodal import TextAndVisionContext
from reference.pipeline import sample_next_token
from tests._mm_cases import IMG, VID, prompt_case

torch.set_num_threads(1)
V = 97  # tiny vocabulary
MAX_LEN = 24
ENGINES = ("reference", "optimized")
JOIN_S = 120  # a thread that has not finished by then is a hang


def _make(engine, path, **kw):
    if engine == "reference":
        return RM.Qwen35Model.from_pretrained(path, max_batch_size=kw.pop("max_batch_size", 4), **kw)
    return OM.Qwen35Model.from_pretrained(path, max_batch_size=kw.pop("max_batch_size", 4), backend="torch", **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("safety")
    return {kind: make_hf_checkpoint(root / kind, kind=kind, seed=seed) for kind, seed in (("dense", 31),
                                                                                            ("multimodal", 5))}


@pytest.fixture(scope="module")
def dense_dir(checkpoints):
    return checkpoints["dense"]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def model(engine, dense_dir):
    return _make(engine, dense_dir, max_length=MAX_LEN)


@pytest.fixture(scope="module")
def mm_model(engine, checkpoints):
    return _make(engine, checkpoints["multimodal"])


def _prompt(seed, n):
    return np.random.default_rng(seed).integers(0, V, n).tolist()


def _host(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _release_all(m):
    for r in m.active_requests:
        m.release(r)


def _everything(m) -> dict:
    """Every live request's whole state (snapshot arrays, tokens, rope_delta), as host arrays."""
    out = {}
    for rid in m.active_requests:
        s = m.snapshot(rid)
        arrays = s.conv_states + s.recurrent_states + [x for kv in s.kv for x in kv]
        out[rid] = (s.length, s.tokens.tolist(), s.rope_delta, [_host(a).copy() for a in arrays])
    return out


def _assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for rid in before:
        b, a = before[rid], after[rid]
        assert a[:3] == b[:3], rid
        for x, y in zip(b[3], a[3], strict=True):
            np.testing.assert_array_equal(x, y)


def _step(m, rid, tokens):
    """Prefill `tokens` for `rid` (a new or live request); returns the inputs (executed) and the last logits."""
    inputs = m.prepare_initial_token_inputs([TextContext(rid, tokens)])
    return inputs, _host(m.execute(inputs).logits)[-1]


def _refused(m, call, match, exc=RequestError):
    """`call()` raises `exc` matching `match` and changes no request."""
    before = _everything(m)
    with pytest.raises(exc, match=match):
        call()
    _assert_unchanged(before, _everything(m))


# ---------------------------------------------------------------------------------------------- thread safety


def _greedy_pipeline(m, rid, prompt, steps):
    """Prefill in two chunks, then `steps` greedy decode steps; returns the generated ids and last logits."""
    m.execute(m.prepare_initial_token_inputs([TextContext(rid, prompt[:3])]))
    inputs = m.prepare_initial_token_inputs([TextContext(rid, prompt[3:])])
    logits = _host(m.execute(inputs).logits)[-1]
    new = []
    for _ in range(steps):
        new.append(int(np.argmax(logits)))
        inputs = m.prepare_next_token_inputs([new[-1]], inputs)
        logits = _host(m.execute(inputs).logits)[-1]
    m.release(rid)
    return new, logits


def _run_threads(targets):
    errors, threads = [], []

    def wrap(f):
        try:
            f()
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    for f in targets:
        threads.append(threading.Thread(target=wrap, args=(f,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive(), "a pipeline call hangs"
    if errors:
        raise errors[0]


def test_concurrent_requests_equal_sequential_results(engine, dense_dir):
    model = _make(engine, dense_dir, max_batch_size=8, max_length=MAX_LEN)  # 4 pipelines + a generate of 2
    prompts = [_prompt(s, 6 + s) for s in range(4)]
    want = [_greedy_pipeline(model, f"seq{i}", p, 5) for i, p in enumerate(prompts)]
    want_gen = model.generate(prompts[:2], max_new_tokens=4)
    got, got_gen = {}, {}

    def pipeline(i):
        return lambda: got.__setitem__(i, _greedy_pipeline(model, f"thr{i}", prompts[i], 5))

    def gen(i):
        return lambda: got_gen.__setitem__(i, model.generate(prompts[:2], max_new_tokens=4))

    for _ in range(2):
        _run_threads([pipeline(i) for i in range(4)] + [gen(0), gen(1)])
        for i in range(4):
            assert got[i][0] == want[i][0]
            np.testing.assert_array_equal(got[i][1], want[i][1])  # bit-identical: nothing interleaved
        assert got_gen == {0: want_gen, 1: want_gen}
    assert model.active_requests == []


def test_every_public_call_waits_for_the_lock(model):
    _release_all(model)
    done_inputs, _ = _step(model, "held", [1, 2, 3])
    snap = model.snapshot("held")
    calls = {
        "prepare_initial_token_inputs": lambda: model.prepare_initial_token_inputs([TextContext("w", [4])]),
        "prepare_next_token_inputs": lambda: model.prepare_next_token_inputs([5], done_inputs),
        "execute": lambda: model.execute(model.prepare_initial_token_inputs([TextContext("x", [6])])),
        "release": lambda: model.release("w"),
        "snapshot": lambda: model.snapshot("held"),
        "restore": lambda: model.restore("held", snap),
        "logits": lambda: model.logits([[1, 2]]),
        "generate": lambda: model.generate([[1, 2]], max_new_tokens=1),
    }
    for name, call in calls.items():
        finished = threading.Event()
        t = threading.Thread(target=lambda c=call, done=finished: (c(), done.set()), daemon=True)
        with model.lock:
            t.start()
            assert not finished.wait(0.1), f"{name} ran while another thread held the model's lock"
        t.join(JOIN_S)
        assert finished.is_set(), f"{name} did not finish after the lock was released"
    _release_all(model)


# ---------------------------------------------------------------------------------------------- inputs run once


def test_inputs_run_once(model):
    _release_all(model)
    prompt = _prompt(1, 7)
    inputs, _ = _step(model, "a", prompt)
    _refused(model, lambda: model.execute(inputs), "execute: these inputs .*'a'.* were already executed")
    # even with the flag reset by hand the chunk is not fed twice: the request has advanced
    _refused(model, lambda: model.execute(type(inputs)(**{**inputs.__dict__, "executed": False})),
             r"request 'a' advanced since its inputs were prepared \(0 -> 7 tokens\)")
    # prepared twice for one request, both executed: the second is refused
    first = model.prepare_initial_token_inputs([TextContext("b", prompt[:4])])
    second = model.prepare_initial_token_inputs([TextContext("b", prompt[:4])])
    model.execute(first)
    _refused(model, lambda: model.execute(second), "request 'b' advanced")
    # a stale decode step after another step
    stale = model.prepare_next_token_inputs([9], inputs)
    fresh = model.prepare_next_token_inputs([9], inputs)
    model.execute(fresh)
    _refused(model, lambda: model.execute(stale), r"request 'a' advanced .*\(7 -> 8 tokens\)")
    # prepared before a restore
    snap = model.snapshot("a")
    pending = model.prepare_next_token_inputs([3], fresh)
    model.restore("a", snap)
    _refused(model, lambda: model.execute(pending), "request 'a' was restored")
    # the request is still right: prompt + 9 + 3 decoded == stateless logits
    _, last = _step(model, "a", [3])
    np.testing.assert_allclose(last, _host(model.logits([prompt + [9, 3]])[0])[-1], rtol=1e-4, atol=1e-4)
    _release_all(model)


def test_next_token_of_inputs_that_never_ran_is_refused(model):
    _release_all(model)
    prompt = _prompt(2, 9)
    inputs = model.prepare_initial_token_inputs([TextContext("p", prompt)])
    _refused(model, lambda: model.prepare_next_token_inputs([1], inputs),
             r"prepare_next_token_inputs: these inputs \(requests \['p'\]\) were never executed")
    assert model.seq_len("p") == 0
    out = _host(model.execute(inputs).logits)[-1]  # the prompt is still there to run
    np.testing.assert_allclose(out, _host(model.logits([prompt])[0])[-1], rtol=1e-4, atol=1e-4)
    _release_all(model)


def test_inputs_of_another_model_are_refused(engine, model, dense_dir):
    _release_all(model)
    other = _make(engine, dense_dir, max_length=MAX_LEN)
    other_engine = _make("optimized" if engine == "reference" else "reference", dense_dir)
    _step(model, "a", [1, 2, 3])
    for m in (other, other_engine):
        foreign, _ = _step(m, "a", [4, 5, 6])  # same id, same length: only the tag tells them apart
        _refused(model, partial(model.prepare_next_token_inputs, [7], foreign),
                 "prepare_next_token_inputs: these inputs .* not prepared by this model instance")
        pending = m.prepare_next_token_inputs([7], foreign)
        _refused(model, partial(model.execute, pending), "execute: these inputs .* not prepared by this model")
        m.execute(pending)  # its own model still runs them
    assert model.seq_len("a") == 3 and other.seq_len("a") == 4
    _release_all(model)


# ---------------------------------------------------------------------------------------------- placeholders


def test_placeholders_without_pixels_are_refused_in_every_prefill(mm_model):
    m = mm_model
    _release_all(m)
    toks, kw = prompt_case("one-image")
    _step(m, "txt", [1, 2, 3])
    cases = [
        ("a new text request", lambda: m.prepare_initial_token_inputs([TextContext("new", [1, IMG, 2])]),
         rf"request 'new': token {IMG} at position 1 is the image placeholder"),
        ("a video placeholder", lambda: m.prepare_initial_token_inputs([TextContext("new", [VID, 2])]),
         rf"request 'new': token {VID} at position 0 is the video placeholder"),
        ("a continuation chunk", lambda: m.prepare_initial_token_inputs([TextContext("txt", [4, 5, IMG])]),
         rf"request 'txt': token {IMG} at position 5 is the image placeholder"),
        ("a chunk_end prompt without pixels", lambda: m.prepare_initial_token_inputs(
            [TextAndVisionContext("new", list(toks), chunk_end=3)]), "no image pixels"),
        ("video placeholders next to image pixels", lambda: m.prepare_initial_token_inputs(
            [TextAndVisionContext("new", list(toks) + [VID], **kw)]), "video placeholder"),
        ("stateless logits", lambda: m.logits([[1, 2], [3, IMG]]), r"request 'batch\[1\]'.*image placeholder"),
        ("generate", lambda: m.generate([[1, 2], [3, IMG]], max_new_tokens=2), "prompt 1: .*image placeholder"),
    ]
    for what, call, match in cases:
        _refused(m, call, match)
        assert sorted(m.active_requests) == ["txt"], what
    # an image prompt: its own placeholders are fine; tokens past its end are free text, so checked too
    k = toks.index(IMG) + 2  # inside the placeholder run
    m.execute(m.prepare_initial_token_inputs([TextAndVisionContext("img", list(toks), chunk_end=k, **kw)]))
    _refused(m, lambda: m.prepare_initial_token_inputs([TextContext("img", list(toks[k:]) + [IMG])]),
             rf"request 'img': token {IMG} at position {len(toks)} is the image placeholder")
    m.execute(m.prepare_initial_token_inputs([TextContext("img", list(toks[k:]) + [7])]))  # the same, text
    # decode: a sampled placeholder id is an ordinary token (HF's generate embeds it the same way)
    inputs, _ = _step(m, "txt", [4])
    out = _host(m.execute(m.prepare_next_token_inputs([IMG], inputs)).logits)
    assert np.all(np.isfinite(out)) and m.seq_len("txt") == 5
    _release_all(m)


def test_placeholder_ids_are_tokens_on_a_text_model(model):
    _release_all(model)
    _, last = _step(model, "t", [1, IMG, VID, 2])  # a text-only model has no placeholders
    assert np.all(np.isfinite(last))
    _release_all(model)


# ---------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("user_id", ["a", 0, 1, ("__generate__", 0), ("__generate__", 1), "qwen35-generate"])
def test_generate_never_touches_a_live_request(model, user_id):
    _release_all(model)
    prompts = [_prompt(3, 5), _prompt(4, 6)]
    want = model.generate(prompts, max_new_tokens=3)
    _step(model, user_id, [1, 2, 3])
    before = _everything(model)
    assert model.generate(prompts, max_new_tokens=3) == want
    free = generate_tokens(model, prompts[0], max_new_tokens=3)
    assert free.new_ids == want[0]
    _assert_unchanged(before, _everything(model))
    _refused(model, lambda: generate_tokens(model, prompts[0], max_new_tokens=3, request_id=user_id),
             re.escape(f"generate_tokens: request {user_id!r} is live"))
    _release_all(model)


def test_generate_errors_name_the_prompt(model):
    _release_all(model)
    _step(model, "user", [1, 2])
    for prompts, match in [
        ([[1, 2], [3], [999]], r"^prompt 2: token id 999 at position 0 is outside the vocabulary \[0, 97\)$"),
        ([[1], []], r"^prompt 1 has no tokens"),
        ([[1], [[1, 2]]], r"^prompt 1: tokens must be a 1-D sequence"),
        ([[1], [0.5]], r"^prompt 1: tokens must be integers"),
        ([np.array([2 ** 64 - 1], dtype=np.uint64)], "^prompt 0: token id 18446744073709551615 at position 0"),
    ]:
        _refused(model, partial(model.generate, prompts, max_new_tokens=2), match)
        assert model.active_requests == ["user"]
    _release_all(model)


BAD_PARAMS = [
    (dict(max_new_tokens=True), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature="1"), "temperature must be a finite number >= 0"),
    (dict(temperature=True), "temperature must be a finite number >= 0"),
    (dict(top_k=0, temperature=1.0), "top_k must be an int >= 1 or None"),
    (dict(top_k=True), "top_k must be an int >= 1 or None"),
    (dict(top_k=2.0), "top_k must be an int >= 1 or None"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),  # at temperature 0 too
    (dict(top_p=1.5, temperature=1.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be a number in \(0, 1\]"),
    (dict(seed=-1), "seed must be an int >= 0 or None"),
    (dict(seed=1.5), "seed must be an int >= 0 or None"),
    (dict(seed=True), "seed must be an int >= 0 or None"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids must be ints"),
    (dict(stop_token_ids="a"), "stop_token_ids must be ints"),
    (dict(stop_token_ids=[True]), "stop_token_ids must be ints"),
]


@pytest.mark.parametrize("params, match", BAD_PARAMS)
def test_generation_parameters_are_checked_up_front(model, params, match):
    _release_all(model)
    _step(model, "user", [1, 2])
    kw = dict(max_new_tokens=2) | params
    _refused(model, lambda: model.generate([[1, 2, 3]], **kw), match)
    _refused(model, lambda: generate_tokens(model, [1, 2, 3], **kw), match)
    assert model.active_requests == ["user"]
    sampling = {k: v for k, v in params.items() if k in ("temperature", "top_k", "top_p")}
    if sampling:
        with pytest.raises(RequestError, match=match):
            sample_next_token(np.zeros(V), rng=np.random.default_rng(0), **sampling)
    _release_all(model)


def test_generation_parameters_that_are_accepted(model):
    _release_all(model)
    prompt = _prompt(5, 4)
    greedy = model.generate([prompt], max_new_tokens=3)
    assert model.generate([prompt], max_new_tokens=np.int64(3), top_k=np.int32(5), temperature=0,
                          seed=np.uint8(1), stop_token_ids={256}) == greedy  # an out-of-vocabulary stop id: unused
    assert model.generate([prompt], max_new_tokens=0) == [[]] and model.generate([], max_new_tokens=3) == []
    first_stop = greedy[0].index(greedy[0][1]) + 1
    assert generate_tokens(model, prompt, max_new_tokens=3, stop_token_ids=np.array([greedy[0][1]])).new_ids == \
        greedy[0][:first_stop]


def test_non_finite_logits_are_an_error_not_token_zero():
    for row, match in [(np.full(V, np.nan), "97 NaN"), (np.full(V, -np.inf), "0 finite of 97"),
                       (np.r_[np.inf, np.zeros(V - 1)], "1 \\+inf")]:
        for temperature in (0.0, 1.0):
            with pytest.raises(RequestError, match=f"prompt 3: cannot sample from non-finite logits.*{match}"):
                sample_next_token(row, temperature=temperature, rng=np.random.default_rng(0), who="prompt 3")
    masked = np.r_[np.full(V - 2, -np.inf), 0.0, 1.0]  # -inf entries are masked tokens: never sampled
    rng = np.random.default_rng(0)
    assert {sample_next_token(masked, temperature=1.0, rng=rng) for _ in range(50)} <= {V - 2, V - 1}
    assert sample_next_token(np.r_[1.0, 3.0, 2.0], temperature=1e-310, rng=rng) == 1  # z overflows: greedy


def test_generate_with_non_finite_weights_raises_naming_the_prompt(engine, dense_dir):
    m = _make(engine, dense_dir, max_length=MAX_LEN)
    if engine == "reference":
        m.weights.lm_head = np.full_like(m.weights.lm_head, np.nan)
    else:
        m.lm_head = torch.full_like(m.lm_head, float("nan"))
    with pytest.raises(RequestError, match="prompt 0: cannot sample from non-finite logits"):
        m.generate([[1], [2, 3]], max_new_tokens=4)
    with pytest.raises(RequestError, match="prompt 0: cannot sample from non-finite logits"):
        generate_tokens(m, [2, 3], max_new_tokens=4)
    assert m.active_requests == []


# ---------------------------------------------------------------------------------------------- max_length, ids


def test_generate_and_generate_tokens_agree_on_max_length(model):
    _release_all(model)
    for n in (1, 20, MAX_LEN - 1):
        prompt = _prompt(n, n)
        new = model.generate([prompt], max_new_tokens=50)[0]
        result = generate_tokens(model, prompt, max_new_tokens=50)
        assert result.new_ids == new and len(prompt) + len(new) == MAX_LEN
        assert result.stopped_by == "max length"
        assert len(model.logits([prompt + new])[0]) == MAX_LEN  # the whole sequence is a valid request again
    for n in (MAX_LEN, MAX_LEN + 1):
        prompt = _prompt(n, n)
        with pytest.raises(RequestError) as a:
            model.generate([prompt], max_new_tokens=1)
        with pytest.raises(RequestError) as b:
            generate_tokens(model, prompt, max_new_tokens=1)
        assert str(a.value) == str(b.value) == (f"prompt 0 has {n} tokens, but max_length is {MAX_LEN}: prompt + new "
                                                "tokens must stay <= max_length, so there is no room for a new token")
    assert model.active_requests == []


def test_uint64_token_ids_are_reported_unwrapped(model):
    _release_all(model)
    huge = np.array([5, 2 ** 64 - 1], dtype=np.uint64)
    msg = "token id 18446744073709551615 at position 1 is outside the vocabulary [0, 97)"
    with pytest.raises(RequestError) as a:
        model.generate([huge], max_new_tokens=1)
    with pytest.raises(RequestError) as b:
        generate_tokens(model, huge, max_new_tokens=1)
    assert str(a.value) == str(b.value) == f"prompt 0: {msg}"
    inputs, _ = _step(model, "u", [1, 2])
    _refused(model, lambda: model.prepare_initial_token_inputs([TextContext("v", huge)]),
             re.escape(f"request 'v': {msg}"))
    _refused(model, lambda: model.prepare_next_token_inputs(np.array([2 ** 64 - 1], np.uint64), inputs),
             "request 'u': token id 18446744073709551615 at position 0")
    _refused(model, lambda: model.logits([[2 ** 70]]), r"token id 1180591620717411303424 at position 0")
    assert _step(model, "w", np.array([1, 2], dtype=np.uint64))[1].shape == (V,)  # in-range uint64 ids are fine
    _release_all(model)
