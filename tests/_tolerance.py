"""One place for every numerical budget.

`assert_close(name, ref, got, budget)` reports the relative RMS error ‖ref−got‖₂/‖ref‖₂ (fla's ratio,
`qwen35.measure.rel_rms`) and the max-abs error, and fails on any NaN/Inf.  Budgets are named; loosening one needs
a comment citing evidence.
"""
from __future__ import annotations

import numpy as np

from qwen35.measure import rel_rms, to_numpy

# Relative-RMS budgets, by (what is compared).
BUDGETS = {
    # float64 vs float64 formulations of the same math (chunked WY vs per-token recurrence).
    "f64_exact": 1e-10,
    # float32 implementation vs the float64 oracle.
    "f32": 1e-5,
    # whole-model logits, float32 vs float64 (fp32 rounding alone reaches a few 1e-5 on small random models).
    "f32_logits": 1e-4,
    # bf16 inputs with an fp32 state vs the float64 oracle.
    "bf16": 1e-2,
    # Gradients, float64: |⟨∇f, d⟩ − FD| / ‖∇f‖ for a unit direction d, torch autograd vs the central finite
    # difference (ε = 1e-6) of the NumPy oracle (reference.gradcheck).  Measured in tests/test_gradients.py: ops
    # ≤ 2e-9, whole tiny models ≤ 3e-8 per parameter tensor and ≤ 1e-10 along all parameters at once; scaling the
    # rule's output gradient by 1.001 (a 0.1 % wrong backward) gives 1.3e-5.  The FD error is ε²·|f'''|/6 +
    # ulp(f)/ε: at ε = 1e-5 the truncation term alone reached 2.9e-6 on the MoE model's conv kernel.
    "grad_fd": 1e-6,
    # Gradients, float32 vs transformers' autograd on the same checkpoint, relative RMS per parameter.  Measured
    # on the untied dense / MoE tiny checkpoints (B = 2, T = 70): worst 2.8e-5 / 4.0e-5, as far from each other
    # as each is from the float64 truth (our float64 model: both fp32 gradients are 1e-5-rounded versions of it).
    "grad_f32_vs_hf": 1e-4,
}


def assert_close(name: str, ref, got, budget: float | str, *, atol: float = 1e-12) -> float:
    """Assert `got` matches `ref` within a relative RMS `budget` (a float or a key of BUDGETS)."""
    ref_a, got_a = to_numpy(ref), to_numpy(got)
    assert ref_a.shape == got_a.shape, f"{name}: shape {got_a.shape} != reference {ref_a.shape}"
    assert np.all(np.isfinite(got_a)), f"{name}: non-finite values in the result"
    assert np.all(np.isfinite(ref_a)), f"{name}: non-finite values in the reference"
    tol = BUDGETS[budget] if isinstance(budget, str) else float(budget)
    max_abs = float(np.max(np.abs(ref_a - got_a))) if ref_a.size else 0.0
    if max_abs <= atol:
        return 0.0
    r = rel_rms(ref_a, got_a)
    assert r <= tol, f"{name}: relative RMS error {r:.3e} > budget {tol:.1e} (max abs {max_abs:.3e})"
    return r


def assert_directional(name: str, autograd: float, fd: float, grad_norm: float, budget: float | str = "grad_fd",
                       *, atol: float = 1e-13) -> float:
    """Assert an autograd directional derivative ⟨∇f, d⟩ (d of unit norm) matches its finite difference: the error
    |autograd − fd| as a fraction of ‖∇f‖ (the steepest slope, so the measure does not blow up when d happens to
    be nearly orthogonal to ∇f) within `budget`.  Returns that fraction."""
    tol = BUDGETS[budget] if isinstance(budget, str) else float(budget)
    assert np.isfinite(autograd) and np.isfinite(fd), f"{name}: non-finite derivative ({autograd}, {fd})"
    err = abs(autograd - fd)
    if err <= atol:
        return 0.0
    r = err / max(grad_norm, atol)
    assert r <= tol, (f"{name}: autograd {autograd:.12e} vs finite difference {fd:.12e}: error {err:.3e} = "
                      f"{r:.3e} of |grad| {grad_norm:.3e} > budget {tol:.1e}")
    return r
