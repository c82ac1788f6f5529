"""Plots from result JSON (results go to JSON first; plots are made from the JSON).

| JSON (results/)          | written by                           | plot (docs/plots/)                          |
|--------------------------|--------------------------------------|---------------------------------------------|
| memory.json              | `memory_sweep()` (this file)         | memory.png/.svg   max batch vs memory budget |
| docs/memory_measured_cpu.json | `python -m qwen35.resident`     | memory_measured.png  held vs predicted, 3× vs 1× |
| accuracy.json            | `qwen35 accuracy`                    | accuracy.png, drift.png                      |
| crossover.json           | `qwen35 plot --measure-crossover`    | crossover.png  chunked vs per-token by T     |
| docs/bench_cpu.json      | `qwen35 bench`                       | speed.png                                    |
| compare_*.json           | `qwen35 compare --out`               | compare_*.png  error per layer vs float64    |
| gpu_bench.json           | `scripts/gpu_bench.py`               | gpu_kernels.png  Triton vs torch (vs fla) on a GPU |
| eval*.json               | `qwen35 eval`                        | eval*.png  bits/byte, perplexity per engine |
| train_log*.json          | `qwen35 train` (its --log)           | train_loss*.png  train / held-out loss vs tokens |
| docs/bench_serve_cpu.json | `qwen35 bench --serve`              | serving.png  pool over time, TTFT / ITL |

Nothing here times anything: the measurements are qwen35.bench (CPU speed, the crossover sweep),
qwen35.accuracy, qwen35.compare and scripts/gpu_bench.py.  The one data step kept here is `memory_sweep`: the
memory plot's numbers are analytic (reference.memory, no device, no clock), a pure function of the code, so
`qwen35 plot` recomputes them on every run and the memory plot can never lag behind the memory model.

Every figure carries a footer with the machine, the versions and the dtypes read from the JSON's `meta`, so a
plot never travels without the conditions it was measured under.  matplotlib runs headless (Agg).

    qwen35 plot                       # refresh memory.json, render every known JSON in results/ to docs/plots/
    qwen35 plot --measure-crossover   # first time chunked vs per-token (a minute, one thread) -> crossover.json
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND") and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # headless: CI and servers have no display (a notebook keeps its inline backend)
import matplotlib.pyplot as plt
import numpy as np

from qwen35.measure import PLOTS_DIR, REPO, RESULTS_DIR, git_commit, load_json, write_json

plt.rcParams["svg.fonttype"] = "none"  # keep SVG text as text: smaller files, searchable footers
plt.rcParams["svg.hashsalt"] = "qwen35"  # stable element ids, so re-rendering the same JSON gives the same SVG

GIB = 2 ** 30
MEASURED_MEMORY = ("docs/memory_measured_cpu.json",)  # `python -m qwen35.resident`'s default output
# Device memory budgets of the sweep, GiB: a 24 GB card up to 8 x 141 GB (one H200 node) and a bit beyond.
MEMORY_BUDGETS_GIB = tuple(int(round(x)) for x in np.geomspace(16, 2048, 36))
# Marked on the x axis: common single devices and one 8-GPU node.
DEVICE_MARKS = {"24 GB": 24e9, "80 GB": 80e9, "141 GB": 141e9, "8×80 GB": 640e9, "8×141 GB": 1128e9}
STYLE_OF_RULE = {"in_place": "-", "gather_scatter": "--"}


# ------------------------------------------------------------------------------------------------ helpers
def footer_text(meta: dict, extra: str = "") -> str:
    """One or two lines: machine · versions · dtype · date (whatever of it the JSON's meta holds)."""
    parts = []
    machine = meta.get("device_name") or meta.get("machine") or meta.get("device")
    if machine:
        parts.append(str(machine))
    vers = [f"{k} {meta[k]}" for k in ("python", "numpy", "torch", "triton", "transformers") if meta.get(k)]
    if vers:
        parts.append(", ".join(vers))
    if meta.get("git_commit"):
        parts.append(f"qwen35 {meta['git_commit']}")
    if meta.get("date_utc"):
        parts.append(str(meta["date_utc"])[:10])
    line1 = " · ".join(parts)
    line2 = " · ".join(x for x in (meta.get("dtype_note") or meta.get("dtypes") or "", extra) if x)
    return line1 + ("\n" + line2 if line2 else "")


def _finish(fig, meta: dict, out_dir, stem: str, formats=("png", "svg"), extra: str = ""):
    """Add the footer and save as `out_dir/stem.<fmt>`; returns the paths.  out_dir=None: return the figure unsaved
    (notebooks display it)."""
    import textwrap

    width = int(fig.get_figwidth() * 16)  # characters of 7-pt text across the figure
    text = "\n".join(textwrap.fill(line, width) for line in footer_text(meta, extra).splitlines())
    fig.text(0.01, 0.005, text, fontsize=7, color="0.35", ha="left", va="bottom")
    if out_dir is None:
        return fig
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out_dir / f"{stem}.{fmt}"
        # Fixed metadata (no creation date) so re-rendering the same JSON gives the same file.
        md = {"Software": None} if fmt == "png" else {"Date": None}
        fig.savefig(p, dpi=110, metadata=md)
        paths.append(p)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ memory
def memory_sweep(presets=None, budgets_gib=MEMORY_BUDGETS_GIB, *, context_len: int = 8192,
                 state_dtype: str = "bfloat16", kv_dtype: str = "bfloat16", weight_dtype: str = "bfloat16") -> dict:
    """Max batch vs device memory for each preset under both state rules, from `reference.memory` (analytic).

    For each budget M: free = M − weights; the state rule gives ⌊0.15·free⌋ // (copies·state per request)
    (copies = 3 gather/scatter, 1 in place); the KV cache then holds ⌊(free − reservation) / KV per request⌋
    requests at `context_len`.  The batch a server can run is the smaller of the two.
    """
    from reference.config import Qwen35Config, preset_names
    from reference.memory import memory_budget

    presets = list(presets) if presets else preset_names()
    out = {"kind": "memory", "schema": 1,
           "meta": {"machine": "analytic (reference.memory; no device needed)", "git_commit": git_commit(),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "context_len": context_len, "state_dtype": state_dtype, "kv_dtype": kv_dtype,
                    "weight_dtype": weight_dtype,
                    "dtype_note": f"state {state_dtype}, KV {kv_dtype}, weights {weight_dtype}; "
                                  f"KV bound at {context_len} tokens per request; state budget 15 % of free memory"},
           "budgets_gib": list(budgets_gib), "presets": {}}
    for name in presets:
        cfg = Qwen35Config.preset(name)
        rows = [memory_budget(cfg, int(m * GIB), context_len, state_dtype=state_dtype, kv_dtype=kv_dtype,
                              weight_dtype=weight_dtype) for m in budgets_gib]
        b0 = rows[0]
        entry = {"weight_bytes": b0.weight_bytes, "state_bytes_per_request": b0.state_bytes_per_request,
                 "conv_state_bytes_per_request": b0.conv_state_bytes_per_request,
                 "recurrent_state_bytes_per_request": b0.recurrent_state_bytes_per_request,
                 "kv_bytes_per_token": b0.kv_bytes_per_token, "kv_tokens_equal_to_state": b0.kv_tokens_equal_to_state,
                 "num_linear_layers": cfg.num_linear_layers, "num_full_layers": cfg.num_full_layers}
        for rule in ("gather_scatter", "in_place"):
            entry[rule] = {key: [r.rules[rule][key] for r in rows]
                           for key in ("state_max_batch", "kv_max_batch", "max_batch", "bound_by")}
        out["presets"][name] = entry
    return out


def plot_memory(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg")) -> list[Path]:
    """Left: max batch the state rule allows vs memory budget, per preset, both rules.  Right: one request's state
    expressed as tokens of KV cache — below that context length, state (not KV) is most of a request's memory."""
    budgets = np.asarray(data["budgets_gib"], dtype=float) * GIB / 1e9  # GB on the axis (devices are sold in GB)
    names = list(data["presets"])
    colors = [plt.cm.tab10(i % 10) for i in range(len(names))]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [1.6, 1]})
    for name, col in zip(names, colors, strict=True):
        e = data["presets"][name]
        for rule, ls in STYLE_OF_RULE.items():
            y = np.asarray(e[rule]["state_max_batch"], dtype=float)
            y[y <= 0] = np.nan  # weights do not fit
            ax.plot(budgets, y, ls, color=col, lw=1.6, label=name if rule == "in_place" else None)
    for label, x in DEVICE_MARKS.items():
        ax.axvline(x / 1e9, color="0.8", lw=0.8, zorder=0)
        ax.text(x / 1e9, 1.02, label, transform=ax.get_xaxis_transform(), rotation=0, fontsize=7, ha="center",
                color="0.4")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("device memory (GB)")
    ax.set_ylabel("max concurrent requests the state cache allows")
    ax.set_title("Max batch vs memory: in-place pool (solid, 1×) vs gather/scatter (dashed, 3×)", fontsize=10,
                 pad=16)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(title="preset", fontsize=8, ncol=2, loc="upper left")

    ctx = data["meta"].get("context_len", 8192)
    toks = [data["presets"][n]["kv_tokens_equal_to_state"] for n in names]
    ax2.barh(range(len(names)), toks, color=colors)
    for i, (n, t) in enumerate(zip(names, toks, strict=True)):
        e = data["presets"][n]
        ax2.text(t, i, f"  {t:,.0f} tok  ({e['state_bytes_per_request'] / 2**20:.1f} MiB state, "
                       f"{e['kv_bytes_per_token'] / 1024:.0f} KiB KV/token)", va="center", fontsize=7)
    ax2.set_yticks(range(len(names)))
    ax2.set_yticklabels(names)
    ax2.invert_yaxis()
    ax2.set_xlim(0, max(toks) * 2.2)
    ax2.set_xlabel("context length at which a request's KV cache equals its state")
    ax2.set_title("Below this context, state, not KV, dominates a request", fontsize=10)
    ax2.grid(True, axis="x", alpha=0.25)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _finish(fig, data["meta"], out_dir, "memory", formats,
                   extra=f"right panel: same dtypes; KV max batch in JSON at {ctx} tokens")


