"""The memory model per device under tensor and data parallelism, checked against the sharding plan.

The per-rank formulas of `reference.memory` are closed forms; here they are compared with what the plan of
`reference.parallel` gives tensor by tensor (`expected_lm_shapes` + `shard_index`, the fp32-kept rule of
`reference.weights`), with the bytes of real shards (`shard_weights` of random weights), and with the whole
model's sizes (tp = dp = 1 and the sums over ranks)."""
import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.checkpoint import random_state_dict
from reference.config import Qwen35Config, VisionConfig
from reference.errors import ConfigError
from reference.memory import (
    FALLBACK_MAX_BATCH,
    RULES,
    STATE_BUDGET_FRACTION,
    conv_state_shape,
    dtype_bytes,
    estimate_activation_memory,
    infer_optimal_batch_size,
    kv_bytes_per_token,
    memory_budget,
    parameter_counts,
    parse_bytes,
    rank_parameter_counts,
    recurrent_state_shape,
    replica_batch_size,
    replicated_weight_bytes,
    state_bytes_per_request,
    weight_bytes,
)
from reference.parallel import local_config, shard_index, shard_weights
from reference.weights import FP32_KEPT_SUFFIXES, expected_lm_shapes, expected_vision_shapes, weights_from_state_dict

LINEAR, FULL = "linear_attention", "full_attention"
MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_moe")


@st.composite
def tp_configs(draw):
    """(config, tp): a tiny dense / MoE / multimodal config, tied or not, whose heads and MLP divide tp, with a
    vocabulary that usually does not."""
    tp = draw(st.sampled_from([1, 2, 4]))
    model_type = draw(st.sampled_from(MODEL_TYPES))
    n_layers = draw(st.integers(1, 5))
    layer_types = tuple(draw(st.lists(st.sampled_from([LINEAR, FULL]), min_size=n_layers, max_size=n_layers)))
    nkv = draw(st.sampled_from([1, 2, 4, 8]))  # 1 and 2 below tp = 4: each KV head copied to tp/nkv ranks
    hk = draw(st.sampled_from([4, 8]))
    overrides = dict(
        model_type=model_type, num_hidden_layers=n_layers, layer_types=layer_types,
        vocab_size=draw(st.integers(94, 140)), tie_word_embeddings=draw(st.booleans()),
        num_key_value_heads=nkv, num_attention_heads=max(nkv, 4) * draw(st.sampled_from([1, 2])),
        attn_output_gate=draw(st.booleans()),
        linear_num_key_heads=hk, linear_num_value_heads=hk * draw(st.sampled_from([1, 2])),
        linear_key_head_dim=draw(st.sampled_from([4, 8])), linear_value_head_dim=draw(st.sampled_from([4, 8])),
        linear_conv_kernel_dim=draw(st.sampled_from([2, 4])), hidden_size=draw(st.sampled_from([16, 32])),
    )
    if "moe" in model_type:
        overrides.update(num_experts=draw(st.sampled_from([4, 8])), moe_intermediate_size=draw(st.integers(1, 12)),
                         shared_expert_intermediate_size=4 * draw(st.integers(1, 4)))
    else:
        overrides["intermediate_size"] = 4 * draw(st.integers(1, 16))
    if model_type in ("qwen3_5", "qwen3_5_moe"):  # the tower's output replaces token embeddings: width H
        overrides["vision_config"] = VisionConfig(depth=draw(st.integers(1, 2)), hidden_size=16, intermediate_size=32,
                                                  num_heads=2, patch_size=4, out_hidden_size=overrides["hidden_size"],
                                                  num_position_embeddings=16)
    return Qwen35Config.tiny(**overrides), tp


def plan_bytes(config, tp, rank, dtype):
    """Bytes rank `rank` holds, tensor by tensor from the plan: the shard of every LM tensor (shard_index; None =
    the whole tensor), the fp32-kept tensors in float32 or wider, and the vision tower whole."""
    b = dtype_bytes(dtype)
    total = 0
    for name, shape in expected_lm_shapes(config).items():
        n = math.prod(shape)
        spec = shard_index(config, name, tp, rank)
        if spec is not None:
            axis, idx = spec
            n = n // shape[axis] * len(idx)
        total += n * (max(b, 4) if name.endswith(FP32_KEPT_SUFFIXES) else b)
    return total + sum(math.prod(s) for s in expected_vision_shapes(config).values()) * b


def plan_replicated_bytes(config, dtype):
    """Bytes of the tensors the plan replicates (shard_index None) plus the vision tower."""
    b = dtype_bytes(dtype)
    lm = sum(math.prod(shape) * (max(b, 4) if name.endswith(FP32_KEPT_SUFFIXES) else b)
             for name, shape in expected_lm_shapes(config).items() if shard_index(config, name, 2, 0) is None)
    return lm + sum(math.prod(s) for s in expected_vision_shapes(config).values()) * b


