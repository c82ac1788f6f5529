"""Safetensors files and checkpoint directories, read and written with NumPy only (bf16 included).

    tensors, dtypes = load_state_dict(directory)          # every tensor of a checkpoint directory, names as stored
    tensors, dtypes = read_safetensors(path)              # one file
    tensors, dtypes = read_safetensors(path, lazy=True)   # BF16 as BF16Tensor: decoded only where indexed
    write_safetensors(path, tensors, bf16=(...))          # one file (what reference.checkpoint writes with)

This module knows the file format and the directory layout, not the model: which names a Qwen3.5 checkpoint must
hold, and in which dtype they are used, is `reference.weights`.

What is read:

* a directory holding `model.safetensors` (one file) or `model.safetensors.index.json` + shards (`weight_map`:
  name -> file);
* the safetensors dtypes F64, F32, F16, BF16, I64, I32, I16, I8, U8 and BOOL; BF16 is decoded here from the raw
  bytes (numpy has no bfloat16) to float32, every other dtype is returned as stored (read-only views of the
  memory-mapped file).  With `lazy=True` (read_safetensors, read_checkpoint) a BF16 tensor comes back as a
  `BF16Tensor` instead: an array-like over the mapped bit patterns that decodes only the elements an index
  selects, so one tensor-parallel rank can read its rows or columns without a float32 copy of the whole tensor
  (`reference.weights.load_weights(..., shard=...)`).

Strictness (every refusal is a `CheckpointError` naming the file, and the tensor where one is at fault):

* `directory` must be a directory (a file path, or one that does not exist, is refused); one with neither
  `model.safetensors` nor an index "holds no weights".
* The index must be a JSON object whose `weight_map` is an object of shard file names (strings); every shard
  must exist and stay inside the directory (no absolute path, no `..`, no symlink out, except into the
  `blobs/` of a Hugging Face hub cache snapshot); no tensor may be stored in two shards.  A tensor the index
  lists but its shard does not hold is a `WeightLoadError`.
* A safetensors header must be a JSON object (length field within the file) whose entries have a known
  dtype, a shape of non-negative ints and data_offsets [b, e] with e − b = prod(shape) · itemsize, inside the
  data section and not overlapping another tensor's bytes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from itertools import pairwise
from pathlib import Path

import numpy as np

from reference.errors import CheckpointError, WeightLoadError

__all__ = [
    "SINGLE_FILE", "INDEX_FILE", "FLOAT_STORAGE", "bf16_to_float32", "float32_to_bf16", "BF16Tensor",
    "read_safetensors", "write_safetensors", "checkpoint_dir", "read_checkpoint", "load_state_dict",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# ----------------------------------------------------------------------------------------------------------------
# safetensors files, read and written with NumPy only (bf16 included)
# ----------------------------------------------------------------------------------------------------------------
# Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [b, e]}, ...,
# "__metadata__": {...}}, then the raw little-endian data; offsets are relative to the end of the header.
_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NP_TO_ST = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
             np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
             np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL"}
FLOAT_STORAGE = ("F64", "F32", "F16", "BF16")


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: bf16 is the top half of an IEEE float32, so shift left 16."""
    bits = np.asarray(raw, dtype=np.uint16).astype(np.uint32)
    bits <<= 16  # in place: one float32-sized buffer, not two
    return bits.view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even (as torch's .to(bfloat16))."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0  # a quiet NaN
    return out


class BF16Tensor:
    """A BF16 tensor of a memory-mapped safetensors file, decoded to float32 only where it is read.

    It looks like the float32 array it decodes to (`shape`, `ndim`, `size`, `dtype` float32), but holds only
    the uint16 bit patterns (`raw`, a read-only view of the file):

        t[key]         any NumPy index (an index array along one axis: those rows / columns), decoded -> float32
        np.asarray(t)  the whole tensor decoded (a new float32 array)

    so `t[:, cols]` of a [rows, n] tensor allocates rows·len(cols) floats, never rows·n.
    """

    __slots__ = ("raw",)
    dtype = np.dtype(np.float32)

    def __init__(self, raw: np.ndarray):
        self.raw = raw  # uint16 bit patterns, shape as the tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    @property
    def size(self) -> int:
        return self.raw.size

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, key) -> np.ndarray:
        return bf16_to_float32(self.raw[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError("a BF16Tensor cannot be viewed as float32 without a copy (it is decoded)")
        out = bf16_to_float32(self.raw)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"BF16Tensor(shape={self.shape})"


def _shape_of(path: Path, name: str, info) -> tuple[int, ...]:
    shape = info.get("shape")
    if not isinstance(shape, list) or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}; a shape is a list of non-negative "
                              "integers")
    return tuple(shape)


