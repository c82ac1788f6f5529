"""`qwen35 eval`: held-out loss, perplexity and bits per byte of a checkpoint on every engine (qwen35.evaluation)."""
from __future__ import annotations

from ._common import add_model_argument, checkpoint_dir
from ._validate import comma_list, nonnegative_int, output_path, positive_int, writing

NAME = "eval"
HELP = ("score a checkpoint (default: the bundled demo) on the held-out split of the training corpus: loss "
        "(nats/token), perplexity and bits per byte on the reference (float64, float32), optimized (float32, "
        "bfloat16), the training model and transformers, next to a byte-unigram baseline -> table and JSON")

def add_arguments(parser):
    from qwen35.evaluation import DEFAULT_MAX_BYTES, DEFAULT_SEQ_LEN, ENGINES

    add_model_argument(parser, "a checkpoint directory (config.json, safetensors, tokenizer.json; default: the "
                               "bundled demo)")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="the corpus whose held-out split is scored: a UTF-8 text file or a folder (default: the "
                             "Python documentation topics, as qwen35 train)")
    parser.add_argument("--engines", type=comma_list(ENGINES), default=None, metavar="LIST",
                        help=f"comma-separated subset of {','.join(ENGINES)} (default: all; those whose package is "
                             "not installed are skipped, and named)")
    parser.add_argument("--seq-len", type=positive_int, default=None, metavar="L",
                        help=f"tokens per window (default: the checkpoint's training --seq-len from its "
                             f"train_log.json, else {DEFAULT_SEQ_LEN})")
    parser.add_argument("--max-bytes", type=nonnegative_int, default=DEFAULT_MAX_BYTES, metavar="N",
                        help=f"score whole windows until they cover N held-out bytes (default {DEFAULT_MAX_BYTES}: "
                             "the float64 reference is slow); 0 = the whole split")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="B",
                        help="windows per forward call (default 8)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, metavar="FILE", help="JSON file (default results/eval.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _seq_len(args, path) -> int:
    """--seq-len, else the checkpoint's training seq_len (train_log.json), else the default."""
    import json

    from qwen35.evaluation import DEFAULT_SEQ_LEN

    if args.seq_len is not None:
        return args.seq_len
    try:
        log = json.loads((path / "train_log.json").read_text(encoding="utf-8"))
        value = log["settings"]["seq_len"]
        if isinstance(value, int) and value >= 2:
            return value
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return DEFAULT_SEQ_LEN


def run(args) -> int:
    from qwen35.evaluation import ENGINES, evaluate_checkpoint
    from qwen35.extras import require
    from qwen35.measure import RESULTS_DIR, write_json
    from qwen35.report import eval_table

    path = checkpoint_dir(args)
    out = output_path(args.out or RESULTS_DIR / "eval.json", "--out")  # before the run, not after it
    if args.threads is not None:
        require("torch", "--threads").set_num_threads(args.threads)
    if not args.no_progress:
        try:
            require("tqdm", "the progress bars")
        except ImportError:
            args.no_progress = True
    seq_len = _seq_len(args, path)
    if seq_len < 2:
        from ._validate import UsageError

        raise UsageError("--seq-len 1: a window must hold at least 2 tokens (it scores the next ones)")
    data = evaluate_checkpoint(path, engines=args.engines or ENGINES, seq_len=seq_len,
                               max_bytes=args.max_bytes or None, data=args.data, batch_size=args.batch_size,
                               progress=not args.no_progress, skip_missing=args.engines is None)
    data["checkpoint"] = "bundled demo" if args.model is None else str(path)
    with writing(out, "--out"):
        write_json(data, out)
    print(eval_table(data))
    print(f"\nwrote {out}; plot it with: qwen35 plot")
    return 0
