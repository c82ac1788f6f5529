"""The pitfall list of docs/pitfalls.md (B1…B24) as a checked contract: the tests that were missing elsewhere.

docs/pitfalls.md maps every item to the test(s) that guard it; this file holds only the guards no other test file
carried.  Each test names its item.  Fast by design (the whole file runs in seconds under CI=true).

* B3  — Qwen3.5's four flat GDN projections: a Qwen3-Next grouped checkpoint (in_proj_qkvz / in_proj_ba) is
        rejected with an error naming both layouts; a NumPy tensor-parallel simulation (shard by head, run each
        rank, sum the row-parallel out_proj) reproduces the unsharded layer, and a naive row split does not.
* B4  — the optimized torch RMSNorm keeps a small-delta weight (|w| ~ 1e-3) under bf16 inputs; convention table.
* B7  — the accuracy / GPU-benchmark JSON writers record torch, Triton and machine versions.
* B18, B19(c) — optimized gated attention at positions 1e4–2.6e5 read from non-contiguous [3, T] slices.
* B20 — the optimized in-place pool allocates exactly the bytes its sizing function reports.
* B21 — which path ran is observable: prefill runs the chunked rule, decode the fused in-place update, and the
        backend choice is logged.
* B24 — the shared factory only makes physically valid gates, and no test in tests/ is shape-only (an AST check).
"""
from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.backend as OB
import optimized.model as OM
import optimized.norms as onorms
import reference.attention as ratt
from _tolerance import assert_close
from optimized import attention as oatt
from optimized.deltanet import RECURRENT_MAX_TOKENS
from qwen35.measure import gdn_inputs, rel_rms
from reference.checkpoint import random_state_dict
from reference.config import Qwen35Config
from reference.context import TextContext
from reference.deltanet import DeltaNetWeights, gated_deltanet
from reference.memory import state_bytes_per_request
from reference.weights import WeightLoadError, weights_from_state_dict

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------- B3
def _qwen3_next_state_dict(config):
    """A tiny checkpoint in Qwen3-Next's grouped layout: per key-head group [q_g | k_g | v_g | z_g] and [b_g | a_g]."""
    sd = random_state_dict(config, seed=3)
    H_k, D_k, D_v = config.linear_num_key_heads, config.linear_key_head_dim, config.linear_value_head_dim
    r = config.value_heads_per_key_head
    for name in [n for n in sd if n.endswith("linear_attn.in_proj_qkv.weight")]:
        base = name[: -len("in_proj_qkv.weight")]
        qkv, z = sd.pop(name), sd.pop(base + "in_proj_z.weight")
        b, a = sd.pop(base + "in_proj_b.weight"), sd.pop(base + "in_proj_a.weight")
        kd, H = H_k * D_k, qkv.shape[1]
        q, k, v = qkv[:kd].reshape(H_k, D_k, H), qkv[kd:2 * kd].reshape(H_k, D_k, H), qkv[2 * kd:]
        v, z = v.reshape(H_k, r * D_v, H), z.reshape(H_k, r * D_v, H)
        sd[base + "in_proj_qkvz.weight"] = np.concatenate([q, k, v, z], axis=1).reshape(-1, H)
        sd[base + "in_proj_ba.weight"] = np.concatenate([b.reshape(H_k, r, H), a.reshape(H_k, r, H)], 1).reshape(-1, H)
    return sd


def test_b3_qwen3_next_grouped_checkpoint_is_rejected_with_a_clear_error():
    config = Qwen35Config.tiny()
    sd = _qwen3_next_state_dict(config)
    with pytest.raises(WeightLoadError) as err:
        weights_from_state_dict(sd, config)
    e = err.value
    linear = [i for i, t in enumerate(config.layer_types) if t == "linear_attention"]
    for i in linear:
        for proj in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"):
            assert any(m.endswith(f"layers.{i}.linear_attn.{proj}.weight") for m in e.missing), (i, proj)
        for proj in ("in_proj_qkvz", "in_proj_ba"):
            assert any(u.endswith(f"layers.{i}.linear_attn.{proj}.weight") for u in e.unexpected), (i, proj)
    msg = str(e)
    assert "in_proj_qkvz" in msg and "in_proj_ba" in msg and "in_proj_qkv.weight" in msg and "missing" in msg


