"""Helpers shared by the subcommands: choosing a config from --preset / --model / the bundled demo, the checkpoint
directory, the prompt and the checkpoint loading of the commands that run a model.  Every user error here is a
`Qwen35Error` (UsageError, ConfigError, CheckpointError) whose message names the flag or the file."""
from __future__ import annotations

from pathlib import Path

from reference.config import Qwen35Config, preset_names

from ._validate import UsageError, nonnegative_int, positive_int, token_ids

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"


def add_config_arguments(parser, default_preset: str | None = None) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None,
                   help=f"a published size ({', '.join(preset_names())})"
                        + (f"; default {default_preset}" if default_preset else ""))
    g.add_argument("--model", default=None, metavar="DIR",
                   help="a Hugging Face Qwen3.5 checkpoint directory (its config.json), or a config.json file")
    parser.set_defaults(_default_preset=default_preset)


def read_config(path, flag: str = "--model") -> Qwen35Config:
    """The Qwen35Config of a checkpoint directory (its config.json) or of a config.json file; a missing path, a
    config.json that is not a file or cannot be read is a UsageError naming `flag` (bad JSON or fields: ConfigError).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {p}: no such file or directory (expected a Hugging Face Qwen3.5 checkpoint "
                         "directory with a config.json)")
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise UsageError(f"{flag} {p}: {f} {'is not a file' if f.exists() else 'does not exist'} (expected a Hugging "
                         "Face Qwen3.5 checkpoint directory with a config.json)")
    try:
        return Qwen35Config.from_json_file(f)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {p}: cannot read {f} ({getattr(e, 'strerror', None) or e})") from None


def load_config(args) -> tuple[Qwen35Config, str]:
    """(config, label) from --model, --preset, the subcommand's default preset, or the bundled demo."""
    if getattr(args, "model", None):
        return read_config(args.model), str(args.model)
    name = getattr(args, "preset", None) or getattr(args, "_default_preset", None)
    if name:
        return Qwen35Config.preset(name), f"preset {name}"
    if (DEMO_DIR / "config.json").exists():
        return Qwen35Config.from_pretrained(DEMO_DIR), "bundled demo"
    return Qwen35Config.tiny(), "tiny built-in config"


DEFAULT_PROMPT = "Hello, Qwen3.5! The quick brown fox jumps over the lazy dog."


def add_model_argument(parser, help_text: str) -> None:
    parser.add_argument("--model", default=None, metavar="DIR", help=help_text)


def add_prompt_ids_argument(group, help_text: str = "comma-separated token ids") -> None:
    group.add_argument("--prompt-ids", default=None, metavar="IDS", type=token_ids, help=help_text)


def add_allow_nonfinite_argument(parser) -> None:
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="load a checkpoint even if a tensor holds NaN or inf (default: refuse it, naming the "
                             "tensor)")


def add_checkpoint_prompt_arguments(parser):
    """--model DIR, --allow-nonfinite, --seed and the mutually exclusive --prompt / --prompt-ids / --length;
    returns that group."""
    add_model_argument(parser, "a Hugging Face Qwen3.5 checkpoint directory (default: the bundled demo)")
    add_allow_nonfinite_argument(parser)
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="prompt text (tokenized with the checkpoint's tokenizer)")
    add_prompt_ids_argument(g)
    g.add_argument("--length", type=positive_int, default=None,
                   help="N random token ids (seeded by --seed) instead of a prompt")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of --length's ids (default 0)")
    return g


def checkpoint_dir(args) -> Path:
    """--model DIR or the bundled demo: an existing directory holding a config.json file (UsageError if not)."""
    if not args.model:
        return DEMO_DIR
    path = Path(args.model)
    if not path.exists():
        raise UsageError(f"--model {path}: no such directory (expected a Hugging Face Qwen3.5 checkpoint directory "
                         "with config.json and safetensors)")
    if not path.is_dir():
        raise UsageError(f"--model {path}: is a file, not a directory (expected a Hugging Face Qwen3.5 checkpoint "
                         "directory with config.json and safetensors)")
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"--model {path}: {config} {'is not a file' if config.exists() else 'does not exist'} "
                         "(expected a Hugging Face Qwen3.5 checkpoint directory)")
    return path


def check_token_ids(ids, config: Qwen35Config, source: str) -> list[int]:
    """The prompt `ids` as ints, after checking that there is at least one, that each is in the vocabulary
    0..vocab_size-1, that the prompt fits the model's maximum length, and (multimodal models) that it holds no
    image / video placeholder id, which would need pixels; `source` names where they came from (a flag or the
    tokenizer) in the UsageError."""
    ids = [int(t) for t in ids]
    if not ids:
        raise UsageError(f"{source}: the prompt is empty (it has no tokens)")
    bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < config.vocab_size]
    if bad:
        i, t = bad[0]
        raise UsageError(f"{source}: token id {t} (position {i}{f', and {len(bad) - 1} more' if len(bad) > 1 else ''})"
                         f" is outside the model's vocabulary 0..{config.vocab_size - 1}")
    limit = config.resolve_max_seq_len()
    if len(ids) > limit:
        raise UsageError(f"{source}: the prompt has {len(ids)} tokens, more than the model's maximum sequence "
                         f"length {limit}")
    for name in _placeholder_names(config):
        tid = getattr(config, name)
        if tid in ids:
            raise UsageError(f"{source}: token id {tid} at position {ids.index(tid)} is the model's {name} (a "
                             "placeholder for pixels, which the command line does not take)")
    return ids


def _placeholder_names(config: Qwen35Config) -> list[str]:
    if not config.is_multimodal:
        return []
    return [n for n in ("image_token_id", "video_token_id") if getattr(config, n) is not None]


def random_prompt(config: Qwen35Config, n: int, seed) -> list[int]:
    """n random text token ids (the vocabulary without the image / video placeholders), seeded."""
    import numpy as np

    allowed = np.setdiff1d(np.arange(config.vocab_size), [getattr(config, k) for k in _placeholder_names(config)])
    return allowed[np.random.default_rng(seed).integers(0, allowed.size, n)].tolist()


def prompt_tokens(args, path, config) -> list[int]:
    """The prompt's token ids: --length N random ids (seeded by --seed), --prompt-ids, or --prompt (default
    DEFAULT_PROMPT) through the checkpoint's tokenizer; 32 random ids when only the byte tokenizer is there and the
    vocabulary is too small for it (an explicit --prompt is then an error).  Checked by `check_token_ids`."""
    from qwen35.tokenizer import ByteTokenizer, load_tokenizer

    if args.length is not None:
        if args.length > config.resolve_max_seq_len():
            raise UsageError(f"--length {args.length} is more than the model's maximum sequence length "
                             f"{config.resolve_max_seq_len()}")
        return check_token_ids(random_prompt(config, args.length, args.seed), config, "--length")
    if args.prompt_ids is not None:
        return check_token_ids(args.prompt_ids, config, "--prompt-ids")
    tok = load_tokenizer(path)
    if isinstance(tok, ByteTokenizer) and config.vocab_size < tok.vocab_size:
        if args.prompt is not None:
            raise UsageError(f"--prompt: {path} has no tokenizer.json and its vocabulary ({config.vocab_size}) is "
                             "too small for the byte tokenizer; pass --prompt-ids or --length")
        return random_prompt(config, 32, args.seed)
    return check_token_ids(tok.encode(DEFAULT_PROMPT if args.prompt is None else args.prompt), config,
                           "--prompt (tokenized)")