def plot_memory_measured(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg"), stem: str = "memory_measured"):
    """From `python -m qwen35.resident` (qwen35/resident.py; kind "memory_measured"), on its largest checkpoint.
    Left: measured / predicted bytes by category, per engine and dtype, at the largest batch (reference.memory's
    prediction = 1).  Right: the state working memory of one decode step at its peak in units of batch x per_req —
    the batch's pool rows, the state copies alive when the forward pass returns, and the rest of the peak — against
    the gather/scatter rule (3 x) and the in-place rule (1 x)."""
    cases = data["cases"]
    name = list(dict.fromkeys(c["config"] for c in cases))[-1]
    cases = [c for c in cases if c["config"] == name]
    runs = list(dict.fromkeys((c["engine"], c["dtype"]) for c in cases))
    batches = sorted({c["batch"] for c in cases})
    colors = {run: plt.cm.tab10(i) for i, run in enumerate(runs)}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [1, 1.25]})
    cats = ["weights", "state pool", "KV used", "KV capacity"]
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        c = next(c for c in cases if (c["engine"], c["dtype"]) == run and c["batch"] == batches[-1])
        rows = {r["category"]: r for r in c["rows"]}
        xs = np.arange(len(cats)) + (j - (len(runs) - 1) / 2) * width
        ys = [rows[k]["ratio"] for k in cats]
        ax.bar(xs, ys, width, color=colors[run], label=f"{run[0]} · {run[1]}")
        for x, k in zip(xs, cats, strict=True):
            ax.text(x, rows[k]["ratio"], f"{rows[k]['measured'] / 2**20:.1f}", rotation=90, ha="center",
                    va="bottom", fontsize=6, color="0.3")
    ax.axhline(1.0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats)
    ax.set_ylim(0, 1.6)
    ax.set_ylabel("measured / predicted (reference.memory)")
    ax.set_title(f"What the engines hold, batch {batches[-1]} (labels: measured MiB)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left")
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        for i, b in enumerate(batches):
            c = next(c for c in cases if (c["engine"], c["dtype"]) == run and c["batch"] == b)
            p = c["peaks"]["decode"]
            copies = p["state_copies_at_peak"] - 1
            rest = p["copies_at_peak_bound"] - 1 - copies
            x = i + (j - (len(runs) - 1) / 2) * width
            ax2.bar(x, 1, width, color=colors[run], alpha=0.45)
            ax2.bar(x, copies, width, bottom=1, color=colors[run], hatch="//", edgecolor="white")
            ax2.bar(x, rest, width, bottom=1 + copies, color="0.8")
            ax2.text(x, 1 + copies + rest, f"{p['copies_at_peak_bound']:.2f}", ha="center", va="bottom", fontsize=7)
    ax2.axhline(3, color="0.3", ls="--", lw=0.8, label="gather/scatter rule: 3 × (pool + inputs + outputs)")
    ax2.axhline(1, color="0.3", ls=":", lw=1.0, label="in-place rule: 1 × (the pool)")
    ax2.legend(fontsize=8, loc="center right")
    ax2.set_xticks(range(len(batches)))
    ax2.set_xticklabels([f"batch {b}" for b in batches])
    ax2.set_ylabel("state working memory at the decode peak / (batch × per_req)")
    ax2.set_title("One decode step: pool rows (light), state copies by object (hatched), rest of the peak (grey)",
                  fontsize=10)
    ax2.grid(True, axis="y", alpha=0.25)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    cfg = data["configs"][name]
    s = data["settings"]
    return _finish(fig, dict(data.get("meta") or {}), out_dir, stem, formats,
                   extra=f"{name} checkpoint (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
                         f"vocabulary {cfg['vocab_size']:,}); {s['prompt_len']} prompt tokens + 1 decode step per "
                         f"request; pool slots = batch")


