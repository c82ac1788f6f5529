"""What every measurement in qwen35 shares: inputs, error metrics, timers, the machine record, JSON, cost formulas.

    from qwen35.measure import gdn_inputs, rel_rms, timeit, machine_info, write_json, gdn_chunk_flops

The CPU benchmarks (qwen35/bench.py), the accuracy experiment (qwen35/accuracy.py), the GPU benchmarks
(scripts/gpu_bench.py), the notebooks and the tests all take these from here, so a FLOP count, an error metric or
an input recipe has exactly one definition.

* inputs   `gdn_inputs` — physically valid gated-delta inputs (g ≤ 0, β ∈ (0, 1)), NumPy float64;
* errors   `to_numpy`, `rel_rms`, `error_metrics` (relative RMS, max-abs, NMSE in dB);
* timing   `SINGLE_THREAD_ENV`, `pin_threads`, `timeit`, `timeit_interleaved`;
* machine  `machine_info(device)` — CPU, device, versions, git commit, date; recorded in every result file;
* JSON     `write_json`, `load_json`;
* costs    FLOP and byte formulas of the gated delta rule (chunked prefill, decode step), the causal conv, the
           gated RMSNorm and the whole model (prefill FLOPs, decode weight bytes).

The module imports with NumPy alone: torch, triton and transformers are looked up inside the functions that use
them, and a missing one is recorded as None.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reference.norms import sigmoid

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "results"  # where result JSON goes by default (the plots are drawn from it)
PLOTS_DIR = REPO / "docs" / "plots"  # where `qwen35 plot` draws to by default


# ================================================================================================================
# inputs
# ================================================================================================================


def logsigmoid(x):
    """log σ(x) = −log(1 + e^{−x}), computed without overflow; ≤ 0 everywhere."""
    return -np.logaddexp(0.0, -x)


@dataclass
class GDNInputs:
    """The inputs of one gated delta rule call (NumPy float64; callers cast)."""

    q: np.ndarray  # [B, T, H_k, D_k]
    k: np.ndarray  # [B, T, H_k, D_k]
    v: np.ndarray  # [B, T, H_v, D_v]
    g: np.ndarray  # [B, T, H_v]  log-decay, ≤ 0
    beta: np.ndarray  # [B, T, H_v]  write strength, in [0, 1]
    h0: np.ndarray | None  # [N, H_v, D_k, D_v]  initial state, or None

    NAMES = ("q", "k", "v", "g", "beta")

    def as_dict(self) -> dict:
        """{q, k, v, g, beta} — the per-token inputs of the rule (the initial state h0 is not one of them)."""
        return {name: getattr(self, name) for name in self.NAMES}


def gdn_inputs(
    seed: int,
    B: int,
    T: int,
    H_k: int,
    H_v: int,
    D_k: int,
    D_v: int,
    *,
    N: int | None = None,
    gate_normalizer: float = 1.0,
    mask_p: float = 0.1,
    with_h0: bool = True,
    beta_mode: str = "random",  # "random" | "zero" | "one"
) -> GDNInputs:
    """Physically valid inputs of the gated delta rule, drawn from one seeded generator.

    g = logsigmoid(·)/gate_normalizer ≤ 0 (a decay: e^g ∈ (0, 1]; larger normalizers mean longer memory), with a
    random fraction `mask_p` of the steps set to exactly 0 (no decay at all); β = σ(·) ∈ (0, 1) (or all 0 / all 1
    with `beta_mode`); q and k raw (the rule L2-normalises them); h0 = 0.5·N(0, 1) of N sequences (default B)
    unless `with_h0` is False.  Random g ~ N(0, 1) would make e^g > 1 and the state explode: a test on such
    inputs proves nothing (docs/pitfalls.md, B24).

    The draws come in a fixed order (q, k, v, g, mask, β, h0), so a given seed gives the same q … β whatever
    `with_h0` or `N` is.
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H_k, D_k))
    k = rng.standard_normal((B, T, H_k, D_k))
    v = rng.standard_normal((B, T, H_v, D_v))
    g = logsigmoid(rng.standard_normal((B, T, H_v))) / gate_normalizer
    if mask_p > 0:
        g = np.where(rng.random(g.shape) < mask_p, 0.0, g)
    if beta_mode == "zero":
        beta = np.zeros((B, T, H_v))
    elif beta_mode == "one":
        beta = np.ones((B, T, H_v))
    elif beta_mode == "random":
        beta = sigmoid(rng.standard_normal((B, T, H_v)))
    else:
        raise ValueError(f"gdn_inputs: beta_mode must be 'random', 'zero' or 'one', got {beta_mode!r}")
    n = B if N is None else N
    h0 = 0.5 * rng.standard_normal((n, H_v, D_k, D_v)) if with_h0 else None
    return GDNInputs(q, k, v, g, beta, h0)


