"""Accuracy of the optimized gated delta rule against the float64 oracle, written to JSON (pitfall B8, B24).

Two experiments, both on physically valid inputs (`qwen35.measure.gdn_inputs`: g = logsigmoid(·)/normalizer ≤ 0
with a few entries masked to 0, β = σ(·), q and k raw — the rule L2-normalises them):

1. **By sequence length.**  For T in a list of lengths, the optimized torch chunked (WY) form and the optimized torch
   per-token recurrence, with q/k/v in float32 or bfloat16 (g and β in float32, as the model computes them; the
   state is always fp32 inside), against `reference.gated_delta.recurrent_gated_delta_rule` in float64 on *the same
   rounded inputs* — so the error measured is the implementation's (arithmetic + output rounding), not the cost of
   rounding the inputs.  The float64 reference chunked form is included as the floor (≈ 1e-15).
2. **Decode drift.**  `steps` decode steps through `fused_recurrent_gated_delta_rule_update` (one token per step,
   state in a slot pool; q/k/v values rounded to bf16 but carried in fp32 so that the outputs are not rounded),
   with the state kept in fp32, or rounded to bf16 after every step, for a short-memory (g/16) and a long-memory
   (g/256) decay (what an engine that
   stores its recurrent state in bf16 does; pitfall B8: SGLang, vLLM and mlx-lm all saw the difference).  Each
   step's output is compared with the float64 recurrence over the same inputs.

Metrics (pitfall B24, `qwen35.measure.error_metrics`): relative RMS error ‖ref − got‖₂ / ‖ref‖₂, max-abs error,
NMSE in dB = 20·log10(rel RMS).  Every result file records the machine and the versions
(`qwen35.measure.machine_info`); qwen35.report.accuracy_table renders it, qwen35.plot draws it.

    qwen35 accuracy                 # lengths 64..4096, 2048 decode steps  -> results/accuracy.json
    qwen35 accuracy --quick         # small sizes (seconds), for tests and CI
    qwen35 accuracy --backend triton --device cuda --out results/accuracy_triton.json    # the Triton kernels
"""
from __future__ import annotations

import os
import time

import numpy as np

from qwen35.measure import error_metrics, gdn_inputs, machine_info

# Geometry of one Gated DeltaNet layer: Qwen3.5 head sizes (D_k = D_v = 128, 2 value heads per key head) with fewer
# heads so that the float64 oracle stays quick on a CPU.  Accuracy depends on D and on the decay, not on H.
DEFAULT_SHAPE = dict(B=1, H_k=2, H_v=4, D_k=128, D_v=128)
FULL_LENGTHS = (64, 256, 1024, 4096)
QUICK_LENGTHS = (16, 64, 160)
FULL_STEPS = 2048
QUICK_STEPS = 128


# ------------------------------------------------------------------------------------------------ experiments
_TORCH_DTYPES = ("float32", "bfloat16")
BACKENDS = ("torch", "triton")


def _ops(backend: str, device: str):
    """(chunk, recurrent, decode update) of the requested backend, resolved (and logged) by optimized.backend.

    Returns the implementation label ("optimized-torch" / "optimized-triton") and the three functions; asking for
    "triton" where it cannot run (no CUDA and no TRITON_INTERPRET=1) is an error here, not a silent fallback.
    """
    from optimized import backend as dispatch

    got = dispatch.resolve_backend(backend, device)
    if got != backend:
        raise RuntimeError(f"backend {backend!r} is not available on {device} (resolved to {got!r}); for Triton on "
                           "a CPU set TRITON_INTERPRET=1 (slow: use small --lengths and --steps)")
    names = ("chunk_gated_delta_rule", "recurrent_gated_delta_rule", "fused_recurrent_gated_delta_rule_update")
    return f"optimized-{got}", tuple(dispatch.get_op(n, backend, device) for n in names)


def _to_torch(x, dtype, device):
    import torch

    return torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device).to(getattr(torch, dtype))


def _round_trip(x, dtype) -> np.ndarray:
    """What the implementation actually receives, as float64 (bf16 rounding applied where asked)."""
    import torch

    return torch.as_tensor(np.asarray(x), dtype=torch.float64).to(getattr(torch, dtype)).double().numpy()


