"""Accuracy of the optimized gated delta rule against the float64 oracle, written to JSON (pitfall B8, B24).

Two experiments, both on physically valid inputs (tests/_factory.py: g = logsigmoid(·)/normalizer ≤ 0 with a few
entries masked to 0, β = σ(·), q and k raw — the rule L2-normalises them):

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

Metrics (pitfall B24): relative RMS error ‖ref − got‖₂ / ‖ref‖₂, max-abs error, NMSE in dB = 20·log10(rel RMS).

    qwen35 accuracy                 # lengths 64..4096, 2048 decode steps  -> results/accuracy.json
    qwen35 accuracy --quick         # small sizes (seconds), for tests and CI
    qwen35 accuracy --backend triton --device cuda --out results/accuracy_triton.json    # the Triton kernels
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "results"

# Geometry of one Gated DeltaNet layer: Qwen3.5 head sizes (D_k = D_v = 128, 2 value heads per key head) with fewer
# heads so that the float64 oracle stays quick on a CPU.  Accuracy depends on D and on the decay, not on H.
DEFAULT_SHAPE = dict(B=1, H_k=2, H_v=4, D_k=128, D_v=128)
FULL_LENGTHS = (64, 256, 1024, 4096)
QUICK_LENGTHS = (16, 64, 160)
FULL_STEPS = 2048
QUICK_STEPS = 128


# ------------------------------------------------------------------------------------------------ inputs, metrics
def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def gdn_inputs(seed: int, B: int, T: int, H_k: int, H_v: int, D_k: int, D_v: int, *, gate_normalizer: float = 1.0,
               mask_p: float = 0.1) -> dict:
    """Float64 inputs of the gated delta rule in the recipe of the shared test factory (tests/_factory.py).

    Returns a dict of q, k [B, T, H_k, D_k]; v [B, T, H_v, D_v]; g, beta [B, T, H_v].
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H_k, D_k))
    k = rng.standard_normal((B, T, H_k, D_k))
    v = rng.standard_normal((B, T, H_v, D_v))
    g = _logsigmoid(rng.standard_normal((B, T, H_v))) / gate_normalizer  # log-decay ≤ 0
    g = np.where(rng.random(g.shape) < mask_p, 0.0, g)  # some steps do not decay at all
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, H_v))))  # write strength in (0, 1)
    return dict(q=q, k=k, v=v, g=g, beta=beta)


def error_metrics(ref, got) -> dict:
    """Relative RMS error, max-abs error and NMSE (dB) of `got` against `ref` (float64 arrays)."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, result {got.shape}")
    if not np.all(np.isfinite(got)):
        return {"rel_rms": float("inf"), "max_abs": float("inf"), "nmse_db": float("inf"), "finite": False}
    err = float(np.sqrt(np.mean((ref - got) ** 2)))
    den = float(np.sqrt(np.mean(ref ** 2)))
    rel = err / den if den > 0 else err
    return {"rel_rms": rel, "max_abs": float(np.max(np.abs(ref - got))) if ref.size else 0.0,
            "nmse_db": 20.0 * math.log10(rel) if rel > 0 else -400.0, "finite": True}


# ------------------------------------------------------------------------------------------------ metadata
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """Machine, versions and date, recorded in every result file (every plot states them)."""
    import torch

    info = {
        "host_cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": (torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda")
                        else f"CPU: {_cpu_name()}"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# ------------------------------------------------------------------------------------------------ experiments
_TORCH_DTYPES = ("float32", "bfloat16")
BACKENDS = ("torch", "triton")


def _ops(backend: str, device: str):
    """(chunk, recurrent, decode update) of the requested backend, resolved (and logged) by optimized.backend.

    Returns the implementation label ("optimized-torch" / "optimized-triton") and the three functions; asking for
    "triton" where it cannot run (no CUDA and no TRITON_INTERPRET=1) is an error here, not a silent fallback.
    """
    from optimized import backend as B

    got = B.resolve_backend(backend, device)
    if got != backend:
        raise RuntimeError(f"backend {backend!r} is not available on {device} (resolved to {got!r}); for Triton on "
                           "a CPU set TRITON_INTERPRET=1 (slow: use small --lengths and --steps)")
    names = ("chunk_gated_delta_rule", "recurrent_gated_delta_rule", "fused_recurrent_gated_delta_rule_update")
    return f"optimized-{got}", tuple(B.get_op(n, backend, device) for n in names)


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
        x = gdn_inputs(seed + T, T=T, **shape)
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
    x = gdn_inputs(seed, B, steps, H_k, H_v, D_k, D_v, gate_normalizer=gate_normalizer)
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


def accuracy_table(data: dict, tensor: str = "o") -> str:
    """A Markdown table of the by-length rows for one tensor ("o" or "final_state")."""
    rows = [r for r in data["by_length"] if r["tensor"] == tensor]
    lines = ["| T | implementation | form | dtype | rel. RMS error | max abs error | NMSE (dB) |",
             "|---:|---|---|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["T"], r["impl"] != "reference", r["form"], r["dtype"])):
        lines.append(f"| {r['T']} | {r['impl']} | {r['form']} | {r['dtype']} | {r['rel_rms']:.2e} | "
                     f"{r['max_abs']:.2e} | {r['nmse_db']:.1f} |")
    return "\n".join(lines)


def write_json(data: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


if __name__ == "__main__":  # python -m qwen35.accuracy --quick
    from qwen35.commands.accuracy import add_arguments, run
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