def _offsets_of(path: Path, name: str, info) -> tuple[int, int]:
    off = info.get("data_offsets")
    if (not isinstance(off, list) or len(off) != 2
            or any(not isinstance(o, int) or isinstance(o, bool) for o in off) or not 0 <= off[0] <= off[1]):
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {off!r}; expected [begin, end] with "
                              "0 <= begin <= end (byte offsets into the data section)")
    return off[0], off[1]


def read_safetensors(path, *, lazy: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor of one .safetensors file.

    Args:
        lazy: return BF16 tensors as `BF16Tensor` (decoded where indexed) instead of decoding them here.
    Returns:
        tensors: name -> array (BF16 decoded to float32, or a BF16Tensor when `lazy`; other dtypes as stored,
                 as read-only views of the memory-mapped file: copy them before the file is rewritten)
        dtypes:  name -> stored safetensors dtype string ("BF16", "F32", ...)
    Raises:
        CheckpointError naming the file (and the tensor, where one is at fault) if the file is unreadable,
        truncated, or its header is not a JSON object of well-formed entries: a known dtype, a shape of
        non-negative ints, data_offsets [b, e] with e − b = prod(shape)·itemsize inside the data section, and
        no two tensors sharing bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not a safetensors file (missing, or not a regular file)")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes; no header)")
    # Memory-mapped: tensors are views into the file until they are cast, so a large checkpoint is not held twice.
    data = np.memmap(path, dtype=np.uint8, mode="r")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if 8 + n > size:
        raise CheckpointError(f"{path}: truncated safetensors file (header claims {n} bytes, file has "
                              f"{size - 8} after the length field)")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: malformed safetensors header, not JSON ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (a JSON {type(header).__name__}, "
                              "expected an object {name: {dtype, shape, data_offsets}})")
    body = data[8 + n:]
    tensors, dtypes, ranges = {}, {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise CheckpointError(f"{path}: __metadata__ must be a JSON object, got {type(info).__name__}")
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {str(info)[:100]!r} "
                                  "(expected {dtype, shape, data_offsets})")
        st_dtype = info.get("dtype")
        if not isinstance(st_dtype, str) or st_dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype!r}; accepted: "
                                  f"{', '.join(_ST_DTYPES)}")
        shape, (b, e) = _shape_of(path, name, info), _offsets_of(path, name, info)
        np_dtype = _ST_DTYPES[st_dtype]
        nbytes = math.prod(shape) * np_dtype.itemsize  # Python ints: no overflow for absurd shapes
        if e - b != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} {st_dtype}{list(shape)} needs {nbytes} bytes, "
                                  f"header gives offsets [{b}, {e})")
        if e > len(body):
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {e} of the "
                                  f"data section, which has only {len(body)} bytes")
        if e > b:
            ranges.append((b, e, name))
        arr = body[b:e].view(np_dtype).reshape(shape)
        if st_dtype == "BF16":
            arr = BF16Tensor(arr) if lazy else bf16_to_float32(arr)
        tensors[name] = arr
        dtypes[name] = st_dtype
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in pairwise(ranges):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) overlap in the "
                                  "data section (each tensor must own its bytes)")
    return tensors, dtypes


def write_safetensors(path, tensors: dict[str, np.ndarray], *, bf16: tuple[str, ...] | bool = (),
                      metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to one .safetensors file (sorted by name, 8-byte aligned header).

    Args:
        tensors: name -> array (float64/32/16, ints, bool).
        bf16: names to store as BF16 (or True for every float tensor); their values are rounded from float32.
        metadata: optional string -> string map (`{"format": "pt"}` is added, as transformers writes).
    """
    path = Path(path)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        as_bf16 = (bf16 is True and np.issubdtype(arr.dtype, np.floating)) or (
            not isinstance(bf16, bool) and name in bf16)
        if as_bf16:
            raw, st = float32_to_bf16(arr), "BF16"
        else:
            if arr.dtype not in _NP_TO_ST:
                raise ValueError(f"write_safetensors: {name!r} has unsupported dtype {arr.dtype}")
            raw, st = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)), _NP_TO_ST[arr.dtype]
        blob = raw.tobytes()
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        chunks.append(blob)
        offset += len(blob)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for blob in chunks:
            f.write(blob)
    return path


# ----------------------------------------------------------------------------------------------------------------
# checkpoint directories: one file, or an index naming its shards
# ----------------------------------------------------------------------------------------------------------------
def _inside(directory: Path, shard, index: Path) -> Path:
    """The shard file `shard` of `index`, refused unless it stays in the checkpoint directory.

    Refused: a non-string or empty name, an absolute path, any `..` component, and a symlink whose target
    leaves the directory, except into the `blobs/` folder of a Hugging Face hub cache when the directory is one
    of its `snapshots/<revision>` folders (that is how the hub cache stores every file)."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index}: weight_map values must be shard file names (strings), got {shard!r}")
    if "\0" in shard or not shard.isprintable():
        raise CheckpointError(f"{index} names shard {shard!r}, which holds a control character; shard names are "
                              "plain file names")
    rel = Path(shard)
    if rel.is_absolute() or ".." in rel.parts or "\\" in shard:
        raise CheckpointError(f"{index} names shard {shard!r}, which is outside the checkpoint directory "
                              f"{directory}; shards must be file names relative to it")
    return _contained(directory, directory / rel, f"{index} names shard {shard!r}, which")


