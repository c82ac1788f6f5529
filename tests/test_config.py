"""Qwen35Config: parsing, derived sizes, layer map, validation errors, round trips, HF-written configs."""
import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.config import (
    FULL,
    LINEAR,
    ConfigError,
    Qwen35Config,
    VisionConfig,
    default_mrope_section,
    derive_layer_types,
    preset_names,
)


# ---------------------------------------------------------------- layer map
@given(n=st.integers(1, 96), interval=st.integers(1, 8))
def test_layer_types_derivation(n, interval):
    lt = derive_layer_types(n, interval)
    assert len(lt) == n
    for i, t in enumerate(lt):
        assert (t == FULL) == ((i + 1) % interval == 0)


@given(types=st.lists(st.sampled_from([LINEAR, FULL]), min_size=1, max_size=64))
def test_kv_index_is_a_bijection_onto_full_layers(types):
    c = Qwen35Config.tiny(num_hidden_layers=len(types), layer_types=tuple(types))
    full = [i for i, t in enumerate(types) if t == FULL]
    lin = [i for i, t in enumerate(types) if t == LINEAR]
    assert [c.kv_cache_index(i) for i in full] == list(range(len(full)))
    assert [c.linear_layer_index(i) for i in lin] == list(range(len(lin)))
    assert c.num_full_layers + c.num_linear_layers == c.num_hidden_layers
    for i in lin:
        with pytest.raises(ValueError, match=f"layer {i} is a linear_attention layer"):
            c.kv_cache_index(i)
    for i in full:
        with pytest.raises(ValueError, match=f"layer {i} is a full_attention layer"):
            c.linear_layer_index(i)


def test_kv_index_out_of_range():
    c = Qwen35Config.tiny()
    with pytest.raises(IndexError, match="out of range"):
        c.kv_cache_index(4)


def test_published_pattern_27b():
    c = Qwen35Config.preset("27b")
    assert c.num_linear_layers == 48 and c.num_full_layers == 16
    assert c.full_layer_indices[:3] == (3, 7, 11)
    assert c.kv_cache_index(3) == 0 and c.kv_cache_index(63) == 15
    assert c.conv_dim == 10240 and c.key_dim == 2048 and c.value_dim == 6144
    assert c.rotary_dim == 64 and c.attention_scale == 1 / 16
    assert c.mrope_section == (11, 11, 10) and c.value_heads_per_key_head == 3


# ---------------------------------------------------------------- presets
EXPECTED_NV = {"0.8b": 16, "2b": 16, "4b": 32, "9b": 32, "27b": 48, "35b-a3b": 32, "122b-a10b": 64, "397b-a17b": 64}


@pytest.mark.parametrize("name", list(EXPECTED_NV))
def test_presets(name):
    assert name in preset_names()
    c = Qwen35Config.preset(name)
    assert c.linear_num_value_heads == EXPECTED_NV[name]
    assert c.head_dim == 256 and c.rotary_dim == 64 and c.rope_theta == 1e7 and c.vocab_size == 248320
    assert c.linear_key_head_dim == c.linear_value_head_dim == 128 and c.linear_conv_kernel_dim == 4
    assert c.num_full_layers * 4 == c.num_hidden_layers
    assert c.is_moe == ("-a" in name)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        Qwen35Config.preset("7b")


