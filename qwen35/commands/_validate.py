"""Validation of the command line: argparse `type=` functions for every numeric, device and list argument, and the
checks of the user's input and output paths.

A bad value never reaches the library: the `type=` functions raise `argparse.ArgumentTypeError`, which argparse
reports as `qwen35 <command>: error: argument --flag: <message>` with exit status 2; the path checks raise
`UsageError` (a `Qwen35Error`), which `qwen35.cli.main` reports the same way.  Each message names the flag or the
file and what is accepted.

    parser.add_argument("--top-p", type=probability)          # 0 < p <= 1
    parser.add_argument("--prompt-ids", type=token_ids)        # "1,2,3" -> [1, 2, 3]
    out = output_path(args.out, "--out")                       # before a long run, not after it
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from pathlib import Path

from qwen35.extras import MissingDependencyError, require
from reference.errors import Qwen35Error

__all__ = ["UsageError", "positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "unit_interval",
           "temperature", "probability",
           "token_ids", "memory_size", "dtype_name", "device", "comma_list", "check_backend", "output_path",
           "read_json_file", "write_text", "writing"]


class UsageError(Qwen35Error, ValueError):
    """A command-line value, or a file the command line names, cannot be used; the message names the flag / file."""


def _number(text: str, kind, ok, expected: str):
    """`text` as an int or a finite float for which `ok(value)` holds, else ArgumentTypeError 'expected <expected>,
    got <text>'."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number ({expected}), got {text!r}")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer n >= 1 (token counts, lengths, steps, context)."""
    return _number(text, int, lambda n: n >= 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    """An integer n >= 0 (seeds: numpy's default_rng takes no negative seed)."""
    return _number(text, int, lambda n: n >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite x > 0 (tolerances)."""
    return _number(text, float, lambda x: x > 0, "a number > 0")


def nonnegative_float(text: str) -> float:
    """A finite x >= 0 (weight decay, a clipping norm where 0 turns it off)."""
    return _number(text, float, lambda x: x >= 0, "a number >= 0")


def unit_interval(text: str) -> float:
    """A finite x with 0 <= x <= 1 (a fraction)."""
    return _number(text, float, lambda x: 0 <= x <= 1, "a number in [0, 1]")


def temperature(text: str) -> float:
    """A finite T >= 0; 0 means greedy decoding, T > 0 samples from softmax(logits / T)."""
    return _number(text, float, lambda t: t >= 0, "a number >= 0, 0 = greedy")


def probability(text: str) -> float:
    """A nucleus mass p with 0 < p <= 1 (p = 0 would keep no token)."""
    return _number(text, float, lambda p: 0 < p <= 1, "a number in (0, 1]")


def token_ids(text: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3]: comma-separated non-negative integers, at least one.  The upper bound (the
    vocabulary) is the checkpoint's and is checked once the config is read (`_common.check_token_ids`)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 1,2,3, got {text!r}")
    ids = []
    for i, p in enumerate(parts):
        if not re.fullmatch(r"[0-9]+", p):
            raise argparse.ArgumentTypeError(f"item {i} is {p!r}; expected comma-separated non-negative integers "
                                             f"such as 1,2,3")
        ids.append(int(p))
    return ids


def memory_size(text: str) -> int:
    """'80GiB', '141GB', '1.5TiB' or plain bytes -> a positive number of bytes (reference.memory.parse_bytes)."""
    from reference.memory import parse_bytes

    try:
        n = parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read a memory size from {text!r}; expected a number and a unit "
                                         "B, KB, MB, GB, TB, KiB, MiB, GiB or TiB, e.g. 80GiB or 141GB") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive memory size such as 80GiB, got {text!r}")
    return n


def dtype_name(text: str) -> str:
    """A dtype name reference.memory sizes (bfloat16, float16, float32, fp8, ...: the keys of DTYPE_BYTES)."""
    from reference.memory import DTYPE_BYTES

    name = text.strip().lower()
    if name not in DTYPE_BYTES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; accepted: {', '.join(sorted(DTYPE_BYTES))}")
    return name


def device(text: str) -> str:
    """A torch device the optimized engine runs on: cpu, cuda or cuda:N, and CUDA must be present for cuda.
    torch is imported only for a cuda device (parsing stays fast; without torch installed, cuda is refused naming
    the extra that installs it)."""
    s = text.strip().lower()
    m = re.fullmatch(r"(cpu|cuda)(?::([0-9]+))?", s)
    if not m:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; accepted: cpu, cuda, cuda:N")
    if m.group(1) == "cuda":
        try:
            torch = require("torch", f"device {text!r}")
        except MissingDependencyError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device")
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here ({why}); use --device cpu")
        n = torch.cuda.device_count()
        if m.group(2) is not None and int(m.group(2)) >= n:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return s


def check_backend(backend: str, device_name: str, *, strict: bool = False) -> None:
    """The optimized engine's backend choice, before any work: $QWEN35_BACKEND (read by optimized.backend for
    "auto") must name a backend, and with `strict` a requested "triton" must really run Triton (a CUDA device, or
    TRITON_INTERPRET=1 on the CPU, and an importable optimized.triton) instead of falling back to the torch ops.
    Without torch installed: MissingDependencyError naming the `torch` extra."""
    require("torch", "the optimized engine")
    from optimized import backend as dispatch

    env = os.environ.get(dispatch.ENV_VAR)
    if backend == "auto" and env and env.lower() not in dispatch.BACKENDS:
        raise UsageError(f"${dispatch.ENV_VAR}={env!r}: expected one of {', '.join(dispatch.BACKENDS)}")
    if strict and backend == "triton":
        if not device_name.startswith("cuda") and not dispatch.interpreting():
            raise UsageError(f"--backend triton on --device {device_name}: the Triton kernels need a CUDA device, "
                             "or TRITON_INTERPRET=1 (the interpreter, small sizes only) on the CPU")
        if not dispatch.triton_available():
            raise UsageError("--backend triton: optimized.triton does not import here (is triton installed?)")


def comma_list(choices):
    """A `type=` function for a comma-separated subset of `choices` -> tuple (at least one item)."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(p.strip() for p in text.split(",") if p.strip())
        bad = [p for p in items if p not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{'unknown ' + ', '.join(map(repr, bad)) if bad else 'empty list'}; "
                                             f"expected a comma-separated subset of {','.join(choices)}")
        return items

    parse.__name__ = "comma_list"
    return parse


def _nearest_existing(p: Path) -> Path:
    a = p.absolute()
    while not a.exists() and a != a.parent:
        a = a.parent
    return a


def output_path(path, flag: str, *, directory: bool = False) -> Path:
    """Check that `path` (a file, or with directory=True a directory) can be written, before any work is done:
    an existing path must be of the right kind and writable; otherwise its nearest existing ancestor must be a
    writable directory (the missing ones are created when writing).  Raises UsageError naming `flag`."""
    p = Path(path)
    what = "a directory" if directory else "a file"
    if p.exists():
        if p.is_dir() != directory:
            raise UsageError(f"{flag} {p}: exists and is not {what}")
        if not os.access(p, os.W_OK):
            raise UsageError(f"{flag} {p}: not writable")
        return p
    a = _nearest_existing(p)
    if not a.is_dir():
        raise UsageError(f"{flag} {p}: cannot be created, {a} is not a directory")
    if not os.access(a, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {p}: cannot be created, {a} is not writable")
    return p


@contextlib.contextmanager
def writing(path, flag: str):
    """Around the code that writes `path`: an OSError (a full disk, a permission, a directory in the way) becomes a
    UsageError naming `flag` and the path."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write it ({e.strerror or e})") from None


def write_text(path, text: str, flag: str) -> Path:
    """Write `text` to `path`, creating its parent directories (errors: see `writing`)."""
    p = Path(path)
    with writing(p, flag):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return p


def read_json_file(path, flag: str) -> dict:
    """A JSON object from the file `path`; a missing, unreadable or malformed file is a UsageError naming `flag`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {p}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} {p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{flag} {p}: expected a JSON object, got a {type(data).__name__}")
    return data
