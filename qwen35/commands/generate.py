"""`qwen35 generate`: generate text from a checkpoint directory (default: the bundled demo) and report tokens/s."""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np

from qwen35.extras import require
from reference.errors import Qwen35Error

from ._common import (
    add_allow_nonfinite_argument,
    add_model_argument,
    add_prompt_ids_argument,
    check_token_ids,
    checkpoint_dir,
    read_config,
)
from ._validate import UsageError, check_backend, device, nonnegative_int, positive_int, probability, temperature

NAME = "generate"
HELP = ("generate text from a Qwen3.5 checkpoint directory (default: the bundled demo model) on the NumPy "
        "reference (or the optimized engine) and print the text and tokens/s")

DEFAULT_PROMPT = "The for statement"


def add_arguments(parser):
    add_model_argument(parser, "a Hugging Face Qwen3.5 checkpoint directory (config.json + safetensors; its "
                               "tokenizer.json is used when present). Default: the bundled demo")
    add_allow_nonfinite_argument(parser)
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help=f"prompt text (default {DEFAULT_PROMPT!r})")
    add_prompt_ids_argument(g, "prompt as comma-separated token ids (for checkpoints without a tokenizer)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate, >= 1 (default 32)")
    parser.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample from the k >= 1 most likely tokens")
    parser.add_argument("--top-p", type=probability, default=None, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed, >= 0 (default 0)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None,
                        help="reference compute dtype (default float32; float64 is the oracle's precision); the "
                             "optimized engine runs float32")
    parser.add_argument("--engine", choices=["reference", "optimized"], default=None,
                        help="reference = NumPy oracle (default); optimized = PyTorch + Triton (the default with "
                             "--tensor-parallel / --data-parallel)")
    parser.add_argument("--tensor-parallel", type=positive_int, default=1,
                        help="split the model over N processes (the optimized engine on torch.distributed; launch "
                             "with torchrun --nproc-per-node N×M; docs/parallel.md). Default 1")
    parser.add_argument("--data-parallel", type=positive_int, default=1,
                        help="M model replicas, each of --tensor-parallel processes (default 1)")
    parser.add_argument("--device", type=device, default=None,
                        help="cpu, cuda or cuda:N, for --engine optimized (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _check_engine_arguments(args) -> None:
    """--device belongs to the optimized engine, --dtype float64 to the reference: refuse a mix that would be
    silently ignored."""
    parallel = args.tensor_parallel > 1 or args.data_parallel > 1
    if parallel and args.engine == "reference":
        raise UsageError(f"--tensor-parallel {args.tensor_parallel} --data-parallel {args.data_parallel}: the "
                         "parallel path is the optimized engine's; drop --engine reference")
    args.engine = args.engine or ("optimized" if parallel else "reference")
    if args.engine == "reference" and args.device not in (None, "cpu"):
        raise UsageError(f"--device {args.device}: the reference engine runs NumPy on the CPU; add --engine optimized")
    if args.engine == "optimized" and args.dtype == "float64":
        raise UsageError("--dtype float64: the optimized engine runs float32; use --engine reference for float64")
    args.device = args.device or "cpu"
    args.dtype = args.dtype or "float32"
    if args.engine == "optimized":
        require("torch", "--engine optimized")
        check_backend("auto", args.device)


def _start_processes(args) -> int:
    """Join the torch.distributed world torchrun set up (gloo on CPU, NCCL on CUDA, one GPU per local rank);
    returns this process's rank (0 without --tensor-parallel / --data-parallel)."""
    world = args.tensor_parallel * args.data_parallel
    if world == 1:
        return 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
            raise UsageError(f"--tensor-parallel {args.tensor_parallel} --data-parallel {args.data_parallel} runs "
                             f"{world} processes: launch with torchrun --nproc-per-node {world} -m qwen35 generate "
                             "...")
        if int(os.environ["WORLD_SIZE"]) != world:
            raise UsageError(f"--tensor-parallel {args.tensor_parallel} × --data-parallel {args.data_parallel} = "
                             f"{world} processes, but torchrun started {os.environ['WORLD_SIZE']}; use "
                             f"--nproc-per-node {world}")
        cuda = str(args.device).startswith("cuda")
        if cuda:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
        # A bounded wait: a rank that dies inside a collective makes the others fail after this many seconds
        # instead of torch's default 30 minutes.
        timeout = datetime.timedelta(seconds=float(os.environ.get("QWEN35_DIST_TIMEOUT", "300")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return dist.get_rank()


def _load_model(args, path: Path):
    if args.engine == "optimized":
        from optimized.model import Qwen35Model as OptimizedModel

        return OptimizedModel.from_pretrained(path, device=args.device, max_batch_size=1,
                                              allow_nonfinite=args.allow_nonfinite,
                                              tensor_parallel=args.tensor_parallel, data_parallel=args.data_parallel)
    from reference.model import Qwen35Model

    return Qwen35Model.from_pretrained(path, max_batch_size=1, dtype=np.dtype(args.dtype),
                                       allow_nonfinite=args.allow_nonfinite)


def run(args) -> int:
    from qwen35.tokenizer import ByteTokenizer, load_tokenizer

    _check_engine_arguments(args)
    path = checkpoint_dir(args)
    config = read_config(path)
    tokenizer = load_tokenizer(path)
    if args.prompt_ids is not None:
        prompt_ids = check_token_ids(args.prompt_ids, config, "--prompt-ids")
    else:
        if isinstance(tokenizer, ByteTokenizer) and config.vocab_size < tokenizer.vocab_size:
            raise UsageError(f"--prompt: {path} has no tokenizer.json and its vocabulary ({config.vocab_size}) is "
                             "too small for the byte tokenizer; pass --prompt-ids")
        prompt_ids = check_token_ids(tokenizer.encode(DEFAULT_PROMPT if args.prompt is None else args.prompt),
                                     config, "--prompt (tokenized)")
    stop = set(tokenizer.eos_token_ids)
    eos = config.eos_token_id
    if eos is not None:
        stop |= set(eos) if isinstance(eos, tuple) else {eos}

    rank = _start_processes(args)
    try:
        return _generate(args, path, config, tokenizer, prompt_ids, stop, rank)
    except Qwen35Error:
        if rank != 0:
            return 2  # every rank raised the same error (optimized.parallel agrees on errors); rank 0 reports it
        raise
    finally:
        if args.tensor_parallel * args.data_parallel > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _generate(args, path, config, tokenizer, prompt_ids, stop, rank) -> int:
    from qwen35.generation import generate_tokens
    from qwen35.tokenizer import ByteTokenizer

    model = _load_model(args, path)
    result = generate_tokens(model, prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_token_ids=stop)
    can_decode = not (isinstance(tokenizer, ByteTokenizer) and config.vocab_size < tokenizer.vocab_size)
    text = tokenizer.decode(result.new_ids) if can_decode else None
    label = "bundled demo" if args.model is None else str(path)
    if rank != 0:
        return 0  # every rank generated the same tokens; rank 0 prints them
    summary = {
        "model": label, "engine": args.engine, "tensor_parallel": args.tensor_parallel,
        "data_parallel": args.data_parallel, "dtype": args.dtype if args.engine == "reference" else "float32",
        "prompt_ids": prompt_ids, "new_ids": result.new_ids, "text": text,
        "prompt_tokens": len(prompt_ids), "new_tokens": len(result.new_ids), "stopped_by": result.stopped_by,
        "prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
        "prefill_tokens_per_s": result.prefill_tokens_per_s, "decode_tokens_per_s": result.decode_tokens_per_s,
        "tokens_per_s": result.tokens_per_s,
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return 0
    world = args.tensor_parallel * args.data_parallel
    layout = (f", {world} processes: tensor parallel {args.tensor_parallel} × data parallel {args.data_parallel}"
              if world > 1 else "")
    print(f"model: {label} ({config.model_type}, {config.num_hidden_layers} layers, {args.engine} engine, "
          f"{summary['dtype']}{layout})")
    if args.model is None:
        print("note: the demo is a 0.9 M-parameter Qwen3.5 trained on CPython's documentation topics "
              "(docs/training.md): expect prose of that kind, not facts")
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