def _shard(w: DeltaNetWeights, config, ranks: int, i: int) -> DeltaNetWeights:
    """Rank i of a head-parallel split of Qwen3.5's flat layout: q, k, v blocks split *separately* by head."""
    H_k, H_v = config.linear_num_key_heads, config.linear_num_value_heads
    D_k, D_v = config.linear_key_head_dim, config.linear_value_head_dim
    kd = H_k * D_k
    hk, hv = H_k // ranks, H_v // ranks  # heads per rank (value head h reads key head h // r: groups stay whole)

    def rows(a, start, n, d):
        return a[start + i * n * d: start + (i + 1) * n * d]

    def qkv(a):  # in_proj_qkv rows and conv1d rows share the [Q | K | V] layout
        return np.concatenate([rows(a, 0, hk, D_k), rows(a, kd, hk, D_k), rows(a, 2 * kd, hv, D_v)])

    return DeltaNetWeights(
        in_proj_qkv=qkv(w.in_proj_qkv), in_proj_z=rows(w.in_proj_z, 0, hv, D_v),
        in_proj_b=rows(w.in_proj_b, 0, hv, 1), in_proj_a=rows(w.in_proj_a, 0, hv, 1), conv1d=qkv(w.conv1d),
        dt_bias=rows(w.dt_bias, 0, hv, 1), A_log=rows(w.A_log, 0, hv, 1), norm=w.norm.copy(),
        out_proj=w.out_proj[:, i * hv * D_v:(i + 1) * hv * D_v])  # row-parallel: columns by value head


def _recombine(shards, config):
    ranks = len(shards)
    H_k, D_k = config.linear_num_key_heads, config.linear_key_head_dim
    kd = H_k * D_k // ranks  # key rows per rank

    def qkv(parts):
        return np.concatenate([p[:kd] for p in parts] + [p[kd:2 * kd] for p in parts] + [p[2 * kd:] for p in parts])

    def cat(f):
        return np.concatenate([getattr(s, f) for s in shards])
    return DeltaNetWeights(in_proj_qkv=qkv([s.in_proj_qkv for s in shards]), in_proj_z=cat("in_proj_z"),
                           in_proj_b=cat("in_proj_b"), in_proj_a=cat("in_proj_a"),
                           conv1d=qkv([s.conv1d for s in shards]), dt_bias=cat("dt_bias"), A_log=cat("A_log"),
                           norm=shards[0].norm, out_proj=np.concatenate([s.out_proj for s in shards], axis=1))