def accuracy_by_length(lengths=FULL_LENGTHS, *, shape=None, seed: int = 0, chunk_size: int = 64,
                       dtypes=_TORCH_DTYPES, device: str = "cpu", backend: str = "torch",
                       progress: bool = True) -> list[dict]:
    """Rows {T, form, impl, dtype, rel_rms, max_abs, nmse_db, seconds} for the output o and the final state."""
    import torch
    from tqdm.auto import tqdm

    from reference.gated_delta import chunk_gated_delta_rule as ref_chunk
    from reference.gated_delta import recurrent_gated_delta_rule as ref_rec

    impl, (opt_chunk, opt_rec, _) = _ops(backend, device)
    shape = dict(DEFAULT_SHAPE if shape is None else shape)
    rows = []
    jobs = [(T, dt) for T in lengths for dt in dtypes]
    bar = tqdm(jobs, desc="accuracy by length", disable=not progress, leave=False)
    for T, dt in bar:
        bar.set_postfix(T=T, dtype=dt)
        x = gdn_inputs(seed + T, T=T, **shape, with_h0=False).as_dict()
        # The oracle sees exactly what the implementation sees: q, k, v rounded to dt; g and β in float32.
        xin = {name: _round_trip(x[name], dt if name in ("q", "k", "v") else "float32") for name in x}
        o_ref, s_ref = ref_rec(xin["q"], xin["k"], xin["v"], g=xin["g"], beta=xin["beta"])
        if dt == dtypes[0]:  # the float64 chunked form against the float64 recurrence: the floor
            t0 = time.perf_counter()
            o_c, s_c = ref_chunk(xin["q"], xin["k"], xin["v"], g=xin["g"], beta=xin["beta"], chunk_size=chunk_size)
            sec = time.perf_counter() - t0
            for what, r, gt in (("o", o_ref, o_c), ("final_state", s_ref, s_c)):
                rows.append({"T": T, "form": "chunk", "impl": "reference", "dtype": "float64", "tensor": what,
                             "seconds": sec, **error_metrics(r, gt)})
        tq = {n: _to_torch(xin[n], dt if n in ("q", "k", "v") else "float32", device) for n in xin}
        for form, fn, extra in (("chunk", opt_chunk, {"chunk_size": chunk_size}), ("recurrent", opt_rec, {})):
            with torch.no_grad():
                t0 = time.perf_counter()
                o, s = fn(tq["q"], tq["k"], tq["v"], g=tq["g"], beta=tq["beta"], **extra)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                sec = time.perf_counter() - t0
            for what, r, gt in (("o", o_ref, o), ("final_state", s_ref, s)):
                rows.append({"T": T, "form": form, "impl": impl, "dtype": dt, "tensor": what,
                             "seconds": sec, **error_metrics(r, gt.detach().double().cpu().numpy())})
    return rows


