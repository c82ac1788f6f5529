"""qwen35 eval (qwen35.evaluation): every engine scores a trained tiny checkpoint alike (the float64 reference vs the
float32 training model within 1e-4 relative), bits per byte and the unigram baseline match a hand computation,
the table, JSON and plots come out, and the command's errors are one line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qwen35 import data as corpus_data
from qwen35.cli import main
from qwen35.evaluation import Score, evaluate_checkpoint, score_windows, target_nats, unigram_bits_per_byte
from qwen35.report import eval_table
from qwen35.training import SHAPES, TrainSettings, train

ENGINES_F32 = ("reference-f32", "optimized-f32", "causal-lm")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model after 4 updates (so its logits are not those of the initialisation)."""
    out = tmp_path_factory.mktemp("trained")
    settings = TrainSettings(steps=4, seq_len=32, batch_size=4, warmup=1, lr=1e-2, eval_bytes=256, eval_every=100)
    train(settings, SHAPES["tiny"], out, threads=1, progress=False, echo=None)
    return out


@pytest.fixture(scope="module")
def evaluated(checkpoint):
    return evaluate_checkpoint(checkpoint, engines=("reference-f64",) + ENGINES_F32 + ("optimized-bf16",),
                               seq_len=32, max_bytes=1024)


def test_every_engine_scores_the_same_windows_alike(evaluated):
    rows = {r["engine"]: r for r in evaluated["rows"]}
    ref = rows["reference-f64"]
    assert ref["bytes"] == evaluated["bytes"] >= 1024 and ref["targets"] == evaluated["targets"]
    assert math.isfinite(ref["loss"]) and 0 < ref["loss"] < math.log(260) + 1
    for name in ENGINES_F32:
        r = rows[name]
        assert (r["targets"], r["bytes"]) == (ref["targets"], ref["bytes"])
        assert abs(r["loss"] - ref["loss"]) <= 1e-4 * ref["loss"], name
        assert r["rel_diff_vs_reference_f64"] <= 1e-4
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["bits_per_byte"] == pytest.approx(r["nats"] / (r["bytes"] * math.log(2)))
    assert rows["optimized-bf16"]["rel_diff_vs_reference_f64"] <= 2e-2  # bf16 weights: looser, and not equal
    assert evaluated["bounded"] and evaluated["windows"] * 32 >= evaluated["targets"]
    assert evaluated["same_split_as_training"] is True and evaluated["trained_steps"] == 4


@pytest.mark.hf
def test_transformers_agrees(checkpoint, evaluated):
    pytest.importorskip("transformers")
    hf = evaluate_checkpoint(checkpoint, engines=("transformers",), seq_len=32, max_bytes=1024)["rows"][0]
    ref = next(r for r in evaluated["rows"] if r["engine"] == "reference-f64")
    assert abs(hf["loss"] - ref["loss"]) <= 1e-4 * ref["loss"]


def test_bits_per_byte_by_hand_on_two_bytes():
    # held-out text "ab": stream <eos> a b, one window reading [<eos>, a] and scoring [a, b]
    stream = corpus_data.token_stream([corpus_data.Document("d", "ab")], corpus_data.ByteTokenizer())
    windows = corpus_data.eval_windows(stream, 8)
    assert [(w.tolist(), t.tolist()) for w, t in windows] == [([256, 97], [97, 98])]
    logits = np.full((2, 260), -np.inf)
    logits[0, 97] = logits[0, 98] = 0.0  # p(a) = 1/2
    logits[1, :4] = 0.0  # four equally likely tokens, b not among them ...
    logits[1, 98] = 0.0  # ... five with it: p(b) = 1/5
    score = score_windows(lambda inputs: [logits], windows, corpus_data.token_bytes(None, 260))
    nats = math.log(2) + math.log(5)
    assert (score.targets, score.bytes) == (2, 2)
    assert score.nats == pytest.approx(nats)
    assert score.loss == pytest.approx(nats / 2) and score.perplexity == pytest.approx(math.sqrt(10))
    assert score.bits_per_byte == pytest.approx((1 + math.log2(5)) / 2)  # (1 bit + log2 5 bits) over 2 bytes
    # a separator target counts its nats and no byte
    s = Score()
    s.add(target_nats(np.zeros((1, 260)), [256]).sum(), 1, 0)
    s.add(target_nats(np.zeros((1, 260)), [97]).sum(), 1, 1)
    assert s.bits_per_byte == pytest.approx(2 * math.log2(260))


def test_unigram_baseline_by_hand():
    # train "aab": counts a 2, b 1, N 3; add-one over 256 bytes: p(a) = 3/259, p(b) = 2/259, p(c) = 1/259
    want = -(math.log2(3 / 259) + math.log2(2 / 259) + math.log2(1 / 259)) / 3
    assert unigram_bits_per_byte(b"aab", b"abc") == pytest.approx(want, rel=1e-12)
    assert unigram_bits_per_byte(b"", b"x") == pytest.approx(8.0)  # nothing seen: uniform over 256 bytes


def test_the_table_and_a_foreign_split(evaluated):
    table = eval_table(evaluated)
    assert "| reference-f64: reference (NumPy) | float64 |" in table
    assert "baseline: byte unigram" in table and "bounded by --max-bytes 1024" in table
    other = json.loads(json.dumps(evaluated))
    other["same_split_as_training"] = False
    other["training_data"]["held_out"]["sha256"] = "0" * 64
    assert "not the one the checkpoint was trained against" in eval_table(other)


def test_qwen35_eval_and_plot(checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from qwen35.plot import render_all

    results = tmp_path / "results"
    out = results / "eval.json"
    assert main(["eval", "--model", str(checkpoint), "--engines", "reference-f64,causal-lm", "--max-bytes", "300",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "causal-lm: Qwen35ForCausalLM" in printed and f"wrote {out}" in printed
    data = json.loads(out.read_text())
    assert data["kind"] == "eval" and data["seq_len"] == 32  # the training seq_len, read from train_log.json
    assert [r["engine"] for r in data["rows"]] == ["reference-f64", "causal-lm"]
    assert data["meta"]["python"] and data["data"]["held_out"]["sha256"]
    (results / "train_log.json").write_text((checkpoint / "train_log.json").read_text())
    written = render_all(results, tmp_path / "plots", ("png",), refresh_memory=False, log=lambda _m: None)
    assert {"eval.png", "train_loss.png"} <= {p.name for p in written}


@pytest.mark.parametrize("argv, needle", [
    (["--engines", "numpy"], "argument --engines: unknown 'numpy'"),
    (["--max-bytes", "-1"], "argument --max-bytes: expected an integer >= 0"),
    (["--seq-len", "0"], "argument --seq-len: expected an integer >= 1"),
    (["--model", "/nonexistent/ckpt"], "--model /nonexistent/ckpt: no such directory"),
    (["--seq-len", "1"], "--seq-len 1"),
])
def test_bad_arguments_are_one_line(capsys, tmp_path, argv, needle):
    assert main(["eval", "--out", str(tmp_path / "e.json"), "--no-progress", *argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen35 eval: error: ") and needle in lines[0], lines


def test_the_demo_needs_no_argument(tmp_path, capsys):
    assert main(["eval", "--engines", "reference-f32", "--max-bytes", "200", "--no-progress", "--out",
                 str(tmp_path / "e.json")]) == 0
    assert "checkpoint: bundled demo" in capsys.readouterr().out
    assert Path(tmp_path / "e.json").is_file()
