"""Helpers of the strict-loading tests (tests/test_strict_loading.py, tests/test_loading_fuzz.py).

    tiny_checkpoint(directory, kind="dense", seed=0, **overrides) -> Path   (qwen35's own writer, no torch)
    read_header(path) -> (header dict, data bytes);   write_header(path, header, data)
    rewrite_header(path, mutate)                      header passed through mutate(dict) -> dict, data kept
    raw_header_bytes(path) -> bytes                   the JSON bytes after the length field
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from hf_checkpoints import tiny_config
from reference.checkpoint import write_checkpoint


def tiny_checkpoint(directory, kind: str = "dense", seed: int = 0, **overrides) -> Path:
    """A tiny random checkpoint (config.json + model.safetensors) of `tiny_config(kind, **overrides)`."""
    return write_checkpoint(Path(directory), tiny_config(kind, **overrides), seed=seed)


def read_header(path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path, header, data: bytes, *, length: int | None = None) -> None:
    """Write `header` (any JSON value) and `data`; `length` overrides the 8-byte length field."""
    h = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)


def rewrite_header(path, mutate) -> None:
    header, data = read_header(path)
    write_header(path, mutate(header), data)


def raw_header_bytes(path) -> bytes:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n]