# ---------------------------------------------------------------- validation errors name the field
@pytest.mark.parametrize("overrides, field", [
    (dict(linear_num_value_heads=5), "linear_num_value_heads"),
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(partial_rotary_factor=0.3), "rotary dim"),
    (dict(mrope_section=(2, 2, 2)), "mrope_section"),
    (dict(mrope_section=(1, 1)), "mrope_section"),
    (dict(layer_types=("linear_attention",) * 3), "layer_types"),
    (dict(layer_types=("linear_attention", "linear_attention", "sliding", "full_attention")), "layer_types\\[2\\]"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(head_dim=-8), "head_dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(linear_conv_kernel_dim=0), "linear_conv_kernel_dim"),
    (dict(model_type="qwen3_next"), "model_type"),
    (dict(model_type="qwen3_5_moe_text", num_experts=0), "num_experts"),
    (dict(model_type="qwen3_5_moe_text", num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_validation_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        Qwen35Config.tiny(**overrides)


def test_multimodal_needs_vision_config():
    d = Qwen35Config.tiny(model_type="qwen3_5").to_hf_dict()
    d.pop("text_config")
    with pytest.raises(ConfigError, match="text_config"):
        Qwen35Config.from_hf_dict(d)


def test_vision_config_validation():
    with pytest.raises(ConfigError, match="vision_config.num_heads"):
        VisionConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="num_position_embeddings"):
        VisionConfig(num_position_embeddings=2300)


def test_max_seq_len_resolution():
    c = Qwen35Config.tiny(max_position_embeddings=1024)
    assert c.resolve_max_seq_len() == 1024
    assert c.resolve_max_seq_len(512) == 512
    with pytest.raises(ConfigError, match=r"max_length \(2048\) exceeds .* max_position_embeddings \(1024\)"):
        c.resolve_max_seq_len(2048)


def test_default_mrope_section_matches_hf_fallback():
    assert default_mrope_section(32) == (11, 11, 10)
    assert default_mrope_section(2) == (1, 1, 0)
    assert Qwen35Config.tiny(mrope_section=None, partial_rotary_factor=0.25).mrope_section == (1, 1, 0)


# ---------------------------------------------------------------- serialisation
@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe"])
def test_round_trip_through_config_json(tmp_path, model_type):
    c = Qwen35Config.tiny(model_type=model_type, tie_word_embeddings=True, eos_token_id=5)
    c.save_pretrained(tmp_path)
    back = Qwen35Config.from_pretrained(tmp_path)
    assert back == c
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type


def test_tie_word_embeddings_read_from_top_level():
    d = Qwen35Config.tiny(model_type="qwen3_5").to_hf_dict()
    d["text_config"]["tie_word_embeddings"] = True  # the sub-config's generic default must not win
    d["tie_word_embeddings"] = False
    assert Qwen35Config.from_hf_dict(d).tie_word_embeddings is False
    d["tie_word_embeddings"] = True
    assert Qwen35Config.from_hf_dict(d).tie_word_embeddings is True


def test_rope_theta_priority():
    d = Qwen35Config.tiny().to_hf_dict()
    d["rope_parameters"]["rope_theta"] = 5e6
    assert Qwen35Config.from_hf_dict(d).rope_theta == 5e6
    d["rope_theta"] = 7e6  # a top-level value wins (the priority order of MAX's Qwen3.5 config reader)
    assert Qwen35Config.from_hf_dict(d).rope_theta == 7e6


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen35Config.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen35Config.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------- configs written by transformers
TINY_HF = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=6,
               linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4)


def _check_against(c, hf_text, tie):
    assert list(c.layer_types) == list(hf_text.layer_types)
    assert c.hidden_size == hf_text.hidden_size and c.head_dim == hf_text.head_dim
    assert c.linear_num_value_heads == hf_text.linear_num_value_heads
    assert c.conv_dim == 2 * 2 * 8 + 6 * 12
    assert c.tie_word_embeddings is tie


@pytest.mark.hf
def test_transformers_text_config(tmp_path):
    from transformers import Qwen3_5TextConfig

    hf = Qwen3_5TextConfig(**TINY_HF, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    c = Qwen35Config.from_pretrained(tmp_path)
    assert c.model_type == "qwen3_5_text" and not c.is_multimodal
    _check_against(c, hf, False)
    assert c.rotary_dim == 4 and c.mrope_section == default_mrope_section(2)


@pytest.mark.hf
def test_transformers_multimodal_config(tmp_path):
    from transformers import Qwen3_5Config

    hf = Qwen3_5Config(text_config=dict(TINY_HF, layer_types=["linear_attention", "full_attention"] * 4),
                       vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                          out_hidden_size=32, patch_size=4, num_position_embeddings=16),
                       tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    c = Qwen35Config.from_pretrained(tmp_path)
    assert c.model_type == "qwen3_5" and c.is_multimodal
    _check_against(c, hf.text_config, True)
    assert c.layer_types[1] == FULL and c.num_full_layers == 4
    assert c.vision_config.depth == 2 and c.vision_config.patch_size == 4 and c.vision_config.out_hidden_size == 32
    assert c.image_token_id == hf.image_token_id and c.vision_start_token_id == hf.vision_start_token_id


@pytest.mark.hf
def test_transformers_moe_config(tmp_path):
    from transformers import Qwen3_5MoeConfig

    text = {k: v for k, v in TINY_HF.items() if k != "intermediate_size"}
    hf = Qwen3_5MoeConfig(text_config=dict(text, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=24),
                          vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                                             out_hidden_size=32, patch_size=4, num_position_embeddings=16))
    hf.save_pretrained(tmp_path)
    c = Qwen35Config.from_pretrained(tmp_path)
    assert c.model_type == "qwen3_5_moe" and c.is_moe
    _check_against(c, hf.text_config, False)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size) == \
        (4, 2, 16, 24)


@pytest.mark.hf
def test_our_config_json_loads_in_transformers(tmp_path):
    from transformers import AutoConfig

    for mt in ("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text"):
        c = Qwen35Config.tiny(model_type=mt)
        d = tmp_path / mt
        c.save_pretrained(d)
        hf = AutoConfig.from_pretrained(d)
        text = getattr(hf, "text_config", hf)
        assert list(text.layer_types) == list(c.layer_types)
        assert text.linear_num_value_heads == c.linear_num_value_heads
        assert Qwen35Config.from_hf_dict(hf.to_dict()) == c


def test_reference_imports_without_torch():
    code = ("import sys, reference, reference.config, reference.memory\n"
            "import pkgutil, importlib\n"
            "for m in pkgutil.iter_modules(reference.__path__): importlib.import_module('reference.' + m.name)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
