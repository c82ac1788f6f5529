"""`qwen35 compare`: reference vs optimized (and vs transformers) on a checkpoint: error table per layer + logits."""
from __future__ import annotations

import json
from pathlib import Path

from ._common import add_checkpoint_prompt_arguments, checkpoint_dir, prompt_tokens

NAME = "compare"
HELP = ("compare the float64 reference with the optimized model (float32 and/or bfloat16) and with transformers "
        "when installed, on a checkpoint (default: the bundled demo): error per layer and for the logits, first "
        "diverging layer highlighted")

def add_arguments(parser):
    g = add_checkpoint_prompt_arguments(parser)
    g.add_argument("--length", type=int, default=None, help="N random token ids (seeded) instead of a prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="optimized model dtype(s) (default: both)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="relative RMS tolerance per point (default 1e-4 for float32, 5e-2 for bfloat16)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="also write the JSON to FILE (e.g. results/compare_demo.json; `qwen35 plot` draws it)")


def run(args) -> int:
    from qwen35.compare import compare_checkpoint
    from reference.config import Qwen35Config

    path = checkpoint_dir(args)
    config = Qwen35Config.from_pretrained(path)
    tokens = prompt_tokens(args, path, config)
    result = compare_checkpoint(path, tokens, dtypes=tuple(args.dtype), backend=args.backend, device=args.device,
                                with_hf=not args.no_hf, tolerance=args.tolerance)
    d = result.as_dict()
    print(json.dumps(d, indent=2) if args.json else result.format())
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(d, indent=1) + "\n")
        print(f"wrote {out}")
    return 0 if result.ok else 1
