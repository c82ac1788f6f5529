"""The `qwen35` command's user errors: each is one line `qwen35 <command>: error: <message>` on stderr naming the flag
or the file, exit status 2, no traceback; a real bug still raises; QWEN35_DEBUG=1 re-raises a user error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen35.cli import main, one_line
from qwen35.commands._validate import UsageError
from reference.errors import Qwen35Error

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "qwen35" / "demo"


def _error(capsys, *argv) -> str:
    """Run `qwen35 argv` in-process; it must exit 2 with exactly one `qwen35 <cmd>: error:` line on stderr."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"qwen35 {argv[0]}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Copies of the bundled demo checkpoint, each broken in one way, plus a plain file and a missing path."""
    root = tmp_path_factory.mktemp("broken")

    def demo_copy(name):
        d = root / name
        shutil.copytree(DEMO, d)
        return d

    d = {"file": root / "plain_file", "missing": root / "missing"}
    d["file"].write_text("not a checkpoint\n")
    d["tok_not_json"] = demo_copy("tok_not_json")
    (d["tok_not_json"] / "tokenizer.json").write_text("{ this is not JSON")
    d["tok_rejected"] = demo_copy("tok_rejected")
    (d["tok_rejected"] / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    d["tok_dir"] = demo_copy("tok_dir")
    (d["tok_dir"] / "tokenizer.json").unlink()
    (d["tok_dir"] / "tokenizer.json").mkdir()
    d["tok_cfg"] = demo_copy("tok_cfg")
    (d["tok_cfg"] / "tokenizer_config.json").write_text(json.dumps({"eos_token": 7}))
    d["config_dir"] = demo_copy("config_dir")
    (d["config_dir"] / "config.json").unlink()
    (d["config_dir"] / "config.json").mkdir()
    d["truncated"] = demo_copy("truncated")
    blob = (DEMO / "model.safetensors").read_bytes()
    (d["truncated"] / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    d["mis_shaped"] = demo_copy("mis_shaped")
    cfg = json.loads((DEMO / "config.json").read_text())
    (d["mis_shaped"] / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=96)))
    d["nonfinite"] = demo_copy("nonfinite")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(DEMO / "model.safetensors")
    tensors["model.embed_tokens.weight"][200, 3] = float("nan")  # a row the prompt 1,2 never looks up
    save_file(tensors, d["nonfinite"] / "model.safetensors")
    d["unknown_arch"] = demo_copy("unknown_arch")
    (d["unknown_arch"] / "config.json").write_text(json.dumps(dict(cfg, architectures=["NoSuchModel"])))
    return d


# --- values refused by argparse (no model is loaded) -------------------------------------------------------------

BAD_VALUES = [
    (["generate", "--max-new-tokens", "-5"], "--max-new-tokens", ">= 1"),
    (["generate", "--max-new-tokens", "ten"], "--max-new-tokens", "integer"),
    (["generate", "--top-p", "0"], "--top-p", "(0, 1]"),
    (["generate", "--top-p", "1.5"], "--top-p", "(0, 1]"),
    (["generate", "--top-p", "nan"], "--top-p", "finite"),
    (["generate", "--temperature", "-1"], "--temperature", ">= 0"),
    (["generate", "--temperature", "nan"], "--temperature", "finite"),
    (["generate", "--temperature", "inf"], "--temperature", "finite"),
    (["generate", "--top-k", "0"], "--top-k", ">= 1"),
    (["generate", "--seed", "-1"], "--seed", ">= 0"),
    (["generate", "--prompt-ids", "1,x,3"], "--prompt-ids", "'x'"),
    (["generate", "--prompt-ids", "1,-2"], "--prompt-ids", "non-negative"),
    (["generate", "--prompt-ids", ","], "--prompt-ids", "1,2,3"),
    (["generate", "--dtype", "float16"], "--dtype", "float64"),
    (["generate", "--engine", "fast"], "--engine", "optimized"),
    (["generate", "--device", "tpu"], "--device", "cpu, cuda, cuda:N"),
    (["generate", "--prompt", "a", "--prompt-ids", "1"], "--prompt-ids", "not allowed"),
    (["memory", "--memory", "12XB"], "--memory", "GiB"),
    (["memory", "--memory", "0"], "--memory", "positive"),
    (["memory", "--context", "-1"], "--context", ">= 1"),
    (["memory", "--state-dtype", "float13"], "--state-dtype", "bfloat16"),
    (["memory", "--kv-dtype", "int4"], "--kv-dtype", "bfloat16"),
    (["memory", "--weight-dtype", ""], "--weight-dtype", "bfloat16"),
    (["compare", "--length", "0"], "--length", ">= 1"),
    (["compare", "--tolerance", "-1"], "--tolerance", "> 0"),
    (["compare", "--dtype", "float64"], "--dtype", "bfloat16"),
    (["compare", "--device", "gpu"], "--device", "cpu, cuda, cuda:N"),
    (["diverge", "--tolerance", "nan"], "--tolerance", "finite"),
    (["diverge", "--seed", "-2"], "--seed", ">= 0"),
    (["diverge", "--length", "-3"], "--length", ">= 1"),
    (["bench", "--parts", "gdn,foo"], "--parts", "gdn,decode,model"),
    (["bench", "--parts", ","], "--parts", "empty"),
    (["accuracy", "--lengths", "64", "0"], "--lengths", ">= 1"),
    (["accuracy", "--steps", "-3"], "--steps", ">= 1"),
    (["accuracy", "--seed", "-1"], "--seed", ">= 0"),
    (["accuracy", "--backend", "cuda"], "--backend", "triton"),
    (["plot", "--format", "gif"], "--format", "png"),
]


@pytest.mark.parametrize("argv,flag,accepted", BAD_VALUES, ids=[" ".join(a) for a, _, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_flag(capsys, argv, flag, accepted):
    line = _error(capsys, *argv)
    assert flag in line and accepted in line, line


def test_unknown_command(capsys):
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("qwen35: error: ") and "generate" in err, err


def _fake_cuda(monkeypatch, available: bool, count: int = 1):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)


@pytest.mark.parametrize("cmd", ["generate", "compare", "accuracy"])
def test_cuda_device_without_cuda(capsys, monkeypatch, cmd):
    _fake_cuda(monkeypatch, available=False)
    extra = ["--engine", "optimized"] if cmd == "generate" else []
    line = _error(capsys, cmd, *extra, "--device", "cuda")
    assert "--device" in line and "CUDA is not available" in line and "--device cpu" in line


def test_cuda_index_beyond_the_devices(capsys, monkeypatch):
    _fake_cuda(monkeypatch, available=True, count=1)
    line = _error(capsys, "generate", "--engine", "optimized", "--device", "cuda:3")
    assert "cuda:0..cuda:0" in line


def test_engine_arguments_that_would_be_ignored(capsys, monkeypatch):
    _fake_cuda(monkeypatch, available=True, count=1)
    assert "--engine optimized" in _error(capsys, "generate", "--device", "cuda")  # the reference is NumPy on CPU
    assert "float32" in _error(capsys, "generate", "--engine", "optimized", "--dtype", "float64")


def test_backend_choices_that_would_fall_back(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = _error(capsys, "accuracy", "--quick", "--backend", "triton", "--device", "cpu")
    assert "--backend triton" in line and "TRITON_INTERPRET=1" in line
    monkeypatch.setenv("QWEN35_BACKEND", "fastest")
    assert "$QWEN35_BACKEND='fastest'" in _error(capsys, "compare", "--no-hf")
    assert "auto, torch, triton" in _error(capsys, "generate", "--engine", "optimized")


def test_help_and_no_command_exit_zero(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--allow-nonfinite" in capsys.readouterr().out
    assert main([]) == 0
    assert "QWEN35_DEBUG" in capsys.readouterr().out


# --- paths: checkpoints, configs, tokenizers -------------------------------------------------------------------

def test_model_directory_problems(capsys, broken):
    for cmd in ("generate", "compare", "diverge"):
        line = _error(capsys, cmd, "--model", str(broken["missing"]))
        assert "--model" in line and "no such directory" in line and "config.json" in line
        line = _error(capsys, cmd, "--model", str(broken["file"]))
        assert "--model" in line and "not a directory" in line
        line = _error(capsys, cmd, "--model", str(broken["config_dir"]))
        assert "config.json is not a file" in line


def test_config_arguments_of_info_and_memory(capsys, broken):
    for cmd in ("info", "memory"):
        assert "no such file or directory" in _error(capsys, cmd, "--model", str(broken["missing"]))
        assert "config.json is not a file" in _error(capsys, cmd, "--model", str(broken["config_dir"]))
        assert "not valid JSON" in _error(capsys, cmd, "--model", str(broken["file"]))  # a file is read as config.json
        line = _error(capsys, cmd, "--preset", "nonexistent")
        assert "unknown preset 'nonexistent'" in line and "27b" in line


@pytest.mark.parametrize("case,words", [
    ("tok_not_json", "not valid JSON"),
    ("tok_rejected", "tokenizers library"),
    ("tok_dir", "cannot be read"),
    ("tok_cfg", "eos_token"),
])
def test_malformed_tokenizer_files(capsys, broken, case, words):
    line = _error(capsys, "generate", "--model", str(broken[case]), "--max-new-tokens", "1")
    assert words in line and str(broken[case]) in line, line


def test_compare_with_a_malformed_tokenizer(capsys, broken):
    line = _error(capsys, "compare", "--model", str(broken["tok_not_json"]), "--no-hf")
    assert "tokenizer.json" in line and "not valid JSON" in line


def test_token_ids_outside_the_vocabulary(capsys):
    line = _error(capsys, "generate", "--prompt-ids", "1,260,3,999")
    assert "--prompt-ids" in line and "260" in line and "0..259" in line and "1 more" in line
    assert "0..259" in _error(capsys, "compare", "--prompt-ids", "5,9999", "--no-hf")
    assert "0..259" in _error(capsys, "diverge", "--prompt-ids", "9999")


def test_empty_prompt(capsys):
    assert "the prompt is empty" in _error(capsys, "generate", "--prompt", "")


@pytest.mark.parametrize("engine", ["reference", "optimized"])
def test_truncated_safetensors(capsys, broken, engine):
    line = _error(capsys, "generate", "--model", str(broken["truncated"]), "--engine", engine,
                  "--prompt-ids", "1,2")
    assert "model.safetensors" in line and "truncated" in line


def test_multi_line_weight_error_is_one_line(capsys, broken):
    line = _error(capsys, "generate", "--model", str(broken["mis_shaped"]), "--prompt-ids", "1,2")
    assert "does not match" in line and "mis-shaped" in line and "mlp.gate_proj.weight" in line
    assert one_line("head:\n  a: 1\n  b: 2\n") == "head: a: 1; b: 2"
    assert one_line("x\ny") == "x; y" and one_line("single") == "single"


def test_nonfinite_checkpoint_is_refused_unless_allowed(capsys, broken):
    ckpt = str(broken["nonfinite"])
    for cmd, extra in (("generate", ["--max-new-tokens", "1"]), ("diverge", []), ("compare", ["--no-hf"])):
        line = _error(capsys, cmd, "--model", ckpt, "--prompt-ids", "1,2", *extra)
        assert "model.embed_tokens.weight" in line and "not finite" in line, line
    # the NaN sits in an embedding row the prompt does not use: with the flag, the one prefill step is clean
    assert main(["generate", "--json", "--model", ckpt, "--prompt-ids", "1,2", "--max-new-tokens", "1",
                 "--allow-nonfinite"]) == 0
    assert len(json.loads(capsys.readouterr().out)["new_ids"]) == 1
    assert main(["diverge", "--json", "--model", ckpt, "--prompt-ids", "1,2", "--allow-nonfinite"]) == 0
    assert json.loads(capsys.readouterr().out)["first_divergent"] is None  # the unused NaN row changes nothing


def test_compare_allow_nonfinite_reaches_the_loader_or_is_refused(capsys, broken):
    import inspect

    from qwen35.compare import compare_checkpoint

    argv = ["compare", "--model", str(broken["nonfinite"]), "--prompt-ids", "1,2", "--no-hf", "--dtype", "float32",
            "--allow-nonfinite"]
    if "allow_nonfinite" in inspect.signature(compare_checkpoint).parameters:
        assert main(argv) == 0
    else:
        assert "--allow-nonfinite" in _error(capsys, *argv)


def test_diverge_unknown_architecture(capsys, broken):
    line = _error(capsys, "diverge", "--model", str(broken["unknown_arch"]), "--length", "3")
    assert "NoSuchModel" in line and "config.json" in line


# --- output paths ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["bench", "--quick", "--parts", "gdn"],
    ["accuracy", "--quick", "--no-progress"],
    ["compare", "--no-hf", "--dtype", "float32"],
])
def test_output_file_under_a_file_is_refused_before_the_run(capsys, tmp_path, argv):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = _error(capsys, *argv, "--out", str(blocker / "out.json"))
    assert "--out" in line and "is not a directory" in line
    line = _error(capsys, *argv, "--out", str(tmp_path))  # an existing directory where a file is wanted
    assert "--out" in line and "is not a file" in line


def test_plot_directories(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "--out" in _error(capsys, "plot", "--out", str(blocker), "--no-memory-refresh")
    assert "--results" in _error(capsys, "plot", "--results", str(blocker / "sub"))
    results = tmp_path / "results"
    results.mkdir()
    (results / "broken.json").write_text("{")
    line = _error(capsys, "plot", "--results", str(results), "--out", str(tmp_path / "plots"), "--no-memory-refresh")
    assert "broken.json" in line and "not valid JSON" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_directory(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "not writable" in _error(capsys, "bench", "--out", str(ro / "x.json"))
    finally:
        ro.chmod(0o700)


def test_bench_gpu_json_problems(capsys, tmp_path):
    assert "cannot read it" in _error(capsys, "bench", "--gpu-json", str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("nope")
    assert "not valid JSON" in _error(capsys, "bench", "--gpu-json", str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[1]")
    assert "JSON object" in _error(capsys, "bench", "--gpu-json", str(tmp_path / "list.json"))
    (tmp_path / "other.json").write_text('{"kind": "memory"}')
    assert "gpu_bench" in _error(capsys, "bench", "--gpu-json", str(tmp_path / "other.json"))


# --- what is not a user error, and QWEN35_DEBUG ------------------------------------------------------------------

def test_a_bug_keeps_its_traceback(monkeypatch):
    import qwen35.commands.info as info

    def broken_run(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(info, "run", broken_run)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["info"])


@pytest.mark.parametrize("exc,status,stderr", [(KeyboardInterrupt, 130, "qwen35 info: interrupted\n"),
                                               (BrokenPipeError, 0, "")])
def test_interrupt_and_closed_pipe(monkeypatch, capsys, exc, status, stderr):
    import qwen35.commands.info as info

    def stopped(args):
        raise exc()

    monkeypatch.setattr(info, "run", stopped)
    assert main(["info"]) == status
    assert capsys.readouterr().err == stderr


def test_debug_env_reraises_user_errors(monkeypatch, capsys, broken):
    monkeypatch.setenv("QWEN35_DEBUG", "1")
    with pytest.raises(UsageError, match="--model") as e:
        main(["generate", "--model", str(broken["missing"])])
    assert isinstance(e.value, Qwen35Error) and isinstance(e.value, ValueError)
    monkeypatch.setenv("QWEN35_DEBUG", "0")
    _error(capsys, "generate", "--model", str(broken["missing"]))


# --- as a real process ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,words", [
    (["generate", "--top-p", "0"], "--top-p"),
    (["generate", "--model", "{tok_not_json}", "--max-new-tokens", "1"], "tokenizer.json"),
])
def test_subprocess_stderr_is_one_line(broken, argv, words):
    argv = [a.format(tok_not_json=broken["tok_not_json"]) for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "QWEN35_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "qwen35", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("qwen35 generate: error: ") and words in r.stderr