# ---------------------------------------------------------------------- weights
@given(tp_configs(), st.sampled_from(["bfloat16", "float32", "float64", "fp8"]))
def test_rank_weight_bytes_are_the_plans_shards(case, dtype):
    config, tp = case
    per_rank = [weight_bytes(config, dtype, True, tensor_parallel=tp, rank=r) for r in range(tp)]
    assert per_rank == [plan_bytes(config, tp, r, dtype) for r in range(tp)]
    assert weight_bytes(config, dtype, True, tensor_parallel=tp) == max(per_rank)  # rank None: the largest
    # the ranks differ only by their vocabulary rows: at most one row of embed_tokens (and of an untied lm_head)
    row = config.hidden_size * dtype_bytes(dtype) * (1 if config.tie_word_embeddings else 2)
    assert max(per_rank) - min(per_rank) in ((0, row) if config.vocab_size % tp else (0,))


@given(tp_configs(), st.sampled_from(["bfloat16", "float32"]), st.booleans())
def test_sum_over_ranks_is_the_whole_model_plus_the_replicas(case, dtype, include_vision):
    config, tp = case
    whole = weight_bytes(config, dtype, include_vision)
    replicated = replicated_weight_bytes(config, dtype, include_vision)
    if include_vision:
        assert replicated == plan_replicated_bytes(config, dtype)
        assert whole == plan_bytes(config, 1, 0, dtype)  # tp = 1: every tensor whole
    total = sum(weight_bytes(config, dtype, include_vision, tp, r) for r in range(tp))
    nkv = config.num_key_value_heads
    copies = max(tp - nkv, 0) * config.num_full_layers * 2 * config.head_dim * config.hidden_size  # copied KV heads
    assert total == whole + (tp - 1) * replicated + copies * dtype_bytes(dtype)
    counts = [rank_parameter_counts(config, include_vision, tp, r) for r in range(tp)]
    assert rank_parameter_counts(config, include_vision) == parameter_counts(config, include_vision)
    for name, n in parameter_counts(config, include_vision).items():  # split parts add up, replicated ones repeat
        assert sum(c[name] for c in counts) >= n


@pytest.mark.parametrize("model_type, tie, vocab, tp", [("qwen3_5_text", False, 97, 2), ("qwen3_5_moe", True, 101, 4),
                                                       ("qwen3_5", False, 99, 4), ("qwen3_5_moe_text", False, 96, 2)])
def test_rank_weight_bytes_are_the_bytes_of_real_shards(model_type, tie, vocab, tp):
    """shard_weights of random weights loaded in float16 (A_log, dt_bias, the gated norm kept in float32): the
    language model's arrays on each rank take the bytes weight_bytes says; the vision tensors (which the loader
    keeps as stored) are on every rank whole."""
    config = Qwen35Config.tiny(model_type=model_type, tie_word_embeddings=tie, vocab_size=vocab,
                               num_key_value_heads=4, linear_num_key_heads=4, linear_num_value_heads=8)
    if "moe" in model_type:
        config = config.replace(num_experts=4, shared_expert_intermediate_size=8)
    whole = weights_from_state_dict(random_state_dict(config), config, dtype=np.float16)

    def lm_nbytes(w):
        arrays = [w.embed_tokens, w.norm]
        if w.lm_head is not w.embed_tokens:
            arrays.append(w.lm_head)
        for lw in w.layers:
            arrays += [lw.input_layernorm, lw.post_attention_layernorm]
            for part in (lw.mixer, lw.mlp):
                arrays += [getattr(part, f.name) for f in dataclasses.fields(part)]
        return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))

    assert lm_nbytes(whole) == weight_bytes(config, "float16", include_vision=False)
    for r in range(tp):
        shard = shard_weights(whole, tp, r)
        assert lm_nbytes(shard) == weight_bytes(config, "float16", False, tp, r)
        assert {k: a.size for k, a in shard.visual.items()} == {k: a.size for k, a in whole.visual.items()}
    assert sum(a.size for a in whole.visual.values()) == parameter_counts(config).get("vision", 0)


def test_rank_out_of_range_and_tp_that_does_not_divide():
    config = Qwen35Config.tiny()  # 2 KV heads, 2 key heads
    with pytest.raises(ConfigError, match="rank 2"):
        weight_bytes(config, "bfloat16", True, tensor_parallel=2, rank=2)
    with pytest.raises(ConfigError, match="num_attention_heads=4, num_key_value_heads=2"):
        weight_bytes(config, "bfloat16", True, tensor_parallel=3)
    with pytest.raises(ConfigError, match="linear_num_key_heads=2"):
        state_bytes_per_request(config, tensor_parallel=4)
    with pytest.raises(ConfigError, match="tensor_parallel must be a positive int"):
        kv_bytes_per_token(config, tensor_parallel=0)


