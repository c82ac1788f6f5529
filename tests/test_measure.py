"""qwen35.measure: the cost formulas against direct counts, the metrics, the input factory, the machine record and
JSON, and that the module imports with NumPy alone."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qwen35.measure import (
    decode_weight_bytes,
    error_metrics,
    gdn_chunk_flops,
    gdn_decode_bytes,
    gdn_inputs,
    linear_weights_per_token,
    load_json,
    machine_info,
    model_prefill_flops,
    rel_rms,
    write_json,
)
from reference.config import Qwen35Config
from reference.weights import expected_lm_shapes

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ FLOP counts
def _counted_unit_lower_inverse(A: np.ndarray) -> tuple[np.ndarray, int]:
    """(I + A)⁻¹ for a strictly lower triangular A by column-wise forward substitution, and the number of
    multiply-adds it performed (counted one by one, the way the loop runs)."""
    c = A.shape[0]
    X = np.eye(c)
    madds = 0
    for j in range(c):
        for i in range(j + 1, c):
            acc = 0.0
            for k in range(j, i):  # X[k, j] is 0 above the diagonal: only rows j..i-1 contribute
                acc += A[i, k] * X[k, j]
                madds += 1
            X[i, j] = -acc
    return X, madds


def _direct_chunk_count(T: int, H_v: int, K: int, V: int, C: int) -> int:
    """The chunked rule's FLOPs, summed over the matrix products of every chunk as (m, k, n) shapes, 2·m·k·n each,
    plus the multiply-adds of an actual forward-substitution inverse of that chunk's size."""
    total = 0
    rng = np.random.default_rng(0)
    for c0 in range(0, T, C):
        c = min(C, T - c0)
        products = [
            (c, K, c),      # k̂ k̂ᵀ  -> A
            (c, K, c),      # q̃ k̂ᵀ  -> Aqk
            (c, c, V + K),  # T·[βV | βγK̂]  -> [U | W]
            (c, K, V),      # W·S
            (c, K, V),      # (q̃ ⊙ γ)·S
            (c, c, V),      # Aqk·V_new
            (K, c, V),      # (K̂ ⊙ decay)ᵀ·V_new: the state update
        ]
        A = np.tril(0.1 * rng.standard_normal((c, c)), -1)
        inv, madds = _counted_unit_lower_inverse(A)
        np.testing.assert_allclose(inv @ (np.eye(c) + A), np.eye(c), atol=1e-12)  # it is the inverse
        total += sum(2 * m * k * n for m, k, n in products) + 2 * madds
    return H_v * total


@pytest.mark.parametrize("T, H_v, K, V, C", [(64, 1, 128, 128, 64), (128, 3, 32, 16, 64), (37, 2, 8, 24, 16),
                                             (100, 1, 16, 16, 32), (5, 4, 8, 8, 64)])
def test_chunked_prefill_flops_equal_a_direct_count(T, H_v, K, V, C):
    """Full chunks, a shorter tail chunk, and T < C: the formula is the sum of the products, inverse included."""
    assert gdn_chunk_flops(T, H_v, K, V, C) == _direct_chunk_count(T, H_v, K, V, C)


def test_chunked_prefill_flops_include_the_inverse_term():
    """Per token and head of a full chunk: 6CK + 4CV + 6KV + (C² − 1)/3, i.e. the C²/3 term on top of the products
    (at C = 64, K = V = 128: 180,224 + 1,365)."""
    C, K, V = 64, 128, 128
    per_token = gdn_chunk_flops(C, 1, K, V, C) / C
    assert per_token == 6 * C * K + 4 * C * V + 6 * K * V + (C * C - 1) / 3 == 181_589
    assert per_token - (6 * C * K + 4 * C * V + 6 * K * V) == pytest.approx(C * C / 3, abs=1)


def _active_weights(config) -> int:
    """Weight elements a token multiplies through, from reference.weights' shapes: every matrix but the embedding
    and the depthwise conv, the fused expert tensors scaled to the active experts."""
    n = 0
    for name, shape in expected_lm_shapes(config).items():
        if "embed_tokens" in name or "conv1d" in name or name == "lm_head.weight" or len(shape) == 1:
            continue
        if "mlp.experts." in name:
            n += int(np.prod(shape)) * config.num_experts_per_tok // config.num_experts
        elif len(shape) in (2, 3):
            n += int(np.prod(shape))
    return n


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_model_flops_and_decode_bytes_follow_the_checkpoint_shapes(kind):
    moe = {"model_type": "qwen3_5_moe_text", "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
           "shared_expert_intermediate_size": 40}
    cfg = Qwen35Config.tiny(**(moe if kind == "moe" else {}))
    assert cfg.is_moe == (kind == "moe")
    active = _active_weights(cfg)
    assert linear_weights_per_token(cfg) == active
    T = 70
    rule = cfg.num_linear_layers * gdn_chunk_flops(T, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                                   cfg.linear_value_head_dim)
    attn = cfg.num_full_layers * 2 * T * T * cfg.num_attention_heads * cfg.head_dim
    assert model_prefill_flops(cfg, T) == 2 * T * active + 2 * cfg.hidden_size * cfg.vocab_size + rule + attn
    assert decode_weight_bytes(cfg, 2) == 2 * (active + cfg.hidden_size * cfg.vocab_size)


