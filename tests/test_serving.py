"""qwen35.serving: continuous batching over the public pipeline API, on a tiny model and a simulated clock.

* with greedy sampling every request of a trace gets the tokens it gets when run alone through model.generate,
  on both engines, with chunked prefill interleaved with decode steps of other requests
* the slots are never exceeded, and every slot is free at the end (also after a step that raised)
* requests are admitted in arrival order, never before they arrive
* a stop token ends a request (kept in its output); a tiny prefill token budget gives the same tokens
* static mode admits a batch only into an empty pool; runs on the simulated clock are deterministic
* a bad request is a RequestError naming it before anything runs, and leaves the model usable
* the times (TTFT, inter-token latency) follow the clock; the trace generator and the slot budget
* bench_serve end to end on a tiny model, its plot, and the command-line refusal of a bad --out
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import optimized.model as OM
import reference.model as RM
from qwen35 import serving
from qwen35.serving import Scheduler, ServeRequest, SimulatedClock, poisson_trace, slots_for_budget
from reference.checkpoint import random_state_dict
from reference.config import Qwen35Config
from reference.context import TextContext
from reference.errors import ConfigError, PoolFullError, RequestError
from reference.memory import memory_budget
from reference.weights import weights_from_state_dict

torch.set_num_threads(1)
CFG = Qwen35Config.tiny()
V = CFG.vocab_size
MAX_LEN = 48
ENGINES = ("reference", "optimized")


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(CFG, seed=5)


def _model(engine, state_dict, slots=4):
    if engine == "reference":  # the float64 oracle
        return RM.Qwen35Model(weights_from_state_dict(state_dict, CFG, np.float64), max_batch_size=slots,
                              max_length=MAX_LEN)
    return OM.Qwen35Model(weights_from_state_dict(state_dict, CFG, np.float32), max_batch_size=slots,
                          backend="torch", max_length=MAX_LEN)


@pytest.fixture(scope="module", params=ENGINES)
def model(request, state_dict):
    return _model(request.param, state_dict)


def _trace(n=7, rate=300.0, seed=1, prompts=(1, 20), new=(1, 8), **kw):
    """A busy trace on the simulated clock (a step costs 10 ms + 1 ms per token; arrivals every ~3 ms)."""
    return poisson_trace(n, rate, prompts, new, seed, vocab_size=V, **kw)


def _run(model, trace, **kw):
    kw.setdefault("clock", SimulatedClock())
    on_step = kw.pop("on_step", None)
    return Scheduler(model, **kw).run(trace, on_step=on_step)


def _alone(model, req, **kw):
    return model.generate([list(req.prompt)], max_new_tokens=req.max_new_tokens,
                          stop_token_ids=req.stop_token_ids, **kw)[0]


# ------------------------------------------------------------------------------------------------ tokens
def test_every_request_gets_its_tokens_from_running_alone(model, monkeypatch):
    trace = _trace()
    calls = {"next": 0}
    real_next = model.prepare_next_token_inputs

    def counting(*a, **kw):
        calls["next"] += 1
        return real_next(*a, **kw)

    monkeypatch.setattr(model, "prepare_next_token_inputs", counting)
    res = _run(model, trace, slots=3, token_budget=8)
    monkeypatch.undo()
    for req, rec in zip(trace, res.requests, strict=True):
        assert rec.request_id == req.request_id
        assert rec.tokens == _alone(model, req), req.request_id
        assert rec.finish_reason == "max_new_tokens" and len(rec.tokens) == req.max_new_tokens
    # what makes it continuous batching: a prefill chunk ran while others were decoding, a decode step ran
    # several requests, a prompt was split into chunks, and both decode paths of the pipeline API were used
    assert any(s.kind == "prefill" and s.decoding > 0 for s in res.steps)
    assert max(len(s.request_ids) for s in res.steps if s.kind == "decode") >= 2
    assert max(r.prefill_chunks for r in res.requests) >= 3
    assert calls["next"] > 0 and calls["next"] < sum(s.kind == "decode" for s in res.steps)
    assert model.active_requests == []


def test_the_slots_are_never_exceeded_and_all_are_freed(model):
    trace = _trace(n=9, seed=2)
    seen = []

    def check(step):
        assert len(model.active_requests) <= 2 and step.occupancy <= 2
        seen.append(step.occupancy)

    res = _run(model, trace, slots=2, token_budget=6, on_step=check)
    assert max(seen) == 2 and res.summary()["max_occupancy"] == 2  # the trace keeps the pool full
    assert model.active_requests == []
    assert res.mean_occupancy() <= 2


def test_a_failing_step_releases_every_request(model, monkeypatch):
    real = model.execute
    n = {"calls": 0}

    def failing(inputs):
        n["calls"] += 1
        if n["calls"] == 4:
            raise RuntimeError("injected failure")
        return real(inputs)

    monkeypatch.setattr(model, "execute", failing)
    with pytest.raises(RuntimeError, match="injected"):
        _run(model, _trace(), slots=3, token_budget=8)
    monkeypatch.undo()
    assert model.active_requests == []
    res = _run(model, _trace(), slots=3, token_budget=8)  # the model serves on as before
    assert [r.tokens for r in res.requests] == [_alone(model, r) for r in _trace()]


def test_stop_tokens_end_requests(model):
    trace = _trace(n=5, seed=3, new=(6, 8))
    free = _run(model, trace, slots=3, token_budget=8)
    stop = free.requests[0].tokens[2]  # a token the first request generates third
    stopped = _run(model, [replace(r, stop_token_ids=frozenset({stop})) for r in trace], slots=3, token_budget=8)
    cut = 0
    for a, b in zip(free.requests, stopped.requests, strict=True):
        if stop in a.tokens:
            k = a.tokens.index(stop) + 1
            assert b.tokens == a.tokens[:k] and b.finish_reason == "stop token"
            cut += k < len(a.tokens)
        else:
            assert b.tokens == a.tokens and b.finish_reason == "max_new_tokens"
    assert cut >= 1
    assert stopped.requests[0].tokens[-1] == stop and len(stopped.requests[0].tokens) <= 3
    assert model.active_requests == []


def test_a_tiny_token_budget_gives_the_same_tokens(model):
    trace = _trace(n=5, seed=4)
    whole = _run(model, trace, slots=3, token_budget=None)
    assert all(r.prefill_chunks == 1 for r in whole.requests)
    for budget in (1, 2):
        small = _run(model, trace, slots=3, token_budget=budget)
        assert [r.tokens for r in small.requests] == [r.tokens for r in whole.requests]
        assert all(s.tokens <= budget for s in small.steps if s.kind == "prefill")
        for req, rec in zip(trace, small.requests, strict=True):
            assert rec.prefill_chunks >= math.ceil(len(req.prompt) / budget)


def test_sampled_tokens_follow_each_request_seed(model):
    trace = _trace(n=4, seed=6, temperature=1.0, top_k=20, top_p=0.9)
    res = _run(model, trace, slots=2, token_budget=5)
    for req, rec in zip(trace, res.requests, strict=True):
        assert rec.tokens == _alone(model, req, temperature=1.0, top_k=20, top_p=0.9, seed=req.seed)
    assert len({tuple(r.tokens) for r in res.requests}) == len(trace)


def test_max_length_ends_a_request(model):
    req = ServeRequest("long", list(range(MAX_LEN - 3)), max_new_tokens=10)
    rec = _run(model, [req], token_budget=16).requests[0]
    assert len(rec.tokens) == 3 and rec.finish_reason == "max length"
    assert rec.tokens == _alone(model, req)


# ------------------------------------------------------------------------------------------------ admission
def test_requests_are_admitted_in_arrival_order(state_dict):
    model = _model("reference", state_dict)
    trace = _trace(n=8, seed=7, rate=100.0)
    shuffled = [trace[i] for i in (5, 0, 7, 2, 1, 6, 3, 4)]  # the list order is not the arrival order
    res = _run(model, shuffled, slots=2, token_budget=4)
    order = [rid for s in res.steps for rid in s.admitted]
    assert order == [r.request_id for r in trace]  # sorted by arrival
    for rec in res.requests:
        assert rec.admitted >= rec.arrival
    first = min(res.requests, key=lambda r: r.arrival)
    assert first.admitted == first.arrival  # the idle scheduler waits for the first arrival, not longer
    # a later arrival is never admitted before an earlier one, even when the earlier one waited for a slot
    admitted = [next(r for r in res.requests if r.request_id == t.request_id).admitted for t in trace]
    assert admitted == sorted(admitted)
    assert any(s.waiting > 0 for s in res.steps)


def test_static_mode_admits_only_into_an_empty_pool(state_dict):
    model = _model("optimized", state_dict)
    trace = _trace(n=7, seed=8, rate=math.inf)  # all at once: a static batch takes what has arrived
    res = _run(model, trace, slots=3, token_budget=None, mode="static")
    batches = [s for s in res.steps if s.admitted]
    assert [len(s.admitted) for s in batches] == [3, 3, 1]
    for s in batches:
        assert s.occupancy == len(s.admitted) and s.kind == "prefill"
    assert [r.tokens for r in res.requests] == [_alone(model, r) for r in trace]


def test_runs_on_the_simulated_clock_are_deterministic(state_dict):
    model = _model("reference", state_dict)
    a, b = (_run(model, _trace(seed=9), slots=3, token_budget=5) for _ in range(2))
    assert a.series() == b.series()
    assert [r.as_dict() for r in a.requests] == [r.as_dict() for r in b.requests]
    assert [r.token_times for r in a.requests] == [r.token_times for r in b.requests]


def test_times_follow_the_clock(state_dict):
    """One request, prompt 5 at t = 0.5: prefill (10 ms + 5 ms), then two decode steps (11 ms each)."""
    model = _model("reference", state_dict)
    res = _run(model, [ServeRequest("a", [1, 2, 3, 4, 5], 3, arrival=0.5)], token_budget=None)
    rec = res.requests[0]
    assert rec.admitted == 0.5
    assert np.allclose(rec.token_times, [0.515, 0.526, 0.537])
    assert math.isclose(rec.ttft, 0.015) and np.allclose(rec.itl, [0.011, 0.011])
    s = res.summary(with_series=True, with_requests=True)
    assert math.isclose(s["makespan_s"], 0.537) and math.isclose(s["throughput_tok_per_s"], 3 / 0.537)
    assert math.isclose(s["mean_occupancy"], 0.037 / 0.537)  # one slot held for 37 ms of the 537
    assert s["steps"] == {"prefill": 1, "decode": 2} and s["series"]["finished"] == [0, 0, 1]
    assert s["per_request"][0]["new_tokens"] == 3


def test_summary_percentiles(state_dict):
    model = _model("reference", state_dict)
    res = _run(model, _trace(n=9, seed=10, new=(2, 6)), slots=3, token_budget=8)
    s = res.summary()
    gaps = [x for r in res.requests for x in r.itl]
    assert len(gaps) == sum(len(r.tokens) - 1 for r in res.requests) > 0
    for key, vals in (("ttft_s", [r.ttft for r in res.requests]), ("itl_s", gaps)):
        p = s[key]
        assert min(vals) <= p["p50"] <= p["p90"] <= p["p99"] <= max(vals)
        assert math.isclose(p["p50"], float(np.median(vals)))
    assert all(r.ttft > 0 and r.first_token == r.token_times[0] for r in res.requests)
    assert s["generated_tokens"] == sum(len(r.tokens) for r in res.requests)
    assert serving.percentiles([]) is None


# ------------------------------------------------------------------------------------------------ bad requests
BAD = {
    "empty prompt": (lambda r: replace(r, prompt=[]), "has no tokens"),
    "token outside the vocabulary": (lambda r: replace(r, prompt=[1, V, 2]), f"token id {V} at position 1"),
    "max_new_tokens 0": (lambda r: replace(r, max_new_tokens=0), "max_new_tokens must be >= 1"),
    "negative arrival": (lambda r: replace(r, arrival=-1.0), "arrival must be a finite time"),
    "NaN arrival": (lambda r: replace(r, arrival=float("nan")), "arrival must be a finite time"),
    "bad temperature": (lambda r: replace(r, temperature=-1.0), "temperature must be"),
    "bad stop ids": (lambda r: replace(r, stop_token_ids=["x"]), "stop_token_ids must be ints"),
    "no room under max_length": (lambda r: replace(r, prompt=[1] * MAX_LEN), "no room for a new token"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_request_is_refused_before_anything_runs(model, case):
    make, message = BAD[case]
    trace = _trace(n=4, seed=11)
    bad = trace[:2] + [make(trace[2])] + trace[3:]
    ran = []
    with pytest.raises(RequestError, match=message) as e:
        _run(model, bad, slots=3, on_step=ran.append)
    assert repr(trace[2].request_id) in str(e.value)  # it names the request
    assert ran == [] and model.active_requests == []
    good = _run(model, trace, slots=3)  # nothing was corrupted
    assert [r.tokens for r in good.requests] == [_alone(model, r) for r in trace]


def test_duplicate_and_live_ids_are_refused(model):
    trace = _trace(n=3, seed=12)
    with pytest.raises(RequestError, match="appears twice"):
        _run(model, trace + [replace(trace[1], arrival=9.0)])
    model.execute(model.prepare_initial_token_inputs([TextContext(trace[0].request_id, [1, 2])]))
    try:
        with pytest.raises(RequestError, match="is live"):
            _run(model, trace)
        assert model.active_requests == [trace[0].request_id]  # the caller's request is untouched
    finally:
        model.release(trace[0].request_id)
    with pytest.raises(RequestError, match="no requests"):
        _run(model, [])
    with pytest.raises(RequestError, match="not a ServeRequest"):
        _run(model, [[1, 2, 3]])


def test_scheduler_settings_are_checked(model):
    for kw in ({"slots": 0}, {"slots": True}, {"token_budget": 0}, {"mode": "greedy"}):
        with pytest.raises(ConfigError):
            Scheduler(model, **kw)
    with pytest.raises(PoolFullError, match="free"):
        _run(model, _trace(n=2), slots=model.max_batch_size + 1)


# ------------------------------------------------------------------------------------------------ trace and slots
def test_poisson_trace():
    a, b = _trace(n=50, seed=3), _trace(n=50, seed=3)
    assert a == b and a != _trace(n=50, seed=4)
    arrivals = [r.arrival for r in a]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert all(1 <= len(r.prompt) <= 20 and 1 <= r.max_new_tokens <= 8 for r in a)
    assert all(0 <= t < V for r in a for t in r.prompt)
    many = poisson_trace(4000, 5.0, (1, 2), (1, 2), 0, vocab_size=V)
    gaps = np.diff([0.0] + [r.arrival for r in many])
    assert abs(gaps.mean() - 0.2) < 0.02 and abs(gaps.std() - 0.2) < 0.02  # exponential: mean = std = 1 / rate
    assert all(r.arrival == 0 for r in poisson_trace(3, math.inf, (1, 2), (1, 2), 0, vocab_size=V))
    for bad in ({"n": 0}, {"rate": 0.0}, {"prompt_lengths": (0, 3)}, {"new_tokens": (5, 2)}):
        kw = {"n": 3, "rate": 1.0, "prompt_lengths": (1, 3), "new_tokens": (1, 3), **bad}
        with pytest.raises(ConfigError):
            poisson_trace(kw.pop("n"), kw.pop("rate"), **kw, vocab_size=V)


def test_slots_for_budget_says_which_bound_binds(model):
    from qwen35.bench import bench_config

    cfg = bench_config()
    short = slots_for_budget(cfg, "800MiB", 640)
    rules = memory_budget(cfg, 800 * 2 ** 20, 640, state_dtype="float32", kv_dtype="float32",
                          weight_dtype="float32").rules["in_place"]
    assert (short.slots, short.state_slots, short.kv_slots) == (rules["max_batch"], rules["state_max_batch"],
                                                                rules["kv_max_batch"])
    assert short.bound_by == "state" and short.slots == short.state_slots == 16
    long = slots_for_budget(cfg, "800MiB", 32768)
    assert long.bound_by == "KV cache" and long.slots == long.kv_slots < long.state_slots
    assert slots_for_budget(cfg, "800MiB", 640, "gather_scatter").slots < short.slots  # 3 copies per request
    with pytest.raises(ConfigError, match="holds no request"):
        slots_for_budget(cfg, "400MiB", 640)  # less than the weights
    tiny = slots_for_budget(CFG, "1MiB", 32)
    res = _run(model, _trace(n=6, seed=13), slots=replace(tiny, slots=2))
    assert res.slots == 2 and res.summary()["max_occupancy"] == 2


# ------------------------------------------------------------------------------------------------ the benchmark
def test_bench_serve_on_a_tiny_model_and_its_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from qwen35.plot import plot_serving

    lines = []
    res = serving.bench_serve(config=CFG.replace(max_position_embeddings=256), n_requests=6, rate=500.0,
                              prompt_lengths=(2, 12), new_tokens=(2, 5), memory="64MiB", max_slots=3,
                              token_budget=8, log=lines.append)
    assert res["kind"] == "serve_bench" and res["budget"]["slots_used"] == 3
    cont = res["continuous"]
    assert cont["requests"] == 6 and cont["max_occupancy"] <= 3 and len(cont["per_request"]) == 6
    assert len(cont["series"]["start"]) == sum(cont["steps"].values())
    assert {s["slots"] for s in res["static"]} <= {1, 2, 3} and res["static"][-1]["slots"] == 3
    assert res["requests_with_same_tokens_as_static"] == 6  # greedy: the same tokens in every batch
    best = max(res["static"], key=lambda s: s["throughput_tok_per_s"])
    assert math.isclose(res["throughput_ratio"], cont["throughput_tok_per_s"] / best["throughput_tok_per_s"])
    assert "continuous" in serving.format_serve(res)
    paths = plot_serving(res, tmp_path)
    assert [p.name for p in paths] == ["serving.png", "serving.svg"] and all(p.stat().st_size > 0 for p in paths)


def test_bench_serve_refuses_a_bad_out_before_running(capsys, tmp_path):
    from qwen35.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["bench", "--serve", "--out", str(blocker / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is not a directory" in err and "Traceback" not in err
