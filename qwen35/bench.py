"""CPU benchmarks of the optimized PyTorch engine: one run, one thread, float32, medians -> JSON.

    from qwen35.bench import run_all
    results = run_all(quick=False)          # or: qwen35 bench [--quick] [--out FILE]

Four parts, each timed after a warm-up with several repeats (median reported):

(a) Gated delta rule prefill core (q, k, v, g, β -> o, final state), H_k = H_v = 16, D_k = D_v = 128, B = 1,
    T ∈ {512, 2048, 4096}: optimized `chunk_gated_delta_rule` vs the reference NumPy chunked and per-token forms
    (float32) vs transformers' torch fallback `torch_chunk_gated_delta_rule`.  Reported against the same run's
    sgemm rate on the chunked form's FLOPs (`qwen35.measure.gdn_chunk_flops`, derived term by term there).
(b) Decode step per layer: the fused in-place update (state pool, one slot) vs the reference per-token NumPy step;
    and one whole GDN layer (hidden 1024: projections + conv + rule + norm + out_proj) vs the reference layer.
(c) Whole model on a checkpoint of the 0.8B geometry (hidden 1024, 4 layers L L L F, random weights, vocab 32768
    instead of 248320 — stated in the output): prefill tokens/s and decode tokens/s, optimized vs transformers
    (`Qwen3_5ForCausalLM`, its torch fallbacks, sdpa attention) on the same checkpoint.  FLOPs:
    `qwen35.measure.model_prefill_flops`; the decode floor: `qwen35.measure.decode_weight_bytes` at the measured
    DRAM read rate.
(d) `crossover_sweep`: the chunked vs the per-token form for T = 1 … 2048 (`qwen35 plot --measure-crossover`).
(e) `bench_training` (`qwen35 bench --parts train`): tokens/s of one training step (forward + backward + AdamW
    step, fp32) of `optimized.Qwen35ForCausalLM` vs transformers' `Qwen3_5ForCausalLM` on the same checkpoint and
    batch, at 1 and 2 threads, for the 0.8B-width geometry of (c) and a small one; both with the same
    `torch.optim.AdamW(fused=True)`.  FLOP floor: 3 × the forward FLOPs (`training_step_flops`) at the sgemm rate
    measured round-robin with them.

Inputs come from `qwen35.measure.gdn_inputs`, timers and the machine record from qwen35.measure; the console table
and the Markdown of docs/benchmarks.md from qwen35.report.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from qwen35.measure import (
    SINGLE_THREAD_ENV,
    decode_weight_bytes,
    gdn_chunk_flops,
    gdn_decode_bytes,
    gdn_inputs,
    machine_info,
    model_prefill_flops,
    pin_threads,
    timeit,
    timeit_interleaved,
)

SHARED_NOTE = ("measured on a 2-core machine that ran other jobs at the same time; one BLAS thread, timings are "
               "medians of repeated runs, but the background load was not controlled")


# ----------------------------------------------------------------------------------------------------------------
# machine rates
# ----------------------------------------------------------------------------------------------------------------


def sgemm_rate(n: int = 2048, repeats: int = 5) -> dict:
    """Single-thread float32 matmul rate (GFLOP/s) of an n×n×n product in torch (MKL), median of repeats."""
    torch = pin_threads()
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timeit(lambda: torch.mm(a, b), repeats=repeats)
    return {"n": n, "gflops": 2 * n ** 3 / t["median_s"] / 1e9, "best_gflops": 2 * n ** 3 / t["min_s"] / 1e9}


def stream_bandwidth(mbytes: int = 256, repeats: int = 5) -> dict:
    """Single-thread DRAM read bandwidth (GB/s): a sum over a float32 buffer far larger than the caches."""
    torch = pin_threads()
    x = torch.ones(mbytes * 1024 * 1024 // 4)
    t = timeit(lambda: x.sum(), repeats=repeats)
    return {"mbytes": mbytes, "read_gbps": x.numel() * 4 / t["median_s"] / 1e9}


# ----------------------------------------------------------------------------------------------------------------
# (a) GDN prefill core
# ----------------------------------------------------------------------------------------------------------------


def _rule_inputs(T, H, D, seed=0):
    """float32 q, k, v, g, β of one sequence (B = 1, H_k = H_v = H, D_k = D_v = D) from the shared input factory."""
    x = gdn_inputs(seed, 1, T, H, H, D, D, with_h0=False)
    return tuple(a.astype(np.float32) for a in (x.q, x.k, x.v, x.g, x.beta))


def bench_gdn_prefill(Ts=(512, 2048, 4096), H=16, D=128, *, quick=False, sgemm=None, log=print) -> list[dict]:
    """Per T: the optimized chunked rule, the transformers fallback and a 1024³ sgemm timed round-robin (so the
    fraction of the matmul rate is taken under the same machine load), then the slow NumPy references once."""
    torch = pin_threads()
    import optimized.gated_delta as ogd
    import reference.gated_delta as rgd

    try:
        from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule as hf_chunk
    except ImportError:
        hf_chunk = None
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def mm3():  # three 1024³ products: ~25 ms, comparable to the timed calls
        for _ in range(3):
            torch.mm(a, b)

    rows = []
    for T in Ts:
        q, k, v, g, beta = _rule_inputs(T, H, D)
        tq, tk, tv, tg, tb = (torch.from_numpy(x) for x in (q, k, v, g, beta))
        flops = gdn_chunk_flops(T, H, D, D)
        row = {"T": T, "H_v": H, "D": D, "flops_chunked": flops}
        fns = {"optimized": partial(ogd.chunk_gated_delta_rule, tq, tk, tv, g=tg, beta=tb), "sgemm_paired": mm3}
        if hf_chunk is not None:
            fns["hf_torch_fallback"] = partial(hf_chunk, tq, tk, tv, g=tg, beta=tb, chunk_size=64,
                                               output_final_state=True, use_qk_l2norm_in_kernel=True)
        row.update(timeit_interleaved(fns, 3 if quick else 7))
        paired = 3 * 2 * 1024 ** 3 / row["sgemm_paired"]["median_s"] / 1e9
        row["sgemm_paired"]["gflops"] = paired
        ref_reps = 1 if quick else 2
        row["reference_chunked_f32"] = timeit(
            partial(rgd.chunk_gated_delta_rule, q, k, v, g=g, beta=beta, dtype=np.float32), repeats=ref_reps, warmup=0)
        if not quick or T <= 512:
            row["reference_per_token_f32"] = timeit(
                partial(rgd.recurrent_gated_delta_rule, q, k, v, g=g, beta=beta, dtype=np.float32), repeats=1,
                warmup=0)
        for name in ("optimized", "hf_torch_fallback", "reference_chunked_f32", "reference_per_token_f32"):
            if name in row:
                row[name]["gflops_on_chunked_flops"] = flops / row[name]["median_s"] / 1e9
                row[name]["fraction_of_paired_sgemm"] = row[name]["gflops_on_chunked_flops"] / paired
                if sgemm:
                    row[name]["fraction_of_sgemm"] = row[name]["gflops_on_chunked_flops"] / sgemm
        if "hf_torch_fallback" in row:
            row["speedup_vs_hf"] = row["hf_torch_fallback"]["median_s"] / row["optimized"]["median_s"]
        log(f"  GDN prefill T={T}: optimized {row['optimized']['median_s'] * 1e3:.1f} ms "
            f"({row['optimized']['gflops_on_chunked_flops']:.1f} GF/s; paired sgemm {paired:.1f} GF/s)")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# (b) decode step per layer
# ----------------------------------------------------------------------------------------------------------------


def bench_decode_step(H=16, D=128, hidden=1024, *, quick=False, log=print) -> dict:
    torch = pin_threads()
    import optimized.deltanet as odn
    import optimized.gated_delta as ogd
    import reference.deltanet as rdn
    import reference.gated_delta as rgd
    from reference.config import Qwen35Config

    q, k, v, g, beta = _rule_inputs(1, H, D, seed=1)
    rng = np.random.default_rng(2)
    S = 8
    pool = torch.from_numpy(0.1 * rng.standard_normal((S, H, D, D)).astype(np.float32))
    h0 = pool[3:4].numpy().copy()
    slots = torch.tensor([3])
    tq, tk, tv, tg, tb = (torch.from_numpy(a) for a in (q, k, v, g, beta))
    inner = 20 if quick else 100
    reps = 3 if quick else 7
    out = {"H_v": H, "D": D}
    def loop(fn, n):
        def run():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n
        return run

    both = timeit_interleaved({
        "kernel_optimized": loop(lambda: ogd.fused_recurrent_gated_delta_rule_update(
            tq, tk, tv, g=tg, beta=tb, state_pool=pool, slot_ids=slots), inner),
        "kernel_reference_f32": loop(lambda: rgd.recurrent_gated_delta_rule(
            q, k, v, g=g, beta=beta, initial_state=h0, dtype=np.float32), max(5, inner // 5)),
    }, reps)
    out.update(both)
    out["kernel_speedup"] = out["kernel_reference_f32"]["median_s"] / out["kernel_optimized"]["median_s"]
    out["kernel_bytes_floor"] = gdn_decode_bytes(1, H, H, D, D, 4)  # the fp32 state read + written, q/k/v/o, g/β

    cfg = Qwen35Config.tiny(hidden_size=hidden, linear_num_key_heads=H, linear_num_value_heads=H,
                            linear_key_head_dim=D, linear_value_head_dim=D, intermediate_size=3584,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=256, partial_rotary_factor=0.25,
                            mrope_section=(11, 11, 10), vocab_size=1000)
    w = rdn.DeltaNetWeights.random(cfg, 0).astype(np.float32)
    wt = odn.TorchDeltaNetWeights.from_reference(w)
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    tx = torch.from_numpy(x)
    conv_pool = torch.zeros(S, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1)
    conv0 = np.zeros((1, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1), np.float32)
    out["layer_hidden"] = hidden
    out.update(timeit_interleaved({
        "layer_optimized": loop(lambda: odn.gated_deltanet_decode(
            tx, wt, cfg, conv_pool=conv_pool, state_pool=pool, slot_ids=slots, backend="torch"), max(5, inner // 5)),
        "layer_reference_f32": loop(lambda: rdn.gated_deltanet(
            x, w, cfg, conv_state=conv0, recurrent_state=h0, mode="recurrent", dtype=np.float32), max(5, inner // 5)),
    }, reps))
    out["layer_speedup"] = out["layer_reference_f32"]["median_s"] / out["layer_optimized"]["median_s"]
    log(f"  decode step: kernel {out['kernel_optimized']['median_s'] * 1e6:.0f} us "
        f"({out['kernel_speedup']:.1f}x reference), layer {out['layer_optimized']['median_s'] * 1e6:.0f} us "
        f"({out['layer_speedup']:.1f}x reference)")
    return out


# ----------------------------------------------------------------------------------------------------------------
# (c) whole model
# ----------------------------------------------------------------------------------------------------------------


def bench_config(vocab_size: int = 32768, num_layers: int = 4):
    """The 0.8B geometry as third-party training scripts give it (hidden 1024, I 3584, 8 q heads, 2 KV heads, hd 256;
    GDN 16/16 heads of 128), with `num_layers` layers (L L L F) and a smaller vocabulary."""
    from reference.config import Qwen35Config

    return Qwen35Config.tiny(
        model_type="qwen3_5_text", vocab_size=vocab_size, hidden_size=1024, intermediate_size=3584,
        num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        max_position_embeddings=32768, rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=(11, 11, 10),
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=16, tie_word_embeddings=True)


def write_random_checkpoint(directory, config, seed: int = 0) -> Path:
    """config.json + model.safetensors with random, trained-looking float32 weights (reference.checkpoint's
    writer: HF names, loadable by transformers and reference.weights alike)."""
    from reference.checkpoint import write_checkpoint

    d = Path(directory)
    write_checkpoint(d, config, seed=seed)
    return d


def bench_model(*, quick=False, sgemm=None, log=print, prefill_Ts=None, decode_steps=None) -> dict:
    """Whole-model prefill (one request of T tokens, logits for its last position) and decode (B = 1, after a
    128-token prompt), optimized vs transformers on the same random checkpoint, timed round-robin.  The top-level
    `*_prefill` keys hold the largest T; `prefill_by_T` holds every T."""
    torch = pin_threads()
    import optimized.model as OM
    from reference.context import TextContext

    cfg = bench_config()
    Ts = tuple(prefill_Ts or ((256,) if quick else (256, 1024)))
    steps = decode_steps or (8 if quick else 32)
    out = {"geometry": "0.8B width (hidden 1024, I 3584, nh 8, nkv 2, hd 256, GDN 16x128 / 16x128), 4 layers "
                       "(L L L F), vocab 32768 (the real 248320 is replaced: random weights, stated), tied lm_head",
           "decode_steps": steps, "decode_context": 128, "prefill_by_T": [], "timing": "round-robin medians"}
    reps = 3 if quick else 5
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, max(max(Ts), 128 + steps)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / "ckpt", cfg)
        model = OM.Qwen35Model.from_pretrained(path, max_batch_size=2, backend="torch")
        try:
            import transformers

            hf = transformers.Qwen3_5ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        except Exception as exc:  # transformers missing or too old
            hf = None
            out["hf_error"] = f"{type(exc).__name__}: {exc}"
        ids = torch.tensor([toks])
        counter = iter(range(10 ** 9))

        def opt_prefill(T):
            rid = ("p", next(counter))
            model.execute(model.prepare_initial_token_inputs([TextContext(rid, toks[:T])]))
            model.release(rid)

        def hf_prefill(T):
            with torch.no_grad():
                hf(input_ids=ids[:, :T], use_cache=True, logits_to_keep=1)

        def opt_decode():
            rid = ("d", next(counter))
            inputs = model.prepare_initial_token_inputs([TextContext(rid, toks[:128])])
            model.execute(inputs)
            t0 = time.perf_counter()
            for i in range(steps):
                inputs = model.prepare_next_token_inputs([toks[128 + i]], inputs)
                model.execute(inputs)
            dt = time.perf_counter() - t0
            model.release(rid)
            return dt

        def hf_decode():
            with torch.no_grad():
                o = hf(input_ids=ids[:, :128], use_cache=True, logits_to_keep=1)
                pkv = o.past_key_values
                t0 = time.perf_counter()
                for i in range(steps):
                    o = hf(input_ids=ids[:, 128 + i:129 + i], past_key_values=pkv, use_cache=True, logits_to_keep=1)
                    pkv = o.past_key_values
                return time.perf_counter() - t0

        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        for T in Ts:
            n_mm = max(1, T // 64)

            def mm(n=n_mm):  # a sgemm block of similar duration, timed in the same rounds
                for _ in range(n):
                    torch.mm(a, b)

            fns = {"optimized": lambda T=T: opt_prefill(T), "sgemm_paired": mm}
            if hf is not None:
                fns["hf"] = lambda T=T: hf_prefill(T)
            r = {"T": T, "flops": model_prefill_flops(cfg, T), **timeit_interleaved(fns, reps)}
            paired = n_mm * 2 * 1024 ** 3 / r["sgemm_paired"]["median_s"] / 1e9
            r["sgemm_paired"]["gflops"] = paired
            for name in ("optimized", "hf"):
                if name not in r:
                    continue
                r[name]["tok_per_s"] = T / r[name]["median_s"]
                r[name]["gflops"] = r["flops"] / r[name]["median_s"] / 1e9
                r[name]["fraction_of_paired_sgemm"] = r[name]["gflops"] / paired
                if sgemm:
                    r[name]["fraction_of_sgemm"] = r[name]["gflops"] / sgemm
            if "hf" in r:
                r["speedup_vs_hf"] = r["hf"]["median_s"] / r["optimized"]["median_s"]
            out["prefill_by_T"].append(r)
            log(f"  model prefill T={T}: optimized {r['optimized']['tok_per_s']:.0f} tok/s" + (
                f", transformers {r['hf']['tok_per_s']:.0f} tok/s" if "hf" in r else ""))
        fns = {"optimized": opt_decode}
        if hf is not None:
            fns["hf"] = hf_decode
        dec = timeit_interleaved(fns, reps)
    out["optimized_decode"] = {"median_s_per_token": dec["optimized"]["median_s"] / steps, "repeats": reps}
    out["optimized_decode"]["tok_per_s"] = 1 / out["optimized_decode"]["median_s_per_token"]
    big = out["prefill_by_T"][-1]
    out["prefill_T"], out["prefill_flops"] = big["T"], big["flops"]
    out["optimized_prefill"] = big["optimized"]
    if "hf" in big:
        out["hf_prefill"] = big["hf"]
        out["prefill_speedup_vs_hf"] = big["speedup_vs_hf"]
    if "hf" in dec:
        out["hf_decode"] = {"median_s_per_token": dec["hf"]["median_s"] / steps, "repeats": reps}
        out["hf_decode"]["tok_per_s"] = 1 / out["hf_decode"]["median_s_per_token"]
        out["decode_speedup_vs_hf"] = out["hf_decode"]["median_s_per_token"] / out["optimized_decode"][
            "median_s_per_token"]
    log(f"  model decode: optimized {out['optimized_decode']['tok_per_s']:.1f} tok/s" + (
        f", transformers {out['hf_decode']['tok_per_s']:.1f} tok/s" if "hf_decode" in out else ""))
    return out


# ----------------------------------------------------------------------------------------------------------------
# (e) training step
# ----------------------------------------------------------------------------------------------------------------


def small_train_config():
    """A small model of the kind trained on a CPU in minutes: hidden 256, 4 layers (L L L F), GDN 4 × 64 heads,
    attention 4 heads of 64 (2 KV heads), byte vocabulary (260), tied embeddings."""
    from reference.config import Qwen35Config

    return Qwen35Config.tiny(
        model_type="qwen3_5_text", vocab_size=260, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, partial_rotary_factor=0.25,
        mrope_section=(4, 2, 2), linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=4,
        linear_num_value_heads=4, tie_word_embeddings=True)


def training_step_flops(config, batch: int, T: int) -> int:
    """FLOPs of one training step on `batch` sequences of T tokens: 3 × the forward pass (the backward pass of
    every matrix product is two products of the same size: the input's and the weight's gradient; the chunked rule's
    backward is of the same order), the forward with logits for every position:
    `qwen35.measure.model_prefill_flops(config, T)` (last-position logits) + 2·(T−1)·hidden·vocab.  AdamW and the
    elementwise work are not counted (O(parameters) and O(activations), not O(T · parameters))."""
    forward = model_prefill_flops(config, T) + 2 * (T - 1) * config.hidden_size * config.vocab_size
    return int(3 * batch * forward)


def _train_step(model, optimizer, ids, cpu_seconds: list | None = None) -> None:
    """forward with labels = ids, backward, optimizer step, gradients dropped (what a training loop does); the
    process CPU time it took is appended to `cpu_seconds`."""
    c0 = time.process_time()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cpu_seconds is not None:
        cpu_seconds.append(time.process_time() - c0)


TRAIN_CASES = {  # name -> (config factory, batch, T, T when quick)
    "0.8B width": (bench_config, 1, 512, 256),
    "small": (small_train_config, 8, 256, 128),
}


def bench_training(*, quick: bool = False, threads=(1, 2), cases=None, log=print) -> dict:
    """One training step (forward, `loss.backward()`, `AdamW.step()`, `zero_grad`), optimized.Qwen35ForCausalLM vs
    transformers' Qwen3_5ForCausalLM (train mode, its default attention) on the same random checkpoint and the same
    batch (labels = input_ids), fp32; per case and thread count the two contenders and a paired sgemm block are
    timed round-robin after a warm-up step each (medians).  Besides the wall time, each contender's process CPU time
    per step is recorded (`cpu_median_s`, all threads together): on a machine shared with other jobs it is the
    less disturbed of the two.  Returns a JSON-ready dict."""
    torch = pin_threads()
    from optimized import Qwen35ForCausalLM

    try:
        import transformers
    except ImportError as exc:
        transformers = None
        hf_error = f"{type(exc).__name__}: {exc}"
    out = {"timing": "round-robin medians after one warm-up step each", "cases": [],
           "optimizer": "torch.optim.AdamW(lr=1e-6, fused=True), the same for both", "dtype": "float32"}
    reps = 3 if quick else 5
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for name, (make, batch, T, T_quick) in (cases or TRAIN_CASES).items():
        cfg = make()
        T = T_quick if quick else T
        flops = training_step_flops(cfg, batch, T)
        ids = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, T)))
        case = {"case": name, "batch": batch, "T": T, "tokens_per_step": batch * T, "flops_per_step": flops,
                "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                "params": None, "by_threads": []}
        with tempfile.TemporaryDirectory() as tmp:
            path = write_random_checkpoint(Path(tmp) / "ckpt", cfg)
            models = {"optimized": Qwen35ForCausalLM.from_pretrained(path)}
            if transformers is not None:
                try:
                    models["hf"] = transformers.Qwen3_5ForCausalLM.from_pretrained(path, dtype=torch.float32).train()
                except Exception as exc:  # a transformers without Qwen3.5
                    hf_error = f"{type(exc).__name__}: {exc}"
            if "hf" not in models:
                case["hf_error"] = hf_error
        case["params"] = sum(p.numel() for p in models["optimized"].parameters())
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-6, fused=True) for k, m in models.items()}

        n_mm = max(1, round(flops / 3 / (2 * 1024 ** 3)))  # a sgemm block of about a third of a step's work

        def mm(n=n_mm):
            for _ in range(n):
                torch.mm(a, b)

        for n in threads:
            torch.set_num_threads(n)
            cpu = {k: [] for k in models}
            fns = {k: partial(_train_step, m, opts[k], ids, cpu[k]) for k, m in models.items()}
            fns["sgemm_paired"] = mm
            r = {"threads": n, **timeit_interleaved(fns, reps)}
            for k in models:
                r[k]["cpu_median_s"] = statistics.median(cpu[k][1:])  # the first call is the warm-up
            rate = n_mm * 2 * 1024 ** 3 / r["sgemm_paired"]["median_s"]  # FLOP/s
            r["sgemm_paired"]["gflops"] = rate / 1e9
            r["floor_s"] = flops / rate  # every FLOP at the sgemm rate
            for k in models:
                r[k]["tok_per_s"] = batch * T / r[k]["median_s"]
                r[k]["gflops"] = flops / r[k]["median_s"] / 1e9
                r[k]["fraction_of_floor"] = r["floor_s"] / r[k]["median_s"]
            if "hf" in r:
                r["speedup_vs_hf"] = r["hf"]["median_s"] / r["optimized"]["median_s"]
                r["speedup_vs_hf_cpu_time"] = r["hf"]["cpu_median_s"] / r["optimized"]["cpu_median_s"]
            case["by_threads"].append(r)
            log(f"  training step, {name} (B={batch}, T={T}), {n} thread(s): optimized "
                f"{r['optimized']['tok_per_s']:.0f} tok/s ({100 * r['optimized']['fraction_of_floor']:.0f}% of the "
                "FLOP floor)" + (
                    f", transformers {r['hf']['tok_per_s']:.0f} tok/s -> {r['speedup_vs_hf']:.2f}x (CPU time "
                f"{r['speedup_vs_hf_cpu_time']:.2f}x)" if "hf" in r
                    else ""))
        torch.set_num_threads(1)
        out["cases"].append(case)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------------------------

GOALS = {
    "gdn_prefill_fraction_of_sgemm": 0.5,
    "gdn_prefill_speedup_vs_hf": 2.5,
    "decode_layer_speedup_vs_reference": 4.0,
    "decode_rule_speedup_vs_reference": 4.0,
    "model_prefill_fraction_of_sgemm": 0.8,
    "model_prefill_speedup_vs_hf": 1.2,
    "model_decode_speedup_vs_hf": 2.0,
    "train_speedup_vs_hf": 1.5,
}


def goals_report(res: dict) -> dict:
    """Each CPU goal of docs/benchmarks.md: target, measured value, met or not (GDN prefill judged at T = 2048 and
    4096, the smaller of the two)."""
    rep = {}
    big = [r for r in res.get("gdn_prefill", []) if r["T"] >= 2048] or res.get("gdn_prefill", [])
    if big:
        frac = min(r["optimized"].get("fraction_of_paired_sgemm", r["optimized"].get("fraction_of_sgemm", 0.0))
                   for r in big)
        rep["gdn_prefill_fraction_of_sgemm"] = frac
        if all("speedup_vs_hf" in r for r in big):
            rep["gdn_prefill_speedup_vs_hf"] = min(r["speedup_vs_hf"] for r in big)
    if "decode" in res:
        rep["decode_layer_speedup_vs_reference"] = res["decode"]["layer_speedup"]
        rep["decode_rule_speedup_vs_reference"] = res["decode"]["kernel_speedup"]
    m = res.get("model")
    if m:
        op = m["optimized_prefill"]
        if "fraction_of_paired_sgemm" in op or "fraction_of_sgemm" in op:
            rep["model_prefill_fraction_of_sgemm"] = op.get("fraction_of_paired_sgemm", op.get("fraction_of_sgemm"))
        if "prefill_speedup_vs_hf" in m:
            rep["model_prefill_speedup_vs_hf"] = m["prefill_speedup_vs_hf"]
            rep["model_decode_speedup_vs_hf"] = m["decode_speedup_vs_hf"]
    speedups = [r["speedup_vs_hf"] for c in (res.get("train") or {}).get("cases", []) for r in c["by_threads"]
                if "speedup_vs_hf" in r]
    if speedups:  # judged on the worst case and thread count
        rep["train_speedup_vs_hf"] = min(speedups)
    return {k: {"target": GOALS[k], "measured": v, "met": v >= GOALS[k]} for k, v in rep.items()}


def run_all(*, quick: bool = False, parts=("gdn", "decode", "model"), log=print) -> dict:
    """Every part in one process, one thread -> one JSON-ready dict (`qwen35 bench` prints it with
    qwen35.report.format_table and writes it to docs/bench_cpu.json)."""
    torch = pin_threads()
    machine = machine_info("cpu")
    machine.update(blas="MKL" if torch.backends.mkl.is_available() else "?", note=SHARED_NOTE,
                   env={k: os.environ.get(k) for k in (*SINGLE_THREAD_ENV, "THP_MEM_ALLOC_ENABLE",
                                                       "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")})
    try:
        machine["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    res = {"machine": machine, "quick": quick}
    log(f"machine: {res['machine']['host_cpu']}, torch {res['machine']['torch']}, 1 thread")
    res["sgemm"] = sgemm_rate(1024 if quick else 2048, repeats=3 if quick else 7)
    # The machine's matmul rate: the best of a few medians (the machine is shared, so a low reading is load, not
    # the machine; taking the best makes every "fraction of sgemm" conservative).
    more = [sgemm_rate(1024 if quick else 2048, repeats=3) for _ in range(2)]
    sg = max([res["sgemm"]["gflops"]] + [m["gflops"] for m in more])
    res["sgemm"]["gflops_medians"] = [res["sgemm"]["gflops"]] + [m["gflops"] for m in more]
    res["sgemm"]["gflops"] = sg
    log(f"  sgemm: {sg:.1f} GFLOP/s")
    if "gdn" in parts:
        res["gdn_prefill"] = bench_gdn_prefill((512, 2048) if quick else (512, 2048, 4096), quick=quick, sgemm=sg,
                                               log=log)
    if "decode" in parts:
        res["decode"] = bench_decode_step(quick=quick, log=log)
    res["stream"] = stream_bandwidth(128 if quick else 512)
    log(f"  DRAM read: {res['stream']['read_gbps']:.1f} GB/s")
    if "model" in parts:
        res["model"] = bench_model(quick=quick, sgemm=sg, log=log)
        wb = decode_weight_bytes(bench_config())
        res["model"]["decode_bytes_per_token"] = wb
        res["model"]["decode_floor_tok_per_s"] = res["stream"]["read_gbps"] * 1e9 / wb
    if "train" in parts:
        res["train"] = bench_training(quick=quick, log=log)
    res["sgemm_end"] = sgemm_rate(1024 if quick else 2048, repeats=3 if quick else 5)
    res["goals"] = goals_report(res)
    return res


# ----------------------------------------------------------------------------------------------------------------
# (d) chunked vs per-token crossover
# ----------------------------------------------------------------------------------------------------------------


def crossover_sweep(lengths=None, *, H_v: int = 16, D: int = 128, quick: bool = False, repeats: int = 3,
                    progress: bool = True) -> dict:
    """Time the chunked and the per-token forms of the gated delta rule for T = 1 … 2048 (one thread, fp32).

    Implementations: optimized torch chunked / recurrent, reference NumPy chunked / per-token (float32), and
    transformers' torch chunked / recurrent fallbacks when transformers is installed.  Median of `repeats` calls
    after one warm-up (one call for the slow ones from T = 512).  `qwen35 plot --measure-crossover` writes the
    result to results/crossover.json, and qwen35.plot.plot_crossover draws it (pitfall B21: where to switch).
    """
    from tqdm.auto import tqdm

    import optimized.gated_delta as ogd
    import reference.gated_delta as rgd

    torch = pin_threads()
    lengths = list(lengths or ((1, 4, 16, 64, 256) if quick else (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)))
    impls = {
        "optimized torch chunked": lambda t, x: ogd.chunk_gated_delta_rule(*t[:3], g=t[3], beta=t[4]),
        "optimized torch recurrent": lambda t, x: ogd.recurrent_gated_delta_rule(*t[:3], g=t[3], beta=t[4]),
        "reference NumPy chunked": lambda t, x: rgd.chunk_gated_delta_rule(*x[:3], g=x[3], beta=x[4],
                                                                           dtype=np.float32),
        "reference NumPy per-token": lambda t, x: rgd.recurrent_gated_delta_rule(*x[:3], g=x[3], beta=x[4],
                                                                                 dtype=np.float32),
    }
    try:  # transformers' own torch fallbacks (what runs when flash-linear-attention is missing; pitfall B21)
        from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

        impls["transformers torch chunked"] = lambda t, x: hf.torch_chunk_gated_delta_rule(
            *t[:3], g=t[3], beta=t[4], chunk_size=64, output_final_state=True, use_qk_l2norm_in_kernel=True)
        impls["transformers torch recurrent"] = lambda t, x: hf.torch_recurrent_gated_delta_rule(
            *t[:3], g=t[3], beta=t[4], output_final_state=True, use_qk_l2norm_in_kernel=True)
    except ImportError:
        pass
    rows = []
    for T in tqdm(lengths, desc="chunk vs recurrent", disable=not progress, leave=False):
        x = _rule_inputs(T, H_v, D, seed=T)  # [1, T, H_v, D] q, k, v; [1, T, H_v] g, β
        t = [torch.from_numpy(a) for a in x]
        for name, fn in impls.items():
            reps = 1 if (not name.startswith("optimized") and T >= 512) else repeats
            with torch.no_grad():
                timing = timeit(partial(fn, t, x), repeats=reps, warmup=1)
            rows.append({"impl": name, "T": T, "seconds": timing["median_s"], "phase": "prefill",
                         "dtype": "float32"})
    meta = machine_info("cpu")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    meta["load_avg_1min"] = load
    meta["dtype_note"] = (f"float32, one thread, H_v = {H_v}, D_k = D_v = {D}, B = 1, chunk 64; median of {repeats}; "
                          f"load average {load:.1f} on {os.cpu_count()} CPUs at the end (shared machine: noisy)")
    return {"kind": "crossover", "schema": 1, "meta": meta, "rows": rows}
