"""`qwen35 bench`: CPU speed runs of the optimized engine vs the NumPy reference and transformers -> table + JSON."""
from __future__ import annotations

NAME = "bench"
HELP = ("benchmark the optimized PyTorch engine on one CPU thread (GDN prefill vs sgemm rate, decode step, whole "
        "model vs transformers); prints a table and writes JSON")


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="a fast run (smaller T, fewer repeats)")
    parser.add_argument("--out", default="docs/bench_cpu.json", help="JSON output file (default docs/bench_cpu.json)")
    parser.add_argument("--parts", default="gdn,decode,model",
                        help="comma-separated subset of gdn,decode,model (default: all)")
    parser.add_argument("--gpu-json", default=None, metavar="FILE",
                        help="instead of running anything, print docs/benchmarks.md's GPU rows from the JSON of "
                             "scripts/gpu_bench.py")


def _reexec_single_threaded() -> None:
    """NumPy's OpenBLAS reads OPENBLAS_NUM_THREADS once, at import; the CLI imported NumPy before this command ran.
    So when the variables are not already 1, run the same command again in a fresh process with them set (a
    multi-threaded reference would be an unfair comparison on this 1-thread benchmark)."""
    import os
    import sys

    want = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if all(os.environ.get(k) == v for k, v in want.items()) or os.environ.get("QWEN35_BENCH_REEXEC") == "1":
        return
    env = dict(os.environ, QWEN35_BENCH_REEXEC="1", **want)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "qwen35.cli"] + sys.argv[1:], env)


def run(args) -> int:
    if getattr(args, "gpu_json", None):
        import json
        from pathlib import Path

        from qwen35.bench import gpu_markdown

        print(gpu_markdown(json.loads(Path(args.gpu_json).read_text())))
        return 0
    _reexec_single_threaded()
    from qwen35.bench import format_table, run_all, write_json

    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    bad = [p for p in parts if p not in ("gdn", "decode", "model")]
    if bad:
        raise ValueError(f"unknown bench part(s) {bad}; choose from gdn, decode, model")
    res = run_all(quick=args.quick, parts=parts)
    print()
    print(format_table(res))
    path = write_json(res, args.out)
    print(f"\nwrote {path}")
    return 0
