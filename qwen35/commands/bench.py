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


def run(args) -> int:
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
