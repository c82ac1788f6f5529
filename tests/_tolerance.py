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
