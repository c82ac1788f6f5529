"""`qwen35 generate --tensor-parallel` launched by torchrun, its refusals without it, and scripts/bench_parallel.py.

Every command runs as a subprocess in its own session with a time limit; on a timeout the whole process group
(torchrun and its ranks) is killed and the test fails, so nothing here can hang the suite.  The children get one
BLAS / OpenMP thread each.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from optimized.parallel import free_port  # noqa: E402
from qwen35.measure import SINGLE_THREAD_ENV  # noqa: E402
from reference.model import Qwen35Model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "qwen35" / "demo"
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _env() -> dict:
    """This environment, one thread per BLAS, and none of a launcher's variables (so a plain run is not mistaken
    for a torchrun rank)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SINGLE_THREAD_ENV, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _run(args, timeout: float, *, program: str = sys.executable, env=None) -> subprocess.CompletedProcess:
    """Run `program args...` (default: this Python) from the repository root; on a timeout kill its whole process
    group and fail."""
    proc = subprocess.Popen([program, *args], cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish within {timeout} s\nstdout: {out[-2000:]}\nstderr: "
                    f"{err[-2000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _one_json_object(stdout: str) -> dict:
    """The single JSON object stdout must hold, with nothing but whitespace around it."""
    text = stdout.strip()
    obj, end = json.JSONDecoder().raw_decode(text)
    assert text[end:].strip() == "", f"more than one object printed: {text[end:][:300]!r}"
    return obj


def _user_error(r: subprocess.CompletedProcess) -> str:
    """A qwen35 user error: exit 2, one line on stderr, no traceback, nothing on stdout."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen35 generate: error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    return lines[0]


@needs_gloo
def test_torchrun_tensor_parallel_2_prints_one_object_with_the_single_process_tokens():
    n = 4
    r = _run(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(free_port()), "-m", "qwen35", "generate", "--tensor-parallel", "2",
              "--max-new-tokens", str(n), "--json"], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    tp = _one_json_object(r.stdout)  # only rank 0 prints
    assert tp["engine"] == "optimized" and tp["tensor_parallel"] == 2 and tp["data_parallel"] == 1
    assert tp["new_tokens"] == n and tp["model"] == "bundled demo"

    single = _run(["-m", "qwen35", "generate", "--engine", "optimized", "--max-new-tokens", str(n), "--json"],
                  timeout=120)
    assert single.returncode == 0, single.stderr
    one = _one_json_object(single.stdout)
    assert tp["prompt_ids"] == one["prompt_ids"]
    assert tp["new_ids"] == one["new_ids"]
    # and both are the float64 oracle's greedy tokens on the unsharded model
    oracle = Qwen35Model.from_pretrained(DEMO, dtype="float64").generate([tp["prompt_ids"]], max_new_tokens=n)[0]
    assert tp["new_ids"] == oracle


def test_tensor_parallel_without_torchrun_is_a_one_line_usage_error():
    line = _user_error(_run(["-m", "qwen35", "generate", "--tensor-parallel", "2", "--max-new-tokens", "2"],
                            timeout=60))
    assert "torchrun --nproc-per-node 2" in line


def test_data_parallel_without_torchrun_names_the_world_size():
    line = _user_error(_run(["-m", "qwen35", "generate", "--tensor-parallel", "2", "--data-parallel", "2"],
                            timeout=60))
    assert "torchrun --nproc-per-node 4" in line


def test_reference_engine_refuses_tensor_parallel():
    line = _user_error(_run(["-m", "qwen35", "generate", "--engine", "reference", "--tensor-parallel", "2"],
                            timeout=60))
    assert "--engine reference" in line and "optimized" in line


@needs_gloo
def test_bench_parallel_quick_writes_its_json(tmp_path):
    out = tmp_path / "bench_parallel.json"
    r = _run(["scripts/bench_parallel.py", "--quick", "--out", str(out)], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["kind"] == "bench_parallel" and res["quick"] is True
    assert res["machine"]["cpu_count"] and res["machine"]["load_avg_start"] is not None
    # the sharded run computes what the single process computes
    assert res["check"]["prefill_logits_rel_rms_tp2_vs_tp1"] < 1e-5
    assert res["check"]["decode_logits_rel_rms_tp2_vs_tp1"] < 1e-5
    fl = res["floor"]
    assert sum(fl["prefill_flops_per_rank_tp2"]) == fl["prefill_flops_tp1"]  # every counted FLOP is split
    rounds = res["settings"]["rounds"]
    for phase in ("prefill", "decode"):
        p = res[phase]
        assert p["tp1"]["tok_per_s"] > 0 and p["tp2"]["tok_per_s"] > 0
        assert p["speedup_tp2"] == pytest.approx(p["tp2"]["tok_per_s"] / p["tp1"]["tok_per_s"])
        assert all(c > 0 for c in p["tp2"]["comm_s_per_step_by_rank"])
        # 2 all-reduces per layer + the embedding's + the logits gather, per step
        assert p["tp2"]["comm_calls_per_step"] == [2 * 4 + 2] * 2
    for rank in res["raw"]:
        assert len(rank["tp2_prefill"]) == rounds + 1  # the warm-up round is recorded, and dropped by the medians
    assert set(res["goals"]) == {"prefill_speedup_tp2", "decode_speedup_tp2"}


@needs_gloo
def test_check_logits_under_torchrun_records_the_comparison_and_fails_on_other_tokens(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert _run(["scripts/bench_parallel.py", "--write-checkpoint", str(ckpt), "--quick"], timeout=60).returncode == 0
    a, b = tmp_path / "tp2.json", tmp_path / "one.json"
    a.write_text(json.dumps({"new_ids": [1, 2, 3]}))
    b.write_text(json.dumps({"new_ids": [1, 2, 4]}))  # tokens that differ: the check must fail
    out = tmp_path / "check.json"
    r = _run(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
              str(free_port()), "scripts/bench_parallel.py", "--check-logits", str(ckpt), "--generate-json", str(a),
              str(b), "--out", str(out)], timeout=180)
    assert r.returncode != 0, r.stdout
    rec = json.loads(out.read_text())
    assert rec["ok"] is False and rec["generate"]["new_ids_equal"] is False
    assert rec["backend"] == "gloo" and rec["world_size"] == 2 and rec["comm_calls"] > 0
    # the logits themselves agree: the sharded model, one process, and the float64 oracle
    assert max(rec["rel_rms_tp2_vs_one_device"]) < 1e-5
    assert max(rec["rel_rms_tp2_vs_float64_oracle"]) < 1e-5


@needs_gloo
@pytest.mark.slow
def test_gpu_check_dry_run_runs_the_tensor_parallel_step(tmp_path):
    pytest.importorskip("triton")  # scripts/gpu_check.sh looks for a Python with torch and triton
    out = tmp_path / "parallel.json"
    env = _env()
    env.update(PYTHON=sys.executable, GPU_CHECK_SKIP_TESTS="1", GPU_CHECK_SKIP_BENCH="1",
               GPU_CHECK_PARALLEL_OUT=str(out))
    proc = _run(["scripts/gpu_check.sh", "--dry-run", str(tmp_path / "bench.json")], timeout=300, program="bash",
                env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tensor parallel:      ok" in proc.stdout
    rec = json.loads(out.read_text())
    assert rec["ok"] is True and rec["device"] == "cpu" and rec["generate"]["new_ids_equal"] is True
    assert rec["generate"]["tp2"]["tensor_parallel"] == 2 and rec["generate"]["one_device"]["tensor_parallel"] == 1