# ---------------------------------------------------------------------- state and KV
@given(tp_configs(), st.sampled_from(["bfloat16", "float32"]), st.sampled_from([None, "bfloat16", "float32"]))
def test_state_and_kv_per_rank_are_those_of_the_local_geometry(case, dtype, conv_dtype):
    config, tp = case
    local = local_config(config, tp)
    per_rank = state_bytes_per_request(config, dtype, conv_dtype=conv_dtype, tensor_parallel=tp)
    assert per_rank == state_bytes_per_request(local, dtype, conv_dtype=conv_dtype)
    assert tp * per_rank == state_bytes_per_request(config, dtype, conv_dtype=conv_dtype)
    assert kv_bytes_per_token(config, dtype, tensor_parallel=tp) == kv_bytes_per_token(local, dtype)
    copies = max(tp // config.num_key_value_heads, 1)  # ranks holding each KV head
    assert tp * kv_bytes_per_token(config, dtype, tensor_parallel=tp) == copies * kv_bytes_per_token(config, dtype)
    if config.num_linear_layers:  # a rank's conv channels and value heads are those the plan gives it
        i = config.layer_types.index(LINEAR)
        for r in range(tp):
            _, channels = shard_index(config, f"layers.{i}.linear_attn.conv1d.weight", tp, r)
            _, heads = shard_index(config, f"layers.{i}.linear_attn.A_log", tp, r)
            assert conv_state_shape(config, tensor_parallel=tp)[0] == len(channels)
            assert recurrent_state_shape(config, tensor_parallel=tp)[0] == len(heads)


def test_27b_at_tp4_by_hand():
    c = Qwen35Config.preset("27b")
    # 48 linear layers x (10240/4 x 3 conv + 48/4 x 128 x 128 recurrent) x 2 bytes
    assert state_bytes_per_request(c, tensor_parallel=4) == 48 * (2560 * 3 + 12 * 128 * 128) * 2 == 78_446_592 // 4
    assert kv_bytes_per_token(c, tensor_parallel=4) == 16 * 2 * 1 * 256 * 2  # one of the 4 KV heads per rank


# ---------------------------------------------------------------------- batch sizes
@settings(max_examples=40)
@given(free=st.one_of(st.none(), st.integers(-1, 2**42)), rule=st.sampled_from(sorted(RULES)),
       tp=st.sampled_from([1, 2, 4]), dp=st.integers(1, 8), preset=st.sampled_from(["9b", "27b"]))
def test_batch_size_per_replica_and_over_replicas(free, rule, tp, dp, preset):
    c = Qwen35Config.preset(preset)
    per_rank = state_bytes_per_request(c) // tp
    copies = RULES[rule]
    if free is None or free <= 0:
        expected = FALLBACK_MAX_BATCH
    else:
        expected = max(1, int(STATE_BUDGET_FRACTION * free) // (copies * per_rank))
    assert replica_batch_size(c, free, rule, tensor_parallel=tp) == expected
    assert infer_optimal_batch_size(c, free, rule, tensor_parallel=tp, data_parallel=dp) == dp * expected
    assert estimate_activation_memory(c, free, rule=rule, tensor_parallel=tp) == copies * expected * per_rank


def test_tp_dp_1_are_todays_numbers():
    c = Qwen35Config.preset("27b")
    free, per = 80 * 2**30, 78_446_592
    for rule, copies in RULES.items():
        assert infer_optimal_batch_size(c, free, rule, tensor_parallel=1, data_parallel=1) == int(
            0.15 * free) // (copies * per) == infer_optimal_batch_size(c, free, rule)
    assert infer_optimal_batch_size(c, None, data_parallel=3) == 3 * FALLBACK_MAX_BATCH
    assert infer_optimal_batch_size(Qwen35Config.tiny(layer_types=(FULL,) * 4), 10**12, data_parallel=4) == 0
    with pytest.raises(ConfigError, match="data_parallel"):
        infer_optimal_batch_size(c, free, data_parallel=0)
    default = memory_budget(c, parse_bytes("80GiB")).as_dict()
    explicit = memory_budget(c, parse_bytes("80GiB"), tensor_parallel=1, data_parallel=1).as_dict()
    assert default == explicit
    assert default["weight_bytes"] == weight_bytes(c) and default["state_bytes_per_request"] == per
    assert default["total_weight_bytes"] == weight_bytes(c) and default["devices"] == 1
    assert all(r["total_max_batch"] == r["max_batch"] for r in default["rules"].values())


@given(tp_configs(), st.integers(1, 4), st.integers(2**16, 2**24), st.integers(1, 64))
def test_memory_budget_per_device_and_totals(case, dp, memory, context):
    config, tp = case
    b = memory_budget(config, memory, context, tensor_parallel=tp, data_parallel=dp)
    ranks = [weight_bytes(config, "bfloat16", True, tp, r) for r in range(tp)]
    assert b.weight_bytes == max(ranks) and b.free_bytes == memory - max(ranks)
    assert b.devices == tp * dp and b.total_memory_bytes == tp * dp * memory
    assert b.total_weight_bytes == dp * sum(ranks)
    assert b.state_bytes_per_request == state_bytes_per_request(local_config(config, tp))
    assert b.kv_bytes_per_token == kv_bytes_per_token(local_config(config, tp))
    for rule, r in b.rules.items():
        assert r["total_max_batch"] == dp * r["max_batch"]
        if b.free_bytes > 0:
            state_b = replica_batch_size(config, b.free_bytes, rule, tensor_parallel=tp)
            assert r["state_max_batch"] == state_b
            assert r["reserved_bytes"] == RULES[rule] * state_b * b.state_bytes_per_request
            if b.kv_bytes_per_request:  # what the reservation leaves holds KV of the rank's heads
                assert r["max_batch"] == max(0, min(state_b, (b.free_bytes - r["reserved_bytes"])
                                                    // b.kv_bytes_per_request))
        else:
            assert r["max_batch"] == 0


# ---------------------------------------------------------------------- the command
def test_memory_cli_per_device_and_total(capsys):
    from qwen35.cli import main

    c = Qwen35Config.preset("27b")
    assert main(["memory", "--preset", "27b", "--tensor-parallel", "4", "--data-parallel", "2",
                 "--memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "8 devices" in out and "Per device" in out and "Total" in out
    assert f"{78_446_592 // 4:,} B" in out  # one rank's state per request
    assert f"{weight_bytes(c, 'bfloat16', True, 4):,} B" in out  # one rank's weights
    assert f"{2 * sum(weight_bytes(c, 'bfloat16', True, 4, r) for r in range(4)):,} B" in out  # total weights
    assert f"{8 * 80 * 2**30:,} B" in out and "48 x [12, 128, 128]" in out and "1 of 4 KV heads" in out
    assert main(["memory", "--preset", "27b", "--tensor-parallel", "4", "--data-parallel", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    free = 80 * 2**30 - weight_bytes(c, "bfloat16", True, 4)
    per_replica = int(0.15 * free) // (3 * (78_446_592 // 4))
    assert d["rules"]["gather_scatter"]["state_max_batch"] == per_replica
    assert d["rules"]["gather_scatter"]["total_max_batch"] == 2 * d["rules"]["gather_scatter"]["max_batch"]
    assert d["devices"] == 8 and d["state_bytes_per_request"] == 78_446_592 // 4


def test_memory_cli_27b_at_tp8_copies_the_kv_heads(capsys):
    from qwen35.cli import main

    c = Qwen35Config.preset("27b")  # 4 KV heads, 24 query heads: at TP=8 each KV head is copied on 2 ranks
    assert main(["memory", "--preset", "27b", "--tensor-parallel", "8", "--data-parallel", "2",
                 "--memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "16 devices" in out and "1 of 4 KV heads, copied on 2 ranks" in out
    assert f"{78_446_592 // 8:,} B" in out  # one rank's state per request
    assert f"{weight_bytes(c, 'bfloat16', True, 8):,} B" in out
    assert kv_bytes_per_token(c, tensor_parallel=8) == kv_bytes_per_token(c, tensor_parallel=4)  # one head either way


@pytest.mark.parametrize("tp", ["3", "6"])
def test_memory_cli_refuses_a_tp_that_does_not_divide(capsys, tp):
    from qwen35.cli import main

    named = "num_key_value_heads=4, linear_num_key_heads=16, intermediate_size=17408"

    assert main(["memory", "--preset", "27b", "--tensor-parallel", tp, "--memory", "80GiB"]) == 2
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert captured.out == "" and "\n" not in line and "Traceback" not in line
    assert line.startswith("qwen35 memory: error: tensor_parallel=" + tp) and named in line


def test_memory_cli_refuses_a_non_positive_degree(capsys):
    from qwen35.cli import main

    assert main(["memory", "--data-parallel", "0"]) == 2
    assert "--data-parallel" in capsys.readouterr().err


def test_vision_tower_is_replicated():
    config = Qwen35Config.tiny(model_type="qwen3_5", num_key_value_heads=2,
                               vision_config=VisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                                                          patch_size=4, out_hidden_size=32,
                                                          num_position_embeddings=16))
    vision = parameter_counts(config)["vision"]
    assert vision == sum(math.prod(s) for s in expected_vision_shapes(config).values())
    for r in range(2):
        assert rank_parameter_counts(config, True, 2, r)["vision"] == vision
