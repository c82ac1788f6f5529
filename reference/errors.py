"""The error family of qwen35: every user-facing error derives from `Qwen35Error`.

    Qwen35Error
    ├── ConfigError        a config.json field is missing, of the wrong type, out of range or unsupported
    ├── CheckpointError    a checkpoint directory, index or safetensors file cannot be read as given
    │   └── WeightLoadError    the tensors do not fit the config (missing / unexpected / mis-shaped names)
    ├── RequestError       a pipeline call cannot be run as given (names the request or the prompt's index)
    └── StateCacheError    a state-cache operation was refused (pool full, unknown request id)

Each also derives from the builtin exception a caller would expect (`ValueError`, `RuntimeError`, `KeyError`),
so `except ValueError` keeps working.  The `qwen35` command turns any `Qwen35Error` into one line on stderr and
exit status 2.  Messages name the offending field, tensor, file or request.
"""
from __future__ import annotations

__all__ = ["Qwen35Error", "ConfigError", "CheckpointError", "WeightLoadError", "RequestError", "StateCacheError",
           "PoolFullError", "UnknownRequestError"]


class Qwen35Error(Exception):
    """Base class of every error qwen35 raises for bad input (config, checkpoint, request)."""


class ConfigError(Qwen35Error, ValueError):
    """A config value is missing, inconsistent, of the wrong type or out of range; the message names the field."""


class CheckpointError(Qwen35Error, ValueError):
    """A checkpoint cannot be read as given (not a directory, malformed index or header, non-finite tensor);
    the message names the file and, where there is one, the tensor."""


class RequestError(Qwen35Error, ValueError):
    """A request cannot be run as given (bad tokens, empty, too long, duplicated...); names the request."""


class StateCacheError(Qwen35Error, RuntimeError):
    """A state-cache operation was refused; the message names the request(s)."""


class PoolFullError(StateCacheError):
    """claim() found no free slot: max_batch_size requests are already live."""


class UnknownRequestError(StateCacheError, KeyError):
    """An operation named a request that holds no slot (never claimed, or released)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class WeightLoadError(CheckpointError):
    """A checkpoint does not fit the config.  Carries every problem at once.

    Attributes:
        missing:     expected names not in the checkpoint (full checkpoint names, prefix included)
        unexpected:  checkpoint names nothing uses
        mis_shaped:  list of (name, expected shape, found shape)
        wrong_dtype: list of (name, found dtype) for non-float tensors
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), mis_shaped=(), wrong_dtype=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mis_shaped = list(mis_shaped)
        self.wrong_dtype = list(wrong_dtype)
