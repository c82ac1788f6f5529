"""optimized.Qwen35Model vs reference.model.Qwen35Model on tiny checkpoints (dense and MoE).

float32 logits within 1e-4 relative RMS of the float64 oracle, identical greedy tokens, chunked prefill + decode
continuation (docs/pitfalls.md, B10, B11), ragged batches and batch independence (B12), in-place slot pools (B9), the
memory rule the model reports, and the errors of the pipeline interface.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import optimized.model as OM
import reference.model as RM
from _tolerance import assert_close
from hf_checkpoints import make_hf_checkpoint
from reference.context import TextContext

V = 97
torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    d = make_hf_checkpoint(tmp_path_factory.mktemp("opt") / request.param, kind=request.param, seed=21)
    ref = RM.Qwen35Model.from_pretrained(d, max_batch_size=4)
    opt = OM.Qwen35Model.from_pretrained(d, max_batch_size=4, backend="torch")
    return d, ref, opt


def _prompt(seed, n):
    return np.random.default_rng(seed).integers(0, V, n).tolist()


def test_stateless_logits_match_reference(pair):
    _, ref, opt = pair
    prompts = [_prompt(1, 7), _prompt(2, 70), _prompt(3, 1), _prompt(4, 64)]
    for r, o in zip(ref.logits(prompts), opt.logits(prompts), strict=True):
        assert o.dtype == torch.float32
        assert_close("logits", r, o, "f32_logits")


def test_greedy_generation_matches_reference(pair):
    _, ref, opt = pair
    prompts = [_prompt(5, 9), _prompt(6, 33), _prompt(7, 2)]
    assert opt.generate(prompts, max_new_tokens=8) == ref.generate(prompts, max_new_tokens=8)
    assert opt.active_requests == []


@pytest.mark.parametrize("split", [1, 3, 4, 63, 64])
def test_chunked_prefill_then_decode_equals_full(pair, split):
    """prefill(a) + prefill(b) + decode == logits of the whole sequence (B10, B11)."""
    _, ref, opt = pair
    toks = _prompt(split, 70)
    full = ref.logits([toks])[0]
    rid = ("chunk", split)
    out = opt.execute(opt.prepare_initial_token_inputs([TextContext(rid, toks[:split])]))
    assert_close("first chunk", full[split - 1], out.logits[0], "f32_logits")
    inputs = opt.prepare_initial_token_inputs([TextContext(rid, toks[split:68])], return_n_logits=1)
    out = opt.execute(inputs)
    assert_close("second chunk", full[67], out.logits[0], "f32_logits")
    for t in (68, 69):
        inputs = opt.prepare_next_token_inputs([toks[t]], inputs)
        out = opt.execute(inputs)
        assert inputs.is_decode
        assert_close(f"decode at {t}", full[t], out.logits[0], "f32_logits")
    assert opt.seq_len(rid) == 70
    assert opt.release(rid) and not opt.release(rid)


def test_ragged_batch_and_independence(pair):
    """A ragged batch (prefill then decode) matches per-request reference logits; slots are reused cleanly."""
    _, ref, opt = pair
    prompts = {"a": _prompt(10, 5), "b": _prompt(11, 66), "c": _prompt(12, 1)}
    more = {"a": [3, 4], "b": [5, 6], "c": [7, 8]}
    inputs = opt.prepare_initial_token_inputs([TextContext(r, p) for r, p in prompts.items()])
    out = opt.execute(inputs)
    for step in range(2):
        for r in prompts:
            seq = prompts[r] + more[r][:step]
            assert_close(f"{r} step {step}", ref.logits([seq])[0][-1], out.logits_for(r)[0], "f32_logits")
        inputs = opt.prepare_next_token_inputs([more[r][step] for r in prompts], inputs)
        out = opt.execute(inputs)
    for r in prompts:
        opt.release(r)
    # a released slot starts clean for a new request
    out = opt.execute(opt.prepare_initial_token_inputs([TextContext("z", prompts["b"])]))
    assert_close("reused slot", ref.logits([prompts["b"]])[0][-1], out.logits[0], "f32_logits")
    opt.release("z")


def test_decode_updates_pool_in_place(pair):
    """Decode writes only the batch's slots, in the same pool tensors (no gather/scatter copies)."""
    _, _, opt = pair
    inputs = opt.prepare_initial_token_inputs([TextContext("p", _prompt(20, 9)), TextContext("q", _prompt(21, 4))])
    opt.execute(inputs)
    ptrs = [p.data_ptr() for p in opt.state_pools + opt.conv_pools]
    other = [s for s in range(opt.max_batch_size) if s not in inputs.slot_ids.tolist()]
    before = [p[other].clone() for p in opt.state_pools]
    changed_before = [p[inputs.slot_ids].clone() for p in opt.state_pools]
    inputs = opt.prepare_next_token_inputs([1, 2], inputs)
    opt.execute(inputs)
    assert [p.data_ptr() for p in opt.state_pools + opt.conv_pools] == ptrs
    for p, b in zip(opt.state_pools, before, strict=True):
        assert torch.equal(p[other], b)
    assert any(not torch.equal(p[inputs.slot_ids], c) for p, c in zip(opt.state_pools, changed_before, strict=True))
    assert all(p.dtype == torch.float32 for p in opt.state_pools)  # fp32 recurrent state (B8)
    opt.release("p"), opt.release("q")


