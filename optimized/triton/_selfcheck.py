"""The `__main__` of each kernel file: validate every kernel against the float64 oracle, then time it.

    TRITON_INTERPRET=1 python -m optimized.triton.gated_delta     # CPU, interpreter, tiny shapes
    python -m optimized.triton.gated_delta                        # CUDA: the 27B layer shape, bf16 and fp32

(likewise `optimized.triton.conv`, `optimized.triton.norm`).  The full benchmark with peaks, the torch path and
flash-linear-attention is scripts/gpu_bench.py; the tests are tests/test_triton_kernels.py.
"""
from __future__ import annotations

import os
import sys
import time
from functools import partial

import numpy as np
import torch

from optimized.triton._common import poison_outputs


def _time(fn, dev, iters):
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def main(which: str) -> None:
    # The shared error metric; imported here, when a kernel file runs as __main__, so that importing optimized
    # never imports qwen35.
    from qwen35.measure import rel_rms

    gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no CUDA device: run with TRITON_INTERPRET=1 to use the Triton interpreter on CPU")
    dev = torch.device("cuda" if gpu else "cpu")
    rng = np.random.default_rng(0)
    iters = 20 if gpu else 1
    dtypes = (torch.float32, torch.bfloat16) if gpu else (torch.float32,)
    rows = []

    def t(a, dt=torch.float32):
        return torch.tensor(a, dtype=dt, device=dev)

    def rnd(a, dt):  # the values the kernel sees, as float64 for the oracle
        return torch.tensor(a, dtype=dt).double().numpy()

    if which == "gated_delta":
        from optimized.triton import gated_delta as K
        from reference import gated_delta as R

        if gpu:
            H_k, H_v, D, lengths, B, S = 16, 48, 128, [1, 700, 63, 300], 64, 128
        else:
            H_k, H_v, D, lengths, B, S = 1, 2, 24, [1, 70, 5], 3, 5
        T = sum(lengths)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        for dt in dtypes:
            q, k = (rnd(rng.standard_normal((1, T, H_k, D)), dt) for _ in range(2))
            v = rnd(rng.standard_normal((1, T, H_v, D)), dt)
            g = -np.log1p(np.exp(-rng.standard_normal((1, T, H_v)))).astype(np.float32).astype(np.float64)
            beta = (1 / (1 + np.exp(-rng.standard_normal((1, T, H_v))))).astype(np.float32).astype(np.float64)
            h0 = (0.5 * rng.standard_normal((len(lengths), H_v, D, D))).astype(np.float32).astype(np.float64)
            o_ref, h_ref = R.recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=h0, cu_seqlens=cu)
            args = (t(q, dt), t(k, dt), t(v, dt))
            kw = dict(g=t(g), beta=t(beta), initial_state=t(h0), cu_seqlens=torch.tensor(cu, device=dev))
            for name, fn in (("chunk", K.chunk_gated_delta_rule), ("recurrent", K.recurrent_gated_delta_rule)):
                with poison_outputs():
                    o, h = fn(*args, **kw)
                ms = _time(partial(fn, *args, **kw), dev, iters if name == "chunk" or gpu else 1)
                rows.append((f"{name} T={T} H_v={H_v} D={D}", str(dt), rel_rms(o_ref, o), rel_rms(h_ref, h), ms))
            pool0 = (0.5 * rng.standard_normal((S, H_v, D, D))).astype(np.float32)
            slots = rng.permutation(S)[:B]
            x = [rnd(rng.standard_normal((B, 1, H_k, D)), dt) for _ in range(2)] + \
                [rnd(rng.standard_normal((B, 1, H_v, D)), dt)]
            gd_, bd_ = g[:, :B].reshape(B, 1, H_v), beta[:, :B].reshape(B, 1, H_v)
            o_ref, h_ref = R.recurrent_gated_delta_rule(*x, g=gd_, beta=bd_, initial_state=pool0[slots])
            pool = t(pool0)
            dargs = ([t(a, dt) for a in x], dict(g=t(gd_), beta=t(bd_), state_pool=pool,
                                                   slot_ids=torch.tensor(slots, device=dev)))
            with poison_outputs():
                o = K.fused_recurrent_gated_delta_rule_update(*dargs[0], **dargs[1])
            err_h = rel_rms(h_ref, pool[torch.tensor(slots, device=dev)])
            ms = _time(partial(K.fused_recurrent_gated_delta_rule_update, *dargs[0], **dargs[1]), dev, iters)
            rows.append((f"decode B={B} H_v={H_v} D={D}", str(dt), rel_rms(o_ref, o), err_h, ms))
    elif which == "conv":
        from optimized.triton import conv as K
        from reference import conv as R

        C, Kc, lengths, B, S = (10240, 4, [1, 2, 3000, 17], 256, 512) if gpu else (40, 4, [1, 2, 70], 3, 5)
        T = sum(lengths)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        for dt in dtypes:
            x, w = rnd(rng.standard_normal((T, C)), dt), rnd(rng.standard_normal((C, Kc)), dt)
            st = rnd(rng.standard_normal((len(lengths), C, Kc - 1)), dt)
            y_ref, s_ref = R.causal_conv1d(x, w, conv_state=st, cu_seqlens=cu)
            args = (t(x, dt), t(w, dt))
            kw = dict(conv_state=t(st, dt), cu_seqlens=torch.tensor(cu, device=dev))
            with poison_outputs():
                y, s = K.causal_conv1d(*args, **kw)
            rows.append((f"conv T={T} C={C}", str(dt), rel_rms(y_ref, y), rel_rms(s_ref, s),
                         _time(partial(K.causal_conv1d, *args, **kw), dev, iters)))
            pool0 = rnd(rng.standard_normal((S, C, Kc - 1)), dt)
            slots = rng.permutation(S)[:B]
            xb = rnd(rng.standard_normal((B, C)), dt)
            y_ref, s_ref = R.causal_conv1d_update(xb, w, conv_state=pool0[slots])
            pool = t(pool0, dt)
            ids = torch.tensor(slots, device=dev)
            with poison_outputs():
                y = K.causal_conv1d_update(t(xb, dt), args[1], conv_pool=pool, slot_ids=ids)
            err_y, err_s = rel_rms(y_ref, y), rel_rms(s_ref, pool[ids])
            ms = _time(lambda xb=xb, dt=dt, w=args[1], pool=pool, ids=ids: K.causal_conv1d_update(
                t(xb, dt), w, conv_pool=pool, slot_ids=ids), dev, iters)
            rows.append((f"conv update B={B} C={C}", str(dt), err_y, err_s, ms))
    elif which == "norm":
        from optimized.triton import norm as K
        from reference import norms as R

        R_, D = (8192 * 48, 128) if gpu else (300, 40)
        for dt in dtypes:
            x, z = rnd(rng.standard_normal((R_, D)), dt), rnd(rng.standard_normal((R_, D)), dt)
            w = rng.standard_normal(D).astype(np.float32).astype(np.float64)
            with poison_outputs():
                y = K.gated_rms_norm(t(x, dt), t(z, dt), t(w), 1e-6)
            err_y = rel_rms(R.gated_rms_norm(x, z, w, 1e-6), y)
            ms = _time(lambda x=x, z=z, w=w, dt=dt: K.gated_rms_norm(t(x, dt), t(z, dt), t(w), 1e-6), dev, iters)
            rows.append((f"gated_rms_norm R={R_} D={D}", str(dt), err_y, None, ms))
    else:
        raise ValueError(which)

    print(f"{'case':36s} {'dtype':15s} {'rel RMS out':>12s} {'rel RMS state':>14s} {'ms':>10s}  ({dev})")
    for name, dt, e1, e2, ms in rows:
        e2s = f"{e2:14.2e}" if e2 is not None else f"{'-':>14s}"
        print(f"{name:36s} {dt:15s} {e1:12.2e} {e2s} {ms:10.4f}")
    print("budgets: fp32 1e-5, bf16 1e-2 (tests/_tolerance.py); on CPU the interpreter's timings are meaningless")
    over = [(name, dt) for name, dt, e1, e2, _ in rows
            if not all(np.isfinite(e) and e <= (1e-5 if dt == "torch.float32" else 1e-2)
                       for e in (e1, e2) if e is not None)]
    if over:
        sys.exit(f"OVER BUDGET (or non-finite): {over}")
