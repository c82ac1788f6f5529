"""The `qwen35` command.  Subcommands live in `qwen35/commands/<name>.py`; each module exposes

    NAME = "memory"                  # the subcommand
    HELP = "one line for --help"
    def add_arguments(parser): ...   # argparse arguments
    def run(args) -> int: ...        # exit status

and is discovered here, so adding a command touches no shared file.

Exit status and errors:

    0    success (and --help)
    1    the command ran, and its check failed (compare / diverge above tolerance, plot wrote nothing)
    2    a user error: a bad argument value, or a file / directory / checkpoint / tokenizer that cannot be used
    130  interrupted (Ctrl-C)

A user error is ONE line on stderr, `qwen35 <command>: error: <message>`, naming the flag or the file and what is
accepted, and no traceback.  Bad values are refused by argparse (`qwen35/commands/_validate.py` holds the `type=`
functions); anything the library refuses arrives as a `reference.errors.Qwen35Error`, and so does every foreign
error that a user can cause (an unreadable path, a malformed JSON or tokenizer.json), converted where it arises.
Nothing else is caught: any other exception is a bug and shows its traceback.  `QWEN35_DEBUG=1` shows the
traceback of a user error too (the `Qwen35Error` is re-raised).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from reference.errors import Qwen35Error

from . import commands

ORDER = ["generate", "info", "memory", "compare", "diverge", "bench", "plot"]
DEBUG_ENV = "QWEN35_DEBUG"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (`<prog>: error: <message>`) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    parser = _Parser(
        prog="qwen35",
        description="Qwen3.5 hybrid attention: a NumPy oracle (reference) and a PyTorch + Triton engine (optimized). "
                    "Every command works with no arguments on the bundled demo model or a preset.",
        epilog=f"Exit status: 0 ok, 1 a check failed, 2 a user error (one line on stderr), 130 interrupted. "
               f"{DEBUG_ENV}=1 shows the traceback of a user error.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _discover():
        p = sub.add_parser(mod.NAME, help=getattr(mod, "HELP", ""), description=getattr(mod, "HELP", ""))
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def one_line(message: str) -> str:
    """A possibly multi-line error message (WeightLoadError lists missing / unexpected / mis-shaped tensors on
    lines of their own) as one line: the lines joined by '; '."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def main(argv=None) -> int:
    """Run `qwen35 <argv>`; returns the exit status (see the module docstring) instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error already printed as one line (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `qwen35 info | head`: the reader is gone; say nothing more to it
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a captured stdout has no file descriptor
            pass
        return 0
    except KeyboardInterrupt:
        print(f"qwen35 {args.command}: interrupted", file=sys.stderr)
        return 130
    except Qwen35Error as e:
        if _debug():
            raise
        print(f"qwen35 {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
