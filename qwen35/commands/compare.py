"""`qwen35 compare`: reference vs optimized (and vs transformers) on a checkpoint: error table per layer + logits."""
from __future__ import annotations

import json
from pathlib import Path

from ._common import DEMO_DIR

NAME = "compare"
HELP = ("compare the float64 reference with the optimized model (float32 and/or bfloat16) and with transformers "
        "when installed, on a checkpoint (default: the bundled demo): error per layer and for the logits, first "
        "diverging layer highlighted")

DEFAULT_PROMPT = "Hello, Qwen3.5! The quick brown fox jumps over the lazy dog."


def add_arguments(parser):
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a Hugging Face Qwen3.5 checkpoint directory (default: the bundled demo)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="prompt text (tokenized with the checkpoint's tokenizer)")
    g.add_argument("--prompt-ids", default=None, metavar="IDS", help="comma-separated token ids")
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


def prompt_tokens(args, path, config) -> list[int]:
    import numpy as np

    from qwen35.tokenizer import ByteTokenizer, load_tokenizer

    if args.length is not None:
        return np.random.default_rng(args.seed).integers(0, config.vocab_size, args.length).tolist()
    if args.prompt_ids is not None:
        return [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
    tok = load_tokenizer(path)
    if isinstance(tok, ByteTokenizer) and config.vocab_size < tok.vocab_size:
        return np.random.default_rng(args.seed).integers(0, config.vocab_size, 32).tolist()
    return tok.encode(args.prompt or DEFAULT_PROMPT)


def run(args) -> int:
    from qwen35.compare import compare_checkpoint
    from reference.config import Qwen35Config

    path = Path(args.model) if args.model else DEMO_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json (expected a Hugging Face Qwen3.5 checkpoint directory)")
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
