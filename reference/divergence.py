"""Layer-wise divergence report: where do two implementations of the model part ways?

    ref = reference_trace(model, tokens)            # [(name, array)]: embedding, every layer, final norm, logits
    other = ...                                     # the same points from another implementation (e.g. HF hooks:
                                                    #   qwen35.compare.hf_trace)
    report = compare_traces(ref, other, tolerance=1e-4)
    print(report.format());  report.first_divergent  # the first point whose relative RMS exceeds the tolerance

Each row holds the max and mean absolute difference and the relative RMS error ‖ref − other‖ / ‖ref‖ of one
point.  Differences grow layer by layer through the residual stream, so the first row that crosses the tolerance
is where to look (Raschka's layer debugger; pitfall B24 for what "matches" means).

NumPy only: the other side's arrays come in as arrays, so this module never imports torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from reference.context import as_token_array
from reference.rope import decode_position_ids

__all__ = ["LayerDivergence", "DivergenceReport", "reference_trace", "trace_names", "compare_traces"]


def trace_names(config) -> list[str]:
    """Names of the trace points: embedding, each decoder layer (with its type), final norm, logits."""
    return (["embedding"] + [f"layer {i} ({t.split('_')[0]})" for i, t in enumerate(config.layer_types)]
            + ["final norm", "logits"])


def reference_trace(model, tokens) -> list[tuple[str, np.ndarray]]:
    """Run `model` (reference.model.Qwen35Model) statelessly on one token sequence and record every point.

    Returns [(name, array [T, H] or [T, V])] in `trace_names(model.config)` order.
    """
    tokens = as_token_array(tokens, request_id="trace")
    model.check_tokens("trace", tokens)
    T = tokens.size
    conv = [np.zeros((1,) + p.shape[1:], model.dtype) for p in model.state_cache.conv_pools]
    rec = [np.zeros((1,) + p.shape[1:], model.dtype) for p in model.state_cache.recurrent_pools]
    past = {layer: None for layer in model.config.full_layer_indices}
    hidden: list[np.ndarray] = []
    h, *_ = model.forward(tokens, np.array([0, T], np.int64), decode_position_ids(0, T), conv, rec, past,
                          hidden_trace=hidden)
    logits = h @ model.weights.lm_head.T.astype(model.dtype, copy=False)
    return list(zip(trace_names(model.config), hidden + [h, logits], strict=True))


@dataclass
class LayerDivergence:
    name: str
    max_abs: float
    mean_abs: float
    rel_rms: float
    ref_max_abs: float  # scale of the reference values at this point
    ok: bool


@dataclass
class DivergenceReport:
    rows: list[LayerDivergence]
    tolerance: float
    labels: tuple[str, str] = ("reference", "other")
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergent(self) -> str | None:
        """Name of the first point whose relative RMS error exceeds the tolerance (None: all within)."""
        return next((r.name for r in self.rows if not r.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_divergent is None

    def as_dict(self) -> dict:
        return {"labels": list(self.labels), "tolerance": self.tolerance, "first_divergent": self.first_divergent,
                "rows": [asdict(r) for r in self.rows], "notes": self.notes}

    def format(self) -> str:
        a, b = self.labels
        lines = [f"layer-wise divergence, {a} vs {b} (relative RMS tolerance {self.tolerance:.1e})",
                 f"  {'':6}  {'point':<22} {'max |diff|':>11} {'mean |diff|':>11} {'rel RMS':>9} {'max |ref|':>9}"]
        for r in self.rows:
            tag = "[OK]  " if r.ok else "[DIFF]"
            lines.append(f"  {tag}  {r.name:<22} {r.max_abs:11.3e} {r.mean_abs:11.3e} {r.rel_rms:9.2e} "
                         f"{r.ref_max_abs:9.3g}")
        first = self.first_divergent
        lines.append("  all points within tolerance" if first is None else f"  first divergent point: {first}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def compare_traces(ref, other, tolerance: float = 1e-4, labels=("reference", "other")) -> DivergenceReport:
    """Compare two traces point by point (same names, same order, same shapes)."""
    ref, other = list(ref), list(other)
    if [n for n, _ in ref] != [n for n, _ in other]:
        raise ValueError(f"traces name different points: {[n for n, _ in ref]} vs {[n for n, _ in other]}")
    rows = []
    for (name, a), (_, b) in zip(ref, other, strict=True):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes differ, {a.shape} vs {b.shape}")
        d = np.abs(a - b)
        den = float(np.sqrt(np.mean(a * a)))
        rel = float(np.sqrt(np.mean(d * d))) / den if den > 0 else float(np.sqrt(np.mean(d * d)))
        finite = bool(np.all(np.isfinite(b)))
        rows.append(LayerDivergence(name=name, max_abs=float(d.max()) if d.size else 0.0,
                                    mean_abs=float(d.mean()) if d.size else 0.0, rel_rms=rel,
                                    ref_max_abs=float(np.abs(a).max()) if a.size else 0.0,
                                    ok=finite and rel <= tolerance))
    return DivergenceReport(rows=rows, tolerance=float(tolerance), labels=tuple(labels))
