"""Loading one tensor-parallel rank's shard straight from safetensors (`load_weights(..., shard=TensorShard)`).

The oracle is the simplest formulation: load the whole model, then cut it with `reference.parallel.shard_weights`.
A rank's load must equal that bit for bit (values, dtypes, C order, the `shard` field, the tied lm_head being the
embedding array, the vision tower whole), give the same WeightLoadError as the whole load for a checkpoint that
does not fit its config, report a non-finite value only on the rank that loads it, and, measured with
tracemalloc (NumPy reports its buffers to it; memory-mapped file pages are not allocations), never hold more
than about its share of the weights.
"""
from __future__ import annotations

import re
import shutil
import tracemalloc

import numpy as np
import pytest

from hf_checkpoints import tiny_config
from reference.checkpoint import random_state_dict, write_checkpoint
from reference.config import Qwen35Config
from reference.errors import CheckpointError, ConfigError, WeightLoadError
from reference.parallel import TensorShard, shard_index, shard_weights
from reference.safetensors_io import BF16Tensor, load_state_dict, read_safetensors, write_safetensors
from reference.weights import load_weights, weights_from_state_dict

# A geometry that tp = 2 and tp = 4 both divide: 4 KV heads, 4 linear key heads (8 value heads), MLP 64, 4 experts;
# the vocabulary (97) does not divide, so the embedding blocks are uneven.
TP4 = dict(num_attention_heads=8, num_key_value_heads=4, linear_num_key_heads=4, linear_num_value_heads=8)

CASES = {  # name -> (tiny_config kind, config overrides, write_checkpoint options, load dtype)
    "dense": ("dense", {}, {}, np.float64),
    "moe_fused": ("moe", {}, {}, np.float64),
    "moe_per_expert": ("moe", {}, {"moe_layout": "per_expert"}, np.float64),
    "multimodal": ("multimodal", {}, {}, np.float64),
    "tied": ("dense", {"tie_word_embeddings": True}, {}, np.float64),
    "bf16_moe_per_expert": ("multimodal_moe", {}, {"dtype": "bfloat16", "moe_layout": "per_expert"}, np.float32),
    "index_json": ("dense", {}, {"max_shard_bytes": 20_000}, np.float64),
}


def _config(kind: str, **overrides) -> Qwen35Config:
    return tiny_config(kind, **TP4, **overrides)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_loading")
    out = {}
    for name, (kind, overrides, options, dtype) in CASES.items():
        d = write_checkpoint(root / name, _config(kind, **overrides), seed=7, **options)
        out[name] = (d, dtype, load_weights(d, dtype=dtype))
    return out


def _arrays(w) -> dict[str, np.ndarray]:
    """Every array of a ModelWeights by a path-like name (the vision tower's under `visual.`)."""
    out = {"embed_tokens": w.embed_tokens, "norm": w.norm, "lm_head": w.lm_head}
    for i, layer in enumerate(w.layers):
        out[f"{i}.input_layernorm"] = layer.input_layernorm
        out[f"{i}.post_attention_layernorm"] = layer.post_attention_layernorm
        for part in ("mixer", "mlp"):
            out.update({f"{i}.{part}.{k}": v for k, v in vars(getattr(layer, part)).items()})
    out.update({f"visual.{k}": v for k, v in w.visual.items()})
    return out


def _assert_identical(got, want):
    """`got` and `want` hold the same arrays bit for bit, with the same dtypes, C order and metadata."""
    assert (got.config, got.prefix, got.source_dtypes, got.shard) == (want.config, want.prefix, want.source_dtypes,
                                                                     want.shard)
    assert [lw.layer_type for lw in got.layers] == [lw.layer_type for lw in want.layers]
    a, b = _arrays(got), _arrays(want)
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is np.ndarray, k  # not np.memmap, nor a lazy array-like
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert a[k].flags.c_contiguous, k
        assert a[k].tobytes() == b[k].tobytes(), k
    assert (got.lm_head is got.embed_tokens) == (want.lm_head is want.embed_tokens)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_rank_load_equals_the_cut_whole_model(ckpts, case, tp):
    d, dtype, whole = ckpts[case]
    for rank in range(tp):
        shard = TensorShard(whole.config, tp, rank)
        got = load_weights(d, dtype=dtype, shard=shard)
        _assert_identical(got, shard_weights(whole, tp, rank))
        assert got.shard == shard
        if whole.config.tie_word_embeddings:
            assert got.lm_head is got.embed_tokens
        assert got.embed_tokens.shape[0] == shard.vocab[1] - shard.vocab[0]


