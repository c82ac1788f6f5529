"""Continuous batching over the public pipeline API: a request queue, a slot pool, chunked prefill between decodes.

    from qwen35.serving import Scheduler, poisson_trace, slots_for_budget
    trace = poisson_trace(64, 2.0, prompt_lengths=(16, 512), new_tokens=(16, 128), seed=0, vocab_size=V)
    budget = slots_for_budget(model.config, "800MiB", context_len=640)       # reference.memory: which bound binds
    result = Scheduler(model, slots=budget, token_budget=256).run(trace)
    result.summary()        # throughput, TTFT / ITL percentiles, time-weighted pool occupancy
    # or: qwen35 bench --serve [--quick] [--out FILE]   (bench_serve below -> docs/bench_serve_cpu.json)

The scheduler drives either engine (`reference.model.Qwen35Model` or `optimized.model.Qwen35Model`) through the
calls of docs/pipeline_api.md only: `prepare_initial_token_inputs` (a context of a new id claims a slot; a context
of a live id continues it, so a prompt is fed chunk by chunk), `prepare_next_token_inputs(tokens, prev,
request_ids=...)`, `execute`, `release`, and `reference.pipeline.sample_next_token` on the last logit row.

One iteration of `Scheduler.run`:

1. **Admit**, in arrival order (ties: trace order), every request that has arrived while a slot is free.  The slot
   count is fixed for the run: an int, or a `SlotBudget` from `slots_for_budget` (reference.memory's "in_place"
   state rule and the KV bound at the trace's longest context), at most the model's free slots.  An admitted
   request holds its slot until it finishes; the engine claims the slot with the request's first prefill chunk.
2. **Pick the step.**  The pipeline runs a step either as prefill (ragged chunks of prompts) or as decode (one
   token for each of a set of requests), so each engine step is one or the other.  Policy "alternate": when both
   kinds of work wait, the kind flips from the previous step's, so at most one prefill chunk runs between two
   decode steps (a running request waits at most one chunk for its next token) and a waiting prompt waits at most
   one decode step for its next chunk; when only one kind waits, it runs.
3. **Prefill step**: `token_budget` prompt tokens (e.g. 256), given to the admitted requests with prompt left in
   admission order, each at most what it has left (the last may get a partial chunk); `None` = every pending
   prompt whole in one step.  A request whose prompt completes samples its first token from this step's logits.
4. **Decode step**: one token for every request whose prompt is done.  When every one of them ran in the previous
   step, the step is `prepare_next_token_inputs(tokens, previous inputs, request_ids=those)`; when the set gained
   requests since (their prompt finished in a prefill step), each continues with a one-token TextContext of its
   live id through `prepare_initial_token_inputs`, which the engines run as the same decode step.
5. **Leave**: a request ends at one of its stop ids (kept in its output, as `generate` does), after its
   max_new_tokens, or when prompt + new tokens reach the model's max_length; its slot is released at once.

Mode "static" is the comparison baseline, `reference.pipeline.generate`'s grouping with each request's own length
and stop ids: a batch is admitted only when the pool is empty (up to `slots` arrived requests), its prompts run
(whole by default) and then decode steps until every request of the batch has finished.

Time.  Every time in the records is seconds on the scheduler's clock, whose zero is the start of `run`; arrivals
are on the same axis.  `RealClock` (the default; what `qwen35 bench --serve` uses) is elapsed wall time: a request
is admitted once that much real time has passed, and an idle scheduler sleeps until the next arrival.
`SimulatedClock` moves only by a cost per engine step (tests: the same code, a clock they control).  The decisions
depend only on the trace and the clock, so with a SimulatedClock a run is deterministic (the same steps, the same
times); with the RealClock the interleaving follows the machine's speed.  With greedy sampling the tokens of every
request are those of the request run alone either way (tests/test_serving.py).

Bad requests.  `run` checks the whole trace before any step (`check_requests`: unique ids that are not live,
tokens non-empty and inside the vocabulary, room for a new token under max_length, max_new_tokens >= 1, sampling
parameters, arrival a finite time >= 0): a bad request is a RequestError naming it, raised before anything runs,
and no slot is claimed.  A step that raises releases every request of the run (as `generate` does) and re-raises.

Per request (`ServedRequest`): arrival, admission, first-token time (TTFT = first token − arrival), the time of
every token (inter-token latency = their differences), the tokens and why it stopped.  Per step (`StepRecord`):
its kind, start and end, the tokens it ran, and the pool's occupancy (slots held), the waiting queue and the decode
batch when it started.
"""
from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from reference.context import TextContext, check_no_placeholders, request_name
from reference.errors import ConfigError, PoolFullError, RequestError
from reference.memory import memory_budget, parse_bytes
from reference.pipeline import check_generation_params, check_prompt_room, host_logits, sample_next_token

