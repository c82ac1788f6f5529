"""reference.weights: loading HF checkpoint directories (pitfall B23 in docs/pitfalls.md).

Every case has its expected outcome: a load that gives exactly the tensors Hugging Face holds, or ONE
WeightLoadError listing every missing / unexpected / mis-shaped / non-float name (file-level problems:
CheckpointError naming the file; tests/test_strict_loading.py has the strict-loader rules).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hf_checkpoints import load_hf_model, make_hf_checkpoint
from reference.config import Qwen35Config
from reference.errors import CheckpointError
from reference.safetensors_io import (
    bf16_to_float32,
    float32_to_bf16,
    load_state_dict,
    read_safetensors,
    write_safetensors,
)
from reference.weights import WeightLoadError, load_weights


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {kind: make_hf_checkpoint(root / kind, kind=kind, seed=3)
            for kind in ("dense", "moe", "multimodal", "multimodal_moe")}


def _rewrite(src, dst, mutate, *, bf16=()):
    """Copy checkpoint `src` to `dst` with its tensors passed through `mutate(dict) -> dict`."""
    tensors, _ = load_state_dict(src)
    tensors = mutate(dict(tensors))
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    write_safetensors(dst / "model.safetensors", tensors, bf16=bf16)
    return dst


def _flat(w):
    """Every array of a ModelWeights as name -> array, for whole-model comparisons."""
    out = {"embed": w.embed_tokens, "norm": w.norm, "lm_head": w.lm_head}
    for i, layer in enumerate(w.layers):
        out[f"{i}.in"] = layer.input_layernorm
        out[f"{i}.post"] = layer.post_attention_layernorm
        for part in ("mixer", "mlp"):
            for k, v in vars(getattr(layer, part)).items():
                out[f"{i}.{part}.{k}"] = v
    return out


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("kind", ["dense", "moe", "multimodal", "multimodal_moe"])
def test_loads_exactly_what_hf_holds(ckpts, kind):
    """Each kind loads, and every LM tensor equals the HF model's parameter (conv squeezed, experts fused)."""
    w = load_weights(ckpts[kind])
    hf = {k: v.double().numpy() for k, v in load_hf_model(ckpts[kind]).state_dict().items()}
    pre = "model.language_model." if kind.startswith("multimodal") else "model."
    assert w.prefix == pre
    np.testing.assert_array_equal(w.embed_tokens, hf[pre + "embed_tokens.weight"])
    np.testing.assert_array_equal(w.lm_head, hf["lm_head.weight"])
    lin, full = w.layers[0], w.layers[3]
    assert lin.layer_type == "linear_attention" and full.layer_type == "full_attention"
    np.testing.assert_array_equal(lin.mixer.conv1d, hf[pre + "layers.0.linear_attn.conv1d.weight"][:, 0, :])
    np.testing.assert_array_equal(lin.mixer.A_log, hf[pre + "layers.0.linear_attn.A_log"])
    np.testing.assert_array_equal(full.mixer.q_proj, hf[pre + "layers.3.self_attn.q_proj.weight"])
    if "moe" in kind:
        np.testing.assert_array_equal(full.mlp.gate_up_proj, hf[pre + "layers.3.mlp.experts.gate_up_proj"])
        np.testing.assert_array_equal(full.mlp.down_proj, hf[pre + "layers.3.mlp.experts.down_proj"])
    else:
        np.testing.assert_array_equal(full.mlp.down_proj, hf[pre + "layers.3.mlp.down_proj.weight"])
    if kind.startswith("multimodal"):
        assert "patch_embed.proj.weight" in w.visual and "merger.linear_fc2.weight" in w.visual
        np.testing.assert_array_equal(w.visual["pos_embed.weight"], hf["model.visual.pos_embed.weight"])
    else:
        assert w.visual == {}


def test_both_prefixes_give_the_same_weights(ckpts, tmp_path):
    def to_vl(t):
        return {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
                for k, v in t.items()}
    vl = _rewrite(ckpts["dense"], tmp_path / "vl", to_vl)
    a, b = load_weights(ckpts["dense"]), load_weights(vl)
    assert (a.prefix, b.prefix) == ("model.", "model.language_model.")
    _assert_same(a, b)


def test_mtp_tensors_are_skipped(ckpts, tmp_path):
    d = _rewrite(ckpts["dense"], tmp_path / "mtp", lambda t: {**t, "mtp.fc.weight": np.ones((32, 64), np.float32),
                                                              "mtp.layers.0.mlp.gate_proj.weight": np.ones(3)})
    _assert_same(load_weights(ckpts["dense"]), load_weights(d))


