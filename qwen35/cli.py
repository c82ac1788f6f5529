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
A command that needs an optional package which is not installed (torch, matplotlib, tokenizers, transformers, ...;
see qwen35/extras.py) is a user error too: one line naming the extra to install, e.g.
`qwen35 bench: error: this command needs torch, which is not installed: pip install 'qwen35[torch]'`.  That holds
even where the command's module or its arguments cannot be built without the package: the command is still listed
in --help, and running it gives that line.  So the core install (numpy + safetensors) runs every command that
needs no extra.

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
from .extras import MissingDependencyError, missing_dependency

ORDER = ["generate", "info", "memory", "train", "eval", "compare", "diverge", "bench", "accuracy", "plot"]
DEBUG_ENV = "QWEN35_DEBUG"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (`<prog>: error: <message>`) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Unavailable:
    """A command module that cannot be imported here because an optional package is missing: it keeps the
    command's name, and `missing` says which extra would bring it."""

    def __init__(self, name: str, missing: MissingDependencyError):
        self.NAME = name
        self.HELP = f"(unavailable: {missing.module} is not installed; pip install 'qwen35[{missing.extra}]')"
        self.missing = missing

    def run(self, args) -> int:
        raise self.missing


def _discover():
    mods = []
    for info in pkgutil.iter_modules(commands.__path__):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        except ModuleNotFoundError as e:
            missing = missing_dependency(e)
            if missing is None:
                raise
            mod = _Unavailable(info.name, missing)
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    mods.sort(key=lambda m: (ORDER.index(m.NAME) if m.NAME in ORDER else len(ORDER), m.NAME))
    return mods


def build_parser():
    """The `qwen35` parser with one subcommand per module of qwen35/commands.  `parser.unavailable` maps the name of
    each command that needs a missing optional package (to be imported or to build its arguments) to the
    MissingDependencyError that running it raises."""
    parser = _Parser(
        prog="qwen35",
        description="Qwen3.5 hybrid attention: a NumPy oracle (reference) and a PyTorch + Triton engine (optimized). "
                    "Every command works with no arguments on the bundled demo model or a preset.",
        epilog=f"Exit status: 0 ok, 1 a check failed, 2 a user error (one line on stderr), 130 interrupted. "
               f"{DEBUG_ENV}=1 shows the traceback of a user error.")
    parser.unavailable = {}
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _discover():
        p = sub.add_parser(mod.NAME, help=getattr(mod, "HELP", ""), description=getattr(mod, "HELP", ""))
        if isinstance(mod, _Unavailable):
            parser.unavailable[mod.NAME] = mod.missing
        elif hasattr(mod, "add_arguments"):
            try:
                mod.add_arguments(p)
            except ModuleNotFoundError as e:
                missing = missing_dependency(e)
                if missing is None:
                    raise
                parser.unavailable[mod.NAME] = missing
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in parser.unavailable:  # before parsing: its arguments may be missing with the package
        return _user_error(argv[0], parser.unavailable[argv[0]])
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
        return _user_error(args.command, e)
    except ModuleNotFoundError as e:  # an optional package the command reached is not installed
        missing = missing_dependency(e)
        if missing is None:
            raise
        return _user_error(args.command, missing, cause=e)


def _user_error(command: str, error: Qwen35Error, cause: BaseException | None = None) -> int:
    """Print `qwen35 <command>: error: <message>` (one line) and return 2; with QWEN35_DEBUG=1 raise instead."""
    if _debug():
        if cause is not None:
            raise error from cause
        raise error
    print(f"qwen35 {command}: error: {one_line(error)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