# ================================================================================================================
# errors
# ================================================================================================================


def to_numpy(x) -> np.ndarray:
    """A float64 NumPy copy of an array or a torch tensor (any device; bf16 widened first), without importing
    torch."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)


def rel_rms(ref, got) -> float:
    """Relative RMS error ‖ref − got‖₂ / ‖ref‖₂ (the absolute RMS error when ref is all zeros)."""
    ref, got = to_numpy(ref), to_numpy(got)
    den = float(np.sqrt(np.mean(ref * ref)))
    num = float(np.sqrt(np.mean((ref - got) ** 2)))
    if den == 0.0:
        return num
    return num / den


def error_metrics(ref, got) -> dict:
    """{rel_rms, max_abs, nmse_db, finite} of `got` against `ref`; NMSE in dB = 20·log10(rel RMS).

    A result holding NaN or inf gets inf everywhere and finite False (instead of a NaN that compares as small).
    """
    ref, got = to_numpy(ref), to_numpy(got)
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, result {got.shape}")
    if not np.all(np.isfinite(got)):
        return {"rel_rms": float("inf"), "max_abs": float("inf"), "nmse_db": float("inf"), "finite": False}
    rel = rel_rms(ref, got)
    return {"rel_rms": rel, "max_abs": float(np.max(np.abs(ref - got))) if ref.size else 0.0,
            "nmse_db": 20.0 * math.log10(rel) if rel > 0 else -400.0, "finite": True}


# ================================================================================================================
# timing
# ================================================================================================================

# One thread for every BLAS.  NumPy's OpenBLAS reads its variable once, when NumPy is first imported, so these reach
# only a process started with them: `qwen35 bench` re-executes itself with them (qwen35/commands/bench.py).
SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pin_threads():
    """One compute thread: SINGLE_THREAD_ENV as defaults of this process's environment (for the pools not started
    yet and for child processes) and torch's intra-op pool set to 1.  Returns the torch module."""
    for name, value in SINGLE_THREAD_ENV.items():
        os.environ.setdefault(name, value)
    import torch

    torch.set_num_threads(1)
    return torch


def timeit(fn, *, repeats: int = 5, warmup: int = 1, inner: int = 1) -> dict:
    """Median / min seconds per call of fn() over `repeats` timings of `inner` calls each, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t0) / inner)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "repeats": repeats, "inner": inner}


def timeit_interleaved(fns: dict, repeats: int) -> dict:
    """Time several contenders round-robin (a, b, a, b, ...) after one warm-up call each, so that a change of machine
    load hits all of them alike.  A contender may return its own measured seconds (a float), which is then used
    instead of the wall time of the call.  Returns {name: {median_s, min_s, repeats}}."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            r = f()
            ts[k].append(r if isinstance(r, float) else time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "repeats": repeats} for k, v in ts.items()}


# ================================================================================================================
# the machine
# ================================================================================================================


def git_commit(short: bool = True) -> str | None:
    """The checkout's HEAD commit (abbreviated unless short=False); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", *(["--short"] if short else []), "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo's model name where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _installed_version(distribution: str) -> str | None:
    """A package's installed version from its metadata, without importing it (transformers takes seconds to
    import)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: str = "cpu") -> dict:
    """The conditions of a measurement: host CPU, the device, versions, git commit and UTC date.

    Keys: host_cpu, cpu_count, device, device_name, platform, python, numpy, torch, torch_threads, cuda, triton,
    transformers, git_commit, date_utc; on a CUDA device also gpu, sm_count, gpu_mem_gib, capability.  A package
    that is not installed is None.  Every result JSON carries this (its `meta`), and every plot's footer is made
    from it, so a number never travels without the machine and the versions it was measured with.
    """
    cpu = cpu_name()
    info = {
        "host_cpu": cpu,
        "cpu_count": os.cpu_count(),
        "device": device,
        "device_name": f"CPU: {cpu}",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None,
        "torch_threads": None,
        "cuda": None,
        "triton": None,
        "transformers": _installed_version("transformers"),
        "git_commit": git_commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), cuda=torch.version.cuda)
        if device.startswith("cuda") and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(torch.device(device))
            info.update(device_name=p.name, gpu=p.name, sm_count=p.multi_processor_count,
                        gpu_mem_gib=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}")
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


# ================================================================================================================
# JSON
# ================================================================================================================