__all__ = ["ServeRequest", "poisson_trace", "SlotBudget", "slots_for_budget", "RealClock", "SimulatedClock",
           "ServedRequest", "StepRecord", "ServeResult", "Scheduler", "check_requests", "percentiles", "MODES",
           "bench_serve", "format_serve", "SERVE_GOAL"]

MODES = ("continuous", "static")
PERCENTILES = (50, 90, 99)
SERVE_GOAL = 0.9  # continuous batching throughput >= 90 % of the best static batch at the same occupancy


# ====================================================================================================== requests
@dataclass
class ServeRequest:
    """One request of a trace.

    request_id:     any hashable id (not live in the model)
    prompt:         [P] token ids, P >= 1
    max_new_tokens: tokens to generate at most (>= 1)
    arrival:        seconds after the start of the run at which the request may be admitted
    stop_token_ids: ids that end the request (the stop token is kept in its output)
    temperature, top_k, top_p: sampling (temperature 0 = greedy; reference.pipeline.sample_next_token)
    seed:           seeds the request's own generator (sampling with temperature > 0)
    """

    request_id: Hashable
    prompt: Sequence[int]
    max_new_tokens: int
    arrival: float = 0.0
    stop_token_ids: frozenset = frozenset()
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


def poisson_trace(n: int, rate: float, prompt_lengths=(16, 512), new_tokens=(16, 128), seed: int = 0, *,
                  vocab_size: int, stop_token_ids=(), temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> list[ServeRequest]:
    """`n` requests arriving as a Poisson process of `rate` requests per second, drawn from one seeded generator.

    Inter-arrival gaps ~ Exponential(mean 1 / rate) (the first request arrives after one gap; rate = inf: all at
    0); prompt lengths and max_new_tokens uniform integers in the inclusive ranges `prompt_lengths` = (lo, hi) and
    `new_tokens` = (lo, hi); prompt tokens uniform in [0, vocab_size).  Ids "r000", "r001", ... in arrival order;
    request i gets sampling seed seed · 1000 + i.  The same arguments give the same trace.
    """
    if not isinstance(n, numbers.Integral) or n < 1:
        raise ConfigError(f"poisson_trace: n must be an int >= 1, got {n!r}")
    if not isinstance(rate, numbers.Real) or not rate > 0:
        raise ConfigError(f"poisson_trace: rate must be > 0 requests per second (inf: all at once), got {rate!r}")
    for name, (lo, hi) in (("prompt_lengths", prompt_lengths), ("new_tokens", new_tokens)):
        if not (isinstance(lo, numbers.Integral) and isinstance(hi, numbers.Integral) and 1 <= lo <= hi):
            raise ConfigError(f"poisson_trace: {name} must be (lo, hi) ints with 1 <= lo <= hi, got {(lo, hi)!r}")
    rng = np.random.default_rng(seed)
    gaps = np.zeros(n) if math.isinf(rate) else rng.exponential(1.0 / rate, n)
    arrivals = np.cumsum(gaps)
    lengths = rng.integers(prompt_lengths[0], prompt_lengths[1] + 1, n)
    news = rng.integers(new_tokens[0], new_tokens[1] + 1, n)
    width = max(3, len(str(n - 1)))
    return [ServeRequest(f"r{i:0{width}d}", rng.integers(0, vocab_size, int(lengths[i])).tolist(), int(news[i]),
                         arrival=float(arrivals[i]), stop_token_ids=frozenset(int(t) for t in stop_token_ids),
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=int(seed) * 1000 + i)
            for i in range(n)]


def _prefixed(request_id, fn, *args):
    """fn(*args), its RequestError re-raised with the request's name in front."""
    try:
        return fn(*args)
    except RequestError as e:
        raise RequestError(f"{request_name(request_id)}: {e}") from None


def check_requests(model, trace) -> list[ServeRequest]:
    """Every request of a trace, before anything runs; returns the trace as a list.  Each problem is a RequestError
    naming the request: a duplicate or live id, an empty prompt, a token outside the vocabulary (or an image / video
    placeholder without pixels), a prompt that leaves no room for a new token under max_length, max_new_tokens < 1,
    bad sampling parameters or stop ids, an arrival that is not a finite time >= 0."""
    if isinstance(trace, ServeRequest) or not isinstance(trace, Sequence) or isinstance(trace, (str, bytes)):
        raise RequestError(f"serve: expected a list of ServeRequest, got {type(trace).__name__}")
    trace = list(trace)
    if not trace:
        raise RequestError("serve: the trace has no requests")
    seen, live = set(), set(model.active_requests)
    for i, r in enumerate(trace):
        if not isinstance(r, ServeRequest):
            raise RequestError(f"serve: trace[{i}] is a {type(r).__name__}, not a ServeRequest")
        rid = r.request_id
        if rid in seen:
            raise RequestError(f"{request_name(rid)} appears twice in the trace")
        seen.add(rid)
        if rid in live:
            raise RequestError(f"{request_name(rid)} is live in the model; serve requests under ids of no live "
                               "request")
        arr = model.check_tokens(rid, r.prompt)  # empty, non-integer or outside the vocabulary: names the request
        check_no_placeholders(rid, arr, model.config)
        check_prompt_room(rid, arr.size, model.max_length)
        _prefixed(rid, check_generation_params, r.max_new_tokens, r.temperature, r.top_k, r.top_p, r.seed,
                  r.stop_token_ids)
        if r.max_new_tokens < 1:
            raise RequestError(f"{request_name(rid)}: max_new_tokens must be >= 1, got {r.max_new_tokens!r}")
        if not isinstance(r.arrival, numbers.Real) or isinstance(r.arrival, bool) or not (
                math.isfinite(r.arrival) and r.arrival >= 0):
            raise RequestError(f"{request_name(rid)}: arrival must be a finite time >= 0 (seconds after the start "
                               f"of the run), got {r.arrival!r}")
    return trace


# ====================================================================================================== slots
@dataclass(frozen=True)
class SlotBudget:
    """How many requests a memory budget serves at once (reference.memory.memory_budget, one rule).

    slots:       min(state_slots, kv_slots), what the scheduler admits at most
    state_slots: the rule's state bound, reference.memory.replica_batch_size: ⌊0.15·free⌋ // (copies·state)
    kv_slots:    the KV bound: ⌊(free − state reservation) / (context_len · KV bytes per token)⌋
    bound_by:    "state" or "KV cache" (the smaller bound), or "weights (they do not fit)"
    free_bytes:  memory_bytes − weight bytes
    """

    slots: int
    state_slots: int
    kv_slots: int
    bound_by: str
    rule: str
    memory_bytes: int
    context_len: int
    free_bytes: int
    weight_bytes: int
    state_bytes_per_request: int
    kv_bytes_per_request: int

    def as_dict(self) -> dict:
        return asdict(self)


def slots_for_budget(config, memory_bytes, context_len: int, rule: str = "in_place", *, dtype: str = "float32",
                     state_dtype: str = "float32") -> SlotBudget:
    """The slot count of a device with `memory_bytes` (an int or a size such as "800MiB") serving requests of at
    most `context_len` tokens (prompt + new): reference.memory's `rule` for the Gated DeltaNet state ("in_place":
    the optimized engine's pool) and the KV bound of what memory is left, the smaller of the two.  `dtype` is the
    weights' and the KV cache's, `state_dtype` the state's (the optimized engine keeps the recurrent state in fp32).
    ConfigError when the budget holds no request."""
    budget = memory_budget(config, parse_bytes(memory_bytes), context_len, state_dtype=state_dtype, kv_dtype=dtype,
                           weight_dtype=dtype)
    if rule not in budget.rules:
        raise ConfigError(f"rule {rule!r} is not known; expected one of {sorted(budget.rules)}")
    r = budget.rules[rule]
    out = SlotBudget(slots=int(r["max_batch"]), state_slots=int(r["state_max_batch"]), kv_slots=int(r["kv_max_batch"]),
                     bound_by=r["bound_by"], rule=rule, memory_bytes=budget.memory_bytes, context_len=int(context_len),
                     free_bytes=budget.free_bytes, weight_bytes=budget.weight_bytes,
                     state_bytes_per_request=budget.state_bytes_per_request,
                     kv_bytes_per_request=budget.kv_bytes_per_request)
    if out.slots < 1:
        raise ConfigError(f"a budget of {budget.memory_bytes:,} bytes holds no request at {context_len} tokens: "
                          f"weights {budget.weight_bytes:,} bytes, state bound {out.state_slots}, KV bound "
                          f"{out.kv_slots} ({out.bound_by})")
    return out


# ====================================================================================================== clocks
class RealClock:
    """Elapsed wall time (time.perf_counter) since the clock was made; `sleep_until` really sleeps."""

    def __init__(self):
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)

    def step_done(self, kind: str, tokens: int) -> None:
        """Real time passes by itself."""


