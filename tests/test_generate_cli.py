"""`qwen35 generate`, the bundled demo checkpoint, the tokenizers and qwen35.generation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from hf_checkpoints import make_hf_checkpoint
from qwen35.cli import main
from qwen35.generation import generate_tokens
from qwen35.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from reference.config import FULL, LINEAR, Qwen35Config
from reference.model import Qwen35Model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "qwen35" / "demo"


def _run_json(capsys, *argv) -> dict:
    assert main(["generate", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_with_no_arguments_runs_the_demo(capsys):
    assert main(["generate"]) == 0
    out = capsys.readouterr().out
    assert "bundled demo" in out and "tokens/s" in out and "generated (32 tokens" in out
    assert "prompt (17 tokens): 'The for statement'" in out


def test_generate_as_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "qwen35", "generate", "--max-new-tokens", "4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout


def test_generate_matches_the_model_api(capsys):
    d = _run_json(capsys, "--prompt", "abc", "--max-new-tokens", "6", "--dtype", "float64")
    model = Qwen35Model.from_pretrained(DEMO)
    prompt = ByteTokenizer().encode("abc")
    assert d["prompt_ids"] == prompt
    assert d["new_ids"] == model.generate([prompt], max_new_tokens=6)[0]
    assert d["text"] == ByteTokenizer().decode(d["new_ids"])
    assert d["tokens_per_s"] > 0 and d["new_tokens"] == 6
    # sampling is reproducible by seed
    a = _run_json(capsys, "--temperature", "1.0", "--top-k", "50", "--seed", "7", "--max-new-tokens", "8")
    b = _run_json(capsys, "--temperature", "1.0", "--top-k", "50", "--seed", "7", "--max-new-tokens", "8")
    assert a["new_ids"] == b["new_ids"]


def test_generate_from_a_checkpoint_directory(tmp_path, capsys):
    d = make_hf_checkpoint(tmp_path / "moe", kind="moe", seed=2)
    out = _run_json(capsys, "--model", str(d), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "5",
                    "--dtype", "float64")
    expected = Qwen35Model.from_pretrained(d).generate([[1, 2, 3, 4]], max_new_tokens=5)[0]
    assert out["new_ids"] == expected and out["text"] is None
    # no tokenizer.json and a vocabulary too small for bytes: a clear error, exit status 2
    assert main(["generate", "--model", str(d)]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nowhere")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_stop_token_ends_generation():
    model = Qwen35Model.from_pretrained(DEMO, max_batch_size=1)
    prompt = ByteTokenizer().encode("stop here")
    free = generate_tokens(model, prompt, max_new_tokens=10)
    r = generate_tokens(model, prompt, max_new_tokens=10, stop_token_ids=[free.new_ids[3]])
    assert r.new_ids == free.new_ids[:4] and r.stopped_by == "stop token"
    assert model.active_requests == []  # released
    assert free.prefill_tokens_per_s > 0 and free.decode_tokens_per_s > 0


def test_make_demo_writes_a_random_sibling_with_the_demo_tokenizer(tmp_path):
    """scripts/make_demo.py writes a small random-weight L L L F checkpoint whose tokenizer files are the bundled
    demo's, byte for byte (the trained demo reads with the same byte tokenizer)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo.py"), "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (DEMO / f).read_bytes() == (tmp_path / "demo" / f).read_bytes(), f
    c = Qwen35Config.from_pretrained(tmp_path / "demo")
    assert c.layer_types == (LINEAR, LINEAR, LINEAR, FULL) and c.vocab_size == 260 and c.hidden_size == 64
    assert sum(p.stat().st_size for p in (tmp_path / "demo").iterdir()) < 1_000_000


def test_the_bundled_demo_is_a_small_trained_model():
    """The shipped demo: L L L F, the byte vocabulary, at most 8 MB, and trained: on the first held-out bytes of
    its corpus it scores far below the byte-unigram baseline (full numbers: docs/training.md)."""
    from qwen35.evaluation import evaluate_checkpoint

    c = Qwen35Config.from_pretrained(DEMO)
    assert c.layer_types == (LINEAR, LINEAR, LINEAR, FULL) and c.vocab_size == 260
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 8_000_000
    assert isinstance(load_tokenizer(DEMO), HFTokenizer)
    data = evaluate_checkpoint(DEMO, engines=("reference-f32",), max_bytes=2048)
    (row,) = data["rows"]
    assert row["bits_per_byte"] < 2.5 < data["baseline"]["bits_per_byte"] - 2, (row, data["baseline"])


@given(st.text(max_size=40))
def test_byte_tokenizer_round_trip_and_tokenizers_agree(text):
    byte, hf = ByteTokenizer(), load_tokenizer(DEMO)
    ids = byte.encode(text)
    assert byte.decode(ids) == text
    assert hf.encode(text) == ids
    assert hf.decode(ids) == text


def test_special_tokens():
    t = ByteTokenizer()
    assert t.encode("a<|endoftext|>") == [97, 256]
    assert t.eos_token_ids == [256] == load_tokenizer(DEMO).eos_token_ids
    assert t.decode([104, 105, 256], skip_special_tokens=True) == "hi"
    assert t.decode([0xE6, 0x97]) == "\ufffd"  # an incomplete UTF-8 sequence decodes to the replacement char
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_generate_with_the_optimized_engine(capsys):
    d = _run_json(capsys, "--engine", "optimized", "--max-new-tokens", "4")
    ref = Qwen35Model.from_pretrained(DEMO, dtype=np.float32).generate(
        [ByteTokenizer().encode("The for statement")], max_new_tokens=4)[0]
    assert d["new_ids"] == ref