def _plain(obj):
    """json.dumps' fallback: NumPy scalars and arrays as Python numbers and lists, paths as strings; anything else
    as its str(), so a long run's partial results are never lost to one odd value."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def write_json(data: dict, path) -> Path:
    """Write `data` as indented JSON (parent directories created, trailing newline); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_plain) + "\n")
    return path


def load_json(path) -> dict:
    return json.loads(Path(path).read_text())


# ================================================================================================================
# cost formulas
# ================================================================================================================
#
# FLOPs count 2 per multiply-add of every matrix product, at the product's full (dense) size: nothing is halved for
# triangular structure, except where a triangular matrix is *inverted* (a dense inverse does not exist there).
# Elementwise work — decays, β/γ scalings, subtractions, masks, L2 norms — is O(C·D) per chunk against the O(C·D²)
# products and is left out of the chunked count.  Bytes are compulsory traffic: each input read once, each output
# written once, no scratch.


def _chunk_flops_per_head(c: int, D_k: int, D_v: int) -> int:
    """FLOPs of one chunk of c tokens, one value head (see gdn_chunk_flops)."""
    return 6 * c * c * D_k + 4 * c * c * D_v + 6 * c * D_k * D_v + (c ** 3 - c) // 3


def gdn_chunk_flops(T: int, H_v: int, D_k: int, D_v: int, C: int = 64) -> int:
    """FLOPs of the chunked (WY / UT-transform) gated delta rule on T tokens of one sequence, H_v value heads.

    The sequence is cut into chunks of C tokens, the last one holding the remaining T mod C (counted at its own
    size; padding is not work).  Per chunk of c tokens and value head, with K = D_k, V = D_v, S the [K, V] state
    entering the chunk (reference/gated_delta.py, `chunk_gated_delta_rule`, has the algebra):

        A  = (β k̂ k̂ᵀ ⊙ decay), strictly lower       [c, K]·[K, c]            2·c²·K
        Aqk = q̃ k̂ᵀ ⊙ decay                          [c, K]·[K, c]            2·c²·K
        T  = (I + A)⁻¹, unit lower triangular        forward substitution     (c³ − c)/3
        [U | W] = T·[βV | βγK̂]                       [c, c]·[c, V + K]        2·c²·(K + V)
        W·S                                          [c, K]·[K, V]            2·c·K·V
        (q̃ ⊙ γ)·S                                   [c, K]·[K, V]            2·c·K·V
        Aqk·V_new,  V_new = U − W·S                  [c, c]·[c, V]            2·c²·V
        (K̂ ⊙ decay)ᵀ·V_new  (the state update)       [K, c]·[c, V]            2·c·K·V
        ------------------------------------------------------------------------------------
        total                                        6·c²·K + 4·c²·V + 6·c·K·V + (c³ − c)/3

    The inverse: column j of T is a forward substitution over the c − 1 − j rows below the diagonal, row i of it
    an (i − j)-term dot product, so Σ_d d·(c − d) = (c³ − c)/6 multiply-adds = (c³ − c)/3 FLOPs (an integer:
    c³ − c = (c − 1)·c·(c + 1)).  Per token that is (c² − 1)/3 ≈ C²/3: with the other terms divided by c, the
    per-token, per-head count of a full chunk is 6·C·K + 4·C·V + 6·K·V + (C² − 1)/3.

    That is the right count.  Leaving the inverse out (6·C·K + 4·C·V + 6·K·V = 180,224 per token-head at C = 64,
    K = V = 128) misses 1,365 FLOPs per token-head, 0.76 % of the work at Qwen3.5's head size, and more at larger
    C or smaller D (5 % at C = 64, K = V = 32).  The optimized torch path inverts T blockwise (8 × 8 forward
    substitutions, then block merges by matrix products), which does somewhat more arithmetic than this; the count
    is the algorithm's, not one implementation's.  It is the explicit-inverse form (the optimized path's, and
    fla's): the NumPy oracle, reference/gated_delta.py, solves (I + A)·[U | W] = [βV | βγK̂] by substitution
    without forming T, about 0.9x this count at Qwen3.5's head size.
    """
    full, tail = divmod(int(T), int(C))
    per_head = full * _chunk_flops_per_head(C, D_k, D_v) + (_chunk_flops_per_head(tail, D_k, D_v) if tail else 0)
    return H_v * per_head


def gdn_chunk_bytes(T: int, N: int, H_k: int, H_v: int, D_k: int, D_v: int, elem_bytes: int) -> int:
    """Compulsory bytes of one chunked prefill call: q, k [T, H_k, D_k] and v, o [T, H_v, D_v] in the activation
    dtype (`elem_bytes` each), g and β [T, H_v] in fp32, the fp32 final state [N, H_v, D_k, D_v] of the N
    sequences written once (no initial state read)."""
    return T * (2 * H_k * D_k + 2 * H_v * D_v) * elem_bytes + T * H_v * 2 * 4 + N * H_v * D_k * D_v * 4


