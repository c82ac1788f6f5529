"""reference.pipeline: the request layer both engines share (docs/pipeline_api.md).

* one contract: both engines build and return the same `ModelInputs` / `ModelOutputs` / `RequestSnapshot` classes,
  each filling its own state payload
* `prepare_next_token_inputs(tokens, prev, request_ids=...)` decodes some of a step's requests; the others keep
  their state and continue later; a wrong subset is refused and changes nothing
* `generate` reports every step to `on_step` (phase, prompts, why each stopped) and gives the same tokens with
  or without the hook, and whatever `return_logits` the model was built with
* `generate` under caller-given ids refuses ids that are live
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import optimized.model as OM
import reference.model as RM
from hf_checkpoints import make_hf_checkpoint
from reference import pipeline
from reference.context import TextContext
from reference.errors import RequestError

torch.set_num_threads(1)
V = 97  # tiny vocabulary
MAX_LEN = 16
ENGINES = ("reference", "optimized")


def _make(engine, path, **kw):
    if engine == "reference":
        return RM.Qwen35Model.from_pretrained(path, max_batch_size=4, **kw)
    return OM.Qwen35Model.from_pretrained(path, max_batch_size=4, backend="torch", **kw)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("pipeline") / "dense", kind="dense", seed=41)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def model(engine, dense_dir):
    return _make(engine, dense_dir, max_length=MAX_LEN)


def _prompt(seed, n):
    return np.random.default_rng(seed).integers(0, V, n).tolist()


def _host(x) -> np.ndarray:
    return pipeline.host_logits(x)


def _release_all(m):
    for r in m.active_requests:
        m.release(r)


def test_both_engines_share_one_contract(dense_dir):
    ref, opt = _make("reference", dense_dir), _make("optimized", dense_dir)
    for name in ("ModelInputs", "ModelOutputs", "RequestSnapshot", "RequestError"):
        assert getattr(RM, name) is getattr(OM, name) is getattr(pipeline, name), name
    for m in (ref, opt):
        inputs = m.prepare_initial_token_inputs([TextContext("a", [1, 2, 3])])
        out = m.execute(inputs)
        assert type(inputs) is pipeline.ModelInputs and type(out) is pipeline.ModelOutputs
        assert type(m.snapshot("a")) is pipeline.RequestSnapshot
        assert list(inputs.seq_lens) == [3] and not inputs.is_decode
        m.release("a")
    # each engine fills its own payload: gathered state copies (reference) or slot ids (optimized)
    r_in = ref.prepare_initial_token_inputs([TextContext("b", [4])])
    o_in = opt.prepare_initial_token_inputs([TextContext("b", [4])])
    assert len(r_in.conv_states) == ref.config.num_linear_layers and r_in.slot_ids is None
    assert o_in.conv_states is None and o_in.slot_ids.tolist() == [0] and o_in.host_tokens.tolist() == [4]


def test_decode_some_requests_of_a_step(model):
    _release_all(model)
    pa, pb, pc = _prompt(1, 5), _prompt(2, 7), _prompt(3, 3)
    inputs = model.prepare_initial_token_inputs([TextContext(r, p) for r, p in (("a", pa), ("b", pb), ("c", pc))])
    model.execute(inputs)
    step = model.prepare_next_token_inputs([9, 8], inputs, request_ids=["c", "b"])  # a sits this step out
    assert step.request_ids == ["c", "b"] and step.is_decode
    out = model.execute(step)
    for rid, prompt, t in (("c", pc, 9), ("b", pb, 8)):
        np.testing.assert_allclose(_host(out.logits_for(rid))[-1], _host(model.logits([prompt + [t]])[0])[-1],
                                   rtol=1e-4, atol=1e-4)
    assert (model.seq_len("a"), model.seq_len("b"), model.seq_len("c")) == (5, 8, 4)
    # the request that sat out continues where it was (a one-token prefill chunk is a decode step too)
    out = model.execute(model.prepare_initial_token_inputs([TextContext("a", [7])]))
    np.testing.assert_allclose(_host(out.logits)[-1], _host(model.logits([pa + [7]])[0])[-1], rtol=1e-4, atol=1e-4)
    _release_all(model)


def test_a_wrong_subset_is_refused_and_changes_nothing(model):
    _release_all(model)
    inputs = model.prepare_initial_token_inputs([TextContext("a", [1, 2]), TextContext("b", [3])])
    model.execute(inputs)
    model.execute(model.prepare_initial_token_inputs([TextContext("other", [4, 5])]))
    for tokens, ids, match in [
        ([1], ["other"], r"request 'other' is not one of these inputs' requests \['a', 'b'\]"),
        ([1, 2], ["a", "a"], "request 'a' appears twice in request_ids"),
        ([1, 2], ["a"], "2 next tokens for 1 requests"),
        ([], [], "request_ids is empty"),
        # an order is needed (token b continues request_ids[b]): a string, a set or a dict has none to trust
        ([1, 2], "ab", "request_ids must be a list or tuple of request ids .* got str"),
        ([1, 2], {"a", "b"}, "request_ids must be a list or tuple of request ids .* got set"),
        ([1, 2], {"a": 0, "b": 1}, "request_ids must be a list or tuple of request ids .* got dict"),
    ]:
        with pytest.raises(RequestError, match=match):
            model.prepare_next_token_inputs(tokens, inputs, request_ids=ids)
    assert [model.seq_len(r) for r in ("a", "b", "other")] == [2, 1, 2]
    model.execute(model.prepare_next_token_inputs([6], inputs, request_ids=["b"]))
    assert [model.seq_len(r) for r in ("a", "b", "other")] == [2, 2, 2]
    _release_all(model)


def test_generate_reports_every_step(model):
    _release_all(model)
    prompts = [_prompt(4, MAX_LEN - 2), _prompt(5, 4)]  # prompt 0 has room for two new tokens
    reports = []
    got = pipeline.generate(model, prompts, max_new_tokens=3, on_step=reports.append)
    assert got == model.generate(prompts, max_new_tokens=3)
    assert [len(g) for g in got] == [2, 3]
    assert [(r.phase, r.prompts, r.stopped) for r in reports] == [
        ("prefill", [0, 1], {}), ("decode", [0, 1], {0: "max length"}), ("decode", [1], {1: "max_new_tokens"})]
    assert all(r.seconds > 0 for r in reports)
    # a stop token ends its prompt at once (and is included)
    stop = got[1][0]
    reports.clear()
    stopped = pipeline.generate(model, prompts[1:], max_new_tokens=3, stop_token_ids=[stop], on_step=reports.append)
    assert stopped == [[stop]] and reports[-1].stopped == {0: "stop token"}
    assert model.active_requests == []


def test_generate_does_not_depend_on_return_logits(engine, dense_dir, model):
    _release_all(model)
    prompts = [_prompt(6, 5), _prompt(7, 9), _prompt(8, 2)]
    want = model.generate(prompts, max_new_tokens=4)
    for mode in ("all", "variable"):
        other = _make(engine, dense_dir, max_length=MAX_LEN, return_logits=mode)
        shapes = []
        execute = other.execute

        def recording(inputs, execute=execute, shapes=shapes):
            out = execute(inputs)
            shapes.append(tuple(out.logits.shape))
            return out

        other.execute = recording
        assert other.generate(prompts, max_new_tokens=4) == want, mode
        # every step computes one logit row per running request, the prefill too ("all" would give 16 rows)
        assert shapes == [(3, V), (3, V), (3, V), (3, V)], (mode, shapes)
        assert other.return_logits == mode  # the mode is the model's own again afterwards


def test_generate_under_given_ids(model):
    _release_all(model)
    prompt = _prompt(9, 4)
    want = model.generate([prompt], max_new_tokens=3)
    assert pipeline.generate(model, [prompt], max_new_tokens=3, request_ids=["mine"]) == want
    assert model.active_requests == []  # released afterwards
    model.execute(model.prepare_initial_token_inputs([TextContext("mine", [1, 2])]))
    with pytest.raises(RequestError, match="generate: request 'mine' is live"):
        pipeline.generate(model, [prompt], max_new_tokens=3, request_ids=["mine"])
    with pytest.raises(RequestError, match="generate: 2 request ids for 1 prompts"):
        pipeline.generate(model, [prompt], max_new_tokens=3, request_ids=["x", "y"])
    assert model.active_requests == ["mine"] and model.seq_len("mine") == 2
    _release_all(model)


def test_generate_tokens_checks_its_prompt_before_any_step(model):
    """A bare id, a context or a nested list is refused as "prompt 0" before anything runs."""
    from qwen35.generation import generate_tokens

    _release_all(model)
    calls = []
    execute = model.execute
    model.execute = lambda inputs: calls.append(1) or execute(inputs)
    try:
        for bad in (5, np.int64(7), TextContext("c", [1, 2]), [[1, 2]]):
            with pytest.raises(RequestError, match="prompt 0"):
                generate_tokens(model, bad, max_new_tokens=3)
        assert calls == [] and model.active_requests == []
        assert generate_tokens(model, [1, 2, 3], max_new_tokens=2).new_ids == model.generate([[1, 2, 3]], 2)[0]
    finally:
        del model.execute


@pytest.mark.parametrize("bad", [5, np.int64(7), None, "ab"])
def test_a_batch_that_is_not_a_list_of_prompts_is_refused(model, bad):
    with pytest.raises(RequestError, match="generate: expected a list of prompts"):
        model.generate(bad, max_new_tokens=2)
    with pytest.raises(RequestError, match="logits: expected a list of prompts"):
        model.logits(bad)
    assert model.active_requests == []
