"""`qwen35 plot`: result JSON -> PNG/SVG plots (memory, accuracy, decode drift, speed, crossover, evaluation, training
curve)."""
from __future__ import annotations

from ._validate import output_path, read_json_file, writing

NAME = "plot"
HELP = ("render plots from result JSON: refreshes results/memory.json (analytic, from reference.memory), then turns "
        "every known JSON in results/ (memory, accuracy, bench, eval, train_log) into PNG/SVG under docs/plots/")


def add_arguments(parser):
    from qwen35.measure import PLOTS_DIR, RESULTS_DIR

    parser.add_argument("--results", default=str(RESULTS_DIR), metavar="DIR",
                        help=f"directory of result JSON (default {RESULTS_DIR})")
    parser.add_argument("--out", default=str(PLOTS_DIR), metavar="DIR", help=f"output directory (default {PLOTS_DIR})")
    parser.add_argument("--format", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"],
                        help="image formats (default png svg)")
    parser.add_argument("--measure-crossover", action="store_true",
                        help="first time the chunked vs per-token gated delta rule for T = 1..2048 (about a minute, "
                             "one thread) and write results/crossover.json")
    parser.add_argument("--no-memory-refresh", action="store_true",
                        help="use the existing memory.json instead of recomputing it")


def run(args) -> int:
    from qwen35.plot import render_all

    results = output_path(args.results, "--results", directory=True)
    out = output_path(args.out, "--out", directory=True)
    with writing(results, "--results"):
        results.mkdir(parents=True, exist_ok=True)
    if args.measure_crossover:  # the measurement is qwen35.bench's; the plot step only draws its JSON
        from qwen35.bench import crossover_sweep
        from qwen35.measure import write_json

        data = crossover_sweep()
        with writing(results, "--results"):
            print(f"wrote {write_json(data, results / 'crossover.json')}")
    for path in sorted(results.glob("*.json")):  # render_all reads each; a malformed one is named here
        read_json_file(path, "--results")
    with writing(out, "--out"):
        written = render_all(results, out, tuple(args.format), refresh_memory=not args.no_memory_refresh)
    print(f"{len(written)} files written to {args.out}")
    return 0 if written else 1
