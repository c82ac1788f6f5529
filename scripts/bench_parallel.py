#!/usr/bin/env python3
"""Tensor parallelism on the CPU: TP=1 (one process, one thread) vs TP=2 (two ranks, one thread each) -> JSON.

    python scripts/bench_parallel.py                        # -> docs/bench_parallel_cpu.json
    python scripts/bench_parallel.py --wait-s 900           # first wait (up to 15 min) for a 1-min load < 1.0
    python scripts/bench_parallel.py --quick --out /tmp/p.json   # a tiny model, two rounds (a smoke test)

    python scripts/bench_parallel.py --write-checkpoint DIR [--quick]           # the random checkpoint, for:
    torchrun --nproc-per-node 2 scripts/bench_parallel.py --check-logits DIR --device cuda --out X.json

`--check-logits` (scripts/gpu_check.sh runs it on two GPUs, NCCL; on the CPU it runs with gloo) compares the
tensor-parallel model's logits with the single-device model's and the float64 NumPy oracle's, and, given
`--generate-json TP2.json ONE.json` (two `qwen35 generate --json` outputs), their generated tokens.

The model: the 0.8B width of `qwen35.bench.bench_config` (hidden 1024, I 3584, 8 q / 2 KV heads of 256, Gated
DeltaNet 16 / 16 heads of 128), 4 layers (L L L F), vocabulary 32768, tied lm_head, random float32 weights
(`qwen35.bench.write_random_checkpoint`).

The floor, written down before measuring (per rank; `rank_prefill_flops`, `reference.memory.weight_bytes`):

* Prefill of T = 1024 tokens (logits of the last position): 183.14 GFLOP at TP=1
  (`qwen35.measure.model_prefill_flops`), 91.57 GFLOP per rank at TP=2.  Every counted FLOP is split: the
  projections by heads and MLP columns, the gated delta rule and the attention by heads, the one lm_head row by
  vocabulary block.  What each rank repeats (the RMSNorms, the residual adds, the embedding lookup) is elementwise
  and not counted.  So the FLOP floor allows 2.00x, if two busy cores each keep one idle core's matmul rate.
* One decode step at batch 1 streams every weight once: 466.3 MB at TP=1, 233.2 MB per rank at TP=2
  (`weight_bytes(config, "float32", include_vision=False, tensor_parallel=2)`: half of every split tensor and of
  the vocabulary rows, plus the 40 KB of norm weights every rank holds).  The bytes floor allows 2.00x, if two
  cores together read DRAM twice as fast as one.
* What TP=2 adds: one all-reduce of [T, 1024] float32 after the embedding and after every token mixer and every
  MLP (9 for 4 layers: 36 MiB per prefill of 1024 tokens, 36 KiB per decode step) and one gather of the vocabulary
  blocks of the logits, through gloo on the loopback interface.  Prefill pays for bytes, decode for latency (ten
  collectives per token).  The parallel model's pipeline calls also exchange every rank's outcome (so that an
  error on one rank is raised on all): three small `all_gather_object` calls per decode step, timed here as
  `agree_s` and not part of `comm_seconds`.

The floors are turned into times with rates measured in the same rounds: a float32 1024³ sgemm and a
read-only DRAM stream, each on rank 0 alone (the TP=1 conditions) and on both ranks at once (the TP=2 ones).

How it is measured.  One world of two processes (`optimized.parallel.run_local_world`, gloo, one torch thread
each, each pinned to its own CPU) stays alive for every round.  Rank 0 holds the plain `optimized.model.Qwen35Model`
(TP=1) and its TP=2 shard; rank 1 its TP=2 shard.  A round runs, in this order: TP=1 prefill, TP=2 prefill,
TP=1 decode, TP=2 decode, then the rate probes.  A TP=1 phase runs on rank 0 alone while rank 1 waits in a
barrier, with its CPU time over the wait recorded (`idle_cpu_s`: a waiting gloo rank blocks, it does not spin),
so TP=1 runs as a single process of one thread would, on a machine whose other core is idle.  A TP=2 phase starts
after a barrier; its time is the slower rank's.  Round 0 is the warm-up and is dropped; the medians of the other
rounds are reported, with TP2/TP1 ratios.  Decode: a 128-token prompt (not timed), then 32 steps at batch 1, the
next tokens given (no sampling), timed together.  The TP=2 logits are compared with TP=1's in the warm-up round.
The machine is small and shared: `--wait-s` waits for a 1-minute load average below `--max-load` and CPUs at most
10 % busy over 3 s before starting; the load at the start and the end (the run itself adds about 1 to it) and the
CPU seconds other processes took during the run (`other_jobs_cpu_s_during_run`, from /proc/stat minus this run's
own) are recorded.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout
    sys.path.insert(0, str(ROOT))

from qwen35.measure import (  # noqa: E402
    SINGLE_THREAD_ENV,
    decode_weight_bytes,
    machine_info,
    model_prefill_flops,
    pin_threads,
    write_json,
)

DEFAULT_OUT = ROOT / "docs" / "bench_parallel_cpu.json"
GOALS = {"prefill_speedup_tp2": 1.6, "decode_speedup_tp2": 1.5}  # TP=2 tokens/s over TP=1 tokens/s
TP = 2


# ---------------------------------------------------------------------------------------------- the floor
def quick_config():
    """A tiny geometry that TP=2 divides (8 / 4 attention heads, 4 / 8 Gated DeltaNet heads), for --quick."""
    from reference.config import Qwen35Config

    return Qwen35Config.tiny(num_attention_heads=8, num_key_value_heads=4, linear_num_key_heads=4,
                             linear_num_value_heads=8, vocab_size=96)


def rank_prefill_flops(config, T: int, tensor_parallel: int, rank: int) -> int:
    """FLOPs one rank computes in a prefill of T tokens (last-position logits): `model_prefill_flops` of the
    rank's geometry (`reference.parallel.local_config`: its heads, its MLP columns), with the lm_head row over the
    rank's vocabulary block instead of the whole vocabulary."""
    from reference.parallel import local_config, vocab_range

    v0, v1 = vocab_range(config, tensor_parallel, rank)
    local = local_config(config, tensor_parallel)
    return model_prefill_flops(local, T) - 2 * config.hidden_size * (config.vocab_size - (v1 - v0))