class SimulatedClock:
    """A clock that moves only when told: each engine step costs `step_s + token_s · tokens` seconds, and
    `sleep_until` jumps to the time asked for.  Runs on it are deterministic."""

    def __init__(self, step_s: float = 0.01, token_s: float = 0.001):
        self.t = 0.0
        self.step_s, self.token_s = float(step_s), float(token_s)

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, float(t))

    def step_done(self, kind: str, tokens: int) -> None:
        self.t += self.step_s + self.token_s * tokens


# ====================================================================================================== records
@dataclass
class ServedRequest:
    """What happened to one request (times in seconds on the run's clock).

    arrival, admitted, first_token, finished: when it arrived, got a slot, received its first token, left
    token_times: [n] the end of the step that produced each token (token_times[0] == first_token)
    tokens:      [n] the generated ids;  finish_reason: "stop token", "max_new_tokens" or "max length"
    prompt_tokens, prefill_chunks: prompt length and the prefill steps it took
    """

    request_id: Hashable
    arrival: float
    prompt_tokens: int
    max_new_tokens: int
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    finish_reason: str | None = None
    prefill_chunks: int = 0
    tokens: list = field(default_factory=list)
    token_times: list = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        """Time to first token: first_token − arrival (queueing included)."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies [n − 1]: the gaps between consecutive tokens."""
        return np.diff(self.token_times).tolist()

    def as_dict(self) -> dict:
        """A JSON-ready summary (times rounded to 0.1 ms; no per-token lists)."""
        def r(x):
            return None if x is None else round(float(x), 4)
        return {"request_id": str(self.request_id), "arrival": r(self.arrival), "admitted": r(self.admitted),
                "first_token": r(self.first_token), "finished": r(self.finished), "ttft": r(self.ttft),
                "prompt_tokens": self.prompt_tokens, "new_tokens": len(self.tokens),
                "max_new_tokens": self.max_new_tokens, "finish_reason": self.finish_reason,
                "prefill_chunks": self.prefill_chunks}