def test_sharded_index_equals_single_file(ckpts, tmp_path):
    tensors, _ = load_state_dict(ckpts["moe"])
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(ckpts["moe"] / "config.json", d / "config.json")
    weight_map = {}
    for fname, keys in shards.items():
        write_safetensors(d / fname, {k: tensors[k] for k in keys})
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_same(load_weights(ckpts["moe"]), load_weights(d))
    # An index naming a tensor its shard lacks, and an index naming an absent shard: clear errors.
    weight_map["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightLoadError, match="does not hold"):
        load_weights(d)
    weight_map["model.layers.0.extra.weight"] = "model-00009-of-00009.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00009-of-00009.safetensors"):
        load_weights(d)


@pytest.mark.parametrize("cut", [4, 100, -7])
def test_truncated_file_is_a_clear_error(ckpts, tmp_path, cut):
    d = tmp_path / "trunc"
    shutil.copytree(ckpts["dense"], d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_weights(d)
    assert "model.safetensors" in str(e.value)


def test_missing_unexpected_misshaped_wrong_dtype_in_one_error(ckpts, tmp_path):
    def mutate(t):
        del t["model.layers.1.linear_attn.in_proj_z.weight"]  # missing
        del t["model.norm.weight"]  # missing
        t["model.layers.0.linear_attn.extra.weight"] = np.zeros(3, np.float32)  # unexpected
        t["visual.oops"] = np.zeros(2, np.float32)  # unexpected, outside every prefix
        t["model.layers.3.self_attn.q_proj.weight"] = np.zeros((64, 32), np.float32)  # q only, no gate rows
        t["model.layers.2.linear_attn.A_log"] = np.arange(4, dtype=np.int64)  # not floating point
        return t
    d = _rewrite(ckpts["dense"], tmp_path / "bad", mutate)
    with pytest.raises(WeightLoadError) as e:
        load_weights(d)
    err = e.value
    assert err.missing == ["model.layers.1.linear_attn.in_proj_z.weight", "model.norm.weight"]
    assert err.unexpected == ["model.layers.0.linear_attn.extra.weight", "visual.oops"]
    assert err.mis_shaped == [("model.layers.3.self_attn.q_proj.weight", (128, 32), (64, 32))]
    assert err.wrong_dtype == [("model.layers.2.linear_attn.A_log", "I64")]
    msg = str(err)
    for needle in ("missing (2)", "unexpected (2)", "mis-shaped (1)", "not floating point (1)", "in_proj_z"):
        assert needle in msg


def test_checkpoint_of_another_config_lists_every_difference(ckpts):
    """Loading a 4-layer checkpoint against an 8-layer config: the four absent layers are all reported."""
    config = Qwen35Config.from_pretrained(ckpts["dense"]).replace(num_hidden_layers=8, layer_types=None)
    with pytest.raises(WeightLoadError) as e:
        load_weights(ckpts["dense"], config=config)
    assert {n.split(".")[2] for n in e.value.missing} == {"4", "5", "6", "7"}
    assert e.value.unexpected == [] and e.value.mis_shaped == []


def test_conv1d_2d_and_3d_load_the_same(ckpts, tmp_path):
    def squeeze(t):
        return {k: (v[:, 0, :] if k.endswith("conv1d.weight") else v) for k, v in t.items()}
    d = _rewrite(ckpts["dense"], tmp_path / "conv2d", squeeze)
    assert read_safetensors(d / "model.safetensors")[0]["model.layers.0.linear_attn.conv1d.weight"].ndim == 2
    _assert_same(load_weights(ckpts["dense"]), load_weights(d))


def test_fused_and_per_expert_moe_names_load_the_same(ckpts, tmp_path):
    per_expert, _ = load_state_dict(ckpts["moe"])
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in per_expert)  # what transformers 5.x writes
    fused_w = load_weights(ckpts["moe"])

    def fuse(t):
        out = {k: v for k, v in t.items() if ".mlp.experts." not in k}
        for i, layer in enumerate(fused_w.layers):
            out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = layer.mlp.gate_up_proj.astype(np.float32)
            out[f"model.layers.{i}.mlp.experts.down_proj"] = layer.mlp.down_proj.astype(np.float32)
        return out
    d = _rewrite(ckpts["moe"], tmp_path / "fused", fuse)
    _assert_same(fused_w, load_weights(d))
    # A per-expert set with one expert missing names exactly that tensor.
    d2 = _rewrite(ckpts["moe"], tmp_path / "gap",
                  lambda t: {k: v for k, v in t.items() if k != "model.layers.2.mlp.experts.3.up_proj.weight"})
    with pytest.raises(WeightLoadError) as e:
        load_weights(d2)
    assert e.value.missing == ["model.layers.2.mlp.experts.3.up_proj.weight"]


