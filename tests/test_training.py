"""qwen35 train (qwen35.training, qwen35.data): the corpus split is fixed and documented, a few updates of a tiny
model lower the loss, a resumed run equals the straight one bit for bit, the checkpoint loads in both pipeline
engines, and the command's errors are one line."""
from __future__ import annotations

import itertools
import json
import math
import platform
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from qwen35 import data as corpus_data
from qwen35.cli import main
from qwen35.training import SHAPES, STATE_FILE, TrainSettings, lr_at, param_groups, train

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "training.md"
TINY = SHAPES["tiny"]
# a tiny run: 64-token windows, 4 per update, a short held-out evaluation
FAST = dict(seq_len=64, batch_size=4, warmup=2, eval_bytes=1024, eval_every=100, save_every=100, lr=1e-2)


def _run(out, steps=6, **kw):
    settings = TrainSettings(steps=steps, **{**FAST, **kw.pop("settings", {})})
    return train(settings, TINY, out, threads=1, progress=False, echo=None, **kw)


# ------------------------------------------------------------------------------------------------ the corpus
def test_the_default_split_is_fixed_by_name_and_documented():
    from pydoc_data.topics import topics

    a, b = corpus_data.load_corpus(), corpus_data.load_corpus()
    assert a == b
    names = sorted(topics)
    assert [d.name for d in a.held_out] == names[::10]
    assert [d.name for d in a.train] == [n for i, n in enumerate(names) if i % 10]
    info = a.info()
    total = sum(len(t.encode("utf-8")) for t in topics.values())
    assert info["train"]["bytes"] + info["held_out"]["bytes"] == total
    assert info["python"] == platform.python_version()
    assert info["held_out"]["documents"] == math.ceil(len(names) / 10)
    # docs/training.md records the sizes and sha256 for the CPython it was measured on; on that version they hold
    row = re.search(r"\| CPython (\S+) \| (\d+) \| ([\d,]+) \| `([0-9a-f]{64})` \| (\d+) \| ([\d,]+) \| "
                    r"`([0-9a-f]{64})` \|", DOC.read_text(encoding="utf-8"))
    assert row, "docs/training.md has no split table row"
    version, n_train, b_train, h_train, n_held, b_held, h_held = row.groups()
    if version == platform.python_version():
        assert (info["train"]["documents"], info["train"]["bytes"], info["train"]["sha256"]) == (
            int(n_train), int(b_train.replace(",", "")), h_train)
        assert (info["held_out"]["documents"], info["held_out"]["bytes"], info["held_out"]["sha256"]) == (
            int(n_held), int(b_held.replace(",", "")), h_held)


def test_a_folder_is_cut_into_blocks_of_lines_and_every_tenth_is_held_out(tmp_path):
    line = "x" * 99 + "\n"  # 100 bytes
    (tmp_path / "b.txt").write_text(line * 100)  # 10,000 bytes: blocks of 41 lines (4100 B), 41, 18
    (tmp_path / "a.txt").write_text("héllo\n" * 3)  # one short block, first in sorted order
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text(line * 41 * 8)  # 8 full blocks
    c = corpus_data.load_corpus(tmp_path)
    order = ["a.txt#0", "b.txt#0", "b.txt#1", "b.txt#2"] + [f"sub/c.txt#{i}" for i in range(8)]
    assert sorted(d.name for d in c.train + c.held_out) == sorted(order)
    assert [d.name for d in c.held_out] == [order[0], order[10]]
    assert [d.name for d in c.train] == [n for i, n in enumerate(order) if i % 10]
    assert all(len(d.text.encode()) >= corpus_data.BLOCK_BYTES for d in c.train if d.name != "b.txt#2")
    assert len(c.split_bytes("train")) + len(c.split_bytes("held_out")) == 10_000 + 3 * 7 + 41 * 8 * 100
    single = corpus_data.load_corpus(tmp_path / "b.txt")
    assert [d.name for d in single.held_out] == ["b.txt#0"]
    with pytest.raises(corpus_data.DataError, match="too little text"):
        corpus_data.load_corpus(tmp_path / "a.txt")
    with pytest.raises(corpus_data.DataError, match="no such file"):
        corpus_data.load_corpus(tmp_path / "missing")