def test_memory_rule_and_errors(pair):
    d, _, opt = pair
    assert OM.STATE_RULE == "in_place" and opt.memory_report["rule"] == "in_place"
    assert opt.memory_report["state_bytes_per_request"] == opt.state_bytes_per_request() > 0
    assert OM.Qwen35Model.from_pretrained(d, backend="torch").max_batch_size == 32  # CPU: documented fallback
    with pytest.raises(OM.RequestError):
        opt.prepare_initial_token_inputs([TextContext("e", [])])
    with pytest.raises(OM.RequestError):
        opt.prepare_initial_token_inputs([TextContext("e", [V])])
    with pytest.raises(OM.PoolFullError):
        opt.prepare_initial_token_inputs([TextContext(i, [1]) for i in range(5)])
    assert opt.active_requests == []
    inputs = opt.prepare_initial_token_inputs([TextContext("x", [1, 2])])
    opt.execute(inputs)
    with pytest.raises(OM.RequestError):
        opt.execute(inputs)
    opt.release("x")
    with pytest.raises(OM.UnknownRequestError):
        opt.prepare_next_token_inputs([3], inputs)


def test_snapshot_rollback_and_failed_calls_change_nothing(pair):
    """Text requests: restore rolls a request back (bitwise replay; stale inputs refused); failing prepare calls
    leave the pools and every live request as they were (tests/test_optimized_multimodal.py has the full set)."""
    _, _, opt = pair
    toks = _prompt(50, 40)
    opt.execute(opt.prepare_initial_token_inputs([TextContext("s", toks[:20])]))
    snap = opt.snapshot("s")
    inputs = opt.prepare_initial_token_inputs([TextContext("s", toks[20:])])
    want = opt.execute(inputs).logits
    inputs = opt.prepare_next_token_inputs([5], inputs)
    opt.execute(inputs)
    stale = opt.prepare_next_token_inputs([6], inputs)
    opt.restore("s", snap)  # roll back 21 tokens
    assert opt.seq_len("s") == 20
    with pytest.raises(OM.RequestError, match="'s' was restored"):
        opt.execute(stale)
    got = opt.execute(opt.prepare_initial_token_inputs([TextContext("s", toks[20:])])).logits
    assert torch.equal(got, want)
    pools = [p.clone() for p in opt.conv_pools + opt.state_pools]
    for bad in ([TextContext("n", [1]), TextContext("s", [V])], [TextContext("n", [1]), TextContext("s", [])],
                [TextContext("n", [1]), TextContext("n", [2])]):
        with pytest.raises(OM.RequestError):
            opt.prepare_initial_token_inputs(bad)
    assert opt.active_requests == ["s"] and opt.seq_len("s") == 40
    assert all(torch.equal(a, b) for a, b in zip(pools, opt.conv_pools + opt.state_pools, strict=True))
    opt.release("s")


def test_bf16_model_tracks_reference(pair):
    d, ref, _ = pair
    opt = OM.Qwen35Model.from_pretrained(d, max_batch_size=2, dtype=torch.bfloat16, backend="torch")
    toks = _prompt(30, 40)
    assert opt.state_pools[0].dtype == torch.float32
    r, o = ref.logits([toks])[0], opt.logits([toks])[0]
    assert o.dtype == torch.bfloat16
    # bf16 weights + activations on this random tiny model: HF's own bf16 forward is 0.12 rel-RMS from the float64
    # oracle on this checkpoint (ours 0.15, and 0.05 from HF bf16; measured 2026-11-28); a wiring bug gives ~1.
    assert_close("bf16 logits", r, o, 0.3)
    assert (np.argmax(r, -1) == o.float().argmax(-1).numpy()).mean() > 0.7