def test_bf16_checkpoint_and_fp32_kept_parameters(tmp_path):
    import torch

    d = make_hf_checkpoint(tmp_path / "bf16", kind="dense", seed=5, dtype="bfloat16")
    _, dtypes = read_safetensors(d / "model.safetensors")
    assert set(dtypes.values()) == {"BF16"}
    hf = load_hf_model(d).state_dict()  # HF upcasts to float32 on load: bf16 values are exact in float32
    w = load_weights(d)
    np.testing.assert_array_equal(w.layers[0].mixer.in_proj_qkv, hf["model.layers.0.linear_attn.in_proj_qkv.weight"]
                                  .double().numpy())
    np.testing.assert_array_equal(w.layers[1].mixer.A_log, hf["model.layers.1.linear_attn.A_log"].double().numpy())
    # A half-precision load keeps A_log, dt_bias and the gated-norm weight in float32 (pitfall B23).
    w16 = load_weights(d, dtype=np.float16)
    assert w16.layers[0].mixer.in_proj_qkv.dtype == np.float16
    for name in ("A_log", "dt_bias", "norm"):
        assert getattr(w16.layers[0].mixer, name).dtype == np.float32, name
    assert w16.layers[0].input_layernorm.dtype == np.float16
    assert torch.bfloat16  # the file above was written by torch in bf16


def test_tied_embeddings(tmp_path):
    d = make_hf_checkpoint(tmp_path / "tied", kind="dense", seed=1, tie_word_embeddings=True)
    assert "lm_head.weight" not in read_safetensors(d / "model.safetensors")[0]
    w = load_weights(d)
    assert w.lm_head is w.embed_tokens


def test_no_checkpoint_files(tmp_path, ckpts):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(ckpts["dense"] / "config.json", d / "config.json")
    with pytest.raises(CheckpointError, match="holds no weights: no model.safetensors"):
        load_weights(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nowhere")


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64))
def test_bf16_rounding_matches_torch(values):
    import torch

    x = np.array(values, dtype=np.float32)
    ours = float32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(bf16_to_float32(ours), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


# ------------------------------------------------------------------------------------------ qwen35's own writer
@pytest.mark.parametrize("kind", ["dense", "multimodal_moe"])
def test_writer_output_loads_in_hf_and_reference(tmp_path, kind):
    from _tolerance import assert_close
    from hf_checkpoints import hf_logits, tiny_config
    from reference.checkpoint import write_checkpoint
    from reference.model import Qwen35Model

    d = write_checkpoint(tmp_path / kind, tiny_config(kind), seed=9)
    tokens = list(range(3, 40))
    assert_close(f"writer {kind}", hf_logits(load_hf_model(d), tokens),
                 Qwen35Model.from_pretrained(d).logits([tokens])[0], "f32_logits")


def test_writer_layouts_and_determinism(tmp_path):
    from hf_checkpoints import tiny_config
    from reference.checkpoint import write_checkpoint

    config = tiny_config("moe")
    a = write_checkpoint(tmp_path / "a", config, seed=4)
    b = write_checkpoint(tmp_path / "b", config, seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = write_checkpoint(tmp_path / "c", config, seed=4, moe_layout="per_expert", max_shard_bytes=20_000)
    assert len(list(c.glob("model-*.safetensors"))) > 1 and (c / "model.safetensors.index.json").exists()
    _assert_same(load_weights(a), load_weights(c))
    h = write_checkpoint(tmp_path / "h", config, seed=4, dtype="bfloat16")
    tensors, dtypes = read_safetensors(h / "model.safetensors")
    assert dtypes["model.layers.0.linear_attn.A_log"] == "F32" and dtypes["model.layers.0.linear_attn.norm.weight"] \
        == "F32" and dtypes["model.layers.0.linear_attn.in_proj_qkv.weight"] == "BF16"
    wa, wh = load_weights(a), load_weights(h)
    np.testing.assert_array_equal(wa.layers[0].mixer.A_log, wh.layers[0].mixer.A_log)  # fp32 kept exactly
    rel = np.abs(wa.layers[0].mixer.in_proj_qkv - wh.layers[0].mixer.in_proj_qkv) / np.abs(
        wa.layers[0].mixer.in_proj_qkv)
    assert 0 < rel.max() <= 2.0 ** -8  # bf16 rounding: at most half an ulp of an 8-bit mantissa
