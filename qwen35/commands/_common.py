"""Helpers shared by the subcommands: choosing a config from --preset / --model / the bundled demo, the checkpoint
directory and the prompt of the commands that run a model."""
from __future__ import annotations

from pathlib import Path

from reference.config import Qwen35Config, preset_names

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"


def add_config_arguments(parser, default_preset: str | None = None) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None,
                   help=f"a published size ({', '.join(preset_names())})"
                        + (f"; default {default_preset}" if default_preset else ""))
    g.add_argument("--model", default=None, metavar="DIR",
                   help="a Hugging Face Qwen3.5 checkpoint directory (its config.json)")
    parser.set_defaults(_default_preset=default_preset)


def load_config(args) -> tuple[Qwen35Config, str]:
    """(config, label) from --model, --preset, the subcommand's default preset, or the bundled demo."""
    if getattr(args, "model", None):
        return Qwen35Config.from_pretrained(args.model), str(args.model)
    name = getattr(args, "preset", None) or getattr(args, "_default_preset", None)
    if name:
        return Qwen35Config.preset(name), f"preset {name}"
    if (DEMO_DIR / "config.json").exists():
        return Qwen35Config.from_pretrained(DEMO_DIR), "bundled demo"
    return Qwen35Config.tiny(), "tiny built-in config"


DEFAULT_PROMPT = "Hello, Qwen3.5! The quick brown fox jumps over the lazy dog."


def add_checkpoint_prompt_arguments(parser):
    """--model DIR and the mutually exclusive --prompt / --prompt-ids; returns that group (a command may add
    --length to it)."""
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a Hugging Face Qwen3.5 checkpoint directory (default: the bundled demo)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="prompt text (tokenized with the checkpoint's tokenizer)")
    g.add_argument("--prompt-ids", default=None, metavar="IDS", help="comma-separated token ids")
    return g


def checkpoint_dir(args) -> Path:
    """--model DIR or the bundled demo; it must hold a config.json."""
    path = Path(args.model) if args.model else DEMO_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json (expected a Hugging Face Qwen3.5 checkpoint directory)")
    return path


def prompt_tokens(args, path, config) -> list[int]:
    """The prompt's token ids: --length N random ids (seeded by --seed), --prompt-ids, or --prompt (default
    DEFAULT_PROMPT) through the checkpoint's tokenizer; 32 random ids when only the byte tokenizer is there and the
    vocabulary is too small for it."""
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