@dataclass
class StepRecord:
    """One engine step.

    kind:       "prefill" or "decode";  start, end: its times on the run's clock
    request_ids: the requests it ran, in batch order;  tokens: the tokens it ran (Σ chunk lengths, or the batch)
    occupancy:  slots held when it started (admitted requests not finished);  waiting: arrived, not admitted
    decoding:   requests whose prompt was done when it started
    admitted / finished: ids admitted just before it / finished at its end
    """

    index: int
    kind: str
    start: float
    end: float
    request_ids: list
    tokens: int
    occupancy: int
    waiting: int
    decoding: int
    admitted: list = field(default_factory=list)
    finished: list = field(default_factory=list)


def percentiles(values, qs=PERCENTILES) -> dict | None:
    """{"p50": ..., "p90": ..., "p99": ...} of `values` (numpy's linear interpolation), None when empty."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return None
    return {f"p{q}": float(np.percentile(v, q)) for q in qs}


@dataclass
class ServeResult:
    """A run: `requests` in trace order, `steps` in order, and the settings it ran with."""

    requests: list
    steps: list
    slots: int
    token_budget: int | None
    mode: str
    policy: str
    clock: str
    cpu_s: float = float("nan")  # this process's CPU time during the run (less disturbed by other jobs than wall time)

    @property
    def makespan(self) -> float:
        """From the clock's zero to the last request's end."""
        return max(r.finished for r in self.requests)

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    def mean_occupancy(self) -> float:
        """Time-weighted mean of the slots held over [0, makespan] (each step weighted by its duration; idle waits,
        when no slot is held, count as 0)."""
        busy = sum(s.occupancy * (s.end - s.start) for s in self.steps)
        return busy / self.makespan if self.makespan > 0 else float("nan")

    def series(self) -> dict:
        """Per step (times rounded to 0.1 ms): start, end, kind, tokens, occupancy, waiting queue, decode batch and
        the requests that finished at its end (held slots between this step's end and the next start: occupancy −
        finished)."""
        return {"start": [round(s.start, 4) for s in self.steps], "end": [round(s.end, 4) for s in self.steps],
                "kind": [s.kind for s in self.steps], "tokens": [s.tokens for s in self.steps],
                "occupancy": [s.occupancy for s in self.steps], "waiting": [s.waiting for s in self.steps],
                "decoding": [s.decoding for s in self.steps], "finished": [len(s.finished) for s in self.steps]}

    def summary(self, *, with_series: bool = False, with_requests: bool = False) -> dict:
        """Throughput (generated tokens / makespan), TTFT and inter-token latency percentiles (all gaps of all
        requests pooled), mean occupancy, step counts; optionally the per-step series and per-request rows."""
        steps = {k: [s for s in self.steps if s.kind == k] for k in ("prefill", "decode")}
        out = {
            "mode": self.mode, "policy": self.policy, "clock": self.clock, "slots": self.slots,
            "token_budget": self.token_budget, "requests": len(self.requests),
            "generated_tokens": self.generated_tokens,
            "prompt_tokens": sum(r.prompt_tokens for r in self.requests),
            "makespan_s": self.makespan, "throughput_tok_per_s": self.generated_tokens / self.makespan,
            "cpu_s": self.cpu_s,
            "tok_per_cpu_s": self.generated_tokens / self.cpu_s if self.cpu_s > 0 else float("nan"),
            "mean_occupancy": self.mean_occupancy(),
            "max_occupancy": max((s.occupancy for s in self.steps), default=0),
            "ttft_s": percentiles(r.ttft for r in self.requests),
            "itl_s": percentiles(x for r in self.requests for x in r.itl),
            "steps": {k: len(v) for k, v in steps.items()},
            "step_seconds": {k: sum(s.end - s.start for s in v) for k, v in steps.items()},
            "mean_decode_batch": (float(np.mean([len(s.request_ids) for s in steps["decode"]]))
                                  if steps["decode"] else None),
            "finish_reasons": {k: sum(r.finish_reason == k for r in self.requests)
                               for k in sorted({r.finish_reason for r in self.requests})},
        }
        if with_series:
            out["series"] = self.series()
        if with_requests:
            out["per_request"] = [r.as_dict() for r in self.requests]
        return out


# ====================================================================================================== the scheduler
class _Live:
    """The scheduler's view of one admitted request."""

    __slots__ = ("req", "rec", "prompt", "done", "rng", "stop")

    def __init__(self, req: ServeRequest, rec: ServedRequest, prompt: np.ndarray):
        self.req, self.rec, self.prompt = req, rec, prompt
        self.done = 0  # prompt tokens fed so far
        self.rng = np.random.default_rng(req.seed)
        self.stop = check_generation_params(req.max_new_tokens, req.temperature, req.top_k, req.top_p, req.seed,
                                            req.stop_token_ids)  # checked by check_requests: the stop ids

    @property
    def prefilling(self) -> bool:
        return self.done < self.prompt.size