# ------------------------------------------------------------------------------------------------ accuracy
_FORM_COLORS = {("optimized-torch", "chunk"): "tab:blue", ("optimized-torch", "recurrent"): "tab:orange",
                ("optimized-triton", "chunk"): "tab:cyan", ("optimized-triton", "recurrent"): "tab:red",
                ("reference", "chunk"): "0.5"}
_DTYPE_STYLE = {"float32": "-o", "bfloat16": "--s", "float64": ":^"}


def plot_accuracy(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg"), stem: str = "accuracy") -> list[Path]:
    """Relative RMS error and max-abs error of the output vs the float64 oracle, by T, per form and dtype."""
    rows = [r for r in data["by_length"] if r["tensor"] == "o"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    keys = sorted({(r["impl"], r["form"], r["dtype"]) for r in rows})
    for impl, form, dt in keys:
        sel = sorted((r for r in rows if (r["impl"], r["form"], r["dtype"]) == (impl, form, dt)),
                     key=lambda r: r["T"])
        T = [r["T"] for r in sel]
        kw = dict(color=_FORM_COLORS.get((impl, form), "k"), label=f"{impl} {form}, {dt}", ms=4, lw=1.4)
        ax.plot(T, [max(r["rel_rms"], 1e-17) for r in sel], _DTYPE_STYLE.get(dt, "-"), **kw)
        ax2.plot(T, [max(r["max_abs"], 1e-18) for r in sel], _DTYPE_STYLE.get(dt, "-"), **kw)
    for a, yl in ((ax, "relative RMS error of o vs float64"), (ax2, "max abs error of o vs float64")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("sequence length T (tokens)")
        a.set_ylabel(yl)
        a.grid(True, which="both", alpha=0.25)
    for eps, name in ((2.0 ** -8, "bf16 ε"), (2.0 ** -24, "fp32 ε")):
        ax.axhline(eps, color="0.6", lw=0.8, ls=":")
        ax.text(ax.get_xlim()[0], eps, f" {name}", fontsize=7, va="bottom", color="0.4")
    ax.set_title("Gated delta rule: error vs the float64 recurrence", fontsize=10)
    ax2.set_title("Max abs error (same runs)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    sh = data["meta"].get("shape", {})
    return _finish(fig, data["meta"], out_dir, stem, formats,
                   extra=f"H_k={sh.get('H_k')} H_v={sh.get('H_v')} D_k={sh.get('D_k')} D_v={sh.get('D_v')}, "
                         f"chunk {data['meta'].get('chunk_size')}")


def plot_drift(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg"), stem: str = "drift") -> list[Path]:
    """Per-step relative RMS error of decode outputs vs float64: fp32 state vs a state rounded to bf16 each step,
    for each decay regime in the JSON (short memory: solid; long memory: dashed)."""
    runs = [data[k] for k in ("drift", "drift_slow_decay") if data.get(k)]
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    colors = {"float32": "tab:green", "bfloat16": "tab:red"}
    for run, ls in zip(runs, ("-", "--"), strict=False):
        for state, errs in run["rel_rms"].items():
            e = np.asarray(errs)
            steps = np.arange(1, len(e) + 1)
            ax.plot(steps, e, color=colors.get(state), alpha=0.18, lw=0.5)
            w = max(1, len(e) // 64)  # a running mean makes the trend readable
            smooth = np.convolve(e, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], smooth, ls, color=colors.get(state), lw=2,
                    label=f"{state} state, g = logσ(·)/{run['gate_normalizer']:g} (running mean of {w})")
    d = runs[0]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("decode step")
    ax.set_ylabel("relative RMS error of the step's output vs float64")
    ax.set_title(f"Decode drift over {d['steps']} steps: recurrent state kept in fp32 vs bf16 (pitfall B8)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    meta = {k: v for k, v in data["meta"].items() if k != "dtypes"}
    return _finish(fig, meta, out_dir, stem, formats,
                   extra=f"q/k/v values rounded to {d['input_dtype']}, carried and output in fp32; batch {d['batch']}; "
                         f"one decode step per token through fused_recurrent_gated_delta_rule_update")


# ------------------------------------------------------------------------------------------------ speed
# `qwen35 bench` (qwen35/bench.py) writes {"machine", "sgemm", "gdn_prefill": [rows], "decode",
# "model", "goals"}; a row of gdn_prefill is {"T", "H_v", "D", "flops_chunked", <impl>: {"median_s", ...}}.
BENCH_IMPLS = {  # JSON key -> (label, colour)
    "optimized": ("optimized torch, chunked (fp32)", "tab:blue"),
    "hf_torch_fallback": ("transformers torch fallback, chunked", "tab:purple"),
    "reference_chunked_f32": ("reference NumPy, chunked (fp32)", "0.45"),
    "reference_per_token_f32": ("reference NumPy, per token (fp32)", "0.7"),
}


def is_bench(data: dict) -> bool:
    return "gdn_prefill" in data or data.get("kind") == "bench"


def bench_meta(data: dict) -> dict:
    """The bench JSON's `machine` block in the footer's vocabulary (the CPU is `host_cpu` in a machine_info
    record, `cpu` in older bench files)."""
    m = data.get("machine") or data.get("meta") or {}
    meta = dict(m)
    cpu = m.get("host_cpu") or m.get("cpu")
    if cpu:
        meta["device_name"] = f"CPU: {cpu} ({m.get('torch_threads', '?')} thread)"
    if "date" in m and "date_utc" not in m:
        meta["date_utc"] = m["date"]
    sg = data.get("sgemm", {}).get("gflops")
    meta["dtype_note"] = "float32" + (f"; sgemm {sg:.0f} GFLOP/s on this machine" if sg else "") + (
        "; " + m["note"] if m.get("note") else "")
    return meta


def plot_speed(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg"), stem: str = "speed"):
    """Left: gated delta rule prefill, tokens/s vs T per implementation.  Right (when the bench ran the whole
    model): prefill and decode tokens/s, optimized vs transformers."""
    rows = data.get("gdn_prefill") or []
    if not rows:
        raise ValueError("bench JSON has no gdn_prefill rows")
    model = data.get("model")
    fig, axs = plt.subplots(1, 2 if model else 1, figsize=(13 if model else 8.5, 5),
                            gridspec_kw={"width_ratios": [1.5, 1]} if model else None)
    ax = axs[0] if model else axs
    for key, (label, color) in BENCH_IMPLS.items():
        pts = [(r["T"], r["T"] / r[key]["median_s"]) for r in rows if key in r]
        if pts:
            T, tps = zip(*sorted(pts), strict=True)
            ax.plot(T, tps, "-o", color=color, label=label, ms=5)
    r0 = rows[0]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("tokens / s (one layer's gated delta rule)")
    ax.set_title(f"Gated delta rule prefill, H_v = {r0.get('H_v')}, D = {r0.get('D')}, B = 1", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    if model:
        a2 = axs[1]
        by_T = model.get("prefill_by_T") or []
        for impl, name, color in (("optimized", "optimized torch", "tab:blue"), ("hf", "transformers", "tab:purple")):
            pts = sorted((r["T"], r[impl]["tok_per_s"]) for r in by_T if impl in r and "tok_per_s" in r[impl])
            if pts:
                a2.plot(*zip(*pts, strict=True), "-o", color=color, label=f"{name}, prefill", ms=5)
            dec = model.get(f"{impl}_decode", {}).get("tok_per_s")
            if dec:
                a2.axhline(dec, color=color, ls="--", lw=1.2,
                           label=f"{name}, decode ({dec:.1f} tok/s, context {model.get('decode_context', '?')})")
        floor = model.get("decode_floor_tok_per_s")
        if floor:
            a2.axhline(floor, color="0.5", ls=":", lw=1, label=f"decode bound by weight streaming ({floor:.0f} tok/s)")
        a2.set_xscale("log", base=2)
        a2.set_yscale("log")
        a2.set_xlabel("prompt length T (tokens)")
        a2.set_ylabel("tokens / s (whole model, batch 1)")
        a2.set_title(f"Whole model ({str(model.get('geometry', '')).split('(')[0].strip()}, random weights), "
                     "batch 1", fontsize=9)
        a2.grid(True, which="both", alpha=0.25)
        a2.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    extra = f"model: {model['geometry']}" if model and model.get("geometry") else ""
    return _finish(fig, bench_meta(data), out_dir, stem, formats, extra=extra)


def crossover_point(data: dict, fast: str = "optimized torch chunked", slow: str = "optimized torch recurrent"):
    """Smallest T from which `fast` is at least as quick as `slow` (None if never)."""
    a = {r["T"]: r["seconds"] for r in data["rows"] if r["impl"] == fast}
    b = {r["T"]: r["seconds"] for r in data["rows"] if r["impl"] == slow}
    for T in sorted(set(a) & set(b)):
        if a[T] <= b[T]:
            return T
    return None


def plot_crossover(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg"), stem: str = "crossover"):
    """Latency of the chunked vs the per-token form by T, crossover marked (pitfall B21)."""
    rows = data.get("rows") or []
    if not rows:
        raise ValueError("crossover JSON has no rows")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"optimized torch chunked": ("tab:blue", "-o"), "optimized torch recurrent": ("tab:orange", "-o"),
              "reference NumPy chunked": ("0.45", "--s"), "reference NumPy per-token": ("0.7", "--s"),
              "transformers torch chunked": ("tab:purple", ":^"), "transformers torch recurrent": ("plum", ":^")}
    for name in dict.fromkeys(r["impl"] for r in rows):
        sel = sorted((r for r in rows if r["impl"] == name), key=lambda r: r["T"])
        col, st = styles.get(name, (None, "-o"))
        T = [r["T"] for r in sel]
        ax.plot(T, [r["seconds"] * 1e3 for r in sel], st, color=col, label=name, ms=4)
        ax2.plot(T, [r["T"] / r["seconds"] for r in sel], st, color=col, label=name, ms=4)
    Tx = crossover_point(data)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("sequence length T (tokens)")
        a.grid(True, which="both", alpha=0.25)
        if Tx:
            a.axvline(Tx, color="tab:red", lw=1, ls=":")
    if Tx:
        ax.text(Tx, ax.get_ylim()[1], f" chunked wins from T = {Tx}", color="tab:red", fontsize=8, va="top")
    ax.set_ylabel("latency (ms)")
    ax2.set_ylabel("tokens / s")
    ax.set_title("Chunked (WY) vs per-token recurrent form", fontsize=10)
    ax2.set_title("Same runs as throughput", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _finish(fig, data.get("meta", {}), out_dir, stem, formats)


# ------------------------------------------------------------------------------------------------ model compare
def plot_compare(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg"), stem: str = "compare"):
    """Relative RMS error vs the float64 reference at every trace point (embedding … logits), one line per
    implementation (`qwen35 compare --out`): how rounding grows through the residual stream."""
    reports = data.get("reports") or {}
    if not reports:
        raise ValueError("compare JSON has no reports")
    fig, ax = plt.subplots(figsize=(10, 4.8))
    names = None
    exact = []
    for i, (label, rep) in enumerate(reports.items()):
        rows = rep["rows"]
        names = [r["name"] for r in rows]
        y = [r["rel_rms"] if r["rel_rms"] > 0 else np.nan for r in rows]  # exact points: no mark on a log axis
        exact += [f"{label}: {r['name']}" for r in rows if r["rel_rms"] == 0]
        ax.plot(range(len(rows)), y, ("-o", "--s", ":^", "-.D")[i % 4], color=plt.cm.tab10(i), label=label, ms=6,
                mfc="none" if i % 2 else None)
        if rep.get("first_divergent"):
            j = names.index(rep["first_divergent"])
            ax.plot([j], [y[j]], "s", ms=13, mfc="none", mec="tab:red")
        ax.axhline(rep["tolerance"], color=plt.cm.tab10(i), lw=0.8, ls=":")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("relative RMS error vs the float64 reference")
    if exact:
        ax.text(0.01, 0.62, "exactly 0 (not drawn): " + "; ".join(exact), transform=ax.transAxes, fontsize=7,
                color="0.35")
    ax.set_title(f"Whole model, layer by layer: {data.get('checkpoint')} ({data.get('num_tokens')} tokens); "
                 "dotted: tolerance", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _finish(fig, data.get("meta", {}), out_dir, stem, formats)


# ------------------------------------------------------------------------------------------------ GPU kernels
# scripts/gpu_bench.py writes {"kind": "gpu_bench", "meta", "peaks", "records", "notes"};
# a record is {"case", "impl", "shape", "ms", "tflops", "gbps", "frac_peak_tflops", "frac_peak_gbps", "timing", "how"}.
def plot_gpu_bench(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg"), stem: str = "gpu_kernels"):
    """Left: prefill-type kernels (chunked GDN, conv, norm), time per implementation with % of the measured peak.
    Right: the decode step, µs per step vs batch, per implementation (CUDA-graph replay / eager)."""
    recs = data.get("records") or []
    if not recs:
        raise ValueError("gpu_bench JSON has no records")
    def label(r):
        return r["impl"] + (f" ({r['how']})" if r.get("how") else "")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    cases = [c for c in dict.fromkeys(r["case"] for r in recs) if c != "gdn_decode_step"]
    impls = list(dict.fromkeys(label(r) for r in recs if r["case"] != "gdn_decode_step"))
    width = 0.8 / max(1, len(impls))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(dict.fromkeys(label(r) for r in recs))}
    for j, name in enumerate(impls):
        for i, case in enumerate(cases):
            r = next((r for r in recs if r["case"] == case and label(r) == name), None)
            if r is None or not r.get("ms"):
                continue
            x = i + (j - (len(impls) - 1) / 2) * width
            ax.bar(x, r["ms"], width, color=colors[name], label=name)  # duplicate labels merged below
            frac = r.get("frac_peak_gbps") or r.get("frac_peak_tflops")
            if frac:
                ax.text(x, r["ms"], f"{100 * frac:.0f}%", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c.replace("_", "\n", 1) for c in cases], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (label: % of measured peak)")
    ax.set_title("Prefill-type kernels", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    by_label = dict(zip(labels, handles, strict=True))
    ax.legend(by_label.values(), by_label.keys(), fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.25)
    dec = [r for r in recs if r["case"] == "gdn_decode_step" and r.get("ms")]
    for name in dict.fromkeys(label(r) for r in dec):
        sel = sorted((r for r in dec if label(r) == name), key=lambda r: r["shape"]["B"])
        ax2.plot([r["shape"]["B"] for r in sel], [r["ms"] * 1e3 for r in sel], "-o", color=colors[name], label=name)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("batch (requests, one token each)")
    ax2.set_ylabel("µs per decode step (one layer)")
    ax2.set_title("Decode step on a slot pool (pitfall B22)", fontsize=10)
    ax2.grid(True, which="both", alpha=0.25)
    ax2.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    m = dict(data.get("meta") or {})
    m["device_name"] = m.get("gpu") or f"{m.get('device', '?')}" + (" (Triton interpreter)" if m.get("interpreter")
                                                                     else "")
    m["date_utc"] = m.get("time_utc") or m.get("date_utc")
    shapes = {r["case"]: r["shape"] for r in recs}
    dt = next(iter(shapes.values())).get("dtype", "?")
    notes = [n for n in data.get("notes", []) if "DRY RUN" in n]
    m["dtype_note"] = f"activations {dt}, fp32 state; " + ("; ".join(notes) if notes else
                                                          f"CUDA {m.get('cuda')}, fla {m.get('fla')}")
    return _finish(fig, m, out_dir, stem, formats)


# ------------------------------------------------------------------------------------------------ training, eval
# `qwen35 eval` (qwen35/evaluation.py) writes {"kind": "eval", "meta", "data", "rows": [{"engine", "label", "dtype",
# "loss", "perplexity", "bits_per_byte", "rel_diff_vs_reference_f64", ...}], "baseline": {"bits_per_byte"}, ...}.
def plot_eval(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg"), stem: str = "eval"):
    """Side by side, one bar per engine and dtype: held-out bits per byte (the byte-unigram baseline dashed),
    perplexity, and the relative difference of each engine's loss from the float64 reference (log scale)."""
    rows = data.get("rows") or []
    if not rows:
        raise ValueError("eval JSON has no rows")
    names = [f"{r['engine']}\n({r['dtype']})" for r in rows]
    colors = [plt.cm.tab10(i % 10) for i in range(len(rows))]
    y = np.arange(len(rows))
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 0.55 * len(rows) + 2.6), sharey=True)
    bpb = [r["bits_per_byte"] for r in rows]
    ax.barh(y, bpb, color=colors)
    for i, v in enumerate(bpb):
        ax.text(v, i, f" {v:.4f}", va="center", fontsize=8)
    base = (data.get("baseline") or {}).get("bits_per_byte")
    if base:
        ax.axvline(base, color="0.3", ls="--", lw=1)
        ax.text(base, len(rows) - 0.4, f" byte unigram {base:.3f}", fontsize=7, color="0.3", va="bottom")
    ax.set_xlim(0, max(bpb + [base or 0]) * 1.3)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bits per byte (held-out)")
    ax.set_title("Held-out bits per byte", fontsize=10)
    ppl = [r["perplexity"] for r in rows]
    ax2.barh(y, ppl, color=colors)
    for i, v in enumerate(ppl):
        ax2.text(v, i, f" {v:.4f}", va="center", fontsize=8)
    ax2.set_xlim(0, max(ppl) * 1.3)
    ax2.set_xlabel("perplexity (per token) = exp(loss)")
    ax2.set_title("Held-out perplexity", fontsize=10)
    rel = [r.get("rel_diff_vs_reference_f64") for r in rows]
    shown = [v if v else np.nan for v in rel]  # the reference itself (0) and missing values: no bar on a log axis
    ax3.barh(y, shown, color=colors)
    for i, v in enumerate(rel):
        ax3.text(v if v else 1e-16, i, " reference" if v == 0 else (f" {v:.1e}" if v else " —"), va="center",
                 fontsize=8)
    ax3.set_xscale("log")
    ax3.set_xlim(1e-16, 1.0)
    ax3.set_xlabel("|loss − loss(float64)| / loss(float64)")
    ax3.set_title("Loss vs the float64 oracle", fontsize=10)
    for a in (ax, ax2, ax3):
        a.grid(True, axis="x", which="both", alpha=0.25)
    d = data.get("data") or {}
    scope = (f"{data.get('bytes', 0):,} of {data.get('held_out_bytes', 0):,} held-out bytes, windows of "
             f"{data.get('seq_len')} tokens")
    fig.suptitle(f"{data.get('checkpoint')}: held-out split of {d.get('source')} ({scope})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    held = d.get("held_out") or {}
    return _finish(fig, data.get("meta", {}), out_dir, stem, formats,
                   extra=f"Python {d.get('python')} topics; held-out sha256 {str(held.get('sha256'))[:16]}…")


# `qwen35 train` (qwen35/training.py) writes {"kind": "train_log", "meta", "settings", "shape", "parameters", "data",
# "train": [{"step", "tokens", "seconds", "loss", "lr", "grad_norm"}], "eval": [{"step", "tokens", "loss",
# "bits_per_byte", ...}]}.
def plot_train_log(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg"), stem: str = "train_loss"):
    """Left: training loss (each update, and its running mean) and held-out loss vs tokens seen, nats per token.
    Right: held-out bits per byte vs tokens with the byte-unigram baseline, and the learning rate."""
    train = data.get("train") or []
    evals = data.get("eval") or []
    if not train and not evals:
        raise ValueError("train_log JSON has no train or eval rows")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    if train:
        tok = np.array([r["tokens"] for r in train], dtype=float)
        loss = np.array([r["loss"] for r in train], dtype=float)
        ax.plot(tok, loss, color="tab:blue", alpha=0.25, lw=0.6)
        w = max(1, len(loss) // 50)
        if len(loss) >= w:
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
            ax.plot(tok[w - 1:], smooth, color="tab:blue", lw=1.8, label=f"train (running mean of {w} updates)")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["loss"] for r in evals], "-o", color="tab:red", ms=4,
                label="held-out")
        ax2.plot([r["tokens"] for r in evals], [r["bits_per_byte"] for r in evals], "-o", color="tab:red", ms=4,
                 label="held-out bits per byte")
    base = (data.get("data") or {}).get("unigram_bits_per_byte")
    if base:
        ax2.axhline(base, color="0.3", ls="--", lw=1, label=f"byte unigram of the training split ({base:.3f})")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("Training and held-out loss", fontsize=10)
    ax2.set_yscale("log")  # the first evaluation (the initialisation, ~log2 V bits) would flatten the rest
    ax2.set_xlabel("tokens seen")
    ax2.set_ylabel("bits per byte (log scale)")
    ax2.set_title("Held-out bits per byte", fontsize=10)
    if train:
        ax3 = ax2.twinx()
        ax3.plot(tok, [r["lr"] for r in train], color="0.6", lw=1, ls=":")
        ax3.set_ylabel("learning rate (dotted)", color="0.45", fontsize=8)
        ax3.tick_params(axis="y", labelsize=7, colors="0.45")
    for a in (ax, ax2):
        a.grid(True, alpha=0.25)
        a.legend(fontsize=8)
    s, sh = data.get("settings") or {}, data.get("shape") or {}
    fig.suptitle(f"{data.get('parameters', 0):,} parameters (hidden {sh.get('hidden_size')}, {sh.get('layers')} "
                 f"layers{', MoE' if sh.get('moe') else ''}), {s.get('tokenizer')} tokens, {data.get('step')} of "
                 f"{s.get('steps')} updates of {s.get('batch_size')} × {s.get('seq_len')} tokens, "
                 f"{data.get('seconds', 0) / 60:.1f} min", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    d = data.get("data") or {}
    meta = dict(data.get("meta") or {})
    if meta.get("torch_threads"):
        n = meta["torch_threads"]
        meta["device_name"] = f"{meta.get('device_name', 'CPU')} ({n} torch thread{'s' if n != 1 else ''})"
    return _finish(fig, meta, out_dir, stem, formats,
                   extra=f"lr {s.get('lr')}, warm-up {s.get('warmup')}, cosine to ×{s.get('min_lr_ratio')}, seed "
                         f"{s.get('seed')}; data {d.get('source')} (Python {d.get('python')})")


# ------------------------------------------------------------------------------------------------ serving
# `qwen35 bench --serve` (qwen35/serving.py, bench_serve) writes {"kind": "serve_bench", "meta", "budget", "trace",
# "continuous": {summary..., "series": {"start", "end", "kind", "occupancy", "waiting", "decoding", "finished"}},
# "static": [summary per batch size], "best_static_batch", "goal"}; a summary has "throughput_tok_per_s", "slots",
# "mean_occupancy", "ttft_s" and "itl_s" ({"p50", "p90", "p99"} in seconds).
def plot_serving(data: dict, out_dir=PLOTS_DIR, formats=("png", "svg"), stem: str = "serving"):
    """Left: the continuous run's pool over time (slots held, the decode batch, the waiting queue; the slot count
    and the mean occupancy as lines).  Right: TTFT and inter-token latency p50 / p90 / p99 of the continuous run
    and of each static batch, with their throughput in the legend."""
    cont = data.get("continuous") or {}
    ser = cont.get("series") or {}
    if not ser.get("start"):
        raise ValueError("serve_bench JSON has no occupancy series")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.5, 1]})
    # held slots: a step's occupancy from its start to its end, then minus the requests it finished until the next
    x = [t for pair in zip(ser["start"], ser["end"], strict=True) for t in pair]
    held = [v for o, f in zip(ser["occupancy"], ser["finished"], strict=True) for v in (o, o - f)]
    ax.step(x, held, where="post", color="tab:blue", lw=1.4, label="slots held")
    for key, label, color in (("decoding", "decode batch (prompt done)", "tab:green"),
                              ("waiting", "waiting (arrived, no slot yet)", "tab:orange")):
        ax.step(list(ser["start"]) + [ser["end"][-1]], list(ser[key]) + [ser[key][-1]], where="post", color=color,
                lw=1.0, alpha=0.8, label=label)
    bound = (data.get("budget") or {}).get("bound_by")
    ax.axhline(cont["slots"], color="0.35", ls=":", lw=1,
               label=f"slots: {cont['slots']}" + (f" (bound by {bound})" if bound else ""))
    ax.axhline(cont["mean_occupancy"], color="tab:blue", ls="--", lw=0.9,
               label=f"mean occupancy {cont['mean_occupancy']:.1f} (time-weighted)")
    ax.set_xlabel("time since the start of the run (s)")
    ax.set_ylabel("requests")
    ax.set_title(f"Continuous batching: the pool over time ({cont.get('requests')} requests, prefill chunks of "
                 f"{cont.get('token_budget')} tokens)", fontsize=10)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8, loc="upper right")
    runs = [("continuous", cont)] + [(f"static B={s['slots']}", s) for s in data.get("static") or []]
    groups = [(m, p) for m in ("ttft_s", "itl_s") for p in ("p50", "p90", "p99")]
    width = 0.8 / len(runs)
    for j, (name, s) in enumerate(runs):
        ys = [1e3 * s[m][p] if s.get(m) else np.nan for m, p in groups]
        xs = np.arange(len(groups)) + (j - (len(runs) - 1) / 2) * width
        ax2.bar(xs, ys, width, color=plt.cm.tab10(j), label=f"{name}: {s['throughput_tok_per_s']:.1f} tok/s")
    ax2.set_xticks(range(len(groups)))
    ax2.set_xticklabels([f"{'TTFT' if m == 'ttft_s' else 'ITL'}\n{p}" for m, p in groups], fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("ms")
    goal = data.get("goal") or {}
    ax2.set_title("Latency percentiles" + (f"; throughput continuous / best static = {goal['measured']:.2f}"
                                           if "measured" in goal else ""), fontsize=10)
    ax2.grid(True, axis="y", which="both", alpha=0.25)
    ax2.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    tr = data.get("trace") or {}
    meta = dict(data.get("meta") or {})
    return _finish(fig, meta, out_dir, stem, formats,
                   extra=f"Poisson trace: {tr.get('requests')} requests at {tr.get('rate_per_s')}/s, prompts "
                         f"{tr.get('prompt_lengths')}, new tokens {tr.get('new_tokens')}; {data.get('geometry')}; "
                         f"load {meta.get('load_avg_at_start')} -> {meta.get('load_avg_at_end')}")


# ------------------------------------------------------------------------------------------------ driver
BENCH_LOCATIONS = ("docs/bench_cpu.json", "docs/bench_serve_cpu.json")  # `qwen35 bench [--serve]`'s defaults


def render_all(results_dir=RESULTS_DIR, out_dir=PLOTS_DIR, formats=("png", "svg"), refresh_memory: bool = True,
               include_bench: bool = True, log=print) -> list[Path]:
    """(Re)compute results/memory.json (analytic), then render every JSON in `results_dir` whose kind is known, plus
    the bench JSON at its default location."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    written: list[Path] = []
    mem_path = results_dir / "memory.json"
    if refresh_memory or not mem_path.exists():
        write_json(memory_sweep(), mem_path)
        log(f"wrote {mem_path}")
    paths = sorted(results_dir.glob("*.json"))
    if include_bench and results_dir.resolve() == RESULTS_DIR.resolve():
        paths += [REPO / p for p in BENCH_LOCATIONS + MEASURED_MEMORY if (REPO / p).exists()]
    for path in paths:
        data = load_json(path)
        kind = data.get("kind")
        if kind == "memory":
            written += plot_memory(data, out_dir, formats)
        elif kind == "memory_measured":
            written += plot_memory_measured(data, out_dir, formats,
                                            stem="memory_measured" if path.stem.endswith("_cpu") else path.stem)
        elif kind == "accuracy":
            suffix = path.stem[len("accuracy"):] if path.stem.startswith("accuracy") else f"_{path.stem}"
            written += plot_accuracy(data, out_dir, formats, stem=f"accuracy{suffix}")
            written += plot_drift(data, out_dir, formats, stem=f"drift{suffix}")
        elif kind == "compare":
            written += plot_compare(data, out_dir, formats, stem=path.stem)
        elif kind == "gpu_bench":
            written += plot_gpu_bench(data, out_dir, formats, stem=path.stem.replace("gpu_bench", "gpu_kernels"))
        elif kind == "crossover":
            written += plot_crossover(data, out_dir, formats, stem=path.stem)
        elif kind == "eval":
            written += plot_eval(data, out_dir, formats, stem=path.stem)
        elif kind == "serve_bench":
            written += plot_serving(data, out_dir, formats,
                                    stem="serving" if path.stem == "bench_serve_cpu" else f"serving_{path.stem}")
        elif kind == "train_log":
            suffix = path.stem[len("train_log"):] if path.stem.startswith("train_log") else f"_{path.stem}"
            written += plot_train_log(data, out_dir, formats, stem=f"train_loss{suffix}")
        elif is_bench(data):
            stem = "speed" if path.stem in ("bench", "bench_cpu") else f"speed_{path.stem}"
            written += plot_speed(data, out_dir, formats, stem=stem)
        else:
            log(f"skipped {path.name}: kind {kind!r} has no plot")
    for p in written:
        log(f"wrote {p}")
    return written


if __name__ == "__main__":
    render_all()
