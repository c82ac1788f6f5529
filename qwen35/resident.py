"""What a model really holds: resident bytes by category, and the peak extra bytes of one step, measured on both
engines and set against `reference.memory`'s prediction (docs/benchmarks.md, "Memory, measured").

    held_bytes(*objects)                 distinct storages of every array / tensor found in objects (views once)
    resident_bytes(model)                weights, vision, state pool, KV capacity and KV used of a live model
    predicted_bytes(model)               the same categories from reference.memory for the model's config and dtypes
    prefill_and_decode(model, ids, ...)  peak extra bytes of one prefill step and one decode step of those requests
    measure_case(weights, ...)           all of it for one engine, dtype and batch -> a JSON-ready dict
    check_case(case)                     what drifts from the prediction by more than 2 %
    measure_all(...)                     the study of docs/memory_measured_cpu.json (tiny and 0.8B-width checkpoints)

    python -m qwen35.resident [--quick] [--out docs/memory_measured_cpu.json] [--device cuda]

**Resident bytes.**  An array is counted by the storage it lives in, once: a NumPy array by the root of its `.base`
chain, a torch tensor by its `untyped_storage()`, both keyed by the storage's device and start address (so a
tensor made by `torch.from_numpy` and its array are one storage).  The fused input projection of a Gated DeltaNet
layer and the four row views of it, the dense MLP's `gate_up` and its gate / up views, and a tied `lm_head` are
therefore each counted once; a second copy of any of them would show.

**Peak extra bytes of a step** = the most bytes allocated at once during `prepare_*` + `execute`, above what was
allocated when the step began:

* NumPy arrays report their allocations to `tracemalloc`, so the reference engine's peak (its gathered inputs, its
  output states, its activations) is tracemalloc's peak.  The reference's `forward` is wrapped for the step to
  count, by object, the state copies alive when it returns (gathered inputs + output states, distinct storages) and
  the K/V arrays it rebuilt (its attention concatenates past and new K/V every step).
* torch tensors on the CPU: torch.profiler with `profile_memory=True` records every allocation and free of the CPU
  allocator with its size and time; the running sum in time order gives the peak.  NumPy allocations of the
  optimized engine (its single-row products run through NumPy, optimized/linear.py) are traced by tracemalloc
  at the same time; the peak reported is the sum of the two peaks (an upper bound of their combined peak).
* torch tensors on CUDA: `torch.cuda.max_memory_allocated` minus `memory_allocated` at the start.

A decode step starts from the model alone: the caller's previous inputs, which in the reference engine hold the
last step's gathered state copies, are dropped first (what `prepare_next_token_inputs` itself does first).  Then
the state working memory at the peak of a reference decode step is pool + gathered inputs + outputs, MAX's
gather/scatter rule of 3 x batch x per_req; the optimized engine updates its pool in place and allocates only
activations.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np

from reference.context import TextContext
from reference.memory import (
    dtype_bytes,
    kv_bytes_per_token,
    parameter_split,
    state_bytes_per_request,
    weight_bytes,
)

__all__ = ["held_bytes", "storage_map", "engine_of", "resident_bytes", "predicted_bytes", "fp32_norm_bytes",
           "optimized_kv_capacity", "prefill_and_decode", "measure_case", "check_case", "check_model", "measure_all",
           "comparison_rows", "markdown_tables"]

CATEGORIES = ("weights", "vision", "state pool", "KV used", "KV capacity")
STUDY_BATCHES = (1, 8, 32)
STUDY_PROMPT = 48  # prompt tokens per request: after one decode step, 49 cached tokens (capacity 64 in optimized)


# ------------------------------------------------------------------------------------------------ storages
def _storages(obj, out: dict, seen: set) -> None:
    """Add {(device, address): nbytes} of every array / tensor reachable from `obj` (containers, dataclasses and
    plain objects' attributes are walked; each object once)."""
    if obj is None or isinstance(obj, (str, bytes, int, float, complex, type)):
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        root = obj
        while isinstance(root.base, np.ndarray):
            root = root.base
        if root.base is not None and _is_tensor(root.base):
            _storages(root.base, out, seen)  # an array over a torch tensor's memory: the tensor's storage
            return
        nbytes = root.nbytes
        if root.base is not None:  # memory owned by another object (a buffer): its size where it has one
            try:
                nbytes = memoryview(root.base).nbytes
            except TypeError:
                pass
        key = ("cpu", int(root.__array_interface__["data"][0]))
        out[key] = max(out.get(key, 0), int(nbytes))
        return
    if _is_tensor(obj):
        st = obj.untyped_storage()
        key = (str(obj.device), int(st.data_ptr()))
        out[key] = max(out.get(key, 0), int(st.nbytes()))
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _storages(v, out, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _storages(v, out, seen)
    elif is_dataclass(obj):
        for f in fields(obj):
            _storages(getattr(obj, f.name), out, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("reference", "optimized", "qwen35"):
        for v in vars(obj).values():
            _storages(v, out, seen)


def _is_tensor(obj) -> bool:
    """A torch tensor (without importing torch for a NumPy-only walk)."""
    return type(obj).__module__.startswith("torch") and hasattr(obj, "untyped_storage")


def storage_map(*objects) -> dict:
    """{(device, start address): bytes} of the distinct storages of every array and tensor in `objects`."""
    out: dict = {}
    seen: set = set()
    for obj in objects:
        _storages(obj, out, seen)
    return out


def held_bytes(*objects) -> int:
    """Bytes of the distinct storages of every NumPy array and torch tensor reachable from `objects` (nested lists,
    tuples, dicts, dataclasses and the attributes of the project's own objects); a view counts as its storage, and
    a storage reached twice counts once."""
    return sum(storage_map(*objects).values())


# ------------------------------------------------------------------------------------------------ the engines
def engine_of(model) -> str:
    """"reference" (NumPy, reference.model.Qwen35Model) or "optimized" (PyTorch, optimized.model.Qwen35Model)."""
    mod = type(model).__module__
    if mod == "reference.model":
        return "reference"
    if mod == "optimized.model":
        return "optimized"
    raise TypeError(f"resident_bytes: expected a reference.model or optimized.model Qwen35Model, got "
                    f"{type(model).__module__}.{type(model).__name__}")


def _dtype_name(dtype) -> str:
    """'float64', 'float32', 'bfloat16', ... of a NumPy or torch dtype."""
    return str(dtype).replace("torch.", "")


def engine_dtypes(model) -> dict:
    """The dtypes a model keeps each kind of memory in: weights, conv state, recurrent state, KV cache."""
    dt = _dtype_name(model.dtype)
    if engine_of(model) == "reference":
        return {"weights": dt, "conv_state": dt, "recurrent_state": dt, "kv": dt}
    return {"weights": dt, "conv_state": dt, "recurrent_state": "float32", "kv": dt}  # fp32 state (pitfall B8)


def _weight_objects(model) -> list:
    if engine_of(model) == "reference":
        w = model.weights
        return [w.embed_tokens, w.norm, w.lm_head, w.layers]
    return [model.embed_tokens, model.lm_head, model.norm, model.layers]


def _vision_objects(model) -> list:
    """The vision tensors a model holds: the checkpoint's raw `model.visual.*` arrays still kept and the tower
    built from them on the first request with pixels (each engine's private attributes)."""
    if engine_of(model) == "reference":
        return [model.weights.visual, getattr(model, "_vision_weights", None)]
    return [getattr(model, "_visual_weights", None), getattr(model, "_vision_tower", None)]


def _state_pools(model) -> list:
    if engine_of(model) == "reference":
        return [model.state_cache.conv_pools, model.state_cache.recurrent_pools]
    return [model.conv_pools, model.state_pools]


def _kv_pairs(model) -> list[tuple]:
    """(k, v, cached tokens) of every live request and full-attention layer."""
    if engine_of(model) == "reference":
        kv = model.kv_cache
        return [(k, v, k.shape[0]) for rid in kv.active_requests
                for k, v in (kv.get([rid], layer)[0] for layer in model.config.full_layer_indices)]
    return [(c.k, c.v, c.length) for rec in model._requests.values() for c in rec.kv]


def resident_bytes(model) -> dict:
    """Bytes a live model holds, by category (distinct storages, views once).

    Returns:
        weights      the language model's weights (embeddings, norms, every layer, lm_head; tied: one array)
        vision       the vision tensors held (raw checkpoint arrays and / or the built tower; 0 for text models)
        state pool   every linear layer's conv and recurrent pools (all slots)
        KV used      cached tokens x bytes per token, over every live request and full layer
        KV capacity  the bytes of the K / V buffers those requests hold (optimized: grown by doubling)
        kv_tokens    cached tokens summed over requests (one full layer's count; every full layer caches the same)
        slots        state-pool slots
        total        distinct storages of all of it together
    """
    pairs = _kv_pairs(model)
    n_full = max(model.config.num_full_layers, 1)
    used = sum(int(n) * (_row_bytes(k) + _row_bytes(v)) for k, v, n in pairs)
    kv_objects = [(k, v) for k, v, _ in pairs]
    groups = {"weights": _weight_objects(model), "vision": _vision_objects(model), "state pool": _state_pools(model),
              "KV capacity": kv_objects}
    out = {name: held_bytes(*objs) for name, objs in groups.items()}
    out["KV used"] = used
    out["kv_tokens"] = sum(int(n) for _, _, n in pairs) // n_full
    out["slots"] = int(model.max_batch_size)
    out["total"] = held_bytes(*[o for objs in groups.values() for o in objs])
    return out


def _row_bytes(a) -> int:
    """Bytes of one token's row of a K or V buffer [T, H_kv, D_h] (NumPy or torch)."""
    size = a.element_size() if _is_tensor(a) else a.itemsize
    return size * int(np.prod(tuple(a.shape[1:])))


def fp32_norm_bytes(config, dtype) -> int:
    """Extra bytes of keeping every RMSNorm weight in float32 (what optimized.model does in any dtype) over keeping
    them in `dtype`: the final norm, both norms of every layer, q_norm and k_norm of every full-attention layer.
    (reference.memory counts only A_log, dt_bias and the gated-norm weight in float32.)  0 for dtypes of 4 bytes
    or more."""
    b = dtype_bytes(dtype)
    if b >= 4:
        return 0
    parts = parameter_split(config, include_vision=False)
    n = parts["final_norm"].replicated + parts["layer_norms"].replicated + parts["full_attention_layers"].replicated
    return n * (4 - b)


def predicted_bytes(model, kv_tokens: int | None = None) -> dict:
    """reference.memory's prediction for the model's config, dtypes and pool: the categories of `resident_bytes`.

    weights      weight_bytes(config, weight dtype), text part (A_log, dt_bias, gated-norm weight in fp32 or wider)
    vision       weight_bytes with the vision tower minus without it (0 for text models)
    state pool   slots x state_bytes_per_request(config, recurrent dtype, conv_dtype=conv dtype)
    KV used      kv_bytes_per_token(config, KV dtype) x kv_tokens (default: the tokens the model has cached now)
    KV capacity  the same (the prediction knows no growth policy)
    and, for the optimized engine, `weights, engine rule` = weights + `fp32_norm_bytes` (its norms in fp32).
    """
    c = model.config
    d = engine_dtypes(model)
    tokens = resident_bytes(model)["kv_tokens"] if kv_tokens is None else int(kv_tokens)
    text = weight_bytes(c, d["weights"], include_vision=False)
    out = {
        "weights": text,
        "vision": weight_bytes(c, d["weights"], include_vision=True) - text,
        "state pool": int(model.max_batch_size) * state_bytes_per_request(c, d["recurrent_state"],
                                                                          conv_dtype=d["conv_state"]),
        "KV used": kv_bytes_per_token(c, d["kv"]) * tokens,
        "KV capacity": kv_bytes_per_token(c, d["kv"]) * tokens,
    }
    if engine_of(model) == "optimized":
        out["weights, engine rule"] = text + fp32_norm_bytes(c, d["weights"])
    return out


def _kv_initial_capacity() -> int:
    """Tokens an optimized.attention.KVCache starts with (its constructor's default)."""
    import inspect

    from optimized.attention import KVCache

    return int(inspect.signature(KVCache).parameters["capacity"].default)


def optimized_kv_capacity(lengths, initial: int | None = None) -> int:
    """Tokens of K/V buffer an optimized.attention.KVCache holds after the chunks of `lengths` tokens were appended
    (its policy: start at `initial`, by default its constructor's, and grow to max(need, 2 x capacity))."""
    cap, n = _kv_initial_capacity() if initial is None else initial, 0
    for t in lengths:
        n += int(t)
        if n > cap:
            cap = max(n, 2 * cap)
    return cap


# ------------------------------------------------------------------------------------------------ peaks
class _TracedPeak:
    """Peak bytes of NumPy (and Python) allocations during the block, above the traced bytes at its start."""

    def __enter__(self):
        self.started = not tracemalloc.is_tracing()
        if self.started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self.base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc):
        self.peak = max(tracemalloc.get_traced_memory()[1] - self.base, 0)
        if self.started:
            tracemalloc.stop()
        return False


def _allocation_events(prof) -> list[tuple[int, int]]:
    """(time ns, +bytes allocated / -bytes freed) of every CPU allocator event a torch.profiler run recorded
    (`profile_memory=True`).  The event tree is torch's experimental profiler API; a torch without it is refused
    with a message rather than measured wrongly."""
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError as e:  # pragma: no cover - depends on the torch build
        raise RuntimeError(f"this torch build's profiler does not expose its allocation events ({e}); the CPU "
                           "peak of the optimized engine cannot be measured with it") from None
    events, stack = [], list(roots)
    while stack:
        node = stack.pop()
        if getattr(node.tag, "name", None) == "Allocation" and str(node.extra_fields.device).startswith("cpu"):
            events.append((int(node.start_time_ns), int(node.extra_fields.alloc_size)))
        stack.extend(node.children)
    events.sort()
    return events


def running_peak(events) -> int:
    """max(0, largest prefix sum) of (time, ±bytes) events in time order: the most bytes newly allocated at once."""
    peak = total = 0
    for _, size in events:
        total += size
        peak = max(peak, total)
    return peak


class _TorchPeak:
    """Peak bytes torch's allocator handed out during the block above what it held at the start: CUDA through
    the caching allocator's statistics, CPU through the profiler's allocation events."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def __enter__(self):
        torch = self.torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        torch = self.torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(torch.cuda.max_memory_allocated(self.device) - self.base, 0)
        else:
            self.prof.__exit__(*exc)
            self.peak = running_peak(_allocation_events(self.prof)) if exc[0] is None else 0
        return False


class _Seen:
    """The state copies a step's forward pass left alive, kept (by reference) to be counted after the step.

    reference: its gathered input states, its output states and the K/V arrays it rebuilt (`model.forward` is
    wrapped for the step); optimized: the final states a prefill keeps for its commit (`PendingStep.writes`; a
    decode step has none: it wrote in place).  Holding them to the end of the step changes no peak: each engine
    keeps them itself until its step returns."""

    def __init__(self, model):
        self.model, self.states, self.kv = model, [], []

    def __enter__(self):
        if engine_of(self.model) == "reference":
            original = self.model.forward

            def forward(tokens, offsets, position_ids, conv, rec, past_kv, *args, **kwargs):
                out = original(tokens, offsets, position_ids, conv, rec, past_kv, *args, **kwargs)
                self.states += [conv, rec, out[1], out[2]]
                self.kv += list(out[3].values())
                return out

            self.model.forward = forward  # an instance attribute: shadows the method for this step only
        return self

    def __exit__(self, *exc):
        if engine_of(self.model) == "reference":
            del self.model.forward
        return False

    def execute(self, inputs):
        """`model.execute(inputs)`; for the optimized engine as its two halves, keeping the prefill's final states."""
        if engine_of(self.model) == "reference":
            return self.model.execute(inputs)
        step = self.model.run_step(inputs)
        self.states += [new for _, _, new in step.writes]
        step.commit()
        return step.outputs

    def counts(self) -> dict:
        """state_copies_bytes (and, for the reference, kv_rebuilt_bytes): distinct storages; then forgets them."""
        out = {"state_copies_bytes": held_bytes(self.states)}
        if engine_of(self.model) == "reference":
            out["kv_rebuilt_bytes"] = held_bytes(self.kv)
        self.states, self.kv = [], []
        return out


def _peak_of(model, step: Callable[[_Seen], tuple]) -> tuple[tuple, dict]:
    """Run `step(seen)` (one pipeline step, executing through `seen.execute`) and return its result and
    {numpy_peak, torch_peak, extra_bytes, state_copies_bytes[, kv_rebuilt_bytes]}."""
    gc.collect()
    with _Seen(model) as seen:
        if engine_of(model) == "reference":
            with _TracedPeak() as t:
                result = step(seen)
            torch_peak = 0
        else:
            with _TorchPeak(model.device) as p, _TracedPeak() as t:  # the profiler's own work outside the trace
                result = step(seen)
            torch_peak = p.peak
    return result, {"numpy_peak": t.peak, "torch_peak": torch_peak, "extra_bytes": t.peak + torch_peak,
                    **seen.counts()}


def _to_numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if _is_tensor(x) else np.asarray(x)


def _prompts(config, batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` random prompts of `length` text tokens (below any vision placeholder id)."""
    top = config.vocab_size if config.image_token_id is None else min(config.vocab_size, config.image_token_id)
    rng = np.random.default_rng(seed)
    return [rng.integers(0, top, length).tolist() for _ in range(batch)]


def prefill_and_decode(model, ids, prompts, *, measure: bool = True) -> tuple[dict, object]:
    """Prefill `prompts` as new requests `ids` (one step), then one decode step of all of them (greedy tokens).

    Returns ({"prefill": peak, "decode": peak} with measure, else {}; the decode step's inputs); each peak is a
    dict of `_peak_of`.  Before the decode step the prefill's inputs are dropped, with the reference's gathered
    copies (`prepare_next_token_inputs` drops them first itself): the step starts from the model alone."""
    ctxs = [TextContext(r, p) for r, p in zip(ids, prompts, strict=True)]

    def prefill(seen):
        inputs = model.prepare_initial_token_inputs(ctxs)
        return seen.execute(inputs), inputs

    def step(run):
        return _peak_of(model, run) if measure else (run(_Seen(model)), None)

    (out, inputs), pre = step(prefill)
    tokens = [int(i) for i in _to_numpy(out.logits).argmax(-1)]
    del out
    if engine_of(model) == "reference":
        inputs.conv_states = inputs.recurrent_states = None

    def decode(seen):
        nxt = model.prepare_next_token_inputs(tokens, inputs)
        return seen.execute(nxt), nxt

    (_, last), dec = step(decode)
    return ({"prefill": pre, "decode": dec} if measure else {}), last


# ------------------------------------------------------------------------------------------------ one case
def build_model(weights, engine: str, dtype: str, slots: int, device: str = "cpu"):
    """A model of `engine` ("reference" | "optimized") in `dtype` with `slots` state-pool slots, from NumPy
    ModelWeights (the reference shares them as given: load them in its dtype; the optimized engine converts).
    The optimized engine runs its torch ops on the CPU and its default backend (Triton where available) on CUDA."""
    if engine == "reference":
        from reference.model import Qwen35Model

        if device != "cpu":
            raise ValueError(f"the reference engine runs on the CPU only, got device {device!r}")
        if np.dtype(weights.dtype) != np.dtype(dtype):
            raise ValueError(f"reference engine in {dtype}: load the weights in {dtype} (they are {weights.dtype})")
        return Qwen35Model(weights, max_batch_size=slots, dtype=np.dtype(dtype))
    if engine == "optimized":
        import torch

        from optimized.model import Qwen35Model

        return Qwen35Model(weights, device=device, dtype=getattr(torch, dtype),
                           backend="torch" if torch.device(device).type == "cpu" else "auto", max_batch_size=slots)
    raise ValueError(f"engine must be 'reference' or 'optimized', got {engine!r}")


def comparison_rows(resident: dict, predicted: dict, engine: str, dtype: str, config) -> list[dict]:
    """(category, predicted, measured, ratio, note) rows of one model; the known differences are noted."""
    rows = []
    for cat in CATEGORIES:
        p, m = int(predicted[cat]), int(resident[cat])
        if cat == "vision" and p == 0 and m == 0:
            continue
        note = ""
        if cat == "weights" and engine == "optimized" and m != p:
            extra = fp32_norm_bytes(config, dtype)
            note = (f"every RMSNorm weight kept in fp32: +{extra:,} B predicted by that rule"
                    + ("" if m == p + extra else f" (still {m - p - extra:+,} B unexplained)"))
        elif cat == "KV capacity" and m != p:
            note = f"buffers start at {_kv_initial_capacity()} tokens and grow by doubling"
        rows.append({"category": cat, "predicted": p, "measured": m, "ratio": (m / p) if p else None, "note": note})
    return rows


def measure_case(weights, engine: str, dtype: str, batch: int, *, prompt_len: int = STUDY_PROMPT,
                 device: str = "cpu", seed: int = 0, warmup: bool = True, peaks: bool = True) -> dict:
    """Build `engine` in `dtype` with `batch` slots, prefill `batch` requests of `prompt_len` tokens and decode one
    step (peaks measured), then measure what the model holds against reference.memory's prediction.

    A warm-up request (prefill + one decode, measured and discarded, then released) runs first, so one-time
    allocations (caches, lazily built tables, the profiler's first start) are not counted in the measured steps.
    NumPy allocations are traced from before the warm-up, so frees of the model's own arrays during a step are
    seen.  `peaks=False` runs the same steps unmeasured (the resident bytes only; "peaks" is then empty).
    """
    config = weights.config
    tracing = peaks and not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()
    try:
        model = build_model(weights, engine, dtype, batch, device)
        if warmup and peaks:  # measured too (and discarded): the trackers' own first-use allocations happen here
            prefill_and_decode(model, ["warm-up"], _prompts(config, 1, prompt_len, seed + 1))
            model.release("warm-up")
        ids = [f"r{b}" for b in range(batch)]
        steps, last = prefill_and_decode(model, ids, _prompts(config, batch, prompt_len, seed), measure=peaks)
        held_by_inputs = held_bytes(getattr(last, "conv_states", None), getattr(last, "recurrent_states", None))
        res = resident_bytes(model)
        pred = predicted_bytes(model)
    finally:
        if tracing:
            tracemalloc.stop()
    per_req = pred["state pool"] // batch
    for p in steps.values():
        p["batch_state_bytes"] = batch * per_req
        # state working memory at the step's peak, in units of batch x per_req: the batch's pool rows + the extra
        p["copies_at_peak_bound"] = 1 + p["extra_bytes"] / (batch * per_req) if per_req else None
        p["state_copies_at_peak"] = 1 + p["state_copies_bytes"] / (batch * per_req) if per_req else None
    d = engine_dtypes(model)
    cap_tokens = optimized_kv_capacity([prompt_len, 1]) if engine == "optimized" else prompt_len + 1
    return {"engine": engine, "dtype": dtype, "device": device, "batch": batch, "slots": res["slots"],
            "prompt_len": prompt_len, "kv_tokens": res["kv_tokens"], "dtypes": d,
            "state_bytes_per_request": per_req, "kv_bytes_per_token": kv_bytes_per_token(config, d["kv"]),
            "resident": res, "predicted": pred, "rows": comparison_rows(res, pred, engine, dtype, config),
            "held_by_last_inputs": held_by_inputs, "peaks": steps, "kv_capacity_tokens_per_request": cap_tokens,
            "kv_capacity_by_growth_rule": batch * cap_tokens * kv_bytes_per_token(config, d["kv"])}


def _drifts(rows, who: str, tolerance: float) -> list[str]:
    bad = []
    for row in rows:
        p, m = row["predicted"], row["measured"]
        if row["category"] in ("weights", "state pool", "KV used") and abs(m - p) > tolerance * p:
            bad.append(f"{who}: {row['category']} measured {m:,} B, predicted {p:,} B (ratio {m / p:.4f}, "
                       f"tolerance {tolerance:.0%})")
    return bad


def check_case(case: dict, tolerance: float = 0.02) -> list[str]:
    """What of a `measure_case` result drifts from reference.memory's prediction by more than `tolerance`
    (relative): the resident weights, the state pool and the KV bytes used; one message per drift (empty: none)."""
    return _drifts(case["rows"], f"{case['engine']} {case['dtype']} batch {case['batch']}", tolerance)


def check_model(model, tolerance: float = 0.02) -> list[str]:
    """`check_case` for a live model as it is now (its slots, the tokens it has cached)."""
    engine, dtype = engine_of(model), engine_dtypes(model)["weights"]
    rows = comparison_rows(resident_bytes(model), predicted_bytes(model), engine, dtype, model.config)
    return _drifts(rows, f"{engine} {dtype}", tolerance)


# ------------------------------------------------------------------------------------------------ the study
ENGINES = (("reference", "float64"), ("reference", "float32"), ("optimized", "float32"), ("optimized", "bfloat16"))


def study_configs(quick: bool = False) -> dict:
    """The checkpoints of the study: the tiny test geometry and the 0.8B-width one of qwen35.bench (4 layers)."""
    from qwen35.bench import bench_config
    from reference.config import Qwen35Config

    return {"tiny": Qwen35Config.tiny(), "0.8B width": bench_config(vocab_size=4096 if quick else 32768)}


def measure_all(*, quick: bool = False, batches=STUDY_BATCHES, prompt_len: int = STUDY_PROMPT, device: str = "cpu",
                log=print) -> dict:
    """Every engine and dtype of `ENGINES` on every checkpoint of `study_configs` at every batch: the JSON of
    docs/memory_measured_cpu.json.  Each checkpoint is written by qwen35.bench.write_random_checkpoint (float32
    safetensors) into a temporary directory and loaded with reference.weights.load_weights in each dtype."""
    from qwen35.bench import write_random_checkpoint
    from qwen35.measure import machine_info
    from reference.weights import load_weights

    if quick:
        batches = tuple(b for b in batches if b <= 8)
    out = {"kind": "memory_measured", "schema": 1, "meta": machine_info(device),
           "settings": {"batches": list(batches), "prompt_len": prompt_len, "decode_steps": 1, "quick": quick,
                        "method": "resident: distinct storages (views once); peaks: tracemalloc (NumPy), "
                                  "torch.profiler allocation events (torch CPU) or torch.cuda.max_memory_allocated"},
           "configs": {}, "cases": []}
    out["meta"]["dtype_note"] = "engines: reference float64 / float32, optimized float32 / bfloat16 (fp32 state)"
    for name, config in study_configs(quick).items():
        out["configs"][name] = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                                "vocab_size": config.vocab_size, "layer_types": list(config.layer_types),
                                "linear_heads": [config.linear_num_key_heads, config.linear_num_value_heads],
                                "linear_head_dims": [config.linear_key_head_dim, config.linear_value_head_dim],
                                "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim,
                                "tie_word_embeddings": config.tie_word_embeddings}
        with tempfile.TemporaryDirectory() as tmp:
            path = write_random_checkpoint(Path(tmp) / "ckpt", config)
            loaded = {}
            for engine, dtype in ENGINES:
                if device != "cpu" and engine == "reference":
                    continue
                load = dtype if engine == "reference" else "float32"
                if load not in loaded:
                    loaded.clear()  # one load dtype in memory at a time
                    gc.collect()
                    loaded[load] = load_weights(path, dtype=np.dtype(load))
                for b in batches:
                    t0 = time.perf_counter()
                    case = measure_case(loaded[load], engine, dtype, b, prompt_len=prompt_len, device=device)
                    case["config"] = name
                    case["seconds"] = round(time.perf_counter() - t0, 2)
                    out["cases"].append(case)
                    dec = case["peaks"]["decode"]
                    log(f"{name:>10} {engine:>9} {dtype:>8} B={b:<3} weights {_ratio(case, 'weights')}  pool "
                        f"{_ratio(case, 'state pool')}  KV used {_ratio(case, 'KV used')}  decode peak "
                        f"{dec['extra_bytes'] / 2**20:8.2f} MiB = {dec['copies_at_peak_bound']:.2f} x state "
                        f"({case['seconds']:.1f} s)")
            loaded.clear()
    return out


def _ratio(case: dict, category: str) -> str:
    row = next(r for r in case["rows"] if r["category"] == category)
    return f"{row['ratio']:.4f}" if row["ratio"] is not None else "-"


# ------------------------------------------------------------------------------------------------ tables
def _mib(n) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB" if n >= 2**10 else f"{int(n)} B"


def markdown_tables(data: dict) -> str:
    """docs/benchmarks.md's "Memory, measured" tables from a `measure_all` JSON: per checkpoint, predicted vs
    measured by category and engine (the pool and the KV at every batch, "·"-separated), then the step peaks."""
    L = []
    cases = data["cases"]
    batches = data["settings"]["batches"]
    for name in dict.fromkeys(c["config"] for c in cases):
        cfg = data["configs"][name]
        L.append(f"**{name}** (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers "
                 f"{''.join(t[0].upper() for t in cfg['layer_types'])}, vocabulary {cfg['vocab_size']:,}; "
                 f"{data['settings']['prompt_len']} prompt tokens + 1 decode step per request, pool slots = batch; "
                 f"bytes at batch {' · '.join(map(str, batches))})")
        L.append("")
        L.append("| engine · dtype | category | predicted (B) | measured (B) | measured / predicted | note |")
        L.append("|---|---|---:|---:|---:|---|")
        for engine, dtype in dict.fromkeys((c["engine"], c["dtype"]) for c in cases if c["config"] == name):
            group = sorted((c for c in cases if c["config"] == name and (c["engine"], c["dtype"]) == (engine, dtype)),
                           key=lambda c: c["batch"])
            for cat in CATEGORIES:
                rows = [r for c in group for r in c["rows"] if r["category"] == cat]
                if not rows:
                    continue
                if cat in ("weights", "vision"):
                    rows = rows[:1]
                ratios = list(dict.fromkeys(f"{r['ratio']:.4f}" if r["ratio"] is not None else "—" for r in rows))
                pred = " · ".join(f"{r['predicted']:,}" for r in rows)
                meas = " · ".join(f"{r['measured']:,}" for r in rows)
                L.append(f"| {engine} · {dtype} | {cat} | {pred} | {meas} | {' · '.join(ratios)} | {rows[0]['note']} |")
        L.append("")
    L.append("| checkpoint | engine · dtype | batch | per_req state | decode: peak extra | decode: copies at peak "
             "(bound · by object) | prefill: peak extra | prefill: copies at peak (bound · by object) |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        cells = []
        for step in ("decode", "prefill"):
            p = c["peaks"][step]
            cells += [_mib(p["extra_bytes"]), f"{p['copies_at_peak_bound']:.2f} · {p['state_copies_at_peak']:.2f}"]
        L.append(f"| {c['config']} | {c['engine']} · {c['dtype']} | {c['batch']} | "
                 f"{_mib(c['state_bytes_per_request'])} | " + " | ".join(cells) + " |")
    return "\n".join(L)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen35.resident", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/memory_measured_cpu.json", help="result JSON (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8, a 4096-token vocabulary")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: the optimized engine only")
    parser.add_argument("--plot", default=None, metavar="DIR", help="also draw the plot into DIR (e.g. docs/plots)")
    args = parser.parse_args(argv)
    from qwen35.measure import pin_threads, write_json

    pin_threads()
    data = measure_all(quick=args.quick, device=args.device)
    print(f"wrote {write_json(data, args.out)}")
    print(markdown_tables(data))
    if args.plot:
        from qwen35.plot import plot_memory_measured

        for p in plot_memory_measured(data, args.plot):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
