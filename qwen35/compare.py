"""Reference vs optimized (and vs transformers when installed) on one checkpoint: an error table per layer.

    from qwen35.compare import compare_checkpoint
    result = compare_checkpoint("qwen35/demo", tokens)          # or: qwen35 compare [--model DIR]
    print(result.format())

For one prompt, each implementation records the same trace points — the embedding, the residual stream after every
decoder layer, the final norm, the logits — and each is compared with the float64 NumPy reference
(`reference.divergence`: max and mean |diff| and the relative RMS error per point).  Errors grow
through the residual stream, so the first point above the tolerance is where to look; it is highlighted.  The
logits also get the greedy agreement and the top-1/top-2 gap (pitfall B24: a bf16 logit step is ≈ 0.125 nats, so
argmax flips are expected wherever the gap is smaller).

How the points are captured:
* reference: `reference.divergence.reference_trace` (the model's own hidden-state trace);
* optimized: `optimized_trace` below records the residual stream as it enters each RMSNorm of
  `optimized.model.Qwen35Model._forward` (the input norm of layer i sees the stream after layer i − 1; the final
  norm sees it after the last layer), by wrapping the module's `rms_norm` for the duration of one stateless call;
* transformers: `hf_trace` below (forward hooks on the decoder layers; `qwen35 diverge` uses it too).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}


@contextmanager
def _record_norm_inputs(model):
    """Record (which norm, input) for every rms_norm call of optimized.model during the block."""
    import optimized.model as om

    names = {}
    for i, layer in enumerate(model.layers):
        names[id(layer.input_layernorm)] = ("in", i)
        names[id(layer.post_attention_layernorm)] = ("post", i)
    names[id(model.norm)] = ("final", None)
    calls = []
    original = om.rms_norm

    def recording(x, weight, *args, **kwargs):
        out = original(x, weight, *args, **kwargs)
        key = names.get(id(weight))
        if key is not None:
            calls.append((key, x.detach().double().cpu().numpy(), out.detach().double().cpu().numpy()))
        return out

    om.rms_norm = recording
    try:
        yield calls
    finally:
        om.rms_norm = original


def _hf_text_model(hf):
    """The HF decoder stack (embed_tokens, layers, norm) of a CausalLM or a ConditionalGeneration model."""
    inner = hf.model
    return inner.language_model if hasattr(inner, "language_model") else inner


def hf_trace(hf, tokens, names) -> list[tuple[str, np.ndarray]]:
    """The trace points of `reference.divergence.trace_names` (`names`), captured from a transformers model with
    forward hooks on the embedding, every decoder layer and the final norm, plus the logits."""
    import torch

    text = _hf_text_model(hf)
    captured: list[np.ndarray] = []

    def grab(_module, _inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(out[0].detach().double().cpu().numpy())

    modules = [text.embed_tokens, *text.layers, text.norm]
    handles = [m.register_forward_hook(grab) for m in modules]
    try:
        with torch.no_grad():
            logits = hf(input_ids=torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    arrays = captured + [logits[0].double().numpy()]
    if len(arrays) != len(names):
        raise RuntimeError(f"captured {len(arrays)} points from the HF model, expected {len(names)}")
    return list(zip(names, arrays, strict=True))


def optimized_trace(model, tokens) -> list[tuple[str, np.ndarray]]:
    """The trace points of `reference.divergence.trace_names` from an optimized.model.Qwen35Model (stateless)."""
    from reference.divergence import trace_names

    with _record_norm_inputs(model) as calls:
        logits = model.logits([list(map(int, tokens))])[0]
    by_key = {key: (x, y) for key, x, y in calls}
    L = len(model.layers)
    missing = [k for k in [("in", i) for i in range(L)] + [("final", None)] if k not in by_key]
    if missing:
        raise RuntimeError(f"optimized_trace: the forward pass did not call rms_norm for {missing}; "
                           "optimized/model.py changed — update qwen35/compare.py")
    stream = [by_key[("in", i)][0] for i in range(L)] + [by_key[("final", None)][0]]  # embedding, after layers
    arrays = stream + [by_key[("final", None)][1], logits.detach().double().cpu().numpy()]
    return list(zip(trace_names(model.config), arrays, strict=True))


@dataclass
class LogitAgreement:
    """How far the greedy choice is from flipping: argmax agreement and the reference's top-1/top-2 gap."""

    argmax_agree: float  # fraction of positions with the same argmax
    positions: int
    min_gap_at_disagreement: float | None  # the reference's top1 − top2 gap where they disagree (small = a tie)
    median_gap: float


def logit_agreement(ref_logits, other_logits) -> LogitAgreement:
    ref = np.asarray(ref_logits, dtype=np.float64)
    oth = np.asarray(other_logits, dtype=np.float64)
    a, b = ref.argmax(-1), oth.argmax(-1)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    dis = a != b
    return LogitAgreement(argmax_agree=float(np.mean(~dis)), positions=int(a.size),
                          min_gap_at_disagreement=float(gap[dis].min()) if dis.any() else None,
                          median_gap=float(np.median(gap)))


