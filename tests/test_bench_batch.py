"""qwen35.bench_batch (`qwen35 bench --batch`): the floor arithmetic against a hand computation, the three engines
doing the same work (greedy tokens of a mixed-length batch equal to the float64 oracle's), the profile leaving the
engine as it was, and the --quick path end to end on a tiny config."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from qwen35 import bench_batch as bb  # noqa: E402
from qwen35.measure import model_prefill_flops  # noqa: E402
from reference.checkpoint import write_checkpoint  # noqa: E402
from reference.config import Qwen35Config  # noqa: E402

# Qwen35Config.tiny(): hidden 32, I 64, 4 layers L L L F, vocab 97; attention 4 heads of 16 (2 KV heads, gated q);
# Gated DeltaNet 2 key heads and 4 value heads of 8, conv kernel 4.
TINY = Qwen35Config.tiny()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bench_batch") / "ckpt", TINY, seed=3)


def test_decode_floor_by_hand():
    # weights a token multiplies through, by hand:
    #   GDN layer: in_proj_qkv (2·2·8 + 4·8 = 64 rows), z (32), b (4), a (4) of 32 columns; out_proj 32 × 32
    gdn = (64 + 32 + 4 + 4) * 32 + 32 * 32  # 4352
    #   attention: q + gate 2·4·16 = 128 rows, k and v 2·16 rows each, of 32 columns; o_proj 32 × 64
    att = 128 * 32 + 2 * 32 * 32 + 32 * 64  # 8192
    mlp = 3 * 64 * 32  # gate, up, down: 6144 per layer
    P = 3 * gdn + att + 4 * mlp  # 45,824
    head = 32 * 97  # the lm_head (tied), one row per token
    assert P == 45824
    state = 3 * (64 * 3 * 4 + 4 * 8 * 8 * 4)  # per request: conv [64, 3] + recurrent [4, 8, 8] fp32, 3 layers
    kv = 2 * 2 * 16 * 4  # K and V of 2 heads of 16, one full layer, fp32
    contexts = [10, 30]
    want_bytes = (P + head) * 4 + 2 * 2 * state + 40 * kv  # weights once, states read + written, K/V read
    assert want_bytes == 227456
    want_flops = 2 * 2 * (P + head) + 3 * 2 * 4 * (6 * 8 * 8 + 4 * 8 + 2 * 8) + 4 * 40 * 4 * 16
    assert want_flops == 216320

    by_bytes = bb.decode_floor(TINY, contexts, read_gbps=0.1, sgemm_gflops=1.0)
    assert by_bytes["bytes"] == {"weights": (P + head) * 4, "state": 4 * state, "kv": 40 * kv, "total": want_bytes}
    assert by_bytes["flops"] == want_flops
    assert by_bytes["bound"] == "bytes"
    assert by_bytes["step_s"] == pytest.approx(want_bytes / 0.1e9)
    assert by_bytes["tok_per_s"] == pytest.approx(2 / (want_bytes / 0.1e9))
    by_flops = bb.decode_floor(TINY, contexts, read_gbps=100.0, sgemm_gflops=0.01)
    assert by_flops["bound"] == "flops"
    assert by_flops["tok_per_s"] == pytest.approx(2 / (want_flops / 0.01e9))

    # bf16 weights: half the weight bytes; the conv state and K/V in bf16, the recurrent state still fp32
    b16 = bb.decode_floor(TINY, contexts, read_gbps=0.1, sgemm_gflops=1.0, weight_bytes=2)
    state16 = 3 * (64 * 3 * 2 + 4 * 8 * 8 * 4)
    assert b16["bytes"]["total"] == (P + head) * 2 + 4 * state16 + 40 * kv // 2


def test_prefill_floor_by_hand():
    # one prompt of 10 tokens: every projection for every token, the chunked rule (one chunk of c = 10 per value
    # head: 6·c²·K + 4·c²·V + 6·c·K·V + (c³ − c)/3), causal attention 2·T²·n_h·d_h, one logit row
    rule = 4 * (6 * 100 * 8 + 4 * 100 * 8 + 6 * 10 * 64 + (1000 - 10) // 3)
    t10 = 2 * 10 * 45824 + 3 * rule + 2 * 100 * 4 * 16 + 2 * 32 * 97
    assert t10 == 1081528 == model_prefill_flops(TINY, 10)
    fl = bb.prefill_floor(TINY, [10, 30], sgemm_gflops=2.0)
    assert fl["flops"] == t10 + model_prefill_flops(TINY, 30)
    assert fl["padded_flops"] == 2 * model_prefill_flops(TINY, 30)  # left-padded to the longest
    assert fl["tok_per_s"] == pytest.approx(40 / (fl["flops"] / 2e9))


def test_prompts_are_seeded_and_in_range():
    a = bb.make_prompts(TINY, 16, (16, 512), seed=0)
    assert a == bb.make_prompts(TINY, 16, (16, 512), seed=0)
    assert [len(p) for p in a] == bb.prompt_lengths(16, (16, 512), seed=0)
    assert all(16 <= len(p) <= 512 for p in a) and len({len(p) for p in a}) > 8  # mixed lengths
    assert all(0 <= t < TINY.vocab_size for p in a for t in p)
    assert bb.prompt_lengths(16, (16, 512), seed=1) != bb.prompt_lengths(16, (16, 512), seed=0)


def _oracle_tokens(path, prompts, n_new):
    """The simplest formulation: the float64 reference, each prompt alone, greedy."""
    from reference.model import Qwen35Model

    model = Qwen35Model.from_pretrained(path, max_batch_size=1, dtype=np.float64)
    return [model.generate([p], max_new_tokens=n_new)[0] for p in prompts]


@pytest.mark.parametrize("name", bb.MAIN)
def test_engines_produce_the_oracle_greedy_tokens(tiny_checkpoint, name):
    """Each benchmarked engine, on a mixed-length batch (per-token and chunked prefill, a chunk boundary, transformers'
    left padding), produces the float64 oracle's greedy tokens: the benchmark times equivalent work."""
    if name == "transformers":
        pytest.importorskip("transformers")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (5, 70, 33, 12)]  # 70: past a chunk of 64
    want = _oracle_tokens(tiny_checkpoint, prompts, 6)
    contenders, missing = bb.load_contenders(tiny_checkpoint, [name], max_batch_size=4)
    assert not missing
    c = contenders[name]
    c.prefill(prompts)
    c.decode(5)
    assert c.tokens == want
    c.prefill(prompts[::-1])  # a new batch starts from fresh state
    c.decode(5)
    assert c.tokens == want[::-1]


