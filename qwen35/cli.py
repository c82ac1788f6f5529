"""The `qwen35` command.  Subcommands live in `qwen35/commands/<name>.py`; each module exposes

    NAME = "memory"                  # the subcommand
    HELP = "one line for --help"
    def add_arguments(parser): ...   # argparse arguments
    def run(args) -> int: ...        # exit status

and is discovered here, so adding a command touches no shared file.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands

ORDER = ["generate", "info", "memory", "compare", "diverge", "bench", "plot"]


def _discover():
    mods = []
    for info in pkgutil.iter_modules(commands.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    mods.sort(key=lambda m: (ORDER.index(m.NAME) if m.NAME in ORDER else len(ORDER), m.NAME))
    return mods


def build_parser():
    parser = argparse.ArgumentParser(
        prog="qwen35",
        description="Qwen3.5 hybrid attention: a NumPy oracle (reference) and a PyTorch + Triton engine (optimized). "
                    "Every command works with no arguments on the bundled demo model or a preset.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _discover():
        p = sub.add_parser(mod.NAME, help=getattr(mod, "HELP", ""), description=getattr(mod, "HELP", ""))
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `qwen35 info | head`
        return 0
    except (ValueError, FileNotFoundError, KeyError, IndexError, RuntimeError) as e:
        print(f"qwen35 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
