"""`qwen35 bench`: CPU speed runs of the optimized engine vs the NumPy reference and transformers -> table + JSON."""
from __future__ import annotations

from qwen35.measure import SINGLE_THREAD_ENV

from ._validate import UsageError, comma_list, output_path, read_json_file, writing

NAME = "bench"
HELP = ("benchmark the optimized PyTorch engine on one CPU thread (GDN prefill vs sgemm rate, decode step, whole "
        "model vs transformers; with --parts train the training step at 1 and 2 threads); prints a table and "
        "writes JSON")


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