class Scheduler:
    """Continuous batching (or static batches, the baseline) of a trace on one pipeline model.

    Args:
        model:        a pipeline model of either engine (reference or optimized Qwen35Model)
        slots:        requests admitted at once: an int, a SlotBudget (its `slots`), or None = the model's free
                      slots when `run` starts; at most the model's free slots
        token_budget: prompt tokens per prefill step (>= 1), split across waiting prompts in admission order;
                      None = every pending prompt whole in one step
        mode:         "continuous" (admit whenever a slot is free) or "static" (admit a batch only into an empty
                      pool, then run it to completion)
        clock:        a RealClock (default: a new one per run) or SimulatedClock; anything with now(),
                      sleep_until(t) and step_done(kind, tokens)
    """

    policy = "alternate"

    def __init__(self, model, *, slots: int | SlotBudget | None = None, token_budget: int | None = 256,
                 mode: str = "continuous", clock=None):
        if isinstance(slots, SlotBudget):
            slots = slots.slots
        if slots is not None and (not isinstance(slots, numbers.Integral) or isinstance(slots, bool) or slots < 1):
            raise ConfigError(f"slots must be an int >= 1, a SlotBudget or None, got {slots!r}")
        if token_budget is not None and (not isinstance(token_budget, numbers.Integral)
                                         or isinstance(token_budget, bool) or token_budget < 1):
            raise ConfigError(f"token_budget must be an int >= 1 (prompt tokens per prefill step) or None, got "
                              f"{token_budget!r}")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.token_budget, self.mode, self.clock = model, token_budget, mode, clock
        self.slots = None if slots is None else int(slots)

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self, trace, on_step: Callable[[StepRecord], object] | None = None) -> ServeResult:
        """Serve every request of `trace` (a list of ServeRequest) and return what happened.  Checked whole first
        (`check_requests`); holds the model's lock throughout; `on_step(StepRecord)` is called after every step
        (the requests it finished already released)."""
        model = self.model
        with model.lock:
            trace = check_requests(model, trace)
            free = model.max_batch_size - len(model.active_requests)
            slots = free if self.slots is None else self.slots
            if slots > free:
                raise PoolFullError(f"serve: {slots} slots asked for, but the model has {free} free of "
                                    f"{model.max_batch_size} (max_batch_size)")
            if slots < 1:
                raise PoolFullError(f"serve: all {model.max_batch_size} slots of the model are held by live requests")
            clock = self.clock if self.clock is not None else RealClock()
            cpu0 = time.process_time()
            records = [ServedRequest(r.request_id, float(r.arrival), len(r.prompt), int(r.max_new_tokens))
                       for r in trace]
            order = sorted(range(len(trace)), key=lambda i: (trace[i].arrival, i))  # arrival order, ties: trace order
            queue = [(trace[i], records[i]) for i in order]
            self._live: list[_Live] = []
            self._prev = None  # the last executed inputs: a decode of a subset of its requests continues them
            steps: list[StepRecord] = []
            try:
                while queue or self._live:
                    now = clock.now()
                    admitted = self._admit(queue, slots, now, model)
                    if not self._live:  # nothing admitted and nothing to run: wait for the next arrival
                        clock.sleep_until(queue[0][0].arrival)
                        continue
                    kind = self._pick(steps)
                    waiting = sum(1 for r, _ in queue if r.arrival <= now)
                    step = StepRecord(len(steps), kind, now, now, [], 0, len(self._live), waiting,
                                      sum(not x.prefilling for x in self._live), admitted)
                    (self._prefill if kind == "prefill" else self._decode)(step, clock)
                    steps.append(step)
                    if on_step is not None:
                        on_step(step)
            finally:
                for x in self._live:
                    model.release(x.req.request_id)
                self._live, self._prev = [], None
        return ServeResult(records, steps, slots, self.token_budget, self.mode, self.policy, type(clock).__name__,
                           time.process_time() - cpu0)

    def _admit(self, queue: list, slots: int, now: float, model) -> list:
        """Move arrived requests from the queue into the pool while a slot is free (static: only into an empty
        pool); returns their ids."""
        if self.mode == "static" and self._live:
            return []
        ids = []
        while queue and queue[0][0].arrival <= now and len(self._live) < slots:
            req, rec = queue.pop(0)
            rec.admitted = now
            self._live.append(_Live(req, rec, model.check_tokens(req.request_id, req.prompt)))
            ids.append(req.request_id)
        return ids

    def _pick(self, steps: list) -> str:
        """The next step's kind: prefill while any prompt is pending in static mode; otherwise "alternate"."""
        pre = any(x.prefilling for x in self._live)
        dec = any(not x.prefilling for x in self._live)
        if pre and dec and self.mode == "continuous":
            return "decode" if steps and steps[-1].kind == "prefill" else "prefill"
        return "prefill" if pre else "decode"

    # ------------------------------------------------------------------------------------------------ steps
    def _prefill(self, step: StepRecord, clock) -> None:
        """One prefill step: prompt chunks within the token budget, in admission order."""
        left = math.inf if self.token_budget is None else self.token_budget
        chunks = []  # (live request, chunk length)
        for x in self._live:
            if left <= 0:
                break
            if x.prefilling:
                n = int(min(x.prompt.size - x.done, left))
                chunks.append((x, n))
                left -= n
        model = self.model
        contexts = [TextContext(x.req.request_id, x.prompt[x.done:x.done + n]) for x, n in chunks]
        saved, model.return_logits = model.return_logits, "last"  # one logit row per request (under the lock)
        try:
            inputs = model.prepare_initial_token_inputs(contexts, return_n_logits=1)
        finally:
            model.return_logits = saved
        out = model.execute(inputs)
        self._prev = inputs
        for x, n in chunks:
            x.done += n
            x.rec.prefill_chunks += 1
        step.request_ids = [x.req.request_id for x, _ in chunks]
        step.tokens = sum(n for _, n in chunks)
        self._sample(step, clock, out, [(b, x) for b, (x, _) in enumerate(chunks) if not x.prefilling])

    def _decode(self, step: StepRecord, clock) -> None:
        """One decode step: the last token of every request whose prompt is done."""
        batch = [x for x in self._live if not x.prefilling]
        ids = [x.req.request_id for x in batch]
        tokens = [x.rec.tokens[-1] for x in batch]
        model = self.model
        prev = self._prev
        if prev is not None and set(ids) <= set(prev.request_ids):  # all of them ran in the previous step
            inputs = model.prepare_next_token_inputs(tokens, prev, request_ids=ids)
        else:  # some joined since: each live id continues with its one new token
            inputs = model.prepare_initial_token_inputs([TextContext(r, [t]) for r, t in zip(ids, tokens, strict=True)],
                                                        return_n_logits=1)
        out = model.execute(inputs)
        self._prev = inputs
        step.request_ids, step.tokens = ids, len(ids)
        self._sample(step, clock, out, list(enumerate(batch)))

    def _sample(self, step: StepRecord, clock, out, rows: list) -> None:
        """Sample the next token of each (batch row, request) in `rows` from the step's last logit row per request,
        then close the step on the clock, stamp the tokens and let finished requests leave."""
        picked = []
        if rows:
            last = np.asarray(out.logit_offsets[1:], dtype=np.int64)[[b for b, _ in rows]] - 1
            logits = host_logits(out.logits[last])  # [len(rows), V]
            for (_, x), row in zip(rows, logits, strict=True):
                r = x.req
                picked.append((x, sample_next_token(row, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                                    rng=x.rng, who=request_name(r.request_id))))
        clock.step_done(step.kind, step.tokens)
        step.end = t = clock.now()
        max_length = self.model.max_length
        for x, token in picked:
            rec = x.rec
            rec.tokens.append(token)
            rec.token_times.append(t)
            if rec.first_token is None:
                rec.first_token = t
            if token in x.stop:
                rec.finish_reason = "stop token"
            elif len(rec.tokens) >= x.req.max_new_tokens:
                rec.finish_reason = "max_new_tokens"
            elif x.prompt.size + len(rec.tokens) >= max_length:
                rec.finish_reason = "max length"
            if rec.finish_reason is not None:
                rec.finished = t
                self.model.release(x.req.request_id)
                step.finished.append(x.req.request_id)
        if step.finished:
            gone = set(step.finished)
            self._live = [x for x in self._live if x.req.request_id not in gone]


