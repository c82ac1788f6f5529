# Notebook source (jupytext py:percent). Edit this file, then run `python notebooks/build.py` to regenerate the .ipynb.

# %% [markdown]
# # 06 · Speed and accuracy: choosing a path from the plots
#
# The project has several ways to run the same math: the NumPy reference (per-token or chunked), the optimized torch
# ops (chunked or recurrent), the Triton kernels (on a GPU), and `transformers`.  This notebook reads the committed
# measurements and draws them, so you can pick one for your sequence lengths, dtype and hardware.
#
# **You will learn**
# 1. how the measurements are organised: **JSON first** (`results/`, `docs/bench_cpu.json`), plots made from it
#    (`qwen35 plot`), every plot stamped with machine, versions and dtype;
# 2. how accurate each path is against the float64 oracle, by sequence length and dtype (relative RMS, max-abs,
#    NMSE in dB);
# 3. what happens to a **bf16 recurrent state** over a long decode, and why engines keep it in fp32;
# 4. where the **chunked form overtakes the per-token recurrence** (the crossover), and how fast the optimized path is
#    against the reference and `transformers`;
# 5. how to re-measure all of it on your machine.
#
# Narrative: motivation → naive (reference) → optimized → check → discussion.  Set `FULL = True` to re-measure the
# accuracy here instead of reading the committed JSON (about 20 s on one core).

# %%
FULL = False  # True: re-run the accuracy measurement (lengths to 4096, 2048 decode steps) instead of reading it

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from qwen35.accuracy import run_accuracy
from qwen35.measure import REPO, RESULTS_DIR, load_json
from qwen35.plot import (
    PLOTS_DIR,
    crossover_point,
    plot_accuracy,
    plot_compare,
    plot_crossover,
    plot_drift,
    plot_speed,
    render_all,
)
from qwen35.report import accuracy_table

checks = {}
print("results:", sorted(p.name for p in RESULTS_DIR.glob("*.json")))
bench_path = REPO / "docs" / "bench_cpu.json"
print("bench JSON from `qwen35 bench`:", bench_path.relative_to(REPO) if bench_path.exists() else "not run yet")

# %% [markdown]
# ## 1. Motivation: the same math, five ways
#
# Each path trades readability, speed and precision differently.  Two questions decide which one to use:
# *is it accurate enough?* (against the float64 oracle, the only thing we trust) and *is it fast at my lengths?*
# Both answers are measurements, so both are stored as JSON with the conditions they were taken under.

# %%
acc = run_accuracy(quick=False, progress=False) if FULL else load_json(RESULTS_DIR / "accuracy.json")
m = acc["meta"]
print(f"accuracy measured on {m['device_name']}, {m['cpu_count']} CPUs, python {m['python']}, numpy {m['numpy']}, "
      f"torch {m['torch']}, triton {m['triton']}, commit {m['git_commit']}, {m['date_utc']}")
print(f"geometry {m['shape']}, chunk {m['chunk_size']}; oracle: {m['oracle']}")
for key in ("device_name", "python", "numpy", "torch", "date_utc"):
    checks[f"accuracy JSON records {key}"] = (0.0 if m.get(key) else 1.0, 0.0)

# %% [markdown]
# ## 2. Accuracy by sequence length
#
# Lines: the optimized torch chunked and recurrent forms in float32 and bfloat16, and the reference chunked form in
# float64 (the floor: how far two exact formulations of the same math are apart in float64).  The horizontal dotted
# lines mark one unit of rounding of each dtype.

# %%
plot_accuracy(acc, out_dir=None)
plt.show()
print(accuracy_table(acc, "o"))

# %% [markdown]
# Read it like this:
#
# * **float32** paths sit a few units of fp32 rounding away from the oracle ($\sim 10^{-7}$ relative, about
#   $-125$ to $-135$ dB) and do **not** grow with T: the chunked form's extra products cost a factor of ~3 over the
#   recurrence, not a drift.
# * **bfloat16** paths (bf16 q, k, v in; fp32 state and arithmetic inside; bf16 out) sit at $\approx 1.7\cdot10^{-3}$,
#   which is just the rounding of the *output* to bf16 (half a bf16 ulp, RMS): the algorithm adds nothing visible.
# * The float64 chunked form agrees with the float64 recurrence to $\sim 5\cdot10^{-16}$: the WY derivation of
#   notebook 02 is exact.

# %%
rows = [r for r in acc["by_length"] if r["tensor"] == "o"]
worst = {dt: max(r["rel_rms"] for r in rows if r["dtype"] == dt) for dt in ("float64", "float32", "bfloat16")}
growth32 = max(r["rel_rms"] for r in rows if r["dtype"] == "float32" and r["T"] == max(x["T"] for x in rows)) / \
    max(r["rel_rms"] for r in rows if r["dtype"] == "float32" and r["T"] == min(x["T"] for x in rows))