def test_the_cases_cover_what_they_claim(ckpts):
    """Each case's checkpoint holds the layout it is named for (so the equality above tests that layout)."""
    def names(case):
        return list(load_state_dict(ckpts[case][0])[0])

    assert any(".experts.2.up_proj.weight" in n for n in names("moe_per_expert"))
    assert any(n.endswith("experts.gate_up_proj") for n in names("moe_fused"))
    assert "lm_head.weight" not in names("tied") and ckpts["tied"][2].lm_head is ckpts["tied"][2].embed_tokens
    assert ckpts["multimodal"][2].visual and ckpts["bf16_moe_per_expert"][2].visual
    assert "BF16" in ckpts["bf16_moe_per_expert"][2].source_dtypes.values()
    assert len(list(ckpts["index_json"][0].glob("model-*.safetensors"))) > 2


def test_lazy_bf16_decodes_only_the_selection(tmp_path):
    """read_safetensors(lazy=True) gives BF16Tensor: any index decodes those elements as the eager read does."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 4)).astype(np.float32)
    path = write_safetensors(tmp_path / "t.safetensors", {"x": x, "y": x[0]}, bf16=("x",))
    eager, dtypes = read_safetensors(path)
    lazy, lazy_dtypes = read_safetensors(path, lazy=True)
    assert dtypes == lazy_dtypes == {"x": "BF16", "y": "F32"}
    assert type(eager["x"]) is np.ndarray and eager["x"].dtype == np.float32  # the default read is unchanged
    t = lazy["x"]
    assert isinstance(t, BF16Tensor) and (t.shape, t.ndim, t.size, t.dtype) == ((6, 5, 4), 3, 120, np.float32)
    idx = np.array([1, 3])
    for key in [(idx,), (slice(None), idx), (slice(None), slice(None), idx), (2, slice(None), 0), ()]:
        np.testing.assert_array_equal(t[key], eager["x"][key])
        assert t[key].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(t), eager["x"])
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    assert not np.array_equal(np.asarray(t), x)  # bf16 really rounds: the comparison above is not of copies of x
    np.testing.assert_array_equal(lazy["y"], x[0])  # other dtypes: views of the file, as before


class _Watched:
    """An array-like checkpoint tensor that logs how it is read: ("part", key) per index, ("whole",) per asarray."""

    def __init__(self, arr: np.ndarray, log: list):
        self.arr, self.log = arr, log
        self.shape, self.ndim, self.dtype = arr.shape, arr.ndim, arr.dtype

    def __getitem__(self, key):
        self.log.append(("part", key))
        return self.arr[key]

    def __array__(self, dtype=None, copy=None):
        self.log.append(("whole",))
        return np.array(self.arr, dtype=dtype)


_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


@pytest.mark.parametrize("case", ["dense", "moe_per_expert", "moe_fused", "bf16_moe_per_expert"])
def test_a_rank_reads_only_its_part(ckpts, case):
    """Split tensors are only ever indexed at the rank's rows / columns / experts, never read whole; per-expert
    tensors of other ranks' experts are not read at all; replicated tensors are read whole."""
    d, dtype, whole = ckpts[case]
    config, tp, rank = whole.config, 4, 1
    tensors, dtypes = read_safetensors(d / "model.safetensors", lazy=True)
    logs = {name: [] for name in tensors}
    watched = {name: _Watched(np.asarray(a), logs[name]) for name, a in tensors.items()}
    shard = TensorShard(config, tp, rank)
    got = weights_from_state_dict(watched, config, dtype, source_dtypes=dtypes, shard=shard)
    _assert_identical(got, shard_weights(whole, tp, rank))
    e0, e1 = shard.experts or (0, 0)
    for name, log in logs.items():
        m = _EXPERT.search(name)
        stripped = name if name == "lm_head.weight" else name[len(whole.prefix):]
        if m:  # per-expert: whole if the rank's expert, else untouched
            assert log == ([("whole",)] if e0 <= int(m.group(1)) < e1 else []), name
        elif name.startswith("model.visual.") or shard_index(config, stripped, tp, rank) is None:
            assert log == [("whole",)], name
        else:
            axis, idx = shard_index(config, stripped, tp, rank)
            assert len(log) == 1 and log[0][0] == "part", (name, log)
            key = log[0][1]
            assert len(key) == axis + 1 and all(k == slice(None) for k in key[:axis]), (name, key)
            np.testing.assert_array_equal(key[axis], idx, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# the strict checks are the whole model's, on every rank
# ---------------------------------------------------------------------------------------------------------------
def _rewritten(src, dst, mutate):
    tensors = {k: np.array(v) for k, v in load_state_dict(src)[0].items()}
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    write_safetensors(dst / "model.safetensors", mutate(tensors))
    return dst


def _without(name):
    """A mutation of a state dict: tensor `name` removed."""
    return lambda t: {k: v for k, v in t.items() if k != name}


def _cut(name, rows, copies=None):
    """A mutation: tensor `name` loses its last `rows` rows; `copies` (new name -> existing name) adds tensors."""
    return lambda t: {**t, name: t[name][:-rows], **{k: t[v] for k, v in (copies or {}).items()}}


MUTATIONS = {
    "missing_split_tensor": _without("model.layers.0.mlp.down_proj.weight"),
    "mis_shaped_split_tensor": _cut("model.layers.3.self_attn.k_proj.weight", 16),
    "mis_shaped_embedding_and_unexpected": _cut("model.embed_tokens.weight", 1, {"model.extra": "lm_head.weight"}),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_same_weight_load_error_with_and_without_a_shard(ckpts, tmp_path, mutation):
    d = _rewritten(ckpts["dense"][0], tmp_path / mutation, MUTATIONS[mutation])
    with pytest.raises(WeightLoadError) as whole:
        load_weights(d)
    config = ckpts["dense"][2].config
    for tp, rank in [(2, 0), (2, 1), (4, 3)]:
        with pytest.raises(WeightLoadError) as ranked:
            load_weights(d, shard=TensorShard(config, tp, rank))
        assert str(ranked.value) == str(whole.value)
        assert (ranked.value.missing, ranked.value.mis_shaped, ranked.value.unexpected) == (
            whole.value.missing, whole.value.mis_shaped, whole.value.unexpected)
    assert whole.value.missing or whole.value.mis_shaped


def test_a_missing_expert_of_another_rank_is_still_reported(ckpts, tmp_path):
    """Expert 0 belongs to rank 0; rank 1 of tp = 2 reads no data of it, but the checkpoint is still incomplete."""
    gone = "model.layers.1.mlp.experts.0.up_proj.weight"
    d = _rewritten(ckpts["moe_per_expert"][0], tmp_path / "no_expert0", _without(gone))
    config = ckpts["moe_per_expert"][2].config
    assert TensorShard(config, 2, 1).experts == (2, 4)
    with pytest.raises(WeightLoadError) as whole:
        load_weights(d)
    with pytest.raises(WeightLoadError) as ranked:
        load_weights(d, shard=TensorShard(config, 2, 1))
    assert ranked.value.missing == whole.value.missing == [gone]
    assert str(ranked.value) == str(whole.value)


def test_conv1d_two_and_three_dimensional_shard_the_same(ckpts, tmp_path):
    d3, _, whole = ckpts["dense"]
    d2 = _rewritten(d3, tmp_path / "conv2d", lambda t: {k: (v[:, 0, :] if k.endswith("conv1d.weight") else v)
                                                        for k, v in t.items()})
    assert read_safetensors(d2 / "model.safetensors")[0]["model.layers.0.linear_attn.conv1d.weight"].ndim == 2
    for rank in range(4):
        _assert_identical(load_weights(d2, shard=TensorShard(whole.config, 4, rank)), shard_weights(whole, 4, rank))


def test_a_shard_of_another_config_is_refused(ckpts):
    d, _, whole = ckpts["dense"]
    other = whole.config.replace(intermediate_size=128)
    with pytest.raises(ConfigError, match="another config"):
        load_weights(d, shard=TensorShard(other, 2, 0))
    with pytest.raises(TypeError, match="TensorShard"):
        load_weights(d, shard=(2, 0))


# ---------------------------------------------------------------------------------------------------------------
# non-finite values: checked on what the rank loads
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.layers.1.linear_attn.in_proj_qkv.weight",  # split by rows
                                  "model.layers.3.self_attn.o_proj.weight"])  # split by columns