# ====================================================================================================== the benchmark
def _load() -> list | None:
    """The 1, 5 and 15 minute load averages (None where the system has none)."""
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _timed(name: str, scheduler: Scheduler, trace, log, loads: dict) -> ServeResult:
    """One run of the benchmark, with the load average before it."""
    loads[name] = _load()
    res = scheduler.run(trace)
    log(f"  {name}: {res.generated_tokens / res.makespan:.1f} tok/s over {res.makespan:.1f} s "
        f"({res.generated_tokens / res.cpu_s:.1f} per CPU second), mean occupancy {res.mean_occupancy():.2f} of "
        f"{res.slots}; load before {loads[name]}")
    return res


def bench_serve(*, quick: bool = False, config=None, n_requests: int | None = None, rate: float | None = None,
                prompt_lengths=None, new_tokens=None, memory="800MiB", max_slots: int | None = None,
                token_budget: int = 256, seed: int = 0, log=print) -> dict:
    """`qwen35 bench --serve`: continuous batching vs static batches on one CPU thread, optimized engine, float32.

    The model is a random checkpoint of `config` (default qwen35.bench.bench_config(): the 0.8B width, 4 layers,
    vocab 32768).  The slots come from `slots_for_budget(config, memory, longest prompt + longest output,
    "in_place")` (or `max_slots`).  A Poisson trace (default 64 requests at 2 per second, prompts 16..512,
    16..128 new tokens; quick: 24 requests at 4 per second, prompts 16..128, 8..32 new tokens) runs through the
    continuous scheduler on the real clock, after a short warm-up trace.  Then the same requests, all available at
    once, run as static batches (whole prompts, then decode until the batch is done) of B = the continuous run's
    mean occupancy (rounded) and B = the slots.  Reports throughput (generated tokens / s of wall time, and per
    second of this process's CPU time, which other jobs on the machine disturb less), TTFT and inter-token latency
    percentiles, the occupancy series, the load average before each run, and the goal: continuous throughput
    >= 90 % of the best static batch's.  Greedy decoding: every request's tokens are compared between the runs
    (they run in different batches).
    """
    from qwen35.bench import bench_config, write_random_checkpoint
    from qwen35.measure import machine_info, pin_threads

    torch = pin_threads()
    import tempfile
    from pathlib import Path

    import optimized.model as OM

    cfg = config if config is not None else bench_config()
    n = n_requests or (24 if quick else 64)
    rate = rate or (4.0 if quick else 2.0)
    prompt_lengths = tuple(prompt_lengths or ((16, 128) if quick else (16, 512)))
    new_tokens = tuple(new_tokens or ((8, 32) if quick else (16, 128)))
    context = prompt_lengths[1] + new_tokens[1]
    budget = slots_for_budget(cfg, memory, context, "in_place")
    slots = budget.slots if max_slots is None else int(max_slots)
    meta = machine_info("cpu")
    meta.update(load_avg_at_start=_load(), dtype_note="float32, one thread, optimized engine (torch backend)")
    log(f"serve: {n} requests at {rate}/s, prompts {prompt_lengths}, new tokens {new_tokens}; {slots} slots "
        f"({budget.rule} rule on {memory}: state {budget.state_slots}, KV {budget.kv_slots} at {context} tokens, "
        f"bound by {budget.bound_by}); load {meta['load_avg_at_start']}")
    trace = poisson_trace(n, rate, prompt_lengths, new_tokens, seed, vocab_size=cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / "ckpt", cfg)
        model = OM.Qwen35Model.from_pretrained(path, max_batch_size=slots, backend="torch", dtype=torch.float32)
    warm = poisson_trace(min(slots, 4), math.inf, prompt_lengths, (2, 4), seed + 1, vocab_size=cfg.vocab_size)
    Scheduler(model, slots=slots, token_budget=token_budget).run([replace(r, request_id=f"w{i}")
                                                                   for i, r in enumerate(warm)])
    loads: dict = {}
    cont = _timed("continuous", Scheduler(model, slots=slots, token_budget=token_budget), trace, log, loads)
    sizes = sorted({max(1, min(slots, round(cont.mean_occupancy()))), slots})
    offline = [replace(r, arrival=0.0) for r in trace]  # static batches: every request available at once
    static = {b: _timed(f"static B={b}", Scheduler(model, slots=b, token_budget=None, mode="static"), offline, log,
                        loads) for b in sizes}
    best_b = max(static, key=lambda b: static[b].generated_tokens / static[b].makespan)
    best = static[best_b]
    ratio = (cont.generated_tokens / cont.makespan) / (best.generated_tokens / best.makespan)
    cpu_ratio = (cont.generated_tokens / cont.cpu_s) / (best.generated_tokens / best.cpu_s)
    same = sum(a.tokens == b.tokens for a, b in zip(cont.requests, best.requests, strict=True))
    meta.update(load_avg_at_end=_load(), load_avg_before_each_run=loads)
    return {
        "kind": "serve_bench", "schema": 1, "meta": meta, "quick": quick,
        "geometry": (f"hidden {cfg.hidden_size}, I {cfg.intermediate_size}, {cfg.num_hidden_layers} layers "
                     f"({' '.join('L' if t == 'linear_attention' else 'F' for t in cfg.layer_types)}), vocab "
                     f"{cfg.vocab_size}, random weights"),
        "trace": {"requests": n, "rate_per_s": rate, "prompt_lengths": list(prompt_lengths),
                  "new_tokens": list(new_tokens), "seed": seed, "sampling": "greedy"},
        "budget": {**budget.as_dict(), "memory": str(memory), "slots_used": slots},
        "continuous": cont.summary(with_series=True, with_requests=True),
        "static": [static[b].summary() for b in sizes],
        "best_static_batch": best_b,
        "throughput_ratio": ratio,
        "throughput_ratio_cpu_time": cpu_ratio,
        "goal": {"target": SERVE_GOAL, "measured": ratio, "met": ratio >= SERVE_GOAL,
                 "what": "continuous batching throughput / the best static batch's (B = mean occupancy, B = slots), "
                         "wall time"},
        "requests_with_same_tokens_as_static": same,
    }


