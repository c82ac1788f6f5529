"""`qwen35 train`: train a small Qwen3.5 from scratch on CPU (qwen35.training; docs/training.md)."""
from __future__ import annotations

from pathlib import Path

from ._validate import (
    UsageError,
    nonnegative_float,
    nonnegative_int,
    output_path,
    positive_float,
    positive_int,
    unit_interval,
)

NAME = "train"
HELP = ("train a small Qwen3.5 from scratch on CPU (default: the Python documentation topics, byte-level tokens) "
        "with AdamW, warm-up + cosine schedule, held-out evaluation and resumable Hugging Face checkpoints")

DEFAULT_OUT = "checkpoints/train"
DEFAULT_BPE_VOCAB = 1024

# flag -> (TrainSettings field, type, help); their defaults are TrainSettings' (shown in --help)
_SETTINGS_FLAGS = {
    "--steps": ("steps", positive_int, "optimizer updates"),
    "--seq-len": ("seq_len", positive_int, "tokens per training window (and per evaluation window)"),
    "--batch-size": ("batch_size", positive_int, "windows per update"),
    "--lr": ("lr", positive_float, "peak learning rate (after the warm-up)"),
    "--min-lr-ratio": ("min_lr_ratio", unit_interval, "the cosine's floor as a fraction of --lr, in [0, 1]"),
    "--warmup": ("warmup", nonnegative_int, "linear warm-up updates"),
    "--weight-decay": ("weight_decay", nonnegative_float, "AdamW weight decay of the matrices (not of norms, "
                                                          "biases, A_log, dt_bias)"),
    "--grad-clip": ("grad_clip", nonnegative_float, "clip gradients to this global L2 norm; 0 = no clipping"),
    "--eval-bytes": ("eval_bytes", nonnegative_int, "held-out bytes each evaluation scores; 0 = the whole split"),
    "--seed": ("seed", nonnegative_int, "seed of the initial weights and of the batches"),
}
# model-shape flag -> (ModelShape field, type, help); defaults come from --shape
_SHAPE_FLAGS = {
    "--hidden-size": ("hidden_size", positive_int, "model width"),
    "--layers": ("layers", positive_int, "decoder layers (every 4th is full attention: L L L F)"),
    "--heads": ("heads", positive_int, "full-attention query heads"),
    "--kv-heads": ("kv_heads", positive_int, "full-attention key/value heads (divides --heads)"),
    "--head-dim": ("head_dim", positive_int, "full-attention head size"),
    "--linear-key-heads": ("linear_key_heads", positive_int, "Gated DeltaNet key heads"),
    "--linear-value-heads": ("linear_value_heads", positive_int, "Gated DeltaNet value heads (a multiple of "
                                                                 "--linear-key-heads)"),
    "--linear-head-dim": ("linear_head_dim", positive_int, "Gated DeltaNet key and value head size"),
    "--intermediate-size": ("intermediate_size", positive_int, "SwiGLU width (dense models)"),
    "--experts": ("experts", positive_int, "experts per MoE block (with --moe)"),
    "--experts-per-token": ("experts_per_token", positive_int, "experts each token is routed to (with --moe)"),
    "--moe-intermediate-size": ("moe_intermediate_size", positive_int, "width of each expert (with --moe)"),
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_arguments(parser):
    from qwen35.training import SHAPES, TrainSettings

    s = TrainSettings()
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="a UTF-8 text file or a folder of them (default: the Python documentation topics of "
                             "pydoc_data, ~465 KB); every 10th document is held out (docs/training.md)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"checkpoint directory, written at every save (default {DEFAULT_OUT}; with --resume: "
                             "the resumed directory)")
    parser.add_argument("--log", default=None, metavar="FILE",
                        help="also write the training log JSON here (default results/train_log.json, where qwen35 "
                             "plot draws it; the checkpoint always holds train_log.json)")
    parser.add_argument("--no-log", action="store_true", help="write the log into the checkpoint only")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue the run saved in DIR (its settings, weights, optimizer and RNG state) bit for "
                             "bit; settings given again must match")
    parser.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                        help="stop (and save) after update N of the schedule, to be continued with --resume")
    for flag, (field, kind, text) in _SETTINGS_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=f"{text} (default {getattr(s, field)})")
    parser.add_argument("--eval-every", type=positive_int, default=None,
                        help=f"held-out evaluation every N updates, and at the end (default {s.eval_every})")
    parser.add_argument("--save-every", type=positive_int, default=None,
                        help=f"checkpoint every N updates, and at the end (default {s.save_every})")
    parser.add_argument("--tokenizer", choices=["byte", "bpe"], default=None,
                        help="byte: UTF-8 bytes + 4 special tokens, vocabulary 260, what the bundled demo reads "
                             "(default); bpe: a byte-level BPE trained on the training split (needs tokenizers)")
    parser.add_argument("--vocab-size", type=positive_int, default=None,
                        help=f"the BPE's vocabulary, >= 260 (with --tokenizer bpe; default {DEFAULT_BPE_VOCAB})")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice); a run is bit-for-bit reproducible at a "
                             "fixed thread count")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="a named model shape: " + "; ".join(
                            f"{n} (hidden {sh.hidden_size}, {sh.layers} layers)" for n, sh in SHAPES.items())
                             + " (default small); the flags below override its fields")
    for flag, (_field, kind, text) in _SHAPE_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--moe", action="store_true", default=None,
                        help="sparse MoE blocks instead of the dense SwiGLU (with a shared expert)")
    parser.add_argument("--tie-embeddings", action="store_true", default=None,
                        help="tie lm_head to the token embeddings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _settings(args):
    """TrainSettings from the flags (defaults for the ones not given), checked."""
    from qwen35.training import TrainSettings

    if args.vocab_size is not None and args.tokenizer != "bpe":
        raise UsageError("--vocab-size: only a BPE has a vocabulary to choose; add --tokenizer bpe")
    kw = {field: getattr(args, _dest(flag)) for flag, (field, _, _) in _SETTINGS_FLAGS.items()}
    kw = {k: v for k, v in kw.items() if v is not None}
    for name in ("eval_every", "save_every"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.tokenizer == "bpe":
        kw.update(tokenizer="bpe", vocab_size=args.vocab_size or DEFAULT_BPE_VOCAB)
        if kw["vocab_size"] < 260:
            raise UsageError(f"--vocab-size {kw['vocab_size']}: a byte-level BPE needs at least 260 (256 bytes and "
                             "4 special tokens)")
    if args.data is not None:
        kw["data"] = str(Path(args.data).resolve())
    if kw.get("seq_len") == 1:
        raise UsageError("--seq-len 1: a window must hold at least 2 tokens (it scores the next ones)")
    return TrainSettings(**kw)


def _shape(args):
    """The ModelShape: --shape (default small) with the given shape flags over it, checked by building its config."""
    from qwen35.training import SHAPES
    from reference.errors import ConfigError

    base = SHAPES[args.shape or "small"]
    changes = {field: getattr(args, _dest(flag)) for flag, (field, _, _) in _SHAPE_FLAGS.items()}
    changes.update(moe=args.moe, tie_embeddings=args.tie_embeddings)
    shape = base.replace(**changes)
    vocab = (args.vocab_size or DEFAULT_BPE_VOCAB) if args.tokenizer == "bpe" else 260
    try:
        shape.config(vocab, 0)
    except ConfigError as e:
        raise UsageError(f"the model shape ({shape.hidden_size} hidden, {shape.layers} layers, heads {shape.heads}/"
                         f"{shape.kv_heads}, head dim {shape.head_dim}, linear heads {shape.linear_key_heads}/"
                         f"{shape.linear_value_heads}) is not a valid Qwen3.5 config: {e}") from None
    return shape


def _check_resume(args, saved: dict) -> None:
    """With --resume, every run-defining flag given again must equal the saved value (a resumed run keeps its
    numbers); --shape is refused (the shape is in the checkpoint)."""
    if args.shape is not None:
        raise UsageError("--shape: a resumed run keeps its model shape (it is in the checkpoint)")
    given = [(flag, "settings", field, getattr(args, _dest(flag))) for flag, (field, _, _) in _SETTINGS_FLAGS.items()]
    given += [(flag, "shape", field, getattr(args, _dest(flag))) for flag, (field, _, _) in _SHAPE_FLAGS.items()]
    given += [("--tokenizer", "settings", "tokenizer", args.tokenizer),
              ("--vocab-size", "settings", "vocab_size", args.vocab_size),
              ("--data", "settings", "data", None if args.data is None else str(Path(args.data).resolve())),
              ("--moe", "shape", "moe", args.moe), ("--tie-embeddings", "shape", "tie_embeddings", args.tie_embeddings)]
    for flag, where, field, value in given:
        have = saved[where].get(field)
        if value is not None and value != have:
            raise UsageError(f"{flag} {value}: the run in --resume {args.resume} has {field} = {have}; a resumed run "
                             "keeps its settings (--eval-every, --save-every, --threads and --stop-after may change)")


def run(args) -> int:
    from qwen35.extras import require
    from qwen35.measure import RESULTS_DIR

    require("torch", "qwen35 train")
    from qwen35.training import STATE_FILE, load_training_state, train

    log_path = None if args.no_log else output_path(args.log or RESULTS_DIR / "train_log.json", "--log")
    if args.resume is not None:
        resume = Path(args.resume)
        if not resume.is_dir():
            raise UsageError(f"--resume {resume}: not a directory (expected a checkpoint written by qwen35 train)")
        saved = load_training_state(resume)
        _check_resume(args, saved)
        out = output_path(args.out or resume, "--out", directory=True)
        settings = shape = None
        if args.stop_after is not None and args.stop_after <= saved["step"]:
            raise UsageError(f"--stop-after {args.stop_after}: the run in {resume} is already at step "
                             f"{saved['step']}")
    else:
        resume = None
        settings, shape = _settings(args), _shape(args)
        out = output_path(args.out or DEFAULT_OUT, "--out", directory=True)
        if (out / STATE_FILE).exists():
            raise UsageError(f"--out {out}: already holds a training run ({STATE_FILE}); continue it with --resume "
                             f"{out}, or choose another --out")
        if args.stop_after is not None and args.stop_after > settings.steps:
            raise UsageError(f"--stop-after {args.stop_after}: the run has only --steps {settings.steps}")
    if not args.no_progress:
        require("tqdm", "the progress bar of qwen35 train (or pass --no-progress)")
    result = train(settings, shape, out, resume=resume, threads=args.threads, stop_after=args.stop_after,
                   eval_every=args.eval_every if resume else None, save_every=args.save_every if resume else None,
                   progress=not args.no_progress, log_path=log_path)
    log = result.log
    last = log["eval"][-1] if log["eval"] else None
    print(f"{'finished' if result.finished else 'stopped at'} step {result.step} of {log['settings']['steps']}: "
          f"{log['parameters']:,} parameters, {log['seconds']:.0f} s of training"
          + (f"; held-out {last['loss']:.4f} nats/token, {last['bits_per_byte']:.4f} bits/byte (byte unigram "
             f"{log['data']['unigram_bits_per_byte']:.4f})" if last else ""))
    print(f"checkpoint: {out}" + (f"; log: {log_path}" if log_path else "") + f"; evaluate it with: qwen35 eval "
          f"--model {out}")
    return 0