@given(seed=st.integers(0, 2**16), ranks=st.sampled_from([1, 2, 4]), T=st.sampled_from([1, 5, 19]))
def test_b3_tensor_parallel_shard_by_head_round_trips_and_reproduces_the_layer(seed, ranks, T):
    config = Qwen35Config.tiny(linear_num_key_heads=4, linear_num_value_heads=8)  # r = 2, up to 4 ranks
    w = DeltaNetWeights.random(config, seed)
    shards = [_shard(w, config, ranks, i) for i in range(ranks)]
    back = _recombine(shards, config)
    for f in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "dt_bias", "A_log", "norm",
              "out_proj"):
        np.testing.assert_array_equal(getattr(back, f), getattr(w, f), err_msg=f)
    x = np.random.default_rng(seed).standard_normal((T, config.hidden_size))
    y, conv, state = gated_deltanet(x, w, config, chunk_size=16)
    rank_cfg = config.replace(linear_num_key_heads=4 // ranks, linear_num_value_heads=8 // ranks)
    outs = [gated_deltanet(x, s, rank_cfg, chunk_size=16) for s in shards]
    assert_close("sum of row-parallel outputs", y, sum(o[0] for o in outs), "f64_exact")
    assert_close("recurrent state by head", state, np.concatenate([o[2] for o in outs], axis=1), "f64_exact")
    if ranks > 1:  # the vLLM #36242 class of bug: one contiguous row split of in_proj_qkv scrambles q/k/v
        n = w.in_proj_qkv.shape[0] // ranks
        naive = [DeltaNetWeights(**{**s.__dict__, "in_proj_qkv": w.in_proj_qkv[i * n:(i + 1) * n],
                                    "conv1d": w.conv1d[i * n:(i + 1) * n]}) for i, s in enumerate(shards)]
        y_naive = sum(gated_deltanet(x, s, rank_cfg, chunk_size=16)[0] for s in naive)
        assert rel_rms(y, y_naive) > 1e-2


# ---------------------------------------------------------------------------------------------------------- B4
def _bf16_values(a) -> np.ndarray:
    return torch.tensor(np.asarray(a), dtype=torch.bfloat16).double().numpy()


def test_b4_optimized_convention_table_and_small_delta_weight_under_bf16():
    rng = np.random.default_rng(4)
    D = 64
    x64, z64 = rng.standard_normal((8, D)), rng.standard_normal((8, D))
    x, z = torch.tensor(x64), torch.tensor(z64)
    xhat = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6)
    # convention table at initialisation: zero-centred x̂·(1+w) with w = 0; gated plain x̂·w·silu(z) with w = 1
    assert_close("rms_norm at init (w = 0)", xhat, onorms.rms_norm(x, torch.zeros(D, dtype=torch.float64)), 1e-12)
    assert_close("gated_rms_norm at init (w = 1)", xhat * z64 / (1 + np.exp(-z64)),
                 onorms.gated_rms_norm(x, z, torch.ones(D, dtype=torch.float64)), 1e-12)
    # |w| ~ 1e-3 under bf16 activations: estimate each channel's scale from many rows (bf16 output rounding
    # averages out) and compare with 1 + w.  Forming 1 + w in bf16 rounds it to 1 (or 1 ± 2^-7) and fails.
    rows = 4096
    xb = torch.tensor(rng.standard_normal((rows, D)), dtype=torch.bfloat16)
    w = torch.tensor(_bf16_values(1e-3 * rng.standard_normal(D)), dtype=torch.float32)
    got = onorms.rms_norm(xb, w)
    assert got.dtype == torch.bfloat16
    xv = xb.double().numpy()
    xh = xv / np.sqrt(np.mean(xv ** 2, -1, keepdims=True) + 1e-6)
    ref = xh * (1.0 + w.double().numpy())
    assert_close("rms_norm bf16 vs fp64", ref, got, "bf16")
    g = got.double().numpy()
    scale = np.sum(g * xh, 0) / np.sum(xh * xh, 0)  # least-squares per-channel scale
    w64 = w.double().numpy()
    assert rel_rms(w64, scale - 1.0) < 0.1, "the small delta w was rounded away"


# ---------------------------------------------------------------------------------------------------------- B7
def test_b7_accuracy_and_gpu_bench_json_record_versions():
    import importlib.util

    triton = pytest.importorskip("triton")
    from qwen35.measure import machine_info

    meta = machine_info("cpu")
    assert meta["torch"] == torch.__version__ and meta["triton"] == triton.__version__
    assert meta["numpy"] == np.__version__ and meta["device_name"] and meta["date_utc"] and meta["python"]
    spec = importlib.util.spec_from_file_location("_gpu_bench_for_b7", TESTS.parent / "scripts" / "gpu_bench.py")
    gb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gb)
    m = gb._meta(torch.device("cpu"), "0.0-test")
    assert m["torch"] == torch.__version__ and m["triton"] == triton.__version__ and m["fla"] == "0.0-test"
    assert "cuda" in m and m["device"] == "cpu" and m["time_utc"]


