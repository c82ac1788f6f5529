"""Strict config parsing and the strict checkpoint loader (docs/config_and_memory.md, "Supported config fields"
and "Loader rules").

Each bad input must give a Qwen35Error of the right kind whose message names the field by its config.json path
(`text_config.hidden_size`) or the file and tensor, plus the bad value; valid variations (unknown keys, nulls,
attn_output_gate false) must load.  The HF case checks attn_output_gate false against transformers.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil

import numpy as np
import pytest

from _loading_cases import read_header, rewrite_header, tiny_checkpoint, write_header
from qwen35.measure import rel_rms
from reference.attention import AttentionWeights
from reference.checkpoint import write_checkpoint
from reference.config import Qwen35Config, VisionConfig
from reference.errors import CheckpointError, ConfigError, Qwen35Error, WeightLoadError
from reference.model import Qwen35Model
from reference.safetensors_io import load_state_dict, write_safetensors
from reference.weights import expected_lm_shapes, load_weights

TEXT = Qwen35Config.tiny().to_hf_dict()
MM = Qwen35Config.tiny(model_type="qwen3_5").to_hf_dict()


def _with(d: dict, path: str, value):
    """A deep copy of config dict `d` with the dotted `path` set to `value` (the key deleted for `...`)."""
    d = copy.deepcopy(d)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return d


# ------------------------------------------------------------------------------------------------ config types
TEXT_CASES = [
    ("hidden_size", "32", r"hidden_size must be an integer, got '32' \(string\)"),
    ("hidden_size", True, r"hidden_size must be an integer, got True \(boolean\)"),
    ("hidden_size", 32.0, r"hidden_size must be an integer, got 32.0 \(number\)"),
    ("hidden_size", [32], r"hidden_size must be an integer, got \[32\] \(list\)"),
    ("hidden_size", {"v": 32}, r"hidden_size must be an integer, got \{'v': 32\} \(object\)"),
    ("num_hidden_layers", 10**9, r"num_hidden_layers must be an integer in \[1, 65536\], got 1000000000"),
    ("vocab_size", 2**40, r"vocab_size must be an integer in \[1, 2147483647\]"),
    ("vocab_size", -3, r"vocab_size must be an integer in \[1, "),
    ("tie_word_embeddings", "false", r"tie_word_embeddings must be a JSON boolean \(true or false\), got 'false'"),
    ("tie_word_embeddings", 0, r"tie_word_embeddings must be a JSON boolean .* got 0 \(integer\)"),
    ("attn_output_gate", "true", r"attn_output_gate must be a JSON boolean"),
    ("rms_norm_eps", "1e-6", r"rms_norm_eps must be a number, got '1e-6' \(string\)"),
    ("rms_norm_eps", math.nan, r"rms_norm_eps must be a finite positive number, got nan"),
    ("rms_norm_eps", math.inf, r"rms_norm_eps must be a finite positive number, got inf"),
    ("rms_norm_eps", -1e-6, r"rms_norm_eps must be a finite positive number"),
    ("eos_token_id", [1, "2"], r"eos_token_id\[1\] must be an integer, got '2'"),
    ("eos_token_id", True, r"eos_token_id must be an integer, got True"),
    ("eos_token_id", -1, r"eos_token_id must be an integer in \[0, "),
    ("pad_token_id", 1.5, r"pad_token_id must be an integer, got 1.5"),
    ("layer_types", "linear_attention", r"layer_types must be a list of strings"),
    ("layer_types", [1, 2, 3, 4], r"layer_types\[0\] = 1 \(integer\) is not a known layer type"),
    ("hidden_act", "gelu", r"hidden_act 'gelu' is not supported: the MLP implements 'silu'"),
    ("hidden_act", 7, r"hidden_act must be a string, got 7"),
    ("attention_bias", True, r"attention_bias true is not supported: the attention projections are bias-free"),
    ("model_type", ["qwen3_5_text"], r"model_type \['qwen3_5_text'\] is not a Qwen3.5 type"),
    ("rope_parameters", [], r"rope_parameters must be a JSON object, got \[\] \(list\)"),
    ("rope_parameters", "default", r"rope_parameters must be a JSON object"),
    ("rope_parameters.rope_theta", "1e6", r"rope_parameters.rope_theta must be a number, got '1e6'"),
    ("rope_parameters.rope_theta", None, r"rope_parameters.rope_theta is null"),
    ("rope_parameters.partial_rotary_factor", None, r"rope_parameters.partial_rotary_factor is null"),
    ("rope_parameters.partial_rotary_factor", 2.0, r"rope_parameters.partial_rotary_factor must be in \(0, 1\]"),
    ("rope_parameters.mrope_section", [2, "1", 1], r"rope_parameters.mrope_section\[1\] must be an integer"),
    ("rope_parameters.mrope_section", 4, r"rope_parameters.mrope_section must be a list of integers"),
    ("rope_parameters.mrope_section", [2, 2], r"rope_parameters.mrope_section must be three"),
    ("rope_parameters.mrope_interleaved", "false", r"rope_parameters.mrope_interleaved must be a JSON boolean"),
    ("rope_parameters.rope_type", 3, r"rope_parameters.rope_type must be a string"),
    ("rope_theta", [1.0], r"rope_theta must be a number"),
    ("rope_parameters.rope_theta", 1e-300, r"rope_parameters.rope_theta must be a finite number >= 1"),
]


@pytest.mark.parametrize("path, value, message", TEXT_CASES, ids=[f"{p}={v!r}" for p, v, _ in TEXT_CASES])
def test_text_config_type_errors_name_field_and_value(path, value, message):
    with pytest.raises(ConfigError, match=message):
        Qwen35Config.from_hf_dict(_with(TEXT, path, value))


MM_CASES = [
    ("text_config", "x", r"text_config must be a JSON object, got 'x' \(string\)"),
    ("text_config", ..., r"needs a text_config object"),
    ("text_config.hidden_size", "32", r"text_config.hidden_size must be an integer, got '32'"),
    ("text_config.rope_parameters", 5, r"text_config.rope_parameters must be a JSON object, got 5"),
    ("text_config.rope_parameters.rope_theta", True, r"text_config.rope_parameters.rope_theta must be a number"),
    ("text_config.layer_types", {"0": "full_attention"}, r"text_config.layer_types must be a list"),
    ("vision_config", [], r"vision_config must be a JSON object, got \[\] \(list\)"),
    ("vision_config.depth", "2", r"vision_config.depth must be an integer, got '2'"),
    ("vision_config.layer_norm_eps", math.nan, r"vision_config.layer_norm_eps must be a finite positive number"),
    ("vision_config.rope_parameters", 5, r"vision_config.rope_parameters must be a JSON object"),
    ("vision_config.rope_parameters.rope_theta", "1e4", r"vision_config.rope_parameters.rope_theta must be a number"),
    ("vision_config.hidden_act", "relu", r"vision_config.hidden_act 'relu' is not supported: .*gelu_pytorch_tanh"),
    ("vision_config.out_hidden_size", 48, r"vision_config.out_hidden_size \(48\) must equal the language model's "
                                          r"hidden_size \(32\)"),
    ("image_token_id", "90", r"image_token_id must be an integer, got '90'"),
    ("tie_word_embeddings", "true", r"tie_word_embeddings must be a JSON boolean"),
    ("eos_token_id", [None], r"eos_token_id\[0\] must be an integer, got None"),
]


@pytest.mark.parametrize("path, value, message", MM_CASES, ids=[f"{p}={v!r}" for p, v, _ in MM_CASES])
def test_multimodal_config_type_errors_name_the_path(path, value, message):
    with pytest.raises(ConfigError, match=message):
        Qwen35Config.from_hf_dict(_with(MM, path, value))


def test_mrope_interleaved_false_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as e:
        Qwen35Config.from_hf_dict(_with(TEXT, "rope_parameters.mrope_interleaved", False))
    msg = str(e.value)
    for needle in ("mrope_interleaved false is not supported", "transformers ignores this flag",
                   "sectioned Qwen2-VL layout", "accepted: true"):
        assert needle in msg
    with pytest.raises(ConfigError, match="mrope_interleaved false"):
        Qwen35Config.tiny(mrope_interleaved=False)
    assert Qwen35Config.from_hf_dict(_with(TEXT, "rope_parameters.mrope_interleaved", True)).mrope_interleaved


def test_direct_construction_is_as_strict():
    for kw, needle in [(dict(hidden_size=True), "hidden_size must be an integer"),
                       (dict(tie_word_embeddings="false"), "tie_word_embeddings must be a JSON boolean"),
                       (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite"),
                       (dict(mrope_section=(2, 1.0, 1)), r"mrope_section\[1\]"),
                       (dict(eos_token_id=[1, True]), r"eos_token_id\[1\]")]:
        with pytest.raises(ConfigError, match=needle):
            Qwen35Config.tiny(**kw)
    with pytest.raises(ConfigError, match="vision_config.patch_size must be an integer"):
        VisionConfig(patch_size="16")


def test_unknown_keys_and_nulls_are_accepted():
    d = copy.deepcopy(MM)
    d["some_future_field"] = {"nested": [1, "x", None]}
    d["text_config"]["another"] = "value"
    d["text_config"]["pad_token_id"] = None  # null = absent: the default applies
    d["vision_config"]["deepstack_visual_indexes"] = []
    d["vision_config"]["unknown"] = 3
    assert Qwen35Config.from_hf_dict(d) == Qwen35Config.from_hf_dict(MM)
    t = dict(TEXT, eos_token_id=[3, 4], bos_token_id=None, rope_parameters=dict(TEXT["rope_parameters"], x=1))
    assert Qwen35Config.from_hf_dict(t).eos_token_id == (3, 4)


def test_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        Qwen35Config.from_pretrained(tmp_path / "config.json")
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="config.json"):
        Qwen35Config.from_pretrained(bad)
    (bad / "config.json").write_text("[" * 100_000)
    with pytest.raises(ConfigError, match="config.json"):
        Qwen35Config.from_pretrained(bad)
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config must be a JSON object .*\(list\)"):
        Qwen35Config.from_pretrained(bad)


# ------------------------------------------------------------------------------------------ attn_output_gate false
def test_ungated_config_has_a_q_only_q_proj():
    gated, plain = Qwen35Config.tiny(), Qwen35Config.tiny(attn_output_gate=False)
    assert gated.q_proj_rows == 2 * 4 * 16 and plain.q_proj_rows == 4 * 16
    assert expected_lm_shapes(plain)["layers.3.self_attn.q_proj.weight"] == (64, 32)
    assert AttentionWeights.random(plain).q_proj.shape == (64, 32)
    with pytest.raises(ValueError, match="attn_output_gate is false: q_proj holds q only"):
        AttentionWeights.random(gated).validate(plain)


def _ungated_pair(tmp_path):
    """An ungated checkpoint and its gated twin: gate rows 0 (σ = ½ exactly) and o_proj doubled, so both compute
    exactly the same function ((½·o)(2·W_o)ᵀ = o W_oᵀ, exact in binary floating point)."""
    plain_cfg = Qwen35Config.tiny(attn_output_gate=False)
    plain = tiny_checkpoint(tmp_path / "plain", seed=11, attn_output_gate=False)
    tensors, _ = load_state_dict(plain)
    twin = {}
    nh, hd, H = 4, 16, 32
    for name, arr in tensors.items():
        arr = np.array(arr)
        if name.endswith("self_attn.q_proj.weight"):
            both = np.zeros((nh, 2, hd, H), arr.dtype)
            both[:, 0] = arr.reshape(nh, hd, H)  # per head: q rows, then (zero) gate rows
            arr = both.reshape(2 * nh * hd, H)
        elif name.endswith("self_attn.o_proj.weight"):
            arr = 2 * arr
        twin[name] = arr
    gated = write_checkpoint(tmp_path / "gated", Qwen35Config.tiny(), tensors=twin)
    return plain_cfg, plain, gated


def test_ungated_checkpoint_loads_and_equals_its_gated_twin(tmp_path):
    _, plain, gated = _ungated_pair(tmp_path)
    tokens = list(range(3, 30))
    a = Qwen35Model.from_pretrained(plain).logits([tokens])[0]
    b = Qwen35Model.from_pretrained(gated).logits([tokens])[0]
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())


def test_gate_flag_and_q_proj_rows_disagreeing_is_explained(tmp_path):
    _, plain, gated = _ungated_pair(tmp_path)
    with pytest.raises(WeightLoadError, match="set attn_output_gate true") as e:
        load_weights(gated, config=Qwen35Config.tiny(attn_output_gate=False))
    assert e.value.mis_shaped == [("model.layers.3.self_attn.q_proj.weight", (64, 32), (128, 32))]
    with pytest.raises(WeightLoadError, match="set attn_output_gate false"):
        load_weights(plain, config=Qwen35Config.tiny())


def _rel_rms(a, b) -> float:
    """The relative RMS error of `a` against the reference `b`."""
    return rel_rms(b, a)


@pytest.mark.hf
def test_hf_parity_attn_output_gate_false(tmp_path):
    """transformers' Qwen3_5Attention always has the gate (it ignores attn_output_gate), so the ungated model is
    checked through its exact gated twin (see _ungated_pair) loaded by Qwen3_5ForCausalLM."""
    torch = pytest.importorskip("torch")
    from hf_checkpoints import hf_logits, load_hf_model
    from optimized.model import Qwen35Model as OptModel

    _, plain, gated = _ungated_pair(tmp_path)
    tokens = list(range(5, 45))
    hf = hf_logits(load_hf_model(gated), tokens)
    ref = Qwen35Model.from_pretrained(plain, dtype=np.float32).logits([tokens])[0]
    opt = OptModel.from_pretrained(plain, dtype=torch.float32).logits([tokens])[0].double().cpu().numpy()
    assert _rel_rms(ref, hf) <= 1e-4, _rel_rms(ref, hf)
    assert _rel_rms(opt, hf) <= 1e-4, _rel_rms(opt, hf)


def test_optimized_model_loads_an_ungated_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from optimized.model import Qwen35Model as OptModel

    _, plain, _ = _ungated_pair(tmp_path)
    tokens = list(range(3, 20))
    ref = Qwen35Model.from_pretrained(plain).logits([tokens])[0]
    opt = OptModel.from_pretrained(plain, dtype=torch.float32).logits([tokens])[0].double().cpu().numpy()
    assert _rel_rms(opt, ref) <= 1e-4


# ------------------------------------------------------------------------------------------------ loader: values
@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("strict") / "dense", seed=2)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _poke(d, name, value, *, bf16=False):
    """Rewrite checkpoint `d` with element [0, ...] of tensor `name` set to `value`."""
    tensors = {k: np.array(v) for k, v in load_state_dict(d)[0].items()}
    tensors[name].reshape(-1)[0] = value
    write_safetensors(d / "model.safetensors", tensors, bf16=bf16)


@pytest.mark.parametrize("value, bf16", [(np.nan, False), (np.inf, False), (-np.inf, False), (np.nan, True)])
def test_nonfinite_weight_names_tensor_and_file(dense, tmp_path, value, bf16):
    d = _copy(dense, tmp_path / "nan")
    _poke(d, "model.layers.1.linear_attn.in_proj_qkv.weight", value, bf16=bf16)
    for load in (lambda: load_weights(d), lambda: Qwen35Model.from_pretrained(d)):
        with pytest.raises(CheckpointError) as e:
            load()
        msg = str(e.value)
        assert "model.layers.1.linear_attn.in_proj_qkv.weight" in msg and "model.safetensors" in msg
        assert "1 of its" in msg and "allow_nonfinite=True" in msg
    w = load_weights(d, allow_nonfinite=True)
    assert not np.isfinite(w.layers[1].mixer.in_proj_qkv).all()
    Qwen35Model.from_pretrained(d, allow_nonfinite=True)


def test_nonfinite_in_optimized_from_pretrained(dense, tmp_path):
    torch = pytest.importorskip("torch")
    from optimized.model import Qwen35Model as OptModel

    d = _copy(dense, tmp_path / "nan")
    _poke(d, "model.norm.weight", np.nan)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        OptModel.from_pretrained(d, dtype=torch.float32)
    OptModel.from_pretrained(d, dtype=torch.float32, allow_nonfinite=True)


def test_float16_overflow_is_reported(dense, tmp_path):
    d = _copy(dense, tmp_path / "big")
    _poke(d, "model.embed_tokens.weight", 1e6)  # finite in float32, beyond float16's 65504
    load_weights(d, dtype=np.float32)
    with pytest.raises(CheckpointError, match="exceed the range of float16"):
        load_weights(d, dtype=np.float16)


# ------------------------------------------------------------------------------------------------ loader: files
def test_file_paths_and_empty_directories(dense, tmp_path):
    torch = pytest.importorskip("torch")
    from optimized.model import Qwen35Model as OptModel

    f = dense / "model.safetensors"
    for load in (lambda: load_weights(f), lambda: Qwen35Model.from_pretrained(f),
                 lambda: OptModel.from_pretrained(f, dtype=torch.float32)):
        with pytest.raises(CheckpointError, match="is a file; a checkpoint is loaded from the directory"):
            load()
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(dense / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_weights(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nowhere")


def _sharded(dense, d):
    """`dense` split over two shards plus an index; returns (directory, weight_map)."""
    tensors, _ = load_state_dict(dense)
    d.mkdir()
    shutil.copy(dense / "config.json", d / "config.json")
    names = sorted(tensors)
    wm = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        write_safetensors(d / fname, {k: np.array(tensors[k]) for k in part})
        wm.update(dict.fromkeys(part, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return d, wm


@pytest.mark.parametrize("index, message", [
    ("{not json", "not a readable JSON safetensors index"),
    ("[1, 2]", "must be a JSON object with a 'weight_map', got a JSON list"),
    ("{}", "'weight_map' must be a JSON object .* got nothing"),
    ('{"weight_map": [1]}', "'weight_map' must be a JSON object .* got list"),
    ('{"weight_map": {"model.norm.weight": 3}}', r"weight_map\['model.norm.weight'\] must be a shard file name"),
])
def test_malformed_index_names_the_file(dense, tmp_path, index, message):
    d, _ = _sharded(dense, tmp_path / "sh")
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=message) as e:
        load_weights(d)
    assert "model.safetensors.index.json" in str(e.value)


@pytest.mark.parametrize("shard", ["a\u0000.safetensors", "a\n.safetensors", "a\x7f.safetensors"])
def test_shard_names_with_control_characters_name_the_index(dense, tmp_path, shard):
    d, wm = _sharded(dense, tmp_path / "sh")
    first = [k for k, v in wm.items() if v == "model-00001-of-00002.safetensors"]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**wm, **dict.fromkeys(first, shard)}}))
    with pytest.raises(CheckpointError, match="control character") as e:
        load_weights(d)
    assert "model.safetensors.index.json" in str(e.value)


def test_shards_must_stay_in_the_directory(dense, tmp_path):
    d, wm = _sharded(dense, tmp_path / "sh")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(d / "model-00001-of-00002.safetensors", outside)
    first = [k for k, v in wm.items() if v == "model-00001-of-00002.safetensors"]
    for shard in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**wm, **dict.fromkeys(first,
                                                                                                        shard)}}))
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            load_weights(d)
    os.symlink(outside, d / "link.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**wm, **dict.fromkeys(
        first, "link.safetensors")}}))
    with pytest.raises(CheckpointError, match="a symlink out of it is refused"):
        load_weights(d)


def test_hub_cache_snapshot_symlinks_are_followed(dense, tmp_path):
    """The Hugging Face hub cache stores snapshots/<rev>/<file> as symlinks into ../../blobs: allowed."""
    blobs, snap = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(dense / name, blobs / f"blob-{name}")
        os.symlink(os.path.relpath(blobs / f"blob-{name}", snap), snap / name)
    load_weights(snap)


def test_tensor_in_two_shards_and_absent_shard(dense, tmp_path):
    d, wm = _sharded(dense, tmp_path / "sh")
    t, _ = load_state_dict(d)
    dup = next(k for k, v in sorted(wm.items()) if v.startswith("model-00001"))
    write_safetensors(d / "model-00002-of-00002.safetensors",
                      {**{k: np.array(t[k]) for k, v in wm.items() if v.startswith("model-00002")},
                       dup: np.array(t[dup])})
    with pytest.raises(CheckpointError, match=f"'{dup}' is stored twice: in .*model-00001.* and in .*model-00002"):
        load_weights(d)
    d, wm = _sharded(dense, tmp_path / "sh2")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**wm, "x": "model-9.safetensors"}}))
    with pytest.raises(CheckpointError, match="names shard 'model-9.safetensors', which is not a file"):
        load_weights(d)


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _set(field, value):
    def mutate(h):
        h[_first_tensor(h)][field] = value
        return h
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_set("shape", [-1, 4]), "has shape \\[-1, 4\\]; a shape is a list of non-negative integers"),
    (_set("shape", ["4"]), "has shape \\['4'\\]"),
    (_set("shape", [4.0]), "has shape \\[4.0\\]"),
    (_set("shape", [True]), "has shape \\[True\\]"),
    (_set("shape", 4), "has shape 4;"),
    (_set("shape", [3]), "needs 12 bytes, header gives offsets"),
    (_set("data_offsets", [8, 4]), "has data_offsets \\[8, 4\\]"),
    (_set("data_offsets", [-4, 0]), "has data_offsets \\[-4, 0\\]"),
    (_set("data_offsets", [0, "4"]), "has data_offsets"),
    (_set("data_offsets", [0, 4, 8]), "has data_offsets"),
    (_set("data_offsets", None), "has data_offsets None"),
    (_set("dtype", "F8_E4M3"), "unsupported dtype 'F8_E4M3'; accepted: F64, F32"),
    (_set("dtype", 5), "unsupported dtype 5"),
    (lambda h: {**h, _first_tensor(h): [1, 2]}, "malformed header entry for tensor"),
    (lambda h: {**h, "__metadata__": [1]}, "__metadata__ must be a JSON object"),
    (lambda h: [h], "a JSON list, expected an object"),
])
def test_bad_header_entries_name_file_and_tensor(dense, tmp_path, mutate, message):
    d = _copy(dense, tmp_path / "hdr")
    rewrite_header(d / "model.safetensors", mutate)
    with pytest.raises(CheckpointError, match=message) as e:
        load_weights(d)
    assert "model.safetensors" in str(e.value)


def test_overlapping_and_out_of_file_ranges(dense, tmp_path):
    d = _copy(dense, tmp_path / "ovl")
    f = d / "model.safetensors"
    header, data = read_header(f)
    names = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    (_, a), (_, b) = names[0], names[1]
    na = header[a]["data_offsets"][1] - header[a]["data_offsets"][0]
    nb = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    h2 = copy.deepcopy(header)
    h2[b]["data_offsets"] = [na - 4, na - 4 + nb]  # starts inside a's bytes
    write_header(f, h2, data)
    with pytest.raises(CheckpointError, match=f"tensors '{a}' .* and '{b}' .* overlap"):
        load_weights(d)
    h3 = copy.deepcopy(header)
    h3[b]["data_offsets"] = [len(data), len(data) + nb]
    write_header(f, h3, data)
    with pytest.raises(CheckpointError, match=f"truncated safetensors file: tensor '{b}' ends at byte"):
        load_weights(d)


@pytest.mark.parametrize("how", ["length_beyond_file", "not_json", "not_utf8", "deep_json"])
def test_bad_header_bytes(dense, tmp_path, how):
    d = _copy(dense, tmp_path / "raw")
    f = d / "model.safetensors"
    header, data = read_header(f)
    if how == "length_beyond_file":
        write_header(f, header, data, length=10**12)
        message = "header claims 1000000000000 bytes"
    else:
        body = {"not_json": b"{nope", "not_utf8": b"\xff\xfe\xfd", "deep_json": b"[" * 100_000}[how]
        f.write_bytes(len(body).to_bytes(8, "little") + body + data)
        message = "malformed safetensors header, not JSON"
    with pytest.raises(CheckpointError, match=message):
        load_weights(d)


def test_every_error_is_a_qwen35_error():
    """The families used above all derive from Qwen35Error (and ValueError, for callers that catch that)."""
    for cls in (ConfigError, CheckpointError, WeightLoadError):
        assert issubclass(cls, Qwen35Error) and issubclass(cls, ValueError)