checks["float64 chunked vs recurrence <= 1e-12"] = (worst["float64"], 1e-12)
checks["float32 paths <= 1e-5 (tests' budget)"] = (worst["float32"], 1e-5)
checks["bfloat16 paths <= 1e-2 (tests' budget)"] = (worst["bfloat16"], 1e-2)
checks["float32 error does not grow >3x with T"] = (growth32, 3.0)
print({k: f"{v:.1e}" for k, v in worst.items()}, f"; fp32 growth from shortest to longest T: {growth32:.2f}x")

# %% [markdown]
# ## 3. A long decode: fp32 vs bf16 state (docs/pitfalls.md, B8)
#
# During decode the state is carried from step to step.  Engines that *store* it in bf16 round it after every step.
# The curves: relative RMS error of each step's output against float64, for the state kept in fp32 and for the state
# rounded to bf16 after each step — with q/k/v values rounded to bf16 in both cases (so the inputs are identical and
# only the state dtype differs), for a short-memory decay (solid) and a long-memory one (dashed).

# %%
plot_drift(acc, out_dir=None)
plt.show()
for key in ("drift", "drift_slow_decay"):
    d = acc[key]
    s32, s16 = d["summary"]["float32"], d["summary"]["bfloat16"]
    print(f"g = logsigmoid/{d['gate_normalizer']:g}: fp32 state {s32['last_64_mean']:.1e}, bf16 state "
          f"{s16['first_64_mean']:.1e} -> {s16['last_64_mean']:.1e}  "
          f"(ratio {s16['last_64_mean'] / s32['last_64_mean']:,.0f}x)")
    checks[f"{key}: bf16 state >= 100x worse than fp32"] = (s32["last_64_mean"] * 100 / s16["last_64_mean"], 1.0)
    checks[f"{key}: fp32 state stays below 1e-5"] = (s32["max"], 1e-5)
slow = acc["drift_slow_decay"]["summary"]["bfloat16"]
checks["long memory: bf16-state error grows over the decode"] = (slow["first_64_mean"] / slow["last_64_mean"], 1.0)

# %% [markdown]
# The bf16 state is four orders of magnitude worse than fp32, and with a long memory (slow decay) its error keeps
# *growing* for hundreds of steps before the decay balances the rounding.  An fp32 state, in contrast, stays at
# fp32 rounding.  This is why the optimized kernels refuse a bf16 state pool and why vLLM and SGLang default to fp32
# for it (SGLang measured GSM8K 0.955 fp32 vs 0.945 bf16, sgl-project/sglang#10258).  It costs 2× the state memory
# of notebook 04.

# %% [markdown]
# ### The whole model, layer by layer
#
# `qwen35 compare --out results/compare_demo.json` runs the reference (float64), the optimized model in float32 and
# in bfloat16, and `transformers` (float32, eager) on the bundled demo and records every point of the residual
# stream.  Rounding error enters at the first layer and then stays roughly constant through the stream — no layer
# amplifies it — and the float32 optimized model is as close to the oracle as `transformers` itself.

# %%
cmp_ = load_json(RESULTS_DIR / "compare_demo.json")
plot_compare(cmp_, out_dir=None)
plt.show()
for label, rep in cmp_["reports"].items():
    logits = rep["rows"][-1]
    print(f"{label:>44}: logits rel. RMS {logits['rel_rms']:.1e}, max |diff| {logits['max_abs']:.1e}; "
          f"first divergent point: {rep['first_divergent']}; greedy agreement "
          f"{100 * cmp_['agreement'][label]['argmax_agree']:.0f} %")
    checks[f"compare: {label} within its tolerance"] = (0.0 if rep["first_divergent"] is None else 1.0, 0.0)

# %% [markdown]
# ## 4. Speed: the crossover between the two forms
#
# The per-token recurrence does little work per token but in T sequential small steps; the chunked form does more
# arithmetic in fewer, larger matrix products.  So at small T the recurrence wins and at large T the chunked form
# does.  Measured on one CPU thread, one layer of 16 value heads with $D = 128$:

# %%
cross = load_json(RESULTS_DIR / "crossover.json")
plot_crossover(cross, out_dir=None)
plt.show()
Tx = crossover_point(cross)
print(f"optimized torch: the chunked form is faster from T = {Tx} on "
      f"(measured on {cross['meta']['device_name']}, {cross['meta']['dtype_note']})")
checks["a crossover exists in the measured range"] = (0.0 if Tx is not None else 1.0, 0.0)
t1 = {r["impl"]: r["seconds"] for r in cross["rows"] if r["T"] == 1}
checks["T = 1: recurrence faster than chunked"] = (t1["optimized torch recurrent"] / t1["optimized torch chunked"], 1.0)

