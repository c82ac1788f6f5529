#!/usr/bin/env python3
"""GPU benchmarks of the Triton kernels (optimized/triton/) against the torch path and flash-linear-attention.

    python scripts/gpu_bench.py [--out results/gpu_bench.json]     # on a CUDA machine (scripts/gpu_check.sh)
    python scripts/gpu_bench.py --dry-run [--out /tmp/x.json]       # CPU, Triton interpreter, tiny shapes
    python scripts/gpu_bench.py --aot-check [--arch 90]             # CPU: compile every kernel for sm_<arch>

Cases (pitfall B21, B22):
  * peaks measured in the same run: a bf16 8192³ matmul (TFLOP/s) and a 1 GiB device-to-device copy (GB/s,
    read + write counted);
  * chunked prefill, 1 × 8192 tokens at the 27B layer shape (H_k=16, H_v=48, D_k=D_v=128), bf16 q/k/v, fp32 g/β,
    fp32 final state: Triton vs `optimized.gated_delta` (torch) vs fla's `chunk_gated_delta_rule` when importable;
  * the decode step at batch 1 / 32 / 256 on a 512-slot fp32 state pool; the Triton kernel timed under CUDA-graph
    replay and eagerly, the others eagerly; the calls of one timed run are spread over disjoint slot sets so small
    batches do not just re-hit L2 (B22);
  * the causal conv1d prefill (8192 × conv_dim 10240) and the gated RMSNorm (8192·48 rows of 128);
  * the chunk / per-token crossover: both Triton forms at T ∈ {1, 4, 16, 64, 256, 1024, 4096} (B21).
Each row reports ms, achieved TFLOP/s and GB/s from the explicit formulas below, their fraction of the measured
peaks, and the relative RMS difference of the output against the torch path (and fla) on the same inputs.

FLOP / byte formulas (per call; e = bytes per element of the input dtype): qwen35.measure's gdn_chunk_flops /
gdn_chunk_bytes, gdn_decode_flops / gdn_decode_bytes, causal_conv1d_*, gated_rms_norm_* (each derived in its
docstring; the table is in docs/triton_kernels.md).  Inputs come from qwen35.measure.gdn_inputs, errors from
qwen35.measure.rel_rms, the machine record from qwen35.measure.machine_info.

The JSON (schema "qwen35.gpu_bench/1") holds meta (GPU, versions, git commit), peaks, one record per
(case, implementation) and notes; `qwen35 bench` turns it into the GPU rows of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout (scripts/gpu_check.sh) or with the package installed
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch  # torch does not import triton: TRITON_INTERPRET can still be set in main()

from qwen35.measure import (
    causal_conv1d_bytes,
    causal_conv1d_flops,
    gated_rms_norm_bytes,
    gated_rms_norm_flops,
    gdn_chunk_bytes,
    gdn_chunk_flops,
    gdn_decode_bytes,
    gdn_decode_flops,
    gdn_inputs,
    machine_info,
    rel_rms,
    write_json,
)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=None, help="JSON path (default results/gpu_bench.json)")
    p.add_argument("--out", dest="out_opt", default=None, help="JSON path (same as the positional argument)")
    p.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter at tiny shapes (plumbing check)")
    p.add_argument("--aot-check", action="store_true", help="compile every kernel for --arch without a GPU")
    p.add_argument("--arch", type=int, default=90, help="SM version for --aot-check (default 90 = H100/H200)")
    p.add_argument("--skip-fla", action="store_true", help="do not try flash-linear-attention")
    p.add_argument("--skip-torch", action="store_true", help="do not time the torch path (faster)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ timing


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn, dev, *, iters=30, warmup=5, graph=False, calls_per_replay=1):
    """Median milliseconds per call.  CUDA events around each replay (or call); `graph` captures `fn` (which may
    issue `calls_per_replay` calls) in a CUDA graph first, removing host overhead (B22).  CPU: perf_counter."""
    if dev.type != "cuda":
        fn()
        ts = []
        for _ in range(max(1, iters)):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(ts)) / calls_per_replay, "wall-clock (CPU, interpreter)"
    how = "CUDA events"
    run = fn
    if graph:
        try:
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(3):  # compile + allocator warm-up outside the capture
                    fn()
            torch.cuda.current_stream(dev).wait_stream(s)
            _sync(dev)
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                fn()
            run = gr.replay
            how = "CUDA-graph replay, CUDA events"
        except Exception as exc:  # e.g. a host sync inside the op: fall back to eager timing, and say so
            _sync(dev)
            how = f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:80]})"
            run = fn
    for _ in range(warmup):
        run()
    _sync(dev)
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return float(np.median(ts)) / calls_per_replay, how


# ------------------------------------------------------------------------------------------------ peaks


def measure_peaks(dev, dry):
    if dev.type != "cuda":
        return {"bf16_matmul_tflops": None, "copy_gbps": None, "note": "no CUDA device: peaks not measured"}
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms, _ = time_fn(partial(torch.matmul, a, b), dev, iters=20, warmup=5)
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    del a, b
    src = torch.empty(2 ** 28, device=dev, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms_c, _ = time_fn(partial(dst.copy_, src), dev, iters=20, warmup=5)
    gbps = 2 * src.numel() * 4 / (ms_c * 1e-3) / 1e9  # read + write
    del src, dst
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": tflops, "bf16_matmul_shape": [n, n, n], "copy_gbps": gbps,
            "copy_bytes": 2 * 2 ** 30}


# ------------------------------------------------------------------------------------------------ implementations


def _import_torch_path():
    try:
        import optimized.conv as tc
        import optimized.gated_delta as tg
        import optimized.norms as tn
        return tg, tc, tn, None
    except Exception as exc:
        return None, None, None, f"torch path not importable ({type(exc).__name__}: {exc})"


def _import_fla():
    try:
        import fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_rec
        return fla_chunk, fla_rec, getattr(fla, "__version__", "?"), None
    except Exception as exc:
        return None, None, None, f"flash-linear-attention not importable ({type(exc).__name__}: {exc}); skipped"


def _fla_chunk_call(fla_chunk, q, k, v, g, beta, H_v):
    """fla's API; older fla versions need q/k already repeated to the value heads (HF's note)."""
    try:
        o, ht = fla_chunk(q, k, v, g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
        return (lambda: fla_chunk(q, k, v, g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True)), \
            o, "native GVA"
    except Exception:
        r = H_v // q.shape[2]
        qr, kr = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
        def fn():
            return fla_chunk(qr, kr, v, g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
        o, ht = fn()
        return fn, o, "q/k repeated to H_v heads outside the timed call (this fla version has no GVA)"


# ------------------------------------------------------------------------------------------------ cases


def bench_chunk(dev, shapes, impls, records, notes):
    import optimized.triton as tri

    T, H_k, H_v, D = shapes["T"], shapes["H_k"], shapes["H_v"], shapes["D"]
    dt = shapes["dtype"]
    x = gdn_inputs(0, 1, T, H_k, H_v, D, D, with_h0=False)
    q, k = (torch.tensor(a, dtype=dt, device=dev) for a in (x.q, x.k))
    v = torch.tensor(x.v, dtype=dt, device=dev)
    g, beta = (torch.tensor(a, dtype=torch.float32, device=dev) for a in (x.g, x.beta))
    del x
    e = torch.tensor([], dtype=dt).element_size()
    flops, nbytes = gdn_chunk_flops(T, H_v, D, D), gdn_chunk_bytes(T, 1, H_k, H_v, D, D, e)
    shape = dict(B=1, T=T, H_k=H_k, H_v=H_v, D_k=D, D_v=D, dtype=str(dt).replace("torch.", ""), chunk=64)

    def run_tri():
        return tri.chunk_gated_delta_rule(q, k, v, g=g, beta=beta, output_final_state=True)

    o_tri, ht_tri = run_tri()
    ref_o = ht_t = None
    if impls["torch"] is not None:
        ref_o, ht_t = impls["torch"].chunk_gated_delta_rule(q, k, v, g=g, beta=beta, output_final_state=True)
    cands = []
    if impls["phase"] == "main":
        cands.append(("triton", run_tri, o_tri, ""))
        if impls["torch"] is not None and impls["time_torch"]:
            cands.append(("torch", lambda: impls["torch"].chunk_gated_delta_rule(
                q, k, v, g=g, beta=beta, output_final_state=True), ref_o, ""))
        if ref_o is not None:
            notes.append(f"chunk prefill: triton vs torch rel RMS o={rel_rms(ref_o, o_tri):.2e}, "
                         f"final_state={rel_rms(ht_t, ht_tri):.2e}")
    elif impls["fla_chunk"] is not None:  # the fla phase runs last: its autotuning may be slow
        try:
            fn, o_f, how = _fla_chunk_call(impls["fla_chunk"], q, k, v, g, beta, H_v)
            cands.append(("fla", fn, o_f, how))
            notes.append(f"chunk prefill: triton vs fla rel RMS o={rel_rms(o_f, o_tri):.2e}")
            _set_vs_fla(records, "gdn_chunk_prefill", None, rel_rms(o_f, o_tri))
        except Exception as exc:
            notes.append(f"chunk prefill: fla call failed ({type(exc).__name__}: {str(exc)[:120]})")
    for name, fn, out, how in cands:
        ms, timing = time_fn(fn, dev, iters=shapes["iters"], warmup=shapes["warmup"])
        records.append(_record("gdn_chunk_prefill", name, shape, ms, flops, nbytes, timing, how,
                               None if ref_o is None else rel_rms(ref_o, out),
                               rel_rms(out, o_tri) if name != "triton" else None))


def bench_crossover(dev, shapes, impls, records, notes):
    """Chunked vs per-token Triton kernels over T (one sequence, the same heads): where the chunk form starts to win
    (pitfall B21: fla switches at T <= 64; a decode step must never go through the chunk path)."""
    import optimized.triton as tri

    H_k, H_v, D, dt = shapes["H_k"], shapes["H_v"], shapes["D"], shapes["dtype"]
    e = torch.tensor([], dtype=dt).element_size()
    for T in shapes["crossover_T"]:
        x = gdn_inputs(T, 1, T, H_k, H_v, D, D, with_h0=False)
        q, k = (torch.tensor(a, dtype=dt, device=dev) for a in (x.q, x.k))
        v = torch.tensor(x.v, dtype=dt, device=dev)
        g, beta = (torch.tensor(a, dtype=torch.float32, device=dev) for a in (x.g, x.beta))
        o_c, _ = tri.chunk_gated_delta_rule(q, k, v, g=g, beta=beta)
        o_r, _ = tri.recurrent_gated_delta_rule(q, k, v, g=g, beta=beta)
        err = rel_rms(o_r, o_c)
        shape = dict(B=1, T=T, H_k=H_k, H_v=H_v, D_k=D, D_v=D, dtype=str(dt).replace("torch.", ""))
        for name, fn in (("triton_chunk", partial(tri.chunk_gated_delta_rule, q, k, v, g=g, beta=beta)),
                         ("triton_recurrent", partial(tri.recurrent_gated_delta_rule, q, k, v, g=g, beta=beta))):
            ms, timing = time_fn(fn, dev, iters=max(1, shapes["iters"] // 3), warmup=min(2, shapes["warmup"]))
            records.append(_record("gdn_crossover", name, shape, ms, gdn_chunk_flops(T, H_v, D, D),
                                   gdn_chunk_bytes(T, 1, H_k, H_v, D, D, e), timing,
                                   "chunk vs recurrent rel RMS in err", err, None))


def bench_decode(dev, shapes, impls, records, notes):
    S, H_v, D = shapes["pool"], shapes["H_v"], shapes["D"]
    gen = torch.Generator().manual_seed(0)
    pool = (0.1 * torch.randn((S, H_v, D, D), generator=gen)).to(dev)  # fp32 state pool (B8)
    for B in shapes["batches"]:
        _bench_decode_batch(B, pool, gen, dev, shapes, impls, records, notes)


def _bench_decode_batch(B, pool, gen, dev, shapes, impls, records, notes):
    """bench_decode at batch size B: accuracy on one call, then each candidate, built and timed here."""
    import optimized.triton as tri

    H_k, H_v, D, S = shapes["H_k"], shapes["H_v"], shapes["D"], shapes["pool"]
    dt = shapes["dtype"]
    e = torch.tensor([], dtype=dt).element_size()
    x = gdn_inputs(B, B, 1, H_k, H_v, D, D, with_h0=False)
    q, k = (torch.tensor(a, dtype=dt, device=dev) for a in (x.q, x.k))
    v = torch.tensor(x.v, dtype=dt, device=dev)
    g, beta = (torch.tensor(a, dtype=torch.float32, device=dev) for a in (x.g, x.beta))
    # disjoint slot sets, cycled inside one replay so small batches do not just re-hit L2 (B22)
    n_sets = max(1, min(8, S // B))
    perm = torch.randperm(S, generator=gen)[: n_sets * B].view(n_sets, B).to(dev)
    shape = dict(B=B, H_k=H_k, H_v=H_v, D_k=D, D_v=D, pool_slots=S, dtype=str(dt).replace("torch.", ""),
                 slot_sets_per_replay=n_sets)
    flops, nbytes = gdn_decode_flops(B, H_v, D, D), gdn_decode_bytes(B, H_k, H_v, D, D, e)

    # accuracy on one call, on copies of the pool
    p_tri = pool.clone()
    o_tri = tri.fused_recurrent_gated_delta_rule_update(q, k, v, g=g, beta=beta, state_pool=p_tri,
                                                        slot_ids=perm[0])
    err = None
    if impls["torch"] is not None and impls["phase"] == "main":
        p_t = pool.clone()
        o_t = impls["torch"].fused_recurrent_gated_delta_rule_update(q, k, v, g=g, beta=beta, state_pool=p_t,
                                                                     slot_ids=perm[0])
        err = rel_rms(o_t, o_tri)
        notes.append(f"decode B={B}: triton vs torch rel RMS o={err:.2e}, "
                     f"state={rel_rms(p_t[perm[0]], p_tri[perm[0]]):.2e}")
        del p_t

    def many(fn_one):
        def run():
            for i in range(n_sets):
                fn_one(perm[i])
        return run

    cands = []
    if impls["phase"] == "main":
        tri_run = many(lambda s: tri.fused_recurrent_gated_delta_rule_update(
            q, k, v, g=g, beta=beta, state_pool=pool, slot_ids=s))
        # graph replay for the Triton kernel (its wrapper never syncs); every implementation also eagerly, so
        # the comparison with ops that cannot be captured (a host sync in the torch path) stays apples to
        # apples.  A failed capture can poison the CUDA context, so only the Triton op is captured.
        cands += [("triton", tri_run, "CUDA-graph replay", True, err),
                  ("triton-eager", tri_run, "eager", False, err)]
        if impls["torch"] is not None and impls["time_torch"]:
            cands.append(("torch", many(lambda s: impls["torch"].fused_recurrent_gated_delta_rule_update(
                q, k, v, g=g, beta=beta, state_pool=pool, slot_ids=s)), "eager", False, None))
    elif impls["fla_rec"] is not None:
        fla_rec = impls["fla_rec"]
        r = H_v // H_k
        qr, kr = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
        gva = {"native": (q, k), "repeated": (qr, kr)}
        mode = []

        def fla_one(s, target=pool):  # fla has no slot pool: gather, run, scatter (the in-place kernels don't)
            qq, kk = gva[mode[0]]
            o, ht = fla_rec(qq, kk, v, g=g, beta=beta, initial_state=target.index_select(0, s),
                            output_final_state=True, use_qk_l2norm_in_kernel=True)
            target.index_copy_(0, s, ht.to(target.dtype))
            return o
        try:
            p_f = pool.clone()
            for m in ("native", "repeated"):  # older fla versions need q/k repeated to the value heads
                mode[:] = [m]
                try:
                    o_f = fla_one(perm[0], p_f)
                    break
                except Exception:
                    if m == "repeated":
                        raise
            notes.append(f"decode B={B}: fla ({mode[0]} GVA) vs triton rel RMS o={rel_rms(o_f, o_tri):.2e}, "
                         f"state={rel_rms(p_f[perm[0]], p_tri[perm[0]]):.2e}")
            _set_vs_fla(records, "gdn_decode_step", B, rel_rms(o_f, o_tri))
            del p_f
            cands.append(("fla", many(fla_one), f"eager; gather + fused_recurrent + scatter; {mode[0]} GVA",
                          False, None))
        except Exception as exc:
            notes.append(f"decode B={B}: fla call failed ({type(exc).__name__}: {str(exc)[:120]})")
    del p_tri
    for name, fn, how, graph, e_t in cands:
        ms, timing = time_fn(fn, dev, iters=shapes["iters"], warmup=shapes["warmup"], graph=graph,
                             calls_per_replay=n_sets)
        records.append(_record("gdn_decode_step", name, shape, ms, flops, nbytes, timing, how, e_t, None))


def bench_conv_norm(dev, shapes, impls, records, notes):
    import optimized.triton as tri

    T, C, K, dt = shapes["T"], shapes["conv_dim"], 4, shapes["dtype"]
    e = torch.tensor([], dtype=dt).element_size()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((T, C), generator=gen).to(dev, dt)
    w = (0.5 * torch.randn((C, K), generator=gen)).to(dev, dt)
    shape = dict(T=T, C=C, K=K, dtype=str(dt).replace("torch.", ""))
    y_tri, _ = tri.causal_conv1d(x, w)
    err = None
    cands = [("triton", lambda: tri.causal_conv1d(x, w))]
    if impls["torch"] is not None:
        y_t, _ = impls["conv"].causal_conv1d(x, w)
        err = rel_rms(y_t, y_tri)
        if impls["time_torch"]:
            cands.append(("torch", lambda: impls["conv"].causal_conv1d(x, w)))
    for name, fn in cands:
        ms, timing = time_fn(fn, dev, iters=shapes["iters"], warmup=shapes["warmup"])
        records.append(_record("causal_conv1d_prefill", name, shape, ms, causal_conv1d_flops(T, C, K),
                               causal_conv1d_bytes(T, C, K, e), timing, "", err if name == "triton" else None, None))
    R, D = shapes["norm_rows"], shapes["D"]
    xn = torch.randn((R, D), generator=gen).to(dev, dt)
    zn = torch.randn((R, D), generator=gen).to(dev, dt)
    wn = torch.randn((D,), generator=gen).to(dev, torch.float32)
    y_tri = tri.gated_rms_norm(xn, zn, wn, 1e-6)
    err = None
    cands = [("triton", lambda: tri.gated_rms_norm(xn, zn, wn, 1e-6))]
    if impls["torch"] is not None:
        err = rel_rms(impls["norm"].gated_rms_norm(xn, zn, wn, 1e-6), y_tri)
        if impls["time_torch"]:
            cands.append(("torch", lambda: impls["norm"].gated_rms_norm(xn, zn, wn, 1e-6)))
    shape = dict(rows=R, D=D, dtype=str(dt).replace("torch.", ""))
    for name, fn in cands:
        ms, timing = time_fn(fn, dev, iters=shapes["iters"], warmup=shapes["warmup"])
        records.append(_record("gated_rms_norm", name, shape, ms, gated_rms_norm_flops(R, D),
                               gated_rms_norm_bytes(R, D, e), timing, "", err if name == "triton" else None, None))


PEAKS: dict = {}


def _set_vs_fla(records, case, B, err):
    """Fill `rel_rms_vs_fla` of the Triton rows of a case (the fla phase runs after them)."""
    for r in records:
        if r["case"] == case and r["impl"].startswith("triton") and (B is None or r["shape"].get("B") == B):
            r["rel_rms_vs_fla"] = err


def _record(case, impl, shape, ms, flops, nbytes, timing, how, err_vs_torch, err_vs_triton):
    tflops = flops / (ms * 1e-3) / 1e12 if ms > 0 else None
    gbps = nbytes / (ms * 1e-3) / 1e9 if ms > 0 else None
    pf, pb = PEAKS.get("bf16_matmul_tflops"), PEAKS.get("copy_gbps")
    return {
        "case": case, "impl": impl, "shape": shape, "ms": ms, "flops": flops, "bytes": nbytes,
        "tflops": tflops, "gbps": gbps,
        "frac_peak_tflops": (tflops / pf) if (pf and tflops) else None,
        "frac_peak_gbps": (gbps / pb) if (pb and gbps) else None,
        "timing": timing, "how": how, "rel_rms_vs_torch": err_vs_torch, "rel_rms_vs_triton": err_vs_triton,
        "rel_rms_vs_fla": None,  # Triton rows: filled by the fla phase when fla is importable
    }


def _meta(dev, fla_version):
    """machine_info of the device (GPU name, SMs, versions, git commit) plus fla's version and whether the Triton
    interpreter ran; the date under the schema's key `time_utc`."""
    m = machine_info(str(dev))
    m["time_utc"] = m.pop("date_utc")
    m.update(fla=fla_version, interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    return m


def _table(records):
    hdr = f"{'case':24s} {'impl':7s} {'shape':38s} {'ms':>9s} {'TFLOP/s':>8s} {'%pk':>5s} {'GB/s':>8s} {'%bw':>5s} " \
          f"{'err/torch':>9s}  timing"
    lines = [hdr, "-" * len(hdr)]
    for r in records:
        s = r["shape"]
        sh = ",".join(f"{k}={v}" for k, v in s.items() if k in ("B", "T", "H_v", "D_k", "rows", "C", "dtype"))

        def f(x, fmt):
            return format(x, fmt) if x is not None else "-"
        lines.append(f"{r['case']:24s} {r['impl']:7s} {sh[:38]:38s} {f(r['ms'], '9.4f')} {f(r['tflops'], '8.2f')} "
                     f"{f(r['frac_peak_tflops'] and 100 * r['frac_peak_tflops'], '5.1f')} {f(r['gbps'], '8.1f')} "
                     f"{f(r['frac_peak_gbps'] and 100 * r['frac_peak_gbps'], '5.1f')} "
                     f"{f(r['rel_rms_vs_torch'], '9.1e')}  {r['timing'][:40]} {r['how'][:40]}")
    return "\n".join(lines)


def aot_check(arch):
    """Compile every kernel for sm_<arch> with the real backend, no GPU needed (ptxas ships with Triton).
    Catches what the interpreter cannot: lowering errors, shared-memory overflow, register spills."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as tcompile

    import optimized.triton.conv as cv
    import optimized.triton.gated_delta as gd
    import optimized.triton.norm as nm

    cuobj = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tgt = GPUTarget("cuda", arch, 32)
    limit = 232448 if arch >= 90 else (166912 if arch >= 80 else 101376)  # max dynamic shared memory per block
    dims = dict(H_K="i32", H_V="i32", D_K="i32", D_V="i32")
    ok = True
    for dt in ("fp32", "bf16"):
        P = "*" + dt
        prec = "ieee" if dt == "fp32" else "tf32"
        jobs = [
            (gd._gdn_chunk_prep_kernel, 8, 1,
             dict(q_ptr=P, k_ptr=P, v_ptr=P, g_ptr="*fp32", beta_ptr="*fp32", chunk_ptr="*i32", w_ptr="*fp32",
                  u_ptr="*fp32", aqk_ptr="*fp32", gcum_ptr="*fp32", scale="fp32", **dims),
             dict(C=64, BS=16, BK=128, BVA=128, USE_L2=True, PREC=prec)),
            (gd._gdn_chunk_state_output_kernel, 4, 2,
             dict(q_ptr=P, k_ptr=P, w_ptr="*fp32", u_ptr="*fp32", aqk_ptr="*fp32", gcum_ptr="*fp32", cu_ptr="*i32",
                  h0_ptr="*fp32", o_ptr=P, ht_ptr="*fp32", scale="fp32", **dims),
             dict(C=64, BK=128, BV=32, USE_L2=True, HAS_H0=True, STORE_HT=True, PREC=prec)),
            (gd._gdn_recurrent_kernel, 4, 3,
             dict(q_ptr=P, k_ptr=P, v_ptr=P, g_ptr="*fp32", beta_ptr="*fp32", cu_ptr="*i32", h0_ptr="*fp32",
                  o_ptr=P, ht_ptr="*fp32", scale="fp32", **dims),
             dict(BK=128, BV=32, USE_L2=True, HAS_H0=True, STORE_HT=True)),
            (gd._gdn_decode_kernel, 4, 3,
             dict(q_ptr=P, k_ptr=P, v_ptr=P, g_ptr="*fp32", beta_ptr="*fp32", slot_ptr="*i64", pool_ptr="*fp32",
                  o_ptr=P, scale="fp32", **dims),
             dict(BK=128, BV=32, USE_L2=True)),
            (cv._causal_conv1d_fwd_kernel, 4, 3,
             dict(x_ptr=P, w_ptr=P, state_ptr=P, cu_ptr="*i32", y_ptr=P, C="i32"),
             dict(K=4, BT=16, BC=128, HAS_STATE=True, SILU=True)),
            (cv._causal_conv1d_state_kernel, 4, 3,
             dict(x_ptr=P, state_ptr=P, cu_ptr="*i32", new_state_ptr=P, C="i32"),
             dict(K=4, BC=128, BJ=4, HAS_STATE=True)),
            (cv._causal_conv1d_update_kernel, 4, 3,
             dict(x_ptr=P, w_ptr=P, pool_ptr=P, slot_ptr="*i64", y_ptr=P, C="i32"), dict(K=4, BC=256)),
            (nm._gated_rms_norm_kernel, 4, 3,
             dict(x_ptr=P, z_ptr=P, w_ptr="*fp32", y_ptr=P, R="i32", D="i32", eps="fp32"), dict(BR=16, BD=128)),
        ]
        for fn, warps, stages, sig, const in jobs:
            t0 = time.time()
            full = dict(sig)
            full.update({name: "constexpr" for name in const})
            try:
                kern = tcompile(ASTSource(fn, full, constexprs=const), target=tgt,
                                options={"num_warps": warps, "num_stages": stages})
            except Exception as exc:
                ok = False
                print(f"FAIL {dt:4s} {fn.__name__}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            shared = kern.metadata.shared
            usage = ""
            if cuobj.exists() and "cubin" in kern.asm:
                tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"qwen35_{fn.__name__}.cubin"
                tmp.write_bytes(kern.asm["cubin"])
                out = subprocess.run([str(cuobj), "-res-usage", str(tmp)], capture_output=True, text=True).stdout
                usage = " ".join(w for line in out.splitlines() if "REG" in line for w in line.split()
                                 if w.startswith(("REG:", "STACK:")))
            flag = "ok  " if shared <= limit else "FAIL"
            ok &= shared <= limit
            print(f"{flag} {dt:4s} {fn.__name__:32s} warps={warps} stages={stages} shared={shared:6d} B "
                  f"(limit {limit}) {usage}  [{time.time() - t0:.1f} s]", flush=True)
    return ok


def main(argv=None):
    args = _parse(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere (optimized.triton, machine_info)
    out = Path(args.out_opt or args.out or (ROOT / "results" / "gpu_bench.json"))
    if args.aot_check:
        sys.exit(0 if aot_check(args.arch) else 1)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if dev.type != "cuda" and not args.dry_run:
        print("gpu_bench: no CUDA device; use --dry-run for the CPU plumbing check", file=sys.stderr)
        sys.exit(2)
    notes = []
    if args.dry_run:
        notes.append("DRY RUN: CPU, Triton interpreter, tiny shapes; timings are meaningless")
        shapes = dict(T=80, H_k=2, H_v=4, D=32, dtype=torch.float32, batches=(1, 2), pool=8, conv_dim=96,
                      norm_rows=256, iters=1, warmup=0, crossover_T=(1, 20))
    else:
        shapes = dict(T=8192, H_k=16, H_v=48, D=128, dtype=torch.bfloat16, batches=(1, 32, 256), pool=512,
                      conv_dim=2 * 16 * 128 + 48 * 128, norm_rows=8192 * 48, iters=30, warmup=5,
                      crossover_T=(1, 4, 16, 64, 256, 1024, 4096))
    tg, tc, tn, why = _import_torch_path()
    if why:
        notes.append(why)
    fla_chunk = fla_rec = fla_version = None
    if args.skip_fla:
        notes.append("flash-linear-attention skipped (--skip-fla)")
    elif dev.type == "cuda" or os.environ.get("QWEN35_BENCH_FLA_ON_CPU") == "1":  # the latter: plumbing tests
        fla_chunk, fla_rec, fla_version, why = _import_fla()
        if why:
            notes.append(why)
    else:
        notes.append("flash-linear-attention needs CUDA: skipped")
    impls = dict(torch=tg, conv=tc, norm=tn, time_torch=not args.skip_torch, fla_chunk=fla_chunk, fla_rec=fla_rec)

    t_start = time.time()
    PEAKS.update(measure_peaks(dev, args.dry_run))
    records: list = []
    phases = [("chunk prefill", bench_chunk, "main"), ("decode", bench_decode, "main"),
              ("conv + norm", bench_conv_norm, "main"), ("chunk/recurrent crossover", bench_crossover, "main")]
    if fla_chunk is not None:  # last: fla's autotuning can take a while, and a timeout must not cost the rest
        phases += [("fla chunk prefill", bench_chunk, "fla"), ("fla decode", bench_decode, "fla")]

    meta = _meta(dev, fla_version)

    def write(complete):
        write_json({"kind": "gpu_bench", "schema": "qwen35.gpu_bench/1", "complete": complete, "meta": meta,
                    "peaks": PEAKS, "records": records, "notes": notes, "wall_s": time.time() - t_start}, out)

    for name, fn, phase in phases:
        t0 = time.time()
        impls["phase"] = phase
        try:
            fn(dev, shapes, impls, records, notes)
        except Exception as exc:  # keep going: one failing case must not hide the others
            import traceback
            traceback.print_exc()
            notes.append(f"{name}: FAILED ({type(exc).__name__}: {str(exc)[:200]})")
        print(f"[gpu_bench] {name}: {time.time() - t0:.1f} s", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write(complete=False)  # partial results survive a timeout
    write(complete=True)
    print(_table(records))
    print(f"peaks: {PEAKS}")
    for n_ in notes:
        print("note:", n_)
    print(f"[gpu_bench] wrote {out}")
    failed = any("FAILED" in n_ for n_ in notes)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