# ---------------------------------------------------------------------------------------------------------- B18, B19
ROPE_CFG = dict(head_dim=256, partial_rotary_factor=0.25, mrope_section=(11, 11, 10), rope_theta=1e7)  # Qwen3.5's


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_b18_b19_optimized_attention_at_large_positions_from_strided_slices(dtype):
    """Positions 1e4–2.6e5 with t ≠ h ≠ w, read from a non-contiguous [3, T] slice of a [3, max_tokens] buffer
    (the CUDA-graph decode layout), through optimized.attention.gated_attention (R = 64 of D_h = 256, θ = 1e7).

    Both dtypes are compared with the float64 oracle on a packed copy of the positions.  A frequency computed over
    D_h instead of R, or a kernel reading only row 0 of the positions, is off by O(1) here."""
    cfg = Qwen35Config.tiny(**ROPE_CFG)
    rng = np.random.default_rng(18)
    w = ratt.AttentionWeights.random(cfg, 18)
    wt = oatt.TorchAttentionWeights.from_reference(w, dtype=dtype)
    T = 7
    x = rng.standard_normal((T, cfg.hidden_size))
    buf = torch.zeros((3, 64), dtype=torch.int64)
    for p0 in (10_000, 65_537, 262_000):
        base = p0 + np.arange(T)
        pos = np.stack([base, base - rng.integers(1, 50, T), base - rng.integers(50, 900, T)])  # t ≠ h ≠ w
        buf[:, 5:5 + 2 * T:2] = torch.tensor(pos)
        view = buf[:, 5:5 + 2 * T:2]
        assert not view.is_contiguous()
        y, _ = oatt.gated_attention(torch.tensor(x, dtype=dtype), wt, cfg, position_ids=view)
        y_ref, _ = ratt.gated_attention(x, w, cfg, position_ids=pos)
        # float64: rounding only.  float32: the angle p·f is formed in fp32 (as HF does), so its error grows like
        # p·2^-24 rad; measured 9e-6 … 2.6e-4 relative RMS here, the budget p·2^-26 leaves a margin of ~15×.
        budget = 1e-10 if dtype == torch.float64 else p0 * 2.0 ** -26
        assert_close(f"attention at p0={p0} ({dtype})", y_ref, y, budget)


