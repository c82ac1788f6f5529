"""`qwen35 bench`: CPU speed runs of the optimized engine vs the NumPy reference and transformers -> table + JSON."""
from __future__ import annotations

from qwen35.measure import SINGLE_THREAD_ENV

from ._validate import UsageError, comma_list, output_path, read_json_file, writing

NAME = "bench"
HELP = ("benchmark the optimized PyTorch engine on one CPU thread (GDN prefill vs sgemm rate, decode step, whole "
        "model vs transformers; with --parts train the training step at 1 and 2 threads); prints a table and "
        "writes JSON")


SERVE_OUT = "docs/bench_serve_cpu.json"  # where --serve writes when --out keeps its default
BATCH_OUT = "docs/bench_batch_cpu.json"  # where --batch writes when --out keeps its default
DEFAULT_PARTS = ("gdn", "decode", "model")
PARTS = DEFAULT_PARTS + ("train",)  # train: forward + backward + AdamW, Qwen35ForCausalLM vs transformers


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="a fast run (smaller T, fewer repeats)")
    parser.add_argument("--out", default="docs/bench_cpu.json", help="JSON output file (default docs/bench_cpu.json)")
    parser.add_argument("--parts", type=comma_list(PARTS), default=DEFAULT_PARTS,
                        help="comma-separated subset of gdn,decode,model,train (default: gdn,decode,model; train "
                             "times a training step of Qwen35ForCausalLM vs transformers at 1 and 2 threads)")
    parser.add_argument("--tuned-allocator", action="store_true",
                        help="run with large-buffer reuse (glibc MALLOC_MMAP/TRIM_THRESHOLD_ = 4 GiB, torch "
                             "THP_MEM_ALLOC_ENABLE=1) for every contender; default: the allocators' defaults")
    parser.add_argument("--serve", action="store_true",
                        help="instead of the speed runs: continuous batching of a Poisson trace vs static batches "
                             "(qwen35.serving; throughput, TTFT / inter-token latency percentiles, pool occupancy) "
                             f"-> {SERVE_OUT} unless --out is given")
    parser.add_argument("--batch", action="store_true",
                        help="instead of the speed runs: batched decode / prefill at B = 1, 4, 16, 64 with mixed "
                             "prompt lengths, optimized vs reference vs transformers, bf16 weights and their accuracy "
                             f"cost (qwen35.bench_batch) -> {BATCH_OUT} unless --out is given")
    parser.add_argument("--gpu-json", default=None, metavar="FILE",
                        help="instead of running anything, print docs/benchmarks.md's GPU rows from the JSON of "
                             "scripts/gpu_bench.py")


# The process environment of a benchmark run: one thread for every BLAS (qwen35.measure.SINGLE_THREAD_ENV).  With
# --tuned-allocator also the settings that keep large CPU buffers from being page-faulted in afresh on every call:
# glibc returns freed blocks >= 32 MiB to the OS, so a 32 MiB output costs ~8,000 page faults per call (≈ 45 ms at
# T = 4096 on this KVM guest); raising the mmap/trim thresholds makes freed blocks reusable, and
# THP_MEM_ALLOC_ENABLE gives torch's large buffers huge pages.  They apply to every contender in the process alike
# (and help the transformers fallback more than us).
ALLOCATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(2 ** 32),
                 "MALLOC_TRIM_THRESHOLD_": str(2 ** 32)}


def _reexec(tuned_allocator: bool) -> None:
    """NumPy's OpenBLAS reads OPENBLAS_NUM_THREADS once, at import, and glibc reads MALLOC_* at process start; the
    CLI has already started and imported NumPy.  So when the variables are not as wanted, run the same command
    again in a fresh process with them (a multi-threaded reference would be unfair on a 1-thread benchmark)."""
    import os
    import sys

    if os.environ.get("QWEN35_BENCH_REEXEC") == "1":
        return
    want = dict(SINGLE_THREAD_ENV, **(ALLOCATOR_ENV if tuned_allocator else {}))
    drop = [] if tuned_allocator else [k for k in ALLOCATOR_ENV if k in os.environ]
    if all(os.environ.get(k) == v for k, v in want.items()) and not drop:
        return
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(want, QWEN35_BENCH_REEXEC="1")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "qwen35.cli"] + sys.argv[1:], env)


def run(args) -> int:
    if getattr(args, "gpu_json", None):
        from qwen35.report import gpu_markdown

        data = read_json_file(args.gpu_json, "--gpu-json")
        if data.get("kind") != "gpu_bench":
            raise UsageError(f"--gpu-json {args.gpu_json}: not a scripts/gpu_bench.py JSON (its kind is "
                             f"{data.get('kind')!r}, expected 'gpu_bench')")
        print(gpu_markdown(data))
        return 0
    if getattr(args, "serve", False):
        return _run_serve(args)
    if getattr(args, "batch", False):
        return _run_batch(args)
    output_path(args.out, "--out")  # before the (long) run, not after it
    _reexec(getattr(args, "tuned_allocator", False))
    from qwen35.bench import run_all
    from qwen35.measure import write_json
    from qwen35.report import format_table

    res = run_all(quick=args.quick, parts=tuple(args.parts))
    print()
    print(format_table(res))
    with writing(args.out, "--out"):
        path = write_json(res, args.out)
    print(f"\nwrote {path}")
    return 0


def _json_run(args, default_out: str, measure, table) -> int:
    """One measurement to one JSON: --out checked (`default_out` while --out keeps bench's own default), the
    single-thread re-exec, `measure()`, its `table(result)` printed, the JSON written."""
    out = default_out if args.out == "docs/bench_cpu.json" else args.out
    output_path(out, "--out")
    _reexec(getattr(args, "tuned_allocator", False))
    from qwen35.measure import write_json

    res = measure()
    print()
    print(table(res))
    with writing(out, "--out"):
        path = write_json(res, out)
    print(f"\nwrote {path}")
    return 0


def _run_serve(args) -> int:
    """`--serve`: qwen35.serving.bench_serve -> its table and JSON (default SERVE_OUT)."""
    from qwen35 import serving  # NumPy and the reference only; torch is imported by the run

    return _json_run(args, SERVE_OUT, lambda: serving.bench_serve(quick=args.quick), serving.format_serve)


def _run_batch(args) -> int:
    """`--batch`: qwen35.bench_batch.run_batch -> its tables and JSON (default BATCH_OUT)."""
    from qwen35.report import batch_table

    def measure():
        from qwen35.bench_batch import run_batch  # imports torch: after the single-thread re-exec

        return run_batch(quick=args.quick)

    return _json_run(args, BATCH_OUT, measure, batch_table)