def decode_drift(steps: int = FULL_STEPS, *, shape=None, seed: int = 1, gate_normalizer: float = 16.0,
                 input_dtype: str = "bfloat16", device: str = "cpu", backend: str = "torch",
                 progress: bool = True) -> dict:
    """Relative RMS error of each decode step's output vs float64, for an fp32 state and a bf16-rounded state.

    Slow decay (g = logsigmoid(·)/16, mean ≈ −0.05: the state remembers ~20 tokens or more, and masked steps keep
    everything) so that state rounding errors can accumulate, as in the long-memory heads of a trained model.
    """
    import torch
    from tqdm.auto import tqdm

    from reference.gated_delta import recurrent_gated_delta_rule as ref_rec

    impl, (_, _, decode_update) = _ops(backend, device)
    shape = dict(DEFAULT_SHAPE if shape is None else shape)
    B, H_k, H_v, D_k, D_v = (shape[n] for n in ("B", "H_k", "H_v", "D_k", "D_v"))
    B = max(B, 4)  # a few independent requests, so each step's error is an average over more than one row
    x = gdn_inputs(seed, B, steps, H_k, H_v, D_k, D_v, gate_normalizer=gate_normalizer, with_h0=False).as_dict()
    xin = {n: _round_trip(x[n], input_dtype if n in ("q", "k", "v") else "float32") for n in x}
    o_ref, _ = ref_rec(xin["q"], xin["k"], xin["v"], g=xin["g"], beta=xin["beta"])  # [B, steps, H_v, D_v]
    # The values are rounded to `input_dtype`, but carried in float32 tensors: the output is then not rounded to
    # bf16, and the only difference between the two curves is the dtype the state is kept in between steps.
    tq = {n: _to_torch(xin[n], "float32", device) for n in xin}

    curves = {}
    for state_dtype in ("float32", "bfloat16"):
        # A pool with more slots than requests, requests at scattered slots, as in a server.
        pool = torch.zeros(2 * B + 1, H_v, D_k, D_v, dtype=torch.float32, device=device)
        slots = torch.arange(B, device=device) * 2 + 1
        errs = np.empty(steps)
        bar = tqdm(range(steps), desc=f"decode drift ({state_dtype} state)", disable=not progress, leave=False)
        with torch.no_grad():
            for t in bar:
                o = decode_update(
                    tq["q"][:, t:t + 1], tq["k"][:, t:t + 1], tq["v"][:, t:t + 1], g=tq["g"][:, t:t + 1],
                    beta=tq["beta"][:, t:t + 1], state_pool=pool, slot_ids=slots)  # [B, 1, H_v, D_v]
                if state_dtype == "bfloat16":  # the state is stored in bf16 between steps
                    pool.copy_(pool.to(torch.bfloat16).to(torch.float32))
                errs[t] = error_metrics(o_ref[:, t], o[:, 0].double().cpu().numpy())["rel_rms"]
        curves[state_dtype] = errs
    return {
        "steps": steps, "impl": impl, "input_dtype": input_dtype, "input_carrier": "float32", "output_dtype": "float32",
        "gate_normalizer": gate_normalizer, "batch": B,
        "rel_rms": {k: v.tolist() for k, v in curves.items()},
        "summary": {k: {"first_64_mean": float(np.mean(v[:64])), "last_64_mean": float(np.mean(v[-64:])),
                        "max": float(np.max(v))} for k, v in curves.items()},
    }


def run_accuracy(*, quick: bool = False, lengths=None, steps: int | None = None, device: str = "cpu",
                 backend: str = "torch", seed: int = 0, progress: bool = True) -> dict:
    """Both experiments -> one JSON-ready dict (kind "accuracy")."""
    lengths = tuple(lengths) if lengths else (QUICK_LENGTHS if quick else FULL_LENGTHS)
    steps = steps if steps is not None else (QUICK_STEPS if quick else FULL_STEPS)
    shape = dict(DEFAULT_SHAPE)
    t0 = time.perf_counter()
    by_length = accuracy_by_length(lengths, shape=shape, seed=seed, device=device, backend=backend,
                                   progress=progress)
    drift = decode_drift(steps, shape=shape, seed=seed + 1, device=device, backend=backend, progress=progress)
    # A long-memory regime too (mean g ≈ −0.003: a horizon of a few hundred tokens, like slow-decay heads).
    drift_slow = decode_drift(steps, shape=shape, seed=seed + 2, gate_normalizer=256.0, device=device,
                              backend=backend, progress=progress)
    return {
        "kind": "accuracy",
        "schema": 1,
        "meta": {
            **machine_info(device),
            "quick": quick,
            "backend": backend,
            "interpreter": os.environ.get("TRITON_INTERPRET") == "1" and backend == "triton",
            "shape": shape,
            "chunk_size": 64,
            "oracle": "reference.gated_delta.recurrent_gated_delta_rule, float64, on the same rounded inputs",
            "dtypes": "q/k/v in the row's dtype; g and beta float32; state fp32 inside the kernels",
            "metrics": "rel_rms = ||ref-got||/||ref||; nmse_db = 20 log10(rel_rms); max_abs",
            "seconds": round(time.perf_counter() - t0, 2),
        },
        "by_length": by_length,
        "drift": drift,
        "drift_slow_decay": drift_slow,
    }