# ---------------------------------------------------------------------------------------------------------- B20, B21
@pytest.fixture(scope="module")
def tiny_weights():
    config = Qwen35Config.tiny()
    return weights_from_state_dict(random_state_dict(config, seed=20), config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_b20_optimized_pool_allocates_exactly_what_the_sizing_reports(tiny_weights, dtype):
    """Σ nbytes of the in-place pools == max_batch_size × state_bytes_per_request (conv K−1 columns in the model
    dtype, recurrent state fp32), the figure the model's memory report and reference.memory use."""
    model = OM.Qwen35Model(tiny_weights, dtype=dtype, backend="torch", max_batch_size=3)
    allocated = sum(p.numel() * p.element_size() for p in model.conv_pools + model.state_pools)
    per_req = model.state_bytes_per_request()
    assert allocated == 3 * per_req
    conv = "bfloat16" if dtype == torch.bfloat16 else "float32"
    assert per_req == state_bytes_per_request(model.config, "float32", conv_dtype=conv)
    assert model.memory_report["state_bytes_per_request"] == per_req


def test_b21_prefill_runs_chunked_decode_runs_fused_and_the_path_is_logged(tiny_weights, monkeypatch, caplog):
    """MaxText decoded single tokens through the chunk path (B21): count which rule each phase calls."""
    calls = []
    for name in ("chunk_gated_delta_rule", "recurrent_gated_delta_rule", "fused_recurrent_gated_delta_rule_update"):
        orig = getattr(OB, name)

        def spy(*a, __name=name, __orig=orig, **kw):
            calls.append(__name)
            return __orig(*a, **kw)

        monkeypatch.setattr(OB, name, spy)
    monkeypatch.setattr(OB, "_logged", set())
    with caplog.at_level(logging.INFO, logger="qwen35.optimized"):
        model = OM.Qwen35Model(tiny_weights, backend="auto", max_batch_size=2)
    assert any("torch ops on cpu" in r.getMessage() for r in caplog.records), "the backend choice is not logged"
    n_linear = model.config.num_linear_layers
    long = [1 + i % 90 for i in range(RECURRENT_MAX_TOKENS + 1)]
    inputs = model.prepare_initial_token_inputs([TextContext("a", long), TextContext("b", [6, 7])])
    model.execute(inputs)  # the longest sequence is past the crossover: the chunked form
    assert calls == ["chunk_gated_delta_rule"] * n_linear, calls
    calls.clear()
    model.execute(model.prepare_next_token_inputs([8, 9], inputs))
    assert calls == ["fused_recurrent_gated_delta_rule_update"] * n_linear, calls
    calls.clear()  # short prefill chunks (≤ RECURRENT_MAX_TOKENS) take the per-token form, not a padded chunk
    model.execute(model.prepare_initial_token_inputs([TextContext("a", [1, 2, 3, 4, 5]), TextContext("b", [3, 4])]))
    assert calls == ["recurrent_gated_delta_rule"] * n_linear, calls


# ---------------------------------------------------------------------------------------------------------- B24
@given(seed=st.integers(0, 2**31 - 1), normalizer=st.sampled_from([0.05, 1.0, 16.0]),
       beta_mode=st.sampled_from(["random", "zero", "one"]))
def test_b24_shared_factory_makes_physically_valid_gates(seed, normalizer, beta_mode):
    """vllm-ascend #14192 passed with g ~ randn (exp(g) > 1 explodes): the factory's gates are decays, g ≤ 0."""
    x = gdn_inputs(seed, 2, 40, 1, 2, 4, 4, gate_normalizer=normalizer, beta_mode=beta_mode)
    assert np.all(x.g <= 0.0) and np.all(np.isfinite(x.g))
    assert np.all((x.beta >= 0.0) & (x.beta <= 1.0))
    if beta_mode == "random":
        assert np.all((x.beta > 0.0) & (x.beta < 1.0))


_VALUE_CHECKS = {"assert_close", "assert_array_equal", "assert_allclose", "array_equal", "allclose", "equal",
                 "raises", "warns", "rel_rms"}
_SHAPE_ATTRS = {"shape", "dtype", "ndim"}


def _is_shape_expr(n) -> bool:
    """x.shape / x.dtype / x.ndim, x.shape[i], len(x.shape), tuple(x.shape)."""
    if isinstance(n, ast.Attribute):
        return n.attr in _SHAPE_ATTRS
    if isinstance(n, ast.Subscript):
        return _is_shape_expr(n.value)
    if isinstance(n, ast.Call) and getattr(n.func, "id", "") in ("len", "tuple") and len(n.args) == 1:
        return _is_shape_expr(n.args[0])
    return False


def _is_literal(n) -> bool:
    """Constants, tuples of them, names and dotted names (np.float32, torch.bfloat16, B, T)."""
    if isinstance(n, ast.Constant | ast.Name):
        return True
    if isinstance(n, ast.Attribute):
        return _is_literal(n.value)
    if isinstance(n, ast.Tuple | ast.List):
        return all(_is_literal(e) or _is_shape_expr(e) for e in n.elts)
    if isinstance(n, ast.BinOp):
        return _is_literal(n.left) and _is_literal(n.right)
    return False


def _is_shape_assert(t) -> bool:
    """An assertion about shapes/dtypes (or `is None`) only: it could not notice a wrong value."""
    if isinstance(t, ast.BoolOp):
        return all(_is_shape_assert(v) for v in t.values)
    if isinstance(t, ast.Compare):
        ops = [t.left, *t.comparators]
        if all(isinstance(o, ast.Is | ast.IsNot) for o in t.ops) and all(
                isinstance(c, ast.Constant) and c.value is None for c in t.comparators):
            return True  # `x is None`: says nothing about values
        return any(_is_shape_expr(o) for o in ops) and all(_is_shape_expr(o) or _is_literal(o) for o in ops)
    return False


def shape_only_tests(source: str) -> list[str]:
    """Names of test functions that assert only shapes/dtypes (B24) and call no value check or assert-helper."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            continue
        called = {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
                  for c in ast.walk(node) if isinstance(c, ast.Call)}
        if called & _VALUE_CHECKS or any(n.lstrip("_").startswith(("check", "assert")) for n in called):
            continue
        asserts = [a.test for a in ast.walk(node) if isinstance(a, ast.Assert)]
        if asserts and all(_is_shape_assert(a) for a in asserts):
            found.append(node.name)
    return found


# Reviewed exceptions: tests of an *option*, whose values are checked by the named test.
SHAPE_ONLY_ALLOWED = {
    # output_final_state=False must return None; the values of o are test_chunked_equals_recurrent's job
    ("test_gdn_semantics.py", "test_output_final_state_false_returns_none"),
}


def test_b24_no_shape_only_tests():
    bad = {"def test_x():\n    y = f()\n    assert y.shape == (2, 3)\n    assert y.dtype == 'f'\n"}
    assert shape_only_tests(next(iter(bad))) == ["test_x"]  # the detector itself fires
    assert shape_only_tests("def test_y():\n    assert_close('y', a, f(), 1e-5)\n") == []
    offenders = [(f.name, t) for f in sorted(TESTS.glob("test_*.py")) for t in shape_only_tests(f.read_text())]
    offenders = [o for o in offenders if o not in SHAPE_ONLY_ALLOWED]
    assert not offenders, f"shape-only tests (pitfall B24): {offenders}"