def format_serve(res: dict) -> str:
    """The console table of a `bench_serve` result."""
    def ms(p):
        return "—" if p is None else " / ".join(f"{1e3 * p[k]:.0f}" for k in ("p50", "p90", "p99"))
    rows = [("continuous", res["continuous"])] + [(f"static B={s['slots']}", s) for s in res["static"]]
    lines = [f"{'run':<14} {'tok/s':>8} {'tok/CPU s':>10} {'makespan s':>11} {'mean occ.':>10} "
             f"{'TTFT ms p50/p90/p99':>24} {'ITL ms p50/p90/p99':>22}"]
    for name, s in rows:
        lines.append(f"{name:<14} {s['throughput_tok_per_s']:>8.1f} {s['tok_per_cpu_s']:>10.1f} "
                     f"{s['makespan_s']:>11.1f} {s['mean_occupancy']:>10.2f} {ms(s['ttft_s']):>24} "
                     f"{ms(s['itl_s']):>22}")
    g = res["goal"]
    lines.append(f"continuous / best static (B={res['best_static_batch']}): {g['measured']:.3f} "
                 f"(CPU time {res['throughput_ratio_cpu_time']:.3f}; goal >= {g['target']}: "
                 f"{'met' if g['met'] else 'missed'}); "
                 f"{res['requests_with_same_tokens_as_static']} of {res['trace']['requests']} requests with the same "
                 "tokens in both runs")
    return "\n".join(lines)
