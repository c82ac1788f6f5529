"""Tensor and data parallelism on torch.distributed (gloo, on this CPU): the parallel model equals the single-process
one, holds what the memory model predicts, and fails together.

Each test starts its own world of 2 or 4 processes on a free local port (`optimized.parallel.run_local_world`),
with a time limit on the whole run and on every collective, and tears it down.  The per-rank work is in
tests/_parallel_cases.py; one world checks several checkpoints, to pay the process start-up once.
"""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from optimized.parallel import run_local_world  # noqa: E402
from reference.checkpoint import write_checkpoint  # noqa: E402
from reference.config import Qwen35Config  # noqa: E402
from tests import _parallel_cases as cases  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

FP32 = 1e-5  # relative RMS error of the logits: the parallel run and the single process differ by fp32 rounding

# Head counts that 2 and 4 divide; vocab 97 divides by neither (uneven vocabulary blocks).
GEOMETRY = dict(num_attention_heads=8, num_key_value_heads=4, linear_num_key_heads=4, linear_num_value_heads=8)


def _checkpoint(tmp_path, name, **overrides):
    d = tmp_path / name
    write_checkpoint(d, Qwen35Config.tiny(**{**GEOMETRY, **overrides}), seed=len(name))
    return str(d)


def _assert_case(r, *, multimodal=False):
    tp, dp = r["layout"]
    assert r["logits_rel"] < FP32, r
    assert r["simulation_rel"] < FP32, r
    assert r["pipeline_rel"] < FP32 and r["pipeline_steps"] == 11, r
    assert r["generate_equal"] and r["active_after"] == [], r
    if multimodal:
        assert r["image_logits_rel"] < FP32 and r["image_generate_equal"], r
    # memory: resident weights within 2 % of reference.memory's per-rank prediction; pools and KV exactly
    assert abs(r["weight_bytes"] - r["weight_bytes_predicted"]) <= 0.02 * r["weight_bytes_predicted"], r
    assert r["pool_bytes"] == r["pool_bytes_predicted"], r
    assert r["kv_bytes_per_token"] == r["kv_bytes_per_token_predicted"], r
    if tp > 1:
        assert r["comm_seconds"] > 0 and r["comm_calls"] > 0, r


def test_tensor_parallel_2_dense_moe_multimodal(tmp_path):
    cs = [(_checkpoint(tmp_path, "dense"), False),
          (_checkpoint(tmp_path, "moe-tied", model_type="qwen3_5_moe_text", tie_word_embeddings=True), False),
          (_checkpoint(tmp_path, "mm", model_type="qwen3_5"), True)]
    results = run_local_world(cases.session, 2, cs, 2, 1, timeout_s=240)
    for rank_results in results:
        for r, (_, mm) in zip(rank_results, cs, strict=True):
            _assert_case(r, multimodal=mm)
    # the ranks hold different vocabulary blocks (97 rows: 48 and 49), so their weight bytes differ
    assert results[0][0]["weight_bytes"] != results[1][0]["weight_bytes"]


def test_tensor_parallel_4_and_2x2(tmp_path):
    cs = [(_checkpoint(tmp_path, "dense"), False), (_checkpoint(tmp_path, "moe", model_type="qwen3_5_moe_text"),
                                                    False),
          (_checkpoint(tmp_path, "kv-copied", num_key_value_heads=2), False)]  # TP=4: each KV head on 2 ranks
    for tp, dp in ((4, 1), (2, 2)):
        for rank_results in run_local_world(cases.session, 4, cs, tp, dp, timeout_s=240):
            for r in rank_results:
                _assert_case(r)


def test_data_parallel_2(tmp_path):
    cs = [(_checkpoint(tmp_path, "dense"), False)]
    for rank_results in run_local_world(cases.session, 2, cs, 1, 2, timeout_s=120):
        _assert_case(rank_results[0])


@pytest.mark.parametrize("what", ["prepare", "load", "args", "execute"])
def test_one_rank_raises_every_rank_raises(tmp_path, what):
    d = _checkpoint(tmp_path, "dense")
    results = run_local_world(cases.one_rank_fails, 2, d, what, timeout_s=120)
    expected = {"prepare": ["RequestError"] * 2, "load": ["ConfigError"] * 2, "args": ["RequestError"] * 2,
                # a foreign exception: the failing rank raises it, the others a RankError (a RuntimeError) naming it
                "execute": ["RankError", "RuntimeError"]}[what]
    assert [r["raised"] for r in results] == expected, results
    if what == "args":
        assert all("different arguments" in r["message"] for r in results), results
    elif what == "execute":
        assert "rank 1 raised RuntimeError: injected failure" in results[0]["message"], results
    else:
        assert "rank 1" in results[0]["message"], results  # the other rank names the rank that failed
    if what in ("args", "prepare"):
        assert results[0]["after"] == results[1]["after"] == ["x", "y"]  # nothing was left claimed
    if what == "execute":  # neither replica committed its half of the failed prefill; the rerun is right
        for r in results:
            assert r["lengths"][:2] == [0, 0] and r["rerun_rel"] < FP32, r


def test_sampling_without_a_seed_is_the_same_on_every_rank(tmp_path):
    a, b = run_local_world(cases.sample_without_seed, 2, _checkpoint(tmp_path, "dense"), timeout_s=120)
    assert a == b and len(a) == 2


def test_a_split_that_does_not_divide_is_refused_on_every_rank(tmp_path):
    d = _checkpoint(tmp_path, "odd", num_key_value_heads=3, num_attention_heads=6)
    with pytest.raises(RuntimeError, match=r"tensor_parallel=2 does not divide num_key_value_heads=3"):
        run_local_world(cases.check_checkpoint, 2, d, 2, 1, timeout_s=120)


def test_a_hung_rank_ends_in_time():
    with pytest.raises(RuntimeError, match="did not finish|rank 0 failed"):
        run_local_world(cases.hang_on_rank_1, 2, 60.0, timeout_s=8)