def test_decode_bytes_are_mostly_the_state():
    B, H_k, H_v, D = 256, 16, 48, 128
    total = gdn_decode_bytes(B, H_k, H_v, D, D, 2)
    state = 2 * B * H_v * D * D * 4
    assert total - state == B * (2 * H_k * D + 2 * H_v * D) * 2 + 2 * B * H_v * 4
    assert state / total > 0.98


# ------------------------------------------------------------------------------------------------ metrics, inputs
def test_rel_rms_and_error_metrics():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((4, 9))
    noise = rng.standard_normal((4, 9))
    got = ref + 1e-3 * noise
    want = 1e-3 * np.sqrt(np.mean(noise ** 2)) / np.sqrt(np.mean(ref ** 2))
    assert rel_rms(ref, got) == pytest.approx(want, rel=1e-12)
    m = error_metrics(ref, got)
    assert m["rel_rms"] == pytest.approx(want, rel=1e-12) and m["finite"]
    assert m["nmse_db"] == pytest.approx(20 * np.log10(want))
    assert m["max_abs"] == pytest.approx(1e-3 * np.max(np.abs(noise)))
    assert rel_rms(np.zeros(3), np.full(3, 2.0)) == 2.0  # an all-zero reference: the absolute RMS error
    bad = error_metrics(ref, np.where(ref > 0, np.nan, ref))
    assert not bad["finite"] and bad["rel_rms"] == float("inf")
    with pytest.raises(ValueError, match="shape mismatch"):
        error_metrics(ref, ref[:2])


def test_rel_rms_reads_torch_tensors_including_bf16():
    torch = pytest.importorskip("torch")
    x = np.linspace(-3, 3, 64)
    assert rel_rms(x, torch.tensor(x)) == 0.0
    bf = torch.tensor(x, dtype=torch.bfloat16)
    assert 0 < rel_rms(x, bf) < 2.0 ** -8  # bf16 rounding, widened exactly


def test_gdn_inputs_draw_the_same_rule_inputs_with_or_without_h0():
    a = gdn_inputs(3, 2, 11, 1, 2, 4, 5)
    b = gdn_inputs(3, 2, 11, 1, 2, 4, 5, with_h0=False)
    assert b.h0 is None and a.h0.shape == (2, 2, 4, 5)
    for name in ("q", "k", "v", "g", "beta"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert list(a.as_dict()) == ["q", "k", "v", "g", "beta"]
    np.testing.assert_array_equal(a.as_dict()["g"], a.g)
    assert np.mean(a.g == 0.0) > 0  # some steps do not decay (mask_p)
    with pytest.raises(ValueError, match="beta_mode"):
        gdn_inputs(0, 1, 2, 1, 1, 2, 2, beta_mode="half")


# ------------------------------------------------------------------------------------------------ machine, JSON
def test_machine_info_and_json_round_trip(tmp_path):
    m = machine_info("cpu")
    assert m["device"] == "cpu" and m["device_name"].startswith("CPU: ") and m["numpy"] == np.__version__
    assert m["python"] and m["date_utc"].endswith("Z") and m["cpu_count"] >= 1
    data = {"meta": m, "x": np.float32(0.5), "n": np.int64(3), "a": np.arange(3), "p": tmp_path}
    path = write_json(data, tmp_path / "sub" / "r.json")
    assert path.read_text().endswith("\n")
    back = load_json(path)
    assert back["x"] == 0.5 and back["n"] == 3 and back["a"] == [0, 1, 2] and back["p"] == str(tmp_path)
    assert back["meta"] == json.loads(json.dumps(m))


def test_measure_imports_with_numpy_alone():
    """The core install has NumPy and safetensors only: qwen35.measure imports and works without torch, triton,
    matplotlib or transformers (a finder refuses them, as for packages that are not installed)."""
    script = textwrap.dedent("""
        import importlib.abc, json, sys
        BLOCKED = {"torch", "triton", "matplotlib", "transformers", "tqdm"}
        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Refuse())
        import qwen35.measure as M
        x = M.gdn_inputs(0, 1, 8, 1, 2, 4, 4)
        info = M.machine_info("cpu")
        print(json.dumps({"loaded": sorted(m for m in BLOCKED if m in sys.modules), "torch": info["torch"],
                          "triton": info["triton"], "rel": M.rel_rms(x.q, x.q),
                          "flops": M.gdn_chunk_flops(8, 2, 4, 4)}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d == {"loaded": [], "torch": None, "triton": None, "rel": 0.0, "flops": gdn_chunk_flops(8, 2, 4, 4)}


def test_gpu_bench_parses_its_arguments_in_main(monkeypatch):
    """scripts/gpu_bench.py can be imported (tests, tools) whatever sys.argv holds; main() parses."""
    pytest.importorskip("torch")
    monkeypatch.setattr(sys, "argv", ["pytest", "--not-an-option-of-gpu-bench"])
    spec = importlib.util.spec_from_file_location("_gpu_bench_for_args", ROOT / "scripts" / "gpu_bench.py")
    gb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gb)
    args = gb._parse(["--dry-run", "--out", "x.json", "--skip-fla"])
    assert args.dry_run and args.out_opt == "x.json" and args.skip_fla and not args.aot_check
    assert gb.gdn_chunk_flops is gdn_chunk_flops and gb.rel_rms is rel_rms  # the shared formulas and metric
