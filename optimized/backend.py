"""Which implementation runs: the torch ops of `optimized/` or the Triton kernels of `optimized/triton/`.

    resolve_backend("auto" | "torch" | "triton" | None, device) -> "torch" | "triton"

* None means the environment variable QWEN35_BACKEND (default "auto").
* "auto": Triton on a CUDA device when `optimized.triton` imports; torch otherwise (the torch ops are the fast CPU
  path).  CUDA without Triton falls back to torch with a visible warning (pitfall B21: never silently slow).
* "triton": the kernels; on CPU tensors only under TRITON_INTERPRET=1 (the interpreter — how the tests check the
  kernels without a GPU); otherwise a warning and the torch path.
* "torch": always the torch ops.

The decision is logged once per (request, device type) through `logging` (logger "qwen35.optimized"), and a slow
fallback also raises a `RuntimeWarning` once.  Kernel ops whose Triton twin is missing fall back to torch with a
one-time log.  The dispatching wrappers below all take `backend=` and have the shared signatures.

The Triton kernels are inference-only (they have no backward): a wrapper that would run one while autograd records
(grad enabled and an input requires grad) raises a ConfigError naming the op and asking for backend='torch',
whose ops are differentiable.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings

import torch

from optimized import conv as _conv
from optimized import gated_delta as _gd
from optimized import norms as _norms
from optimized._checks import records_grad
from reference.errors import ConfigError

__all__ = [
    "resolve_backend",
    "triton_available",
    "get_op",
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "gated_rms_norm",
    "KERNEL_OPS",
]

log = logging.getLogger("qwen35.optimized")
BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "QWEN35_BACKEND"

# op name -> (torch implementation, Triton module that holds the twin)
KERNEL_OPS = {
    "chunk_gated_delta_rule": (_gd.chunk_gated_delta_rule, "optimized.triton.gated_delta"),
    "recurrent_gated_delta_rule": (_gd.recurrent_gated_delta_rule, "optimized.triton.gated_delta"),
    "fused_recurrent_gated_delta_rule_update": (
        _gd.fused_recurrent_gated_delta_rule_update, "optimized.triton.gated_delta"),
    "causal_conv1d": (_conv.causal_conv1d, "optimized.triton.conv"),
    "causal_conv1d_update": (_conv.causal_conv1d_update, "optimized.triton.conv"),
    "gated_rms_norm": (_norms.gated_rms_norm, "optimized.triton.norm"),
}

_logged: set = set()
_triton_import_error: str | None = None
_triton_checked = False


def _once(key, level, msg, warn: bool = False):
    if key in _logged:
        return
    _logged.add(key)
    log.log(level, msg)
    if warn:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when `optimized.triton` imports (Triton installed and the kernel modules load)."""
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        _triton_checked = True
        try:
            importlib.import_module("optimized.triton")
        except Exception as exc:  # ImportError, or a Triton that cannot initialise on this machine
            _triton_import_error = f"{type(exc).__name__}: {exc}"
    return _triton_import_error is None