def test_refuses_batch_that_cannot_fit(pair, monkeypatch):
    d, _, _ = pair
    import reference.weights as rw
    w = rw.load_weights(d, dtype=np.float32)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 10_000))
    m = OM.Qwen35Model.__new__(OM.Qwen35Model)
    m.config, m.device, m.dtype = w.config, torch.device("cuda"), torch.float32
    m.local = w.config  # one process: the rank's geometry is the whole model's
    with pytest.raises(RuntimeError, match="does not fit"):
        m._size_pool(1000)
    assert m._size_pool(None) == m.memory_report["max_batch_allowed"] >= 1


@pytest.mark.triton
def test_triton_backend_model_matches_torch(pair, monkeypatch):
    """backend='triton' through the model (prefill + in-place decode) under the Triton interpreter == torch."""
    import optimized.backend as backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not backend.triton_available():
        pytest.skip("optimized.triton does not import here")
    d, _, opt = pair
    tri = OM.Qwen35Model.from_pretrained(d, max_batch_size=2, backend="triton")
    assert tri.backend == "triton"
    toks = _prompt(40, 20)
    outs = []
    for m in (opt, tri):
        inputs = m.prepare_initial_token_inputs([TextContext("t", toks[:18])])
        first = m.execute(inputs).logits
        inputs = m.prepare_next_token_inputs([toks[18]], inputs)
        second = m.execute(inputs).logits
        m.release("t")
        outs.append((first, second))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert_close("triton vs torch logits", a, b, 1e-4)


def test_bench_flop_and_byte_formulas_match_the_checkpoint_shapes():
    """qwen35.measure's FLOP / byte counts agree with the tensor shapes reference.weights expects."""
    from qwen35.bench import bench_config
    from qwen35.measure import decode_weight_bytes, gdn_chunk_flops, model_prefill_flops
    from reference.weights import expected_lm_shapes

    # per token and value head of a full chunk: 6·C·K + 4·C·V + 6·K·V + (C² − 1)/3 = 180,224 + 1,365 (the inverse)
    assert gdn_chunk_flops(64, 1, 128, 128, 64) == 64 * 181_589
    assert gdn_chunk_flops(4096, 16, 128, 128) == 4096 * 16 * 181_589
    cfg = bench_config()
    shapes = expected_lm_shapes(cfg)
    matrices = sum(int(np.prod(s)) for n, s in shapes.items()
                   if len(s) == 2 and "embed_tokens" not in n and "conv1d" not in n)
    head = cfg.hidden_size * cfg.vocab_size  # tied: the embedding is the lm_head
    T = 7
    extra = (cfg.num_linear_layers * gdn_chunk_flops(T, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                                     cfg.linear_value_head_dim)
             + cfg.num_full_layers * 2 * T * T * cfg.num_attention_heads * cfg.head_dim)
    assert model_prefill_flops(cfg, T) == 2 * T * matrices + 2 * head + extra
    assert decode_weight_bytes(cfg) == 4 * (matrices + head)


def test_bench_gpu_rows_from_gpu_bench_json(tmp_path, capsys):
    """`qwen35 bench --gpu-json FILE` renders scripts/gpu_bench.py's records (schema qwen35.gpu_bench/1)."""
    import json

    from qwen35.commands import bench as cmd

    data = {"kind": "gpu_bench", "schema": "qwen35.gpu_bench/1",
            "meta": {"gpu": "NVIDIA H200", "sm_count": 132, "torch": "2.x", "triton": "3.x", "cuda": "12",
                     "time_utc": "2026-11-28T00:00:00Z", "git_commit": "abc"},
            "peaks": {"bf16_matmul_tflops": 700.0, "copy_gbps": 4000.0},
            "records": [{"case": "gdn_decode_step", "impl": "triton", "shape": {"B": 256}, "ms": 0.05,
                         "tflops": None, "gbps": 3000.0, "frac_peak_tflops": None, "frac_peak_gbps": 0.75,
                         "rel_rms_vs_torch": 1e-7, "rel_rms_vs_fla": None}],
            "notes": ["fla not importable"]}
    f = tmp_path / "gpu.json"
    f.write_text(json.dumps(data))

    class Args:
        gpu_json = str(f)

    assert cmd.run(Args()) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "| gdn_decode_step | triton | B=256 | 0.0500 |" in out and "(75 %)" in out
    with pytest.raises(ValueError):
        f.write_text(json.dumps({"kind": "other"}))
        cmd.run(Args())