def floor(config, T: int) -> dict:
    """The work of TP=1 and of each TP=2 rank: prefill FLOPs and one decode step's weight bytes (float32)."""
    from reference.memory import replicated_weight_bytes, weight_bytes

    ranks = range(TP)
    return {
        "prefill_T": T,
        "prefill_flops_tp1": model_prefill_flops(config, T),
        "prefill_flops_per_rank_tp2": [rank_prefill_flops(config, T, TP, r) for r in ranks],
        "decode_weight_bytes_tp1": weight_bytes(config, "float32", include_vision=False),
        "decode_weight_bytes_per_rank_tp2": [weight_bytes(config, "float32", include_vision=False,
                                                          tensor_parallel=TP, rank=r) for r in ranks],
        "replicated_weight_bytes_per_rank": replicated_weight_bytes(config, "float32", include_vision=False),
        "decode_weight_bytes_streamed_tp1": decode_weight_bytes(config),  # qwen35.measure's count (no norms, conv)
        "allreduce_bytes_per_token": (2 * config.num_hidden_layers + 1) * config.hidden_size * 4,
    }


# ---------------------------------------------------------------------------------------------- the launcher check
CHECK_TOLERANCE = {"tp2_vs_one_device": 1e-4, "vs_float64_oracle": 1e-3}  # relative RMS of the logits


def _read_generate_json(path: str) -> dict:
    """A `qwen35 generate --json` output: its one object, or {"error": why not}."""
    try:
        text = Path(path).read_text().strip()
        obj, end = json.JSONDecoder().raw_decode(text)
        if text[end:].strip():
            return {"error": f"{path}: more than one JSON object"}
        return obj
    except (OSError, ValueError) as exc:
        return {"error": f"{path}: {type(exc).__name__}: {exc}"}