def gdn_decode_flops(B: int, H_v: int, D_k: int, D_v: int) -> int:
    """FLOPs of one decode step (one token per request) for B requests, per value head:
    kᵀS (2·K·V), the rank-1 update S += k·δᵀ (2·K·V), qᵀS (2·K·V); the L2 norms of q and k (2·K each: a multiply
    and an add per element); δ = β·(v − γ·kᵀS) (2·V).  The decay γ·S (K·V multiplies) is an elementwise scaling
    and, as in the chunked count, not counted.  The step is bound by the state's bytes, not by these FLOPs."""
    return B * H_v * (6 * D_k * D_v + 4 * D_k + 2 * D_v)


def gdn_decode_bytes(B: int, H_k: int, H_v: int, D_k: int, D_v: int, elem_bytes: int) -> int:
    """Compulsory bytes of one decode step for B requests: the fp32 state read and written once
    (2·B·H_v·K·V·4 — almost all of it), q, k, v, o in the activation dtype, g and β in fp32."""
    return 2 * B * H_v * D_k * D_v * 4 + B * (2 * H_k * D_k + 2 * H_v * D_v) * elem_bytes + 2 * B * H_v * 4


def causal_conv1d_flops(T: int, channels: int, kernel: int) -> int:
    """FLOPs of a depthwise causal conv over T tokens: one multiply-add per tap, channel and token."""
    return 2 * kernel * channels * T


def causal_conv1d_bytes(T: int, channels: int, kernel: int, elem_bytes: int) -> int:
    """x read and y written once [T, channels], the [channels, kernel] weight read once."""
    return 2 * T * channels * elem_bytes + channels * kernel * elem_bytes


def gated_rms_norm_flops(rows: int, D: int) -> int:
    """y = rmsnorm(x)·w·silu(z) over rows of D: ≈ 8 FLOPs per element (square-and-add, scale, weight, the SiLU's
    sigmoid and two multiplies)."""
    return 8 * rows * D


def gated_rms_norm_bytes(rows: int, D: int, elem_bytes: int) -> int:
    """x and z read, y written [rows, D]; the fp32 weight [D] read once."""
    return 3 * rows * D * elem_bytes + D * 4


def linear_weights_per_token(config) -> int:
    """Weight elements one token multiplies through in the language model, lm_head excluded: every projection of
    every layer (Gated DeltaNet: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj; attention: q(+gate), k,
    v, o) and the MLP — for a MoE layer the router, the num_experts_per_tok active experts and the shared expert
    with its gate.  The embedding is a lookup and the depthwise conv and norms are elementwise: not counted."""
    c = config
    H = c.hidden_size
    n = 0
    for kind in c.layer_types:
        if kind == "linear_attention":
            n += (c.conv_dim + c.value_dim + 2 * c.linear_num_value_heads) * H + H * c.value_dim
        else:
            n += c.q_proj_rows * H + 2 * c.num_key_value_heads * c.head_dim * H + H * c.num_attention_heads * c.head_dim
        if c.is_moe:
            n += (c.num_experts * H + c.num_experts_per_tok * 3 * c.moe_intermediate_size * H
                  + 3 * c.shared_expert_intermediate_size * H + H)
        else:
            n += 3 * c.intermediate_size * H
    return n


def model_prefill_flops(config, T: int) -> int:
    """FLOPs of one prefill of T tokens through the language model, logits for the last position only:

        2·T·(linear_weights_per_token)                      every projection, every token
      + Σ over Gated DeltaNet layers  gdn_chunk_flops(T)      the chunked rule
      + Σ over attention layers  2·T²·n_heads·head_dim        QKᵀ and PV, causal (half of the dense 4·T²·nh·hd)
      + 2·hidden·vocab                                        the lm_head, one row
    """
    c = config
    total = 2 * T * linear_weights_per_token(c) + 2 * c.hidden_size * c.vocab_size
    total += c.num_linear_layers * gdn_chunk_flops(T, c.linear_num_value_heads, c.linear_key_head_dim,
                                                   c.linear_value_head_dim)
    total += c.num_full_layers * 2 * T * T * c.num_attention_heads * c.head_dim
    return int(total)


def decode_weight_bytes(config, dtype_bytes: int = 4) -> int:
    """Bytes one decode step (batch 1) must stream: every weight a token multiplies through, the lm_head included,
    once, at `dtype_bytes` each (a MoE layer reads its active experts only)."""
    return int((linear_weights_per_token(config) + config.hidden_size * config.vocab_size) * dtype_bytes)
