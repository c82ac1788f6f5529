"""`qwen35 generate`: generate text from a checkpoint directory (default: the bundled demo) and report tokens/s."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ._common import checkpoint_dir

NAME = "generate"
HELP = ("generate text from a Qwen3.5 checkpoint directory (default: the bundled demo model) on the NumPy "
        "reference (or the optimized engine) and print the text and tokens/s")

DEFAULT_PROMPT = "Hello, Qwen3.5!"


def add_arguments(parser):
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a Hugging Face Qwen3.5 checkpoint directory (config.json + safetensors; its "
                             "tokenizer.json is used when present). Default: the bundled demo")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help=f"prompt text (default {DEFAULT_PROMPT!r})")
    g.add_argument("--prompt-ids", default=None, metavar="IDS",
                   help="prompt as comma-separated token ids (for checkpoints without a tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="reference compute dtype (default float32; float64 is the oracle's precision)")
    parser.add_argument("--engine", choices=["reference", "optimized"], default="reference",
                        help="reference = NumPy oracle (default); optimized = PyTorch + Triton")
    parser.add_argument("--device", default="cpu", help="device for --engine optimized (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _load_model(args, path: Path):
    if args.engine == "optimized":
        from optimized.model import Qwen35Model as OptimizedModel

        return OptimizedModel.from_pretrained(path, device=args.device, max_batch_size=1)
    from reference.model import Qwen35Model

    return Qwen35Model.from_pretrained(path, max_batch_size=1, dtype=np.dtype(args.dtype))


def run(args) -> int:
    from qwen35.generation import generate_tokens
    from qwen35.tokenizer import ByteTokenizer, load_tokenizer
    from reference.config import Qwen35Config

    path = checkpoint_dir(args)
    config = Qwen35Config.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    else:
        if isinstance(tokenizer, ByteTokenizer) and config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{path} has no tokenizer.json and its vocabulary ({config.vocab_size}) is too small "
                             "for the byte tokenizer; pass --prompt-ids")
        prompt_ids = tokenizer.encode(DEFAULT_PROMPT if args.prompt is None else args.prompt)
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    stop = set(tokenizer.eos_token_ids)
    eos = config.eos_token_id
    if eos is not None:
        stop |= set(eos) if isinstance(eos, tuple) else {eos}

    model = _load_model(args, path)
    result = generate_tokens(model, prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_token_ids=stop)
    can_decode = not (isinstance(tokenizer, ByteTokenizer) and config.vocab_size < tokenizer.vocab_size)
    text = tokenizer.decode(result.new_ids) if can_decode else None
    label = "bundled demo" if args.model is None else str(path)
    summary = {
        "model": label, "engine": args.engine, "dtype": args.dtype if args.engine == "reference" else "float32",
        "prompt_ids": prompt_ids, "new_ids": result.new_ids, "text": text,
        "prompt_tokens": len(prompt_ids), "new_tokens": len(result.new_ids), "stopped_by": result.stopped_by,
        "prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
        "prefill_tokens_per_s": result.prefill_tokens_per_s, "decode_tokens_per_s": result.decode_tokens_per_s,
        "tokens_per_s": result.tokens_per_s,
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return 0
    print(f"model: {label} ({config.model_type}, {config.num_hidden_layers} layers, {args.engine} engine, "
          f"{summary['dtype']})")
    if args.model is None:
        print("note: the demo model has random weights: its text is noise; it runs the whole pipeline")
    prompt_text = tokenizer.decode(prompt_ids) if can_decode else str(prompt_ids)
    print(f"prompt ({len(prompt_ids)} tokens): {prompt_text!r}")
    print(f"generated ({len(result.new_ids)} tokens, stopped by {result.stopped_by}): "
          f"{text!r}" if text is not None else f"generated ids: {result.new_ids}")
    print(f"prefill: {len(prompt_ids)} tokens in {result.prefill_seconds * 1e3:.1f} ms "
          f"({result.prefill_tokens_per_s:,.1f} tokens/s)")
    print(f"decode:  {max(len(result.new_ids) - 1, 0)} steps in {result.decode_seconds * 1e3:.1f} ms "
          f"({result.decode_tokens_per_s:,.1f} tokens/s)")
    print(f"total:   {result.tokens_per_s:,.1f} tokens/s")
    return 0
