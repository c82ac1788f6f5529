"""`qwen35 accuracy`: the optimized gated delta rule vs the float64 oracle, by length and over a long decode -> JSON."""
from __future__ import annotations

from ._validate import check_backend, device, nonnegative_int, output_path, positive_int, writing

NAME = "accuracy"
HELP = ("measure relative RMS / max-abs / NMSE error of the optimized chunked and recurrent gated delta rule "
        "(float32, bfloat16) vs the float64 oracle, and the decode drift of an fp32 vs bf16 state -> JSON")


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds): lengths 16..160, 128 steps")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=None, metavar="T",
                        help="sequence lengths (default 64 256 1024 4096)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="decode steps of the drift curve (default 2048)")
    parser.add_argument("--device", type=device, default="cpu",
                        help="torch device for the optimized path: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--backend", default="torch", choices=["torch", "triton"],
                        help="optimized implementation: the torch ops (default) or the Triton kernels (a CUDA "
                             "device, or TRITON_INTERPRET=1 on CPU with small sizes)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="JSON file (default results/accuracy[_triton][_quick].json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from qwen35.accuracy import run_accuracy
    from qwen35.measure import RESULTS_DIR, write_json
    from qwen35.report import accuracy_table

    check_backend(args.backend, args.device, strict=True)
    default = "accuracy" + ("" if args.backend == "torch" else f"_{args.backend}") + ("_quick" if args.quick else "")
    out = output_path(args.out or RESULTS_DIR / f"{default}.json", "--out")  # before the run, not after it
    data = run_accuracy(quick=args.quick, lengths=args.lengths, steps=args.steps, device=args.device,
                        backend=args.backend, seed=args.seed, progress=not args.no_progress)
    with writing(out, "--out"):
        write_json(data, out)
    m = data["meta"]
    print(f"accuracy vs the float64 oracle on {m['device_name']} (torch {m['torch']}, numpy {m['numpy']}); "
          f"shape {m['shape']}")
    print(accuracy_table(data, "o"))
    for key in ("drift", "drift_slow_decay"):
        d = data.get(key)
        if not d:
            continue
        print(f"\ndecode drift over {d['steps']} steps (q/k/v rounded to {d['input_dtype']}, "
              f"g = logsigmoid(.)/{d['gate_normalizer']:g}), mean rel. RMS error of the output:")
        for state, s in d["summary"].items():
            print(f"  {state:>8} state: first 64 steps {s['first_64_mean']:.2e}, last 64 steps "
                  f"{s['last_64_mean']:.2e}, max {s['max']:.2e}")
    print(f"\nwrote {out}  ({m['seconds']} s); plot it with: qwen35 plot")
    return 0