def test_profile_times_the_parts_and_restores_the_engine(tiny_checkpoint):
    import optimized.attention as oat
    import optimized.model as om

    before = [getattr(obj, attr) for obj, attr, _, _ in bb._profile_targets()]
    contenders, _ = bb.load_contenders(tiny_checkpoint, ["optimized"], max_batch_size=3)
    c = contenders["optimized"]
    c.prefill(bb.make_prompts(TINY, 3, (3, 40), seed=1))
    p = bb.profile_decode(c, 2, sgemm_gflops=50.0)
    assert [getattr(obj, attr) for obj, attr, _, _ in bb._profile_targets()] == before
    assert "append" in vars(oat.KVCache) and "execute" in vars(om.Qwen35Model)
    parts = p["parts_ms"]
    assert p["calls_per_step"]["GDN mixers"] == 3 and p["calls_per_step"]["MLPs"] == 4
    assert p["calls_per_step"]["attention mixer: per-request attention"] == 3  # one call per request
    assert p["calls_per_step"]["lm_head"] == 1
    inside = sum(parts[k] for k in ("GDN mixers", "attention mixer", "MLPs", "lm_head", "norms"))
    assert 0 < inside <= parts["execute"] <= p["step_ms"]
    assert p["dense_products"]["gflops"] > 0 and len(c.tokens[0]) == 3  # the profiled steps are real steps


def test_quick_run_end_to_end(tmp_path, monkeypatch, capsys):
    """`qwen35 bench --batch --quick --out FILE` on a tiny config: tables printed, a JSON with every part."""
    from qwen35.cli import main

    monkeypatch.setattr(bb, "bench_config", lambda: TINY)
    out = tmp_path / "batch.json"
    assert main(["bench", "--batch", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Decode, tokens/s" in printed and "goal" in printed
    res = json.loads(out.read_text())
    assert res["kind"] == "bench_batch" and res["quick"] is True
    assert res["sgemm"]["gflops"] > 0 and res["stream"]["read_gbps"] > 0
    assert len(res["machine"]["load_avg_at_start"]) == 3 and len(res["machine"]["load_avg_at_end"]) == 3
    engines = set(bb.MAIN) - set(res["missing"])
    assert {"optimized", "reference"} <= engines
    assert [r["B"] for r in res["by_batch"]] == list(bb.BatchSettings.quick().batch_sizes)
    for r in res["by_batch"]:
        assert len(r["prompt_lengths"]) == r["B"] and r["prompt_tokens"] == sum(r["prompt_lengths"])
        for k in engines | set(bb.BF16) - set(res["missing"]):
            assert r["decode"][k]["tok_per_s"] > 0 and r["prefill"][k]["tok_per_s"] > 0
            assert len(r["tokens"][k]) == r["B"]
        assert r["floor"]["decode"]["tok_per_s"] > 0 and r["floor"]["prefill"]["tok_per_s"] > 0
        assert r["decode_fraction_of_floor"] > 0
        if "transformers" in engines:
            hf = r["prefill"]["transformers"]
            assert hf["padded_tokens"] == r["B"] * max(r["prompt_lengths"])
            assert hf["computed_tok_per_s"] >= hf["useful_tok_per_s"] > 0
            assert r["decode_speedup_vs_hf"] > 0
    assert "decode_B1_fraction_of_floor" in res["goals"]
    assert {p["dtype"] for p in res["profile"]} == {"float32", "bfloat16"}
    if "transformers" in engines:
        assert all(0 < p["products_ms"] < p["step_ms"] for p in res["profile_transformers"])
    b16 = res["bf16"]
    assert [r["B"] for r in b16["decode"]] == list(bb.BatchSettings.quick().bf16_batch_sizes)
    assert all(r["time_ratio_f32_over_bf16"] > 0 and 1 < r["bytes_ratio_f32_over_bf16"] < 2 for r in b16["decode"])
    acc = b16["logits_accuracy"]["engines"]
    assert acc["optimized"]["rel_rms_vs_f64"] < 1e-4 < acc["optimized_bf16"]["rel_rms_vs_f64"] < 0.2
    bpb = b16["demo_eval"]["bits_per_byte"]
    assert 0 < bpb["optimized-f32"] < 8 and abs(bpb["optimized-bf16"] - bpb["optimized-f32"]) < 0.05