def test_nonfinite_value_is_reported_by_the_rank_that_holds_it(ckpts, tmp_path, name):
    d0, _, whole = ckpts["dense"]
    config, tp = whole.config, 4
    axis, idx = shard_index(config, name[len("model."):], tp, 1)
    pos = int(idx[len(idx) // 2])  # inside rank 1's block (for in_proj_qkv: a row of its K block)

    def poison(t):
        a = t[name]
        a[(slice(None),) * axis + (pos,)][0] = np.nan
        return t

    d = _rewritten(d0, tmp_path / "nan", poison)
    with pytest.raises(CheckpointError) as e:
        load_weights(d, shard=TensorShard(config, tp, 1))
    msg = str(e.value)
    rank_size = len(idx) * config.hidden_size  # in_proj_qkv rows [n, H], o_proj columns [H, n]
    assert name in msg and "model.safetensors" in msg and f"1 of its {rank_size} values" in msg
    for rank in (0, 2, 3):  # their blocks are finite
        load_weights(d, shard=TensorShard(config, tp, rank))
    with pytest.raises(CheckpointError, match=name):
        load_weights(d)
    w = load_weights(d, shard=TensorShard(config, tp, 1), allow_nonfinite=True)
    assert not np.isfinite(_arrays(w)["1.mixer.in_proj_qkv" if axis == 0 else "3.mixer.o_proj"]).all()


# ---------------------------------------------------------------------------------------------------------------
# memory: a rank holds about its share, never a whole split tensor
# ---------------------------------------------------------------------------------------------------------------
def _big_config(kind: str) -> Qwen35Config:
    """Weights dominate every other allocation: hidden 256, vocabulary 4096, 4 layers (L L L F)."""
    extra = dict(moe_intermediate_size=128, shared_expert_intermediate_size=256, num_experts=8) if kind == "moe" \
        else dict(intermediate_size=512)
    return tiny_config(kind, hidden_size=256, vocab_size=4096, head_dim=32, mrope_section=(4, 2, 2),
                       linear_key_head_dim=32, linear_value_head_dim=32, **TP4, **extra)


def _peak_bytes(load) -> int:
    """Peak bytes traced while `load()` runs (the result is kept alive until the peak is read)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return peak


@pytest.mark.parametrize("kind, storage, layout", [("dense", "float32", "fused"), ("dense", "bfloat16", "fused"),
                                                    ("moe", "bfloat16", "per_expert")])
def test_rank_load_peaks_below_its_share(tmp_path, kind, storage, layout):
    config = _big_config(kind)
    tensors = random_state_dict(config, seed=1)
    f32_bytes = sum(a.size * 4 for a in tensors.values())  # the whole model's weights in float32
    d = write_checkpoint(tmp_path / "big", config, tensors=tensors, dtype=storage, moe_layout=layout)
    del tensors
    rank = _peak_bytes(lambda: load_weights(d, dtype=np.float32, shard=TensorShard(config, 4, 1)))
    whole = _peak_bytes(lambda: load_weights(d, dtype=np.float32))
    assert whole > 1.0 * f32_bytes, (whole, f32_bytes)  # the measurement sees the weights NumPy allocates
    assert rank < 0.45 * f32_bytes, (rank / f32_bytes, f32_bytes)