def test_windows_and_streams():
    tok = corpus_data.ByteTokenizer()
    docs = [corpus_data.Document("a", "hi"), corpus_data.Document("b", "abc")]
    stream = corpus_data.token_stream(docs, tok)
    assert stream.tolist() == [256, 104, 105, 256, 97, 98, 99]
    windows = corpus_data.eval_windows(stream, 4)
    assert [(w.tolist(), t.tolist()) for w, t in windows] == [([256, 104, 105, 256], [104, 105, 256, 97]),
                                                              ([97, 98], [98, 99])]
    table = corpus_data.token_bytes(None, 260)
    assert sum(len(table[t]) for _, w in windows for t in w) == 5  # every byte of "hi" + "abc", no separator
    assert len(corpus_data.eval_windows(stream, 4, max_bytes=2, byte_table=table)) == 1
    s = corpus_data.WindowSampler(np.arange(100), seq_len=8, batch_size=3, seed=5)
    assert np.array_equal(s.batch(7), corpus_data.WindowSampler(np.arange(100), 8, 3, 5).batch(7))
    assert not np.array_equal(s.batch(7), s.batch(8))
    assert (np.diff(s.batch(7), axis=1) == 1).all()  # contiguous windows


def test_bpe_tokenizer_counts_every_byte():
    pytest.importorskip("tokenizers")
    c = corpus_data.load_corpus()
    spec = corpus_data.train_bpe(c.train_texts(), 300)
    tok = corpus_data.tokenizer_from_json(spec)
    assert tok.vocab_size == 300 and tok.eos_token_ids == [296]
    table = corpus_data.token_bytes(spec, tok.vocab_size)
    stream = corpus_data.token_stream(c.held_out, tok)
    assert sum(len(table[t]) for t in stream) == len(c.split_bytes("held_out"))
    assert corpus_data.train_bpe(c.train_texts(), 300) == spec  # deterministic
    with pytest.raises(corpus_data.DataError, match="at least 260"):
        corpus_data.train_bpe(["abc"], 100)


# ------------------------------------------------------------------------------------------------ the schedule
def test_warmup_then_cosine_to_the_floor():
    s = TrainSettings(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(1, s) == pytest.approx(1e-4) and lr_at(10, s) == pytest.approx(1e-3)
    after = [lr_at(k, s) for k in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(after))
    assert lr_at(100, s) == pytest.approx(1e-4)
    assert lr_at(55, s) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: the cosine's midpoint


def test_weight_decay_spares_norms_biases_and_the_decay_parameters():
    from optimized.causal_lm import Qwen35ForCausalLM

    model = Qwen35ForCausalLM(TINY.config(260, 256, 259), seed=0)
    decay, plain = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert plain["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert any(n.endswith("A_log") for n in plain_names) and any(n.endswith("dt_bias") for n in plain_names)
    assert all("norm" in n or n.endswith(("A_log", "dt_bias", "bias")) for n in plain_names)
    assert {names[id(p)] for p in decay["params"]} >= {"model.embed_tokens.weight", "lm_head.weight"}


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return _run(out, steps=6, settings={"eval_every": 3})


def test_a_few_updates_lower_the_loss(straight):
    losses = straight.losses
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-2:]) < losses[0] - 0.1
    evals = straight.log["eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert evals[-1]["bits_per_byte"] == pytest.approx(evals[-1]["loss"] * evals[-1]["targets"]
                                                       / (evals[-1]["bytes"] * math.log(2)))
    log = json.loads((straight.out_dir / "train_log.json").read_text())
    assert log["kind"] == "train_log" and log["step"] == 6 and len(log["train"]) == 6
    assert log["data"]["held_out"]["sha256"] == corpus_data.load_corpus().info()["held_out"]["sha256"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", STATE_FILE,
            "train_log.json"} <= {p.name for p in straight.out_dir.iterdir()}


def test_resume_continues_bit_for_bit(straight, tmp_path):
    first = _run(tmp_path, steps=6, stop_after=3, settings={"eval_every": 3})
    assert first.step == 3 and not first.finished
    second = train(None, None, tmp_path, resume=tmp_path, threads=1, progress=False, echo=None)
    assert second.finished and second.step == 6
    assert second.losses == straight.losses  # exact floats
    a, b = load_file(straight.out_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in second.log["eval"]] == [e["loss"] for e in straight.log["eval"]]