@dataclass
class Comparison:
    """Every implementation's divergence report against the reference, plus the logit agreement."""

    checkpoint: str
    num_tokens: int
    reports: dict = field(default_factory=dict)  # label -> reference.divergence.DivergenceReport
    agreement: dict = field(default_factory=dict)  # label -> LogitAgreement
    skipped: dict = field(default_factory=dict)  # label -> reason

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports.values())

    def format(self) -> str:
        lines = [f"qwen35 compare: {self.checkpoint}, {self.num_tokens} tokens, every point vs the reference"]
        for label, rep in self.reports.items():
            first = rep.first_divergent
            lines.append("")
            lines.append(f"== {rep.labels[0]} vs {label}  (relative RMS tolerance {rep.tolerance:.0e})")
            lines.append(f"   {'point':<22} {'max |diff|':>11} {'mean |diff|':>11} {'rel RMS':>9} {'NMSE dB':>8}  ")
            for r in rep.rows:
                db = 20 * np.log10(r.rel_rms) if r.rel_rms > 0 else -np.inf
                mark = "  <== first divergence" if r.name == first else ("  (over)" if not r.ok else "")
                lines.append(f"{'>>' if r.name == first else '  '} {r.name:<22} {r.max_abs:11.3e} {r.mean_abs:11.3e} "
                             f"{r.rel_rms:9.2e} {db:8.1f}{mark}")
            lines.append("   all points within tolerance" if first is None else f"   first divergent point: {first}")
            ag = self.agreement.get(label)
            if ag is not None:
                extra = ("" if ag.min_gap_at_disagreement is None
                         else "; smallest reference top-1/top-2 gap where they differ: "
                              f"{ag.min_gap_at_disagreement:.3g}")
                lines.append(f"   greedy argmax agrees at {100 * ag.argmax_agree:.1f} % of {ag.positions} positions "
                             f"(median top-1/top-2 gap {ag.median_gap:.3g}{extra})")
            lines.extend(f"   note: {n}" for n in rep.notes)
        for label, why in self.skipped.items():
            lines.append(f"\n== {label}: skipped ({why})")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        from qwen35.measure import machine_info

        try:
            rel = str(Path(self.checkpoint).resolve().relative_to(Path(__file__).resolve().parent.parent))
        except ValueError:
            rel = self.checkpoint
        return {"kind": "compare", "schema": 1, "meta": {**machine_info("cpu"), "checkpoint": rel,
                                                         "dtype_note": "reference float64; each row's label says the "
                                                                       "other side's dtype and backend"},
                "checkpoint": rel, "num_tokens": self.num_tokens, "ok": self.ok,
                "reports": {k: v.as_dict() for k, v in self.reports.items()},
                "agreement": {k: asdict(v) for k, v in self.agreement.items()}, "skipped": self.skipped}


def compare_checkpoint(path, tokens, *, dtypes=("float32",), backend: str = "auto", device: str = "cpu",
                       with_hf: bool = True, tolerance: float | None = None,
                       allow_nonfinite: bool = False) -> Comparison:
    """Reference (float64) vs the optimized model in each of `dtypes`, and vs transformers (float32, eager).
    `allow_nonfinite` lets both models load a checkpoint holding NaN/Inf weights (refused by default)."""
    import torch

    from reference.divergence import compare_traces, reference_trace
    from reference.model import Qwen35Model as RefModel

    path = Path(path)
    tokens = [int(t) for t in tokens]
    ref_model = RefModel.from_pretrained(path, max_batch_size=1, allow_nonfinite=allow_nonfinite)
    ref = reference_trace(ref_model, tokens)
    out = Comparison(checkpoint=str(path), num_tokens=len(tokens))

    from optimized.model import Qwen35Model as OptModel

    for dt in dtypes:
        model = OptModel.from_pretrained(path, device=device, dtype=getattr(torch, dt), backend=backend,
                                         max_batch_size=1, allow_nonfinite=allow_nonfinite)
        label = f"optimized ({dt}, {model.backend}, {device})"
        other = optimized_trace(model, tokens)
        tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dt, 1e-4)
        out.reports[label] = compare_traces(ref, other, tolerance=tol, labels=("reference (float64)", label))
        out.agreement[label] = logit_agreement(ref[-1][1], other[-1][1])
    if with_hf:
        try:
            import transformers
        except ImportError as e:
            out.skipped["transformers"] = f"not installed ({e})"
        else:
            arch = (json.loads((path / "config.json").read_text()).get("architectures") or ["?"])[0]
            if not hasattr(transformers, arch):
                out.skipped["transformers"] = f"transformers {transformers.__version__} has no class {arch}"
            else:
                hf = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
                label = f"transformers {transformers.__version__} (float32, eager)"
                other = hf_trace(hf, tokens, [n for n, _ in ref])
                tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE["float32"]
                out.reports[label] = compare_traces(ref, other, tolerance=tol, labels=("reference (float64)", label))
                out.agreement[label] = logit_agreement(ref[-1][1], other[-1][1])
    return out