def resolve_backend(backend: str | None = "auto", device=None) -> str:
    """Resolve a backend request for a device to "torch" or "triton" (see the module docstring)."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if backend in (None, "auto") and os.environ.get(ENV_VAR):
        requested = os.environ[ENV_VAR]
    requested = str(requested).lower()
    if requested not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS} (argument or ${ENV_VAR}), got {requested!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    kind = dev.type
    if requested == "torch":
        _once(("torch", kind), logging.INFO, f"qwen35.optimized: torch ops on {kind} (backend='torch')")
        return "torch"
    if requested == "triton":
        if kind != "cuda" and not interpreting():
            _once(("triton-cpu", kind), logging.WARNING,
                  f"qwen35.optimized: backend='triton' asked for {kind} tensors without TRITON_INTERPRET=1; "
                  "running the torch ops instead", warn=True)
            return "torch"
        if not triton_available():
            _once(("triton-missing", kind), logging.WARNING,
                  f"qwen35.optimized: backend='triton' but optimized.triton does not import "
                  f"({_triton_import_error}); running the torch ops instead (slow on GPU)", warn=True)
            return "torch"
        how = "the Triton interpreter on CPU" if kind != "cuda" else "CUDA"
        _once(("triton", kind), logging.INFO, f"qwen35.optimized: Triton kernels via {how}")
        return "triton"
    # auto
    if kind == "cuda":
        if triton_available():
            _once(("auto-triton", kind), logging.INFO, "qwen35.optimized: Triton kernels on CUDA (backend='auto')")
            return "triton"
        _once(("auto-cuda-torch", kind), logging.WARNING,
              f"qwen35.optimized: CUDA device but optimized.triton does not import ({_triton_import_error}); "
              "SLOW FALLBACK to the torch ops on CUDA", warn=True)
        return "torch"
    _once(("auto-cpu", kind), logging.INFO, f"qwen35.optimized: torch ops on {kind} (backend='auto')")
    return "torch"


def get_op(name: str, backend: str | None = "auto", device=None):
    """The implementation of kernel op `name` for a backend request and device (torch fallback if missing)."""
    if name not in KERNEL_OPS:
        raise KeyError(f"unknown kernel op {name!r}; known: {sorted(KERNEL_OPS)}")
    torch_fn, module = KERNEL_OPS[name]
    if resolve_backend(backend, device) == "torch":
        return torch_fn
    fn = getattr(importlib.import_module(module), name, None)
    if fn is None:
        _once(("missing", name), logging.WARNING,
              f"qwen35.optimized: {module}.{name} does not exist yet; {name} runs the torch op", warn=True)
        return torch_fn
    return fn


def _dev(*tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return None


def _kernel(name: str, backend, *tensors):
    """`get_op(name, backend, device of the tensors)`, refused when it is a Triton kernel and autograd records."""
    fn = get_op(name, backend, _dev(*tensors))
    if fn is not KERNEL_OPS[name][0] and records_grad(*tensors):
        raise ConfigError(f"{name}: backend={backend!r} runs the Triton kernel, which is inference-only (it has no "
                          "backward pass), but an input requires grad; use backend='torch' (differentiable ops) "
                          "for training")
    return fn


def chunk_gated_delta_rule(q, k, v, *, g, beta, scale=None, initial_state=None, output_final_state=True,
                           use_qk_l2norm=True, cu_seqlens=None, chunk_size=64, backend="auto"):
    """Chunked gated delta rule (the signature of `reference.gated_delta`) on the chosen backend.

    Args:
        q, k:          [B, T, H_k, D_k]
        v:             [B, T, H_v, D_v]
        g, beta:       [B, T, H_v] (g: log-space decay, <= 0)
        initial_state: [N, H_v, D_k, D_v] (K-major) or None (zeros)
        cu_seqlens:    [N+1] or None (then N = B)
    Returns:
        o [B, T, H_v, D_v], final_state [N, H_v, D_k, D_v] fp32 (None unless output_final_state)
    """
    fn = _kernel("chunk_gated_delta_rule", backend, q, k, v, g, beta, initial_state)
    return fn(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu_seqlens,
              chunk_size=chunk_size)


def recurrent_gated_delta_rule(q, k, v, *, g, beta, scale=None, initial_state=None, output_final_state=True,
                               use_qk_l2norm=True, cu_seqlens=None, backend="auto"):
    """Per-token gated delta rule (shared signature) on the chosen backend.

    Args / Returns: as `chunk_gated_delta_rule` (q, k [B, T, H_k, D_k]; v [B, T, H_v, D_v]; g, beta [B, T, H_v];
    states [N, H_v, D_k, D_v]), without chunk_size.
    """
    fn = _kernel("recurrent_gated_delta_rule", backend, q, k, v, g, beta, initial_state)
    return fn(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu_seqlens)


def fused_recurrent_gated_delta_rule_update(q, k, v, *, g, beta, state_pool, slot_ids, scale=None,
                                            use_qk_l2norm=True, backend="auto"):
    """One decode token per row, state pool updated in place at slot_ids (the contract in docs/optimized.md).

    Args:
        q, k:       [B, 1, H_k, D_k]
        v:          [B, 1, H_v, D_v]
        g, beta:    [B, 1, H_v]
        state_pool: [S, H_v, D_k, D_v] fp32, updated in place (only the rows named in slot_ids)
        slot_ids:   [B] int; -1 = padding row (output zeros, no slot touched)
    Returns:
        o: [B, 1, H_v, D_v]
    """
    fn = _kernel("fused_recurrent_gated_delta_rule_update", backend, q, k, v, g, beta, state_pool)
    return fn(q, k, v, g=g, beta=beta, state_pool=state_pool, slot_ids=slot_ids, scale=scale,
              use_qk_l2norm=use_qk_l2norm)


def causal_conv1d(x, weight, *, conv_state=None, cu_seqlens=None, activation="silu", backend="auto"):
    """Causal depthwise conv1d (+ SiLU) with a carried state, on the chosen backend.

    Args:
        x:          [T_total, C] or [B, T, C]
        weight:     [C, K_conv] or [C, 1, K_conv]
        conv_state: [N, C, K_conv-1] or None (zeros); not modified
        cu_seqlens: [N+1] or None
    Returns:
        y (shape of x), new_conv_state [N, C, K_conv-1] (the last K_conv-1 pre-activation inputs, oldest first)
    """
    fn = _kernel("causal_conv1d", backend, x, weight, conv_state)
    return fn(x, weight, conv_state=conv_state, cu_seqlens=cu_seqlens, activation=activation)


def causal_conv1d_update(x, weight, *, conv_pool, slot_ids, backend="auto"):
    """One decode token per row, conv pool shifted in place at slot_ids, SiLU applied.

    Args:
        x:         [B, C]
        weight:    [C, K_conv] or [C, 1, K_conv]
        conv_pool: [S, C, K_conv-1], updated in place (only the rows named in slot_ids)
        slot_ids:  [B] int; -1 = padding row (output zeros, no slot touched)
    Returns:
        y: [B, C]
    """
    fn = _kernel("causal_conv1d_update", backend, x, weight, conv_pool)
    return fn(x, weight, conv_pool=conv_pool, slot_ids=slot_ids)


def gated_rms_norm(x, z, weight, eps=1e-6, *, backend="auto"):
    """GDN output norm (plain weight, norm before the silu(z) gate) on the chosen backend.

    Args:
        x, z:   [..., D]
        weight: [D]
    Returns:
        [..., D] in x's dtype
    """
    fn = _kernel("gated_rms_norm", backend, x, z, weight)
    return fn(x, z, weight, eps)
