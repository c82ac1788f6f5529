"""Helpers shared by the subcommands: choosing a config from --preset / --model / the bundled demo."""
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
