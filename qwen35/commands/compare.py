"""`qwen35 compare`: reference vs optimized (and vs transformers) on a checkpoint: error table per layer + logits."""
from __future__ import annotations

import json

from ._common import add_checkpoint_prompt_arguments, checkpoint_dir, prompt_tokens, read_config
from ._validate import UsageError, check_backend, device, output_path, positive_float, write_text

NAME = "compare"
HELP = ("compare the float64 reference with the optimized model (float32 and/or bfloat16) and with transformers "
        "when installed, on a checkpoint (default: the bundled demo): error per layer and for the logits, first "
        "diverging layer highlighted")

def add_arguments(parser):
    add_checkpoint_prompt_arguments(parser)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="optimized model dtype(s) (default: both)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--tolerance", type=positive_float, default=None,
                        help="relative RMS tolerance per point (default 1e-4 for float32, 5e-2 for bfloat16)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="also write the JSON to FILE (e.g. results/compare_demo.json; `qwen35 plot` draws it)")


def _load_kwargs(args, loader) -> dict:
    """allow_nonfinite=--allow-nonfinite for a `loader` that takes the keyword; one that does not gets nothing, and
    then --allow-nonfinite is a UsageError rather than silently ignored."""
    import inspect

    if "allow_nonfinite" in inspect.signature(loader).parameters:
        return {"allow_nonfinite": args.allow_nonfinite}
    if args.allow_nonfinite:
        raise UsageError(f"--allow-nonfinite: {loader.__module__}.{loader.__qualname__} has no allow_nonfinite "
                         "keyword in this version")
    return {}


def run(args) -> int:
    from qwen35.compare import compare_checkpoint

    check_backend(args.backend, args.device)
    path = checkpoint_dir(args)
    config = read_config(path)
    tokens = prompt_tokens(args, path, config)
    if args.out:
        output_path(args.out, "--out")
    result = compare_checkpoint(path, tokens, dtypes=tuple(args.dtype), backend=args.backend, device=args.device,
                                with_hf=not args.no_hf, tolerance=args.tolerance,
                                **_load_kwargs(args, compare_checkpoint))
    d = result.as_dict()
    print(json.dumps(d, indent=2) if args.json else result.format())
    if args.out:
        out = write_text(args.out, json.dumps(d, indent=1) + "\n", "--out")
        print(f"wrote {out}")
    return 0 if result.ok else 1
