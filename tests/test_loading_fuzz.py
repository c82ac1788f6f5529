"""Mutation (fuzz) test of loading: a valid tiny checkpoint with config.json or model.safetensors mutated at random
must either load AND run one forward pass with finite logits, or raise a Qwen35Error — never another exception
(TypeError, KeyError, struct.error, OverflowError, MemoryError, a numpy error...).

Config mutations: a value replaced by one of another type or an extreme one (str, bool, float, list, null, object,
0, negative, huge, NaN, ±Inf), a key deleted, a key added, a value wrapped one level deeper (list / object).
File mutations: truncation, a flipped bit in the header, a tensor entry's dtype / shape / data_offsets changed,
the header length field changed.  Bounded: a few dozen examples per property (deadline off).
"""
from __future__ import annotations

import copy
import json
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _loading_cases import tiny_checkpoint, write_header
from reference.errors import Qwen35Error
from reference.model import Qwen35Model

KINDS = ("dense", "multimodal")
_BASES: dict[str, tuple[dict, bytes]] = {}
TOKENS = [1, 5, 9, 2, 7]

ODD_VALUES = [0, -1, 1, 2, 3, 10**30, 2**63, 2**31, True, False, None, "", "x", "32", "false", [], {}, [1, 2],
              [None], {"a": 1}, 1e-300, 1e300, math.nan, math.inf, -math.inf, 0.5, 1.0, -0.0, 4.0]
VALUES = st.one_of(st.sampled_from(ODD_VALUES), st.integers(-3, 200),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4))


def _base(kind: str) -> tuple[dict, bytes]:
    """(config dict, safetensors bytes) of the valid tiny checkpoint of `kind`, built once."""
    if kind not in _BASES:
        with tempfile.TemporaryDirectory() as tmp:
            d = tiny_checkpoint(Path(tmp) / kind, kind=kind, seed=1)
            _BASES[kind] = (json.loads((d / "config.json").read_text()), (d / "model.safetensors").read_bytes())
    return _BASES[kind]


def _paths(node, prefix=()):
    """Every path (tuple of keys / indices) to a value inside nested objects and lists."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _parent(d, path):
    for k in path[:-1]:
        d = d[k]
    return d


def _mutate_config(d: dict, data) -> dict:
    d = copy.deepcopy(d)
    for _ in range(data.draw(st.integers(1, 3), label="n_mutations")):
        paths = list(_paths(d))
        op = data.draw(st.sampled_from(["set", "set", "delete", "add", "wrap_list", "wrap_object"]), label="op")
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent, key = _parent(d, path), path[-1]
        if op == "set":
            parent[key] = data.draw(VALUES, label="value")
        elif op == "delete":
            parent.pop(key) if isinstance(parent, dict) else parent.pop(key)
        elif op == "add":
            target = parent if isinstance(parent, dict) else d
            target[data.draw(st.sampled_from(["extra", "hidden_size", "rope_parameters", "vision_config",
                                               "text_config", "layer_types", "eos_token_id"]),
                             label="new_key")] = data.draw(VALUES, label="new_value")
        elif op == "wrap_list":
            parent[key] = [parent[key]]
        else:
            parent[key] = {"value": parent[key]}
    return d


def _mutate_file(raw: bytes, data) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    op = data.draw(st.sampled_from(["truncate", "flip", "entry", "length"]), label="file_op")
    if op == "truncate":
        return raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
    if op == "flip":
        pos = data.draw(st.integers(0, 8 + n - 1), label="byte")  # the length field or the JSON header
        b = bytearray(raw)
        b[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        return bytes(b)
    if op == "length":
        new = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(n - 16, n + 16).filter(lambda x: x >= 0)),
                        label="length")
        return struct.pack("<Q", new) + raw[8:]
    header = json.loads(raw[8:8 + n])
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="tensor")
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
    entry = header[name]
    if field == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3",
                                                    "", 3, None]), label="dtype")
    elif field == "shape":
        entry["shape"] = data.draw(st.one_of(
            st.lists(st.integers(-2, 70), max_size=4), st.just(list(reversed(entry["shape"]))),
            st.sampled_from([None, "4", [2**62, 2**62], [1.5], [True]])), label="shape")
    else:
        b, e = entry["data_offsets"]
        entry["data_offsets"] = data.draw(st.one_of(
            st.tuples(st.integers(-8, e + 64), st.integers(-8, e + 64)).map(list),
            st.just([b + 4, e + 4]), st.just([0, e - b]), st.sampled_from([None, [b], [str(b), e], [b, e, 0]])),
            label="offsets")
    with tempfile.NamedTemporaryFile() as f:
        write_header(f.name, header, raw[8 + n:])
        return Path(f.name).read_bytes()


def _load_and_run(config: dict, weights: bytes, *, optimized: bool = False) -> None:
    """Load the checkpoint; on success run one forward pass and require finite logits."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "config.json").write_text(json.dumps(config))
        (d / "model.safetensors").write_bytes(weights)
        try:
            if optimized:
                import torch

                from optimized.model import Qwen35Model as OptModel

                logits = OptModel.from_pretrained(d, dtype=torch.float32).logits([TOKENS])[0].double().numpy()
            else:
                logits = Qwen35Model.from_pretrained(d, dtype=np.float32).logits([TOKENS])[0]
        except Qwen35Error:
            return
        assert np.all(np.isfinite(logits)), "loaded, but the forward pass gave non-finite logits"


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_mutated_config_loads_or_raises_qwen35_error(kind, data):
    config, weights = _base(kind)
    _load_and_run(_mutate_config(config, data), weights)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_mutated_safetensors_loads_or_raises_qwen35_error(kind, data):
    config, weights = _base(kind)
    _load_and_run(config, _mutate_file(weights, data))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.sampled_from(["config", "file"]))
def test_optimized_model_loads_or_raises_qwen35_error(data, which):
    pytest.importorskip("torch")
    config, weights = _base("dense")
    if which == "config":
        _load_and_run(_mutate_config(config, data), weights, optimized=True)
    else:
        _load_and_run(config, _mutate_file(weights, data), optimized=True)


def test_unmutated_bases_load_and_run():
    """The starting points are valid: without mutation both kinds load and give finite logits."""
    for kind in KINDS:
        config, weights = _base(kind)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "config.json").write_text(json.dumps(config))
            (d / "model.safetensors").write_bytes(weights)
            assert np.all(np.isfinite(Qwen35Model.from_pretrained(d, dtype=np.float32).logits([TOKENS])[0]))
