"""The memory model: hand-computed presets, the two batch rules, the budget table, the CLI."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.config import Qwen35Config
from reference.memory import (
    FALLBACK_MAX_BATCH,
    dtype_bytes,
    estimate_activation_memory,
    infer_optimal_batch_size,
    kv_bytes_per_token,
    memory_budget,
    parameter_counts,
    parse_bytes,
    state_bytes_per_request,
    weight_bytes,
)

MiB = 2**20


def test_27b_bf16_state_is_74_8_mib():
    c = Qwen35Config.preset("27b")
    # 48 linear layers x (10240 x 3 conv + 48 x 128 x 128 recurrent) x 2 bytes (MAX's 74.8 MiB)
    assert state_bytes_per_request(c, "bfloat16") == 48 * (10240 * 3 + 48 * 128 * 128) * 2 == 78_446_592
    assert round(78_446_592 / MiB, 1) == 74.8
    assert state_bytes_per_request(c, "float32") == 2 * 78_446_592  # "74.8 to 149.6 MiB"


def test_9b_and_35b_state():
    assert state_bytes_per_request(Qwen35Config.preset("9b")) == 24 * (8192 * 3 + 32 * 128 * 128) * 2 == 26_345_472
    assert round(state_bytes_per_request(Qwen35Config.preset("35b-a3b")) / MiB, 1) == 31.4


@pytest.mark.parametrize("name, kib", [("9b", 32), ("27b", 64), ("35b-a3b", 20)])
def test_kv_bytes_per_token(name, kib):
    assert kv_bytes_per_token(Qwen35Config.preset(name)) == kib * 1024


def test_conv_columns_k_or_k_minus_1():
    c = Qwen35Config.tiny()
    k_minus_1 = state_bytes_per_request(c, "float32")
    k = state_bytes_per_request(c, "float32", conv_columns=4)
    assert k - k_minus_1 == c.num_linear_layers * c.conv_dim * 4


def test_gather_scatter_rule_by_hand():
    c = Qwen35Config.preset("27b")
    free = 80 * 2**30
    per = 78_446_592
    assert infer_optimal_batch_size(c, free, "gather_scatter") == int(0.15 * free) // (3 * per) == 54
    assert infer_optimal_batch_size(c, free, "in_place") == int(0.15 * free) // per == 164
    assert infer_optimal_batch_size(c, None) == FALLBACK_MAX_BATCH == 32
    assert infer_optimal_batch_size(c, 0) == 32
    assert infer_optimal_batch_size(c, 1000) == 1  # at least 1


@given(free=st.integers(1, 2**42), rule=st.sampled_from(["gather_scatter", "in_place"]))
def test_activation_reservation_consistent_with_batch(free, rule):
    c = Qwen35Config.preset("9b")
    b = infer_optimal_batch_size(c, free, rule)
    reserved = estimate_activation_memory(c, free, rule=rule)
    copies = 3 if rule == "gather_scatter" else 1
    assert reserved == copies * b * state_bytes_per_request(c)
    if b > 1:  # within the 15 % budget, and one more request would exceed it
        assert reserved <= 0.15 * free
        assert reserved + copies * state_bytes_per_request(c) > int(0.15 * free)


def test_no_linear_layers_needs_no_state():
    c = Qwen35Config.tiny(layer_types=("full_attention",) * 4)
    assert state_bytes_per_request(c) == 0 and infer_optimal_batch_size(c, 10**12) == 0


def test_unknown_rule_and_dtype():
    c = Qwen35Config.tiny()
    with pytest.raises(ValueError, match="rule"):
        infer_optimal_batch_size(c, 10**9, rule="magic")
    with pytest.raises(ValueError, match="dtype"):
        dtype_bytes("float7")


def test_parameter_counts_by_hand():
    c = Qwen35Config.tiny()  # H=32, V=97, I=64, 3 linear + 1 full, conv_dim=2*16+32=64, value_dim=32
    p = parameter_counts(c)
    assert p["embed_tokens"] == p["lm_head"] == 97 * 32
    linear = 64 * 32 + 32 * 32 + 2 * 4 * 32 + 64 * 4 + 2 * 4 + 8 + 32 * 32
    full = 2 * 4 * 16 * 32 + 2 * 2 * 16 * 32 + 32 * 64 + 2 * 16
    assert p["linear_attention_layers"] == 3 * linear and p["full_attention_layers"] == full
    assert p["mlp"] == 4 * 3 * 64 * 32
    tied = parameter_counts(c.replace(tie_word_embeddings=True))
    assert tied["lm_head"] == 0
    n, n32 = sum(p.values()), 3 * (2 * 4 + 8)
    assert weight_bytes(c, "bfloat16") == (n - n32) * 2 + n32 * 4


def test_published_parameter_totals_are_plausible():
    # Sanity: the counts land near the names (text stack only; the vision tower adds ~0.4 B).
    assert 26.5e9 < sum(parameter_counts(Qwen35Config.preset("27b")).values()) < 27.5e9
    assert 34e9 < sum(parameter_counts(Qwen35Config.preset("35b-a3b")).values()) < 36e9


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("141GB") == 141 * 10**9
    assert parse_bytes("1024") == 1024
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


def test_budget_bound_by():
    c = Qwen35Config.preset("27b")
    short = memory_budget(c, parse_bytes("80GiB"), context_len=512)
    assert short.rules["gather_scatter"]["bound_by"] == "state"  # short contexts: the state binds (pitfall B20)
    long = memory_budget(c, parse_bytes("80GiB"), context_len=131072)
    assert long.rules["in_place"]["bound_by"] == "KV cache"
    tiny_mem = memory_budget(c, parse_bytes("16GiB"))
    assert tiny_mem.rules["in_place"]["max_batch"] == 0 and "weights" in tiny_mem.rules["in_place"]["bound_by"]


def test_memory_cli(capsys):
    from qwen35.cli import main

    assert main(["memory", "--preset", "27b", "--memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "78,446,592 B" in out and "74.8 MiB" in out and "gather_scatter" in out and "in_place" in out
    assert main(["memory", "--preset", "27b", "--memory", "80GiB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["state_bytes_per_request"] == 78_446_592 and d["kv_bytes_per_token"] == 65536


def test_info_cli(capsys):
    from qwen35.cli import main

    assert main(["info", "--preset", "9b"]) == 0
    out = capsys.readouterr().out
    assert "24 Gated DeltaNet + 8 gated full attention" in out and "KV index 7" in out
    assert main(["info", "--preset", "9b", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["kv_cache_index"] for r in d["layer_map"] if r["type"] == "full_attention"] == list(range(8))


def test_info_shows_rope_scaling_and_its_max_length(tmp_path, capsys):
    from qwen35.cli import main
    from reference.config import Qwen35Config

    cfg = Qwen35Config.tiny(max_position_embeddings=64,
                            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    cfg.save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "RoPE scaling: yarn" in out and "max sequence length 128" in out  # max(64, 4 x 32)
    assert main(["info", "--model", str(tmp_path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["full_attention"]
    assert d["rope_scaling"]["rope_type"] == "yarn" and d["rope_scaling"]["factor"] == 4.0 and d["max_seq_len"] == 128


def test_cli_error_is_clean(capsys):
    from qwen35.cli import main

    assert main(["memory", "--preset", "nonsense"]) == 2
    assert "unknown preset" in capsys.readouterr().err