# %% [markdown]
# That is the rule the model follows: the **chunked** form for prefill chunks, the **recurrent** in-place update for
# decode (one token per request).  A decode step sent through the chunked path pays the whole fixed cost of a chunk
# for one token (MaxText did exactly that: docs/pitfalls.md, B21).  On a GPU the crossover moves (fla switches at about
# 64 tokens, ik_llama.cpp at about 16) — rerun the sweep there.

# %% [markdown]
# ## 5. Speed: optimized vs reference vs transformers
#
# `qwen35 bench` (single thread, fp32, medians) measures the gated delta rule prefill at
# realistic sizes against the reference and `transformers`' torch fallback, and the whole model against
# `transformers`.  Drawn from its JSON when it has been run:

# %%
if bench_path.exists():
    bench = load_json(bench_path)
    plot_speed(bench, out_dir=None)
    plt.show()
    for r in bench["gdn_prefill"]:
        line = f"T = {r['T']:>5}: optimized {r['T'] / r['optimized']['median_s']:>9,.0f} tok/s"
        for key, name in (("hf_torch_fallback", "transformers"), ("reference_chunked_f32", "reference chunked")):
            if key in r:
                line += f" | {name} {r['T'] / r[key]['median_s']:>8,.0f} tok/s"
        print(line)
    # Timings from a shared machine are evidence, not invariants: printed, not asserted.
    for r in bench["gdn_prefill"]:
        if "reference_chunked_f32" in r:
            print(f"T = {r['T']:>5}: optimized / reference NumPy chunked time = "
                  f"{r['optimized']['median_s'] / r['reference_chunked_f32']['median_s']:.2f}")
    checks["bench JSON has GDN prefill rows with a machine block"] = (
        0.0 if bench["gdn_prefill"] and (bench.get("machine", {}).get("host_cpu") or bench["machine"].get("cpu"))
        else 1.0, 0.0)
else:
    print("no docs/bench_cpu.json yet: run `qwen35 bench` and then `qwen35 plot`")

# %% [markdown]
# ## 6. Check: the committed plots are drawn from the committed JSON
#
# Re-render everything from `results/` into a temporary folder and compare with `docs/plots/` (SVG, rendered
# deterministically by the same matplotlib version).  If someone re-measures without re-plotting, this says so.

# %%
import matplotlib

same_matplotlib = f"Matplotlib v{matplotlib.__version__}" in (PLOTS_DIR / "memory.svg").read_text()
if same_matplotlib:  # another matplotlib version draws the same data with other bytes: nothing to compare then
    with tempfile.TemporaryDirectory() as tmp:
        render_all(RESULTS_DIR, Path(tmp), formats=("svg",), refresh_memory=False, include_bench=False,
                   log=lambda *a: None)  # the plots of results/*.json (the bench JSON has its own owner)
        stale = [p.name for p in sorted(Path(tmp).glob("*.svg"))
                 if not (PLOTS_DIR / p.name).exists() or (PLOTS_DIR / p.name).read_text() != p.read_text()]
    print("plots out of date:", stale or "none")
    checks["docs/plots match results/ (number of stale SVGs)"] = (float(len(stale)), 0.0)
else:
    print(f"docs/plots were drawn with another matplotlib than {matplotlib.__version__}: comparison skipped")

# %% [markdown]
# ## 7. Discussion: which path when
#
# | you want | use | why (from the plots above) |
# |---|---|---|
# | to read the algorithm, or a ground truth | `reference` (NumPy, float64) | exact to $10^{-15}$; slow |
# | long sequences (prefill, training) | chunked (`optimized`; Triton on GPU) | wins past the crossover; fp32-accurate |
# | decode (a token per request) | `fused_recurrent_gated_delta_rule_update` on the pool | no chunk overhead, in place |
# | bf16 activations | fine: error ≈ bf16 output rounding | the fp32 state and scratch keep the algorithm exact |
# | a bf16 recurrent state | avoid | 10⁴× the fp32 error, growing over long decodes |
#
# **Re-measure on your machine:** `qwen35 accuracy` (→ `results/accuracy.json`), `qwen35 plot --measure-crossover`
# (→ `results/crossover.json`), `qwen35 bench` (→ `docs/bench_cpu.json`), then `qwen35 plot` (→ `docs/plots/`).
# The numbers here came from a small shared CPU; a GPU changes the speed plots (not the accuracy ones much, except
# that tensor-core products in bf16/TF32 add their own rounding — docs/pitfalls.md, B24 for how to state such
# contracts).

# %% [markdown]
# ## What was checked

# %%
for name, (value, bound) in checks.items():
    print(f"{'ok ' if value <= bound else 'FAIL'}  {name}: {value:.2e} <= {bound:.0e}")
for name, (value, bound) in checks.items():
    assert value <= bound, f"{name}: {value} > {bound}"
assert len(checks) >= 12