def _contained(directory: Path, path: Path, what: str) -> Path:
    """`path` if it resolves (symlinks followed) inside `directory` or, for a hub-cache snapshot, its blobs/."""
    root = directory.resolve()
    target = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(target == a or a in target.parents for a in allowed):
        raise CheckpointError(f"{what} resolves to {target}, outside the checkpoint directory {directory} "
                              "(a symlink out of it is refused)")
    return path


def _read_index(index: Path) -> dict[str, str]:
    """weight_map of a model.safetensors.index.json: a JSON object {tensor name: shard file name}."""
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a readable JSON safetensors index ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{index}: a safetensors index must be a JSON object with a 'weight_map', got a "
                              f"JSON {type(doc).__name__}")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must be a JSON object {{tensor name: shard file}}, got "
                              f"{type(weight_map).__name__ if 'weight_map' in doc else 'nothing'}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be a shard file name (a string), got "
                                  f"{shard!r}")
    return weight_map


def read_checkpoint(directory: Path, *, lazy: bool = False
                    ) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, Path]]:
    """(tensors, stored dtypes, file of each tensor) of a directory already checked by `checkpoint_dir`: the
    index's shards or the single file (`lazy`: BF16 tensors as `BF16Tensor`, see read_safetensors).  Refusals
    as `load_state_dict`."""
    index = directory / INDEX_FILE
    single = directory / SINGLE_FILE
    if index.exists():
        weight_map = _read_index(index)
        tensors, dtypes, files = {}, {}, {}
        for shard in sorted(set(weight_map.values())):
            shard_path = _inside(directory, shard, index)
            if not shard_path.is_file():
                raise CheckpointError(f"{index} names shard {shard!r}, which is not a file in {directory}")
            t, d = read_safetensors(shard_path, lazy=lazy)
            for name in t:
                if name in files:
                    raise CheckpointError(f"tensor {name!r} is stored twice: in {files[name]} and in {shard_path}")
                files[name] = shard_path
            tensors.update(t)
            dtypes.update(d)
            absent = sorted(n for n, f in weight_map.items() if f == shard and n not in t)
            if absent:
                raise WeightLoadError(f"{index} lists {len(absent)} tensor(s) that shard {shard!r} does not hold: "
                                      f"{absent[:10]}", missing=absent)
        return tensors, dtypes, files
    if single.exists():
        path = _contained(directory, single, str(single))
        t, d = read_safetensors(path, lazy=lazy)
        return t, d, dict.fromkeys(t, path)
    found = sorted(p.name for p in directory.glob("*.safetensors")) if directory.is_dir() else []
    raise CheckpointError(f"{directory} holds no weights: no {SINGLE_FILE} and no {INDEX_FILE}"
                          + (f" (found {found})" if found else ""))


def load_state_dict(directory) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a checkpoint directory (single file or sharded index), names as stored.

    Returns (tensors, stored dtypes).  Raises CheckpointError naming the file for a malformed index (not JSON,
    not an object, `weight_map` not an object of strings), a shard that is absent or outside the directory, a
    tensor stored in two shards, or a malformed safetensors file; WeightLoadError when the index names a
    tensor its shard does not hold.
    """
    tensors, dtypes, _ = read_checkpoint(checkpoint_dir(directory))
    return tensors, dtypes


def checkpoint_dir(directory) -> Path:
    """`directory` as a Path, refused (CheckpointError) unless it exists and is a directory."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {os.fspath(directory)!r} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{os.fspath(directory)!r} is a file; a checkpoint is loaded from the directory that "
                              f"holds config.json and the safetensors file(s) (e.g. {os.fspath(directory.parent)!r})")
    return directory