def test_ctrl_c_finishes_the_update_saves_it_and_resumes(straight, tmp_path, monkeypatch):
    import signal

    batch = corpus_data.WindowSampler.batch

    def interrupted_at_2(self, step):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # arrives in the middle of update 2
        return batch(self, step)

    monkeypatch.setattr(corpus_data.WindowSampler, "batch", interrupted_at_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, steps=6, settings={"eval_every": 3})
    monkeypatch.setattr(corpus_data.WindowSampler, "batch", batch)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["step"] == 2 and len(state["log"]["train"]) == 2  # update 2 finished, then saved
    resumed = train(None, None, tmp_path, resume=tmp_path, threads=1, progress=False, echo=None)
    assert resumed.losses == straight.losses


def test_the_checkpoint_loads_in_both_pipeline_engines(straight):
    from optimized.causal_lm import Qwen35ForCausalLM
    from optimized.model import Qwen35Model as OptimizedModel
    from qwen35.tokenizer import load_tokenizer
    from reference.model import Qwen35Model

    path = straight.out_dir
    ids = load_tokenizer(path).encode("The for statement")
    assert ids == list(b"The for statement")
    ref = Qwen35Model.from_pretrained(path, dtype=np.float64, max_batch_size=1).logits([ids])[0]
    opt = OptimizedModel.from_pretrained(path, max_batch_size=1).logits([ids])[0].numpy()
    with torch.no_grad():
        lm = Qwen35ForCausalLM.from_pretrained(path).eval()(torch.tensor([ids])).logits[0].numpy()
    assert ref.shape == (len(ids), 260)
    for got in (opt, lm):
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------------ the command
def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen35 train: error: ") and "Traceback" not in err, err
    return lines[0]


def test_qwen35_train_runs_and_resumes(tmp_path, capsys):
    out, log = tmp_path / "run", tmp_path / "log.json"
    common = ["--seq-len", "32", "--batch-size", "2", "--eval-bytes", "512", "--threads", "1", "--no-progress",
              "--log", str(log)]
    assert main(["train", "--out", str(out), "--shape", "tiny", "--steps", "4", "--stop-after", "2", *common]) == 0
    assert "stopped at step 2 of 4" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--steps", "4", *common]) == 0
    assert "finished step 4 of 4" in capsys.readouterr().out
    assert json.loads(log.read_text())["step"] == 4
    assert "already holds a training run" in _error(capsys, "train", "--out", str(out), "--shape", "tiny", *common)
    assert "has lr = 0.003" in _error(capsys, "train", "--resume", str(out), "--lr", "0.1", *common)


def test_qwen35_train_bpe(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from qwen35.tokenizer import load_tokenizer

    out = tmp_path / "bpe"
    assert main(["train", "--out", str(out), "--shape", "tiny", "--steps", "1", "--seq-len", "16", "--batch-size",
                 "2", "--eval-bytes", "256", "--tokenizer", "bpe", "--vocab-size", "300", "--no-progress",
                 "--no-log"]) == 0
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300
    assert load_tokenizer(out).vocab_size == 300


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--lr", "-1"], "argument --lr: expected a number > 0"),
    (["--min-lr-ratio", "2"], "argument --min-lr-ratio: expected a number in [0, 1]"),
    (["--weight-decay", "nan"], "argument --weight-decay: expected a finite number"),
    (["--tokenizer", "word"], "argument --tokenizer: invalid choice"),
    (["--shape", "huge"], "argument --shape: invalid choice"),
    (["--vocab-size", "500"], "--vocab-size: only a BPE has a vocabulary"),
    (["--tokenizer", "bpe", "--vocab-size", "100"], "at least 260"),
    (["--heads", "3", "--kv-heads", "2"], "is not a valid Qwen3.5 config"),
    (["--seq-len", "1"], "--seq-len 1"),
    (["--steps", "5", "--stop-after", "9"], "--stop-after 9"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: not a directory"),
    (["--data", "/nonexistent/corpus.txt", "--steps", "1"], "--data /nonexistent/corpus.txt: no such file"),
])
def test_bad_arguments_are_one_line(capsys, tmp_path, argv, needle):
    line = _error(capsys, "train", "--out", str(tmp_path / "o"), "--no-log", "--no-progress", *argv)
    assert needle in line, line