def check_logits(path: str, device: str, generate_json=None) -> dict:
    """Under a launcher (torchrun) with two ranks: the TP=2 model's all-position logits on three prompts vs the
    one-device model's (on rank 0's device) and, for the two short prompts, the unsharded float64 NumPy oracle's;
    with `generate_json`, the new_ids of a TP=2 and a one-process `qwen35 generate --json`.  Every rank returns
    the record; `ok` is True when every comparison is within CHECK_TOLERANCE and the tokens agree."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from optimized.model import Qwen35Model
    from qwen35.measure import rel_rms
    from reference.config import Qwen35Config
    from reference.model import Qwen35Model as ReferenceModel

    cuda = device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    config = Qwen35Config.from_pretrained(path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (7, 64, 300)]
    tp2 = Qwen35Model.from_pretrained(path, tensor_parallel=TP, device=device, max_batch_size=2)
    got = [t.float().cpu() for t in tp2.logits(prompts)]
    rec = {"device": device, "backend": dist.get_backend(), "world_size": dist.get_world_size(),
           "prompt_lengths": [len(p) for p in prompts], "tolerance": CHECK_TOLERANCE,
           "comm_calls": tp2.replica.tensor_parallel.calls}
    if rank == 0:
        one = Qwen35Model.from_pretrained(path, device=device, max_batch_size=2)
        want = [t.float().cpu() for t in one.logits(prompts)]
        oracle = ReferenceModel.from_pretrained(path, max_batch_size=1).logits(prompts[:2])
        rec["rel_rms_tp2_vs_one_device"] = [rel_rms(w, g) for w, g in zip(want, got, strict=True)]
        rec["rel_rms_tp2_vs_float64_oracle"] = [rel_rms(o, g) for o, g in zip(oracle, got[:2], strict=True)]
        rec["rel_rms_one_device_vs_float64_oracle"] = [rel_rms(o, w) for o, w in zip(oracle, want[:2], strict=True)]
        ok = (max(rec["rel_rms_tp2_vs_one_device"]) < CHECK_TOLERANCE["tp2_vs_one_device"]
              and max(rec["rel_rms_tp2_vs_float64_oracle"]) < CHECK_TOLERANCE["vs_float64_oracle"])
        if generate_json:
            tp_out, one_out = (_read_generate_json(p) for p in generate_json)
            same = "error" not in tp_out and "error" not in one_out and tp_out["new_ids"] == one_out["new_ids"]
            rec["generate"] = {"tp2": tp_out, "one_device": one_out, "new_ids_equal": same}
            ok = ok and same
        rec["ok"] = bool(ok)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rec)
    dist.destroy_process_group()  # before exit: a gloo world left standing can abort the interpreter's shutdown
    return everyone[0]


# ---------------------------------------------------------------------------------------------- one rank
def _rank_main(spec: dict) -> dict:
    """What every rank of the two-process world runs: load, then `rounds + 1` rounds (module docstring).  Returns
    this rank's per-round lists of seconds (picklable)."""
    import torch
    import torch.distributed as dist

    from optimized.model import Qwen35Model
    from optimized.parallel import agree
    from qwen35.measure import rel_rms
    from reference.context import TextContext

    pin_threads()
    rank = dist.get_rank()
    if spec["pin"] and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    path, T, prompt, steps = spec["path"], spec["T"], spec["decode_prompt"], spec["decode_steps"]
    toks = spec["tokens"]
    tp2 = Qwen35Model.from_pretrained(path, tensor_parallel=TP, max_batch_size=2, backend="torch")
    tp1 = Qwen35Model.from_pretrained(path, max_batch_size=2, backend="torch") if rank == 0 else None
    group = tp2.replica.tensor_parallel
    rec = {"rank": rank, "cpu": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    counters = {}  # per model: every rank must give the TP=2 model the same request ids

    def new_id(model, kind):
        return (kind, next(counters.setdefault((id(model), kind), itertools.count())))

    def put(name, value):
        rec.setdefault(name, []).append(value)

    def timed(fn):
        """fn() timed, with the TP=2 group's communication seconds and calls over the same interval."""
        comm, calls = tp2.comm_seconds, group.calls
        t0 = time.perf_counter()
        value = fn()
        return time.perf_counter() - t0, value, tp2.comm_seconds - comm, group.calls - calls

    def prefill(model):
        rid = new_id(model, "p")
        dt, out, comm, calls = timed(lambda: model.execute(model.prepare_initial_token_inputs(
            [TextContext(rid, toks[:T])])))
        model.release(rid)
        return dt, out.logits, comm, calls

    def decode(model):
        rid = new_id(model, "d")
        inputs = model.prepare_initial_token_inputs([TextContext(rid, toks[:prompt])])
        model.execute(inputs)

        def steps_():
            nonlocal inputs
            for i in range(steps):
                inputs = model.prepare_next_token_inputs([toks[prompt + i]], inputs)
                out = model.execute(inputs)
            return out.logits

        result = timed(steps_)
        model.release(rid)
        return result

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    buf = torch.ones(spec["stream_mbytes"] * 2 ** 20 // 4)

    def sgemm():
        for _ in range(spec["sgemm_calls"]):
            torch.mm(a, b)

    def agreements():  # one agreement exchange of the parallel model's pipeline calls, n times
        for _ in range(spec["agree_calls"]):
            agree((True, None))

    def solo(name, fn):
        """fn on rank 0 alone; rank 1 waits in the closing barrier, its CPU time over the wait recorded."""
        dist.barrier()
        if rank == 0:
            dt, value, _, _ = fn()
            put(name, dt)
            dist.barrier()
            return value
        c0, t0 = time.process_time(), time.perf_counter()
        dist.barrier()
        put(name + "_idle_cpu_s", time.process_time() - c0)
        put(name + "_idle_wall_s", time.perf_counter() - t0)
        return None

    def together(name, fn):
        """fn on both ranks, started after a barrier; its communication seconds and calls recorded."""
        dist.barrier()
        dt, value, comm, calls = fn()
        put(name, dt)
        put(name + "_comm_s", comm)
        put(name + "_comm_calls", calls)
        return value

    for r in range(spec["rounds"] + 1):  # round 0: the warm-up
        y1 = solo("tp1_prefill", lambda: prefill(tp1))
        y2 = together("tp2_prefill", lambda: prefill(tp2))
        d1 = solo("tp1_decode", lambda: decode(tp1))
        d2 = together("tp2_decode", lambda: decode(tp2))
        solo("sgemm_alone", lambda: timed(sgemm))
        together("sgemm_both", lambda: timed(sgemm))
        solo("stream_alone", lambda: timed(buf.sum))
        together("stream_both", lambda: timed(buf.sum))
        together("agree", lambda: timed(agreements))
        if r == 0 and rank == 0:
            rec["prefill_logits_rel_rms_tp2_vs_tp1"] = rel_rms(y1, y2)
            rec["decode_logits_rel_rms_tp2_vs_tp1"] = rel_rms(d1, d2)
    return rec


# ---------------------------------------------------------------------------------------------- the run
def _median(xs) -> float:
    return float(statistics.median(xs))


def summarize(ranks: list[dict], spec: dict, fl: dict) -> dict:
    """Per-round records of both ranks -> medians, rates, floors and TP2/TP1 ratios (the warm-up round dropped)."""
    r0 = ranks[0]

    def tp1(name):
        return r0[name][1:]

    def tp2(name):  # the slower rank of each round
        return [max(vals) for vals in zip(*(r[name][1:] for r in ranks), strict=True)]

    def per_rank(name):
        return [_median(r[name][1:]) for r in ranks]

    T, steps = spec["T"], spec["decode_steps"]
    mm_flops = spec["sgemm_calls"] * 2 * 1024 ** 3
    stream_bytes = spec["stream_mbytes"] * 2 ** 20
    rates = {
        "sgemm_gflops_alone": mm_flops / _median(tp1("sgemm_alone")) / 1e9,
        "sgemm_gflops_per_rank_both": min(mm_flops / s / 1e9 for s in per_rank("sgemm_both")),
        "dram_read_gbps_alone": stream_bytes / _median(tp1("stream_alone")) / 1e9,
        "dram_read_gbps_per_rank_both": min(stream_bytes / s / 1e9 for s in per_rank("stream_both")),
        "note": "per_rank_both: the slower rank while both ranks run the probe at once",
    }
    out = {"rates": rates}
    for phase, tokens in (("prefill", T), ("decode", steps)):
        one, two = _median(tp1(f"tp1_{phase}")), _median(tp2(f"tp2_{phase}"))
        comm = per_rank(f"tp2_{phase}_comm_s")
        calls = [int(_median(r[f"tp2_{phase}_comm_calls"][1:])) for r in ranks]
        per = 1 if phase == "prefill" else steps
        out[phase] = {
            "tokens": tokens,
            "tp1": {"median_s": one, "min_s": min(tp1(f"tp1_{phase}")), "tok_per_s": tokens / one},
            "tp2": {"median_s": two, "min_s": min(tp2(f"tp2_{phase}")), "tok_per_s": tokens / two,
                    "comm_s_per_step_by_rank": [c / per for c in comm],
                    "comm_calls_per_step": [c / per for c in calls],
                    "comm_s_per_call_by_rank": [c / max(n, 1) for c, n in zip(comm, calls, strict=True)],
                    "comm_fraction_by_rank": [c / two for c in comm]},
            "speedup_tp2": one / two,
            "rank1_idle_cpu_s_during_tp1": _median(ranks[1][f"tp1_{phase}_idle_cpu_s"][1:]),
        }
    agree_s = max(per_rank("agree")) / spec["agree_calls"]
    out["decode"]["tp2"]["agree_s_per_call"] = agree_s
    out["decode"]["tp2"]["agree_s_per_step_estimate"] = 3 * agree_s  # prepare_next + execute's two exchanges
    # floors at the measured rates: TP=1 at rank 0's rates alone, TP=2 at a rank's rates while both run
    p1 = fl["prefill_flops_tp1"] / (rates["sgemm_gflops_alone"] * 1e9)
    p2 = max(fl["prefill_flops_per_rank_tp2"]) / (rates["sgemm_gflops_per_rank_both"] * 1e9)
    d1 = fl["decode_weight_bytes_tp1"] / (rates["dram_read_gbps_alone"] * 1e9)
    d2 = max(fl["decode_weight_bytes_per_rank_tp2"]) / (rates["dram_read_gbps_per_rank_both"] * 1e9)
    out["floor_at_measured_rates"] = {
        "prefill_tp1_s": p1, "prefill_tp2_s": p2, "prefill_speedup_tp2": p1 / p2,
        "decode_tp1_s_per_token": d1, "decode_tp2_s_per_token": d2, "decode_speedup_tp2": d1 / d2,
        "prefill_tp1_fraction_of_floor": p1 / out["prefill"]["tp1"]["median_s"],
        "prefill_tp2_fraction_of_floor": p2 / out["prefill"]["tp2"]["median_s"],
        "decode_tp1_fraction_of_floor": d1 / (out["decode"]["tp1"]["median_s"] / steps),
        "decode_tp2_fraction_of_floor": d2 / (out["decode"]["tp2"]["median_s"] / steps),
    }
    out["check"] = {k: r0[k] for k in ("prefill_logits_rel_rms_tp2_vs_tp1", "decode_logits_rel_rms_tp2_vs_tp1")}
    out["pinned_cpus"] = [r["cpu"] for r in ranks]
    out["goals"] = {f"{p}_speedup_tp2": {"target": GOALS[f"{p}_speedup_tp2"], "measured": out[p]["speedup_tp2"],
                                         "met": out[p]["speedup_tp2"] >= GOALS[f"{p}_speedup_tp2"]}
                    for p in ("prefill", "decode")}
    return out


def _cpu_times():
    """(total, idle + iowait) jiffies of all CPUs from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]
    except (OSError, ValueError, IndexError):
        return None


def _busy_since(start) -> float | None:
    """The busy fraction of all CPUs since `start` (a _cpu_times() sample)."""
    now = _cpu_times()
    if start is None or now is None:
        return None
    return 1.0 - (now[1] - start[1]) / max(now[0] - start[0], 1)


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the ranks, once joined)."""
    import resource

    return sum(ru.ru_utime + ru.ru_stime for ru in (resource.getrusage(resource.RUSAGE_SELF),
                                                    resource.getrusage(resource.RUSAGE_CHILDREN)))


def other_cpu_seconds(start_times, start_own: float) -> float | None:
    """CPU seconds the machine spent busy since `start_times` (_cpu_times) beyond this benchmark's own processes:
    the other jobs' share of the run (0 on a quiet machine)."""
    now = _cpu_times()
    if start_times is None or now is None:
        return None
    busy = ((now[0] - now[1]) - (start_times[0] - start_times[1])) / os.sysconf("SC_CLK_TCK")
    return max(busy - (_own_cpu_seconds() - start_own), 0.0)


def cpu_busy_fraction(seconds: float = 3.0) -> float | None:
    """The fraction of all CPUs' time spent busy (not idle or waiting for I/O) over the next `seconds`, from
    /proc/stat; None where there is none."""
    start = _cpu_times()
    time.sleep(seconds)
    return _busy_since(start)


def _uncommitted(paths) -> list[str] | None:
    """`git status --porcelain` lines under `paths`: the engine files that differ from the recorded commit."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *paths], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines() if out.returncode == 0 else None


def wait_for_quiet(max_load: float, wait_s: float, log=print) -> list:
    """Poll every 30 s until the 1-minute load average is below `max_load` and the CPUs were at most 10 % busy
    over 3 s, or `wait_s` passed; returns the (seconds waited, load, busy fraction) samples."""
    samples, t0 = [], time.monotonic()
    while True:
        load, busy = os.getloadavg()[0], cpu_busy_fraction(3.0 if wait_s else 1.0)
        waited = time.monotonic() - t0
        samples.append((round(waited, 1), load, busy))
        if (load < max_load and (busy is None or busy <= 0.1)) or waited >= wait_s:
            return samples
        log(f"  load {load:.2f}, CPUs {100 * (busy or 0):.0f} % busy: waiting ({waited:.0f} of {wait_s:.0f} s)")
        time.sleep(min(30.0, max(wait_s - waited, 1.0)))


def run(*, quick: bool = False, rounds: int | None = None, pin: bool = True, max_load: float = 1.0,
        wait_s: float = 0.0, log=print) -> dict:
    """The whole benchmark (module docstring) -> a JSON-ready dict."""
    import numpy as np

    from optimized.parallel import run_local_world
    from qwen35.bench import bench_config, write_random_checkpoint

    pin_threads()
    config = quick_config() if quick else bench_config()
    spec = {"T": 64 if quick else 1024, "decode_prompt": 16 if quick else 128, "decode_steps": 4 if quick else 32,
            "rounds": rounds or (2 if quick else 5), "sgemm_calls": 1 if quick else 8,
            "stream_mbytes": 16 if quick else 256, "agree_calls": 20, "pin": pin}
    n_tokens = max(spec["T"], spec["decode_prompt"] + spec["decode_steps"])
    spec["tokens"] = np.random.default_rng(0).integers(0, config.vocab_size, n_tokens).tolist()
    fl = floor(config, spec["T"])
    machine = machine_info("cpu")
    machine["env"] = {k: os.environ.get(k) for k in SINGLE_THREAD_ENV}
    machine["uncommitted_engine_files"] = _uncommitted(("optimized", "reference", "qwen35"))
    samples = wait_for_quiet(max_load, wait_s, log) if hasattr(os, "getloadavg") else []
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    log(f"machine: {machine['host_cpu']}, {machine['cpu_count']} CPUs, load {load_start}")
    t0, times0, own0 = time.perf_counter(), _cpu_times(), _own_cpu_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        spec["path"] = str(write_random_checkpoint(Path(tmp) / "ckpt", config))
        ranks = run_local_world(_rank_main, TP, spec, timeout_s=120 if quick else 1200, threads=1)
    res = summarize(ranks, spec, fl)
    machine.update(load_avg_start=load_start, load_avg_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
                   load_wait_samples=samples, max_load=max_load,
                   quiet_at_start=bool(samples) and samples[-1][1] < max_load and (samples[-1][2] or 0) <= 0.1,
                   other_jobs_cpu_s_during_run=other_cpu_seconds(times0, own0), wall_s=time.perf_counter() - t0)
    geometry = ("tiny (quick)" if quick else
                "0.8B width (hidden 1024, I 3584, nh 8, nkv 2, hd 256, GDN 16x128 / 16x128), 4 layers (L L L F), "
                "vocab 32768, tied lm_head, random float32 weights")
    spec.pop("tokens")
    spec.pop("path")
    return {"kind": "bench_parallel", "schema": 1, "machine": machine, "quick": quick, "geometry": geometry,
            "layout": "TP=1: one process, one thread; TP=2: two processes (gloo), one thread each; one world for "
                      "every round, TP=1 on rank 0 while rank 1 waits in a barrier", "settings": spec,
            "floor": fl, **res, "raw": ranks}


def report(res: dict, log=print) -> None:
    """The console summary: tokens/s, communication, ratios, floors, goals."""
    fl, fr = res["floor"], res["floor_at_measured_rates"]
    log(f"floor: prefill T={fl['prefill_T']}: {fl['prefill_flops_tp1'] / 1e9:.2f} GFLOP at TP=1, "
        f"{max(fl['prefill_flops_per_rank_tp2']) / 1e9:.2f} per rank at TP=2; decode step: "
        f"{fl['decode_weight_bytes_tp1'] / 1e6:.1f} MB at TP=1, {max(fl['decode_weight_bytes_per_rank_tp2']) / 1e6:.1f}"
        " MB per rank")
    r = res["rates"]
    log(f"rates: sgemm {r['sgemm_gflops_alone']:.1f} GF/s alone, {r['sgemm_gflops_per_rank_both']:.1f} per rank "
        f"with both busy; DRAM {r['dram_read_gbps_alone']:.1f} GB/s alone, {r['dram_read_gbps_per_rank_both']:.1f} "
        "per rank with both")
    for phase in ("prefill", "decode"):
        p = res[phase]
        comm = max(p["tp2"]["comm_s_per_step_by_rank"])
        log(f"{phase}: TP=1 {p['tp1']['tok_per_s']:.1f} tok/s, TP=2 {p['tp2']['tok_per_s']:.1f} tok/s -> "
            f"{p['speedup_tp2']:.2f}x (floor {fr[phase + '_speedup_tp2']:.2f}x); TP=2 communication "
            f"{comm * 1e3:.2f} ms per step ({100 * max(p['tp2']['comm_fraction_by_rank']):.1f} % of the time)")
    for name, g in res["goals"].items():
        log(f"goal {name} >= {g['target']}: {g['measured']:.2f} ({'met' if g['met'] else 'missed'})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--quick", action="store_true", help="a tiny model, two rounds (a smoke test)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up (default 5; quick 2)")
    p.add_argument("--no-pin", action="store_true", help="do not pin each rank to its own CPU")
    p.add_argument("--max-load", type=float, default=1.0, help="the 1-minute load average to wait for (default 1.0)")
    p.add_argument("--wait-s", type=float, default=0.0,
                   help="wait up to this many seconds for the load to drop below --max-load (default 0: no wait)")
    p.add_argument("--write-checkpoint", metavar="DIR", default=None,
                   help="only write the random checkpoint (0.8B width; tiny with --quick) to DIR")
    p.add_argument("--check-logits", metavar="DIR", default=None,
                   help="under torchrun --nproc-per-node 2: compare the TP=2 logits with one device's on DIR")
    p.add_argument("--device", default="cpu", help="--check-logits: cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--generate-json", nargs=2, metavar=("TP2_JSON", "ONE_JSON"), default=None,
                   help="--check-logits: also compare the new_ids of these two qwen35 generate --json outputs")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if not math.isfinite(args.wait_s) or args.wait_s < 0:
        p.error(f"--wait-s must be a finite number >= 0, got {args.wait_s}")
    if args.write_checkpoint is not None:
        from qwen35.bench import bench_config, write_random_checkpoint

        print(write_random_checkpoint(args.write_checkpoint, quick_config() if args.quick else bench_config()))
        return 0
    if args.check_logits is not None:
        if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) != TP:
            p.error(f"--check-logits runs {TP} ranks: launch with torchrun --nproc-per-node {TP}")
        rec = check_logits(args.check_logits, args.device, args.generate_json)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps({k: v for k, v in rec.items() if k != "generate"}, default=float))
            if args.out:
                write_json(rec, args.out)
        return 0 if rec["ok"] else 1
    res = run(quick=args.quick, rounds=args.rounds, pin=not args.no_pin, max_load=args.max_load, wait_s=args.wait_s)
    report(res)
    out = write_json(res, args.out or DEFAULT_OUT)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
