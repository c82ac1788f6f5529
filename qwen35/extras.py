"""What `pip install qwen35` brings, and which extra brings the rest.

The core install (numpy and safetensors, nothing else) is the NumPy oracle: every module of `reference/`, the
bundled demo checkpoint, and the commands that run them (`qwen35 generate`, `info`, `memory`).  The other parts
need optional packages, installed through the extras of pyproject.toml:

    extra        adds                                       for
    torch        torch, tqdm                                the optimized engine, bench, accuracy, compare
    triton       torch, tqdm, triton (Linux)                the Triton kernels
    tokenizers   tokenizers                                 a checkpoint's own tokenizer.json
    plots        matplotlib                                 qwen35 plot
    hf           torch, tqdm, transformers                  qwen35 diverge, the transformers rows of compare / bench
    notebooks    torch, matplotlib, hypothesis, nbclient... executing the notebooks
    test         all of the above, pytest, ruff             the test suite
    all          all of the above but the test tools

`EXTRA_FOR` maps each optional top-level module to the extra that installs it.  Code that reaches a missing one
turns the ModuleNotFoundError into a `MissingDependencyError`, whose message is one line naming the extra:

    try:
        import torch
    except ModuleNotFoundError as e:
        raise missing_dependency(e, "--engine optimized") or e

    -> --engine optimized needs torch, which is not installed: pip install 'qwen35[torch]'

`qwen35.cli.main` does the same for any such error a command raises, so every command that needs an extra fails
with that one line (exit status 2) instead of a traceback.
"""
from __future__ import annotations

import importlib

from reference.errors import Qwen35Error

__all__ = ["EXTRA_FOR", "MissingDependencyError", "missing_dependency", "require"]

# optional top-level module -> the extra that installs it
EXTRA_FOR = {
    "torch": "torch",
    "tqdm": "torch",
    "triton": "triton",
    "tokenizers": "tokenizers",
    "matplotlib": "plots",
    "transformers": "hf",
}


class MissingDependencyError(Qwen35Error, ImportError):
    """An optional package that the requested work needs is not installed; the message names the extra."""

    def __init__(self, module: str, needed_by: str = "this command"):
        self.module = module
        self.extra = EXTRA_FOR[module]
        super().__init__(f"{needed_by} needs {module}, which is not installed: pip install 'qwen35[{self.extra}]'")


def missing_dependency(exc: BaseException, needed_by: str = "this command") -> MissingDependencyError | None:
    """The MissingDependencyError for `exc` when it is the ModuleNotFoundError of an optional package that is not
    installed at all (its top-level module is missing); None for any other exception, including a missing
    submodule of an installed package (a version without it: a real error, not a missing extra)."""
    if isinstance(exc, MissingDependencyError):
        return exc
    if isinstance(exc, ModuleNotFoundError) and exc.name in EXTRA_FOR:
        return MissingDependencyError(exc.name, needed_by)
    return None


def require(module: str, needed_by: str):
    """Import and return the optional top-level `module`, or raise MissingDependencyError naming `needed_by` (a
    flag, a command, a file) and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        err = missing_dependency(e, needed_by)
        if err is None:
            raise
        raise err from None
