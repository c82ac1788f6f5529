# Notebook source (jupytext py:percent). Edit this file, then run `python notebooks/build.py` to regenerate the .ipynb.

# %% [markdown]
# # 04 · The state cache and the memory it needs
#
# A server runs many requests at once.  For each, a Qwen3.5 model keeps a **fixed-size state** in every linear layer
# and a **growing KV cache** in every full-attention layer.  How many requests fit on a GPU depends on both — and on
# how the state is moved around during a step.
#
# **You will learn**
# 1. how big one request's state is, and after how many tokens its KV cache overtakes it;
# 2. the **state pool** and its lifecycle — claim, gather, scatter, release — drawn as a picture;
# 3. why the documented gather/scatter design budgets **3×** the pool and an in-place pool **1×**;
# 4. the largest batch for each published size vs GPU memory, under both rules (analytic, from `reference.memory`);
# 5. when the **state**, not the KV cache, bounds how many requests run at once;
# 6. that the analytic sizes equal the bytes the caches really allocate.
#
# Narrative: motivation → naive (gather/scatter) → optimized (in place) → check → discussion.

# %%
FULL = False  # True: also allocate a 27B-sized pool to measure it (≈ 0.6 GB of RAM)

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from qwen35.plot import memory_sweep, plot_memory
from reference.config import Qwen35Config, preset_names
from reference.deltanet import DeltaNetWeights, gated_deltanet
from reference.memory import (
    conv_state_bytes_per_layer,
    format_bytes,
    infer_optimal_batch_size,
    kv_bytes_per_token,
    memory_budget,
    recurrent_state_bytes_per_layer,
    state_bytes_per_request,
    weight_bytes,
)
from reference.state_cache import GatedDeltaNetStateCache, PoolFullError

GiB = 2**30
checks = {}
big = Qwen35Config.preset("27b")

# %% [markdown]
# ## 1. Motivation: a constant next to a line
#
# Per request, every linear layer holds a conv state `[conv_dim, K-1]` and a recurrent state `[H_v, D_k, D_v]`; every
# full layer holds $2 \cdot H_{kv} \cdot D_h$ numbers per token.  For 27B (48 linear and 16 full layers, bf16):

# %%
per_req = state_bytes_per_request(big, "bfloat16")
conv_l, rec_l = conv_state_bytes_per_layer(big, "bfloat16"), recurrent_state_bytes_per_layer(big, "bfloat16")
kv_tok = kv_bytes_per_token(big, "bfloat16")
print(f"per linear layer: conv {conv_l:,} B [{big.conv_dim} x {big.linear_conv_kernel_dim - 1}] "
      f"+ recurrent {rec_l:,} B "
      f"[{big.linear_num_value_heads} x {big.linear_key_head_dim} x {big.linear_value_head_dim}]")
print(f"one request's state, {big.num_linear_layers} linear layers: {per_req:,} B = {format_bytes(per_req)}")
print(f"KV cache per token, {big.num_full_layers} full layers: {kv_tok:,} B;  "
      f"state = KV of {per_req / kv_tok:,.0f} tokens")
checks["27B state per request == 78,446,592 B (74.8 MiB, the MAX figure)"] = (abs(per_req - 78_446_592), 0)

ctx = np.arange(0, 32769, 256)
all_full = big.replace(layer_types=("full_attention",) * big.num_hidden_layers)  # a hypothetical all-attention 27B
fig, ax = plt.subplots(figsize=(8, 3.6))
ax.plot(ctx, (per_req + ctx * kv_tok) / GiB, label="Qwen3.5-27B: state + KV (16 full layers)")
ax.plot(ctx, ctx * kv_tok / GiB, "--", label="its KV part alone")
ax.plot(ctx, ctx * kv_bytes_per_token(all_full) / GiB, ":", label="if all 64 layers were full attention")
ax.axhline(per_req / GiB, color="0.5", lw=0.8)
ax.axvline(per_req / kv_tok, color="0.5", lw=0.8)
ax.text(per_req / kv_tok, ax.get_ylim()[1] * 0.9, f"  KV = state at {per_req / kv_tok:,.0f} tokens", fontsize=8)
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("GiB per request (bf16)")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
ax.set_title("Memory of one request", fontsize=10)
plt.show()

# %% [markdown]
# ## 2. The pool and its lifecycle
#
# `reference.state_cache.GatedDeltaNetStateCache` is the documented (MAX) design.  Per linear layer it allocates
# two pools with `max_batch_size` rows.  A request **claims** a slot (zeroed: a new request never inherits a previous
# owner's state); before a step, the model **gathers** dense copies of the batch's rows; the layers produce new
# states; the model **scatters** them back; when the request finishes it **releases** the slot.
#
# Below, a pool of 4 slots on a tiny config, with every operation drawn: the colour is the owner of the slot.

# %%
tiny = Qwen35Config.tiny()
cache = GatedDeltaNetStateCache(tiny, max_batch_size=4)
snapshots = []
colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green", None: "white"}


def snap(title, gathered=()):
    owner = {cache.slot_of(r): r for r in cache.active_requests}
    fill = [float(np.abs(cache.recurrent_pools[0][s]).sum() > 0) for s in range(cache.max_batch_size)]
    snapshots.append((title, [owner.get(s) for s in range(cache.max_batch_size)], fill, list(gathered)))


snap("empty pool")
cache.claim("a")
cache.claim("b")
snap('claim("a"), claim("b")')
conv, rec = cache.get_states(["b", "a"])
snap('gather ["b", "a"]', gathered=["b", "a"])
# The model runs one linear layer on the gathered copies: one token per request (decode), weights random.
w = DeltaNetWeights.random(tiny, seed=0)
x = np.random.default_rng(1).standard_normal((2, tiny.hidden_size))
_, c0, r0 = gated_deltanet(x, w, tiny, cu_seqlens=np.array([0, 1, 2]), conv_state=conv[0], recurrent_state=rec[0])
new_conv = [c0] + conv[1:]
new_rec = [r0] + rec[1:]
cache.update_states(["b", "a"], new_conv, new_rec)
snap('scatter ["b", "a"]')
cache.release("a")
snap('release("a")')
cache.claim("c")
snap('claim("c")  (slot 0 again, zeroed)')

fig, axs = plt.subplots(1, len(snapshots), figsize=(2.2 * len(snapshots), 3.0))
for a, (title, owners, fill, gathered) in zip(axs, snapshots, strict=True):
    for s, (o, f) in enumerate(zip(owners, fill, strict=True)):
        a.add_patch(Rectangle((0, 3 - s), 1, 0.9, facecolor=colors[o], edgecolor="k", alpha=0.35 + 0.5 * f))
        a.text(0.5, 3.45 - s, f"slot {s}\n{o or 'free'}", ha="center", va="center", fontsize=8)
    for j, r in enumerate(gathered):  # the gathered batch: a separate dense copy
        a.add_patch(Rectangle((1.4, 3 - j), 1, 0.9, facecolor=colors[r], edgecolor="k", ls="--", alpha=0.6))
        a.text(1.9, 3.45 - j, f"row {j}\ncopy of {r}", ha="center", va="center", fontsize=7)
    a.set_xlim(-0.1, 2.5)
    a.set_ylim(-0.2, 4.1)
    a.axis("off")
    a.set_title(title, fontsize=8)
fig.suptitle("GatedDeltaNetStateCache: the pool (left column) and a gathered batch (right, dashed); "
             "darker = non-zero state", fontsize=9)
plt.tight_layout()
plt.show()

checks["released-then-claimed slot starts from zero"] = (
    float(np.abs(cache.recurrent_pools[0][cache.slot_of("c")]).max()), 0.0)
checks["scatter wrote b's new state to b's slot"] = (
    float(np.abs(cache.recurrent_pools[0][cache.slot_of("b")] - r0[0]).max()), 0.0)
cache.claim("d")
cache.claim("e")
try:
    cache.claim("f")
    refused = 0.0
except PoolFullError as e:
    refused = 1.0
    print("a fifth request is refused with a clear error:", str(e)[:100], "...")
checks["a full pool refuses a new request"] = (1.0 - refused, 0.0)

# %% [markdown]
# ## 3. Naive vs optimized: 3× or 1×
#
# During one gather/scatter step three copies of the batch's state are alive at once: the **pool**, the
# **gathered inputs** and the layers' **outputs** before they are scattered back.  So MAX budgets
# $3 \times \text{max\_batch} \times \text{per\_req}$ and gives the state 15 % of free memory:
#
# $$\text{max\_batch}_{\text{gather/scatter}} =
# \max\!\big(1, \lfloor 0.15 \cdot \text{free} \rfloor \,/\!/\, (3 \cdot \text{per\_req})\big).$$
#
# The optimized model (`optimized.model.Qwen35Model`) passes **slot ids** to kernels that read and write the pool in
# place (notebook 05), so only the pool exists: the same 15 % holds three times as many requests.

# %%
print(f"{'preset':>10} {'state/req':>10} {'weights':>10} | max batch at 80 GiB:  gather/scatter (3x)   in place (1x)")
for name in preset_names():
    cfg = Qwen35Config.preset(name)
    free = 80 * GiB - weight_bytes(cfg)
    if free <= 0:
        print(f"{name:>10} {format_bytes(state_bytes_per_request(cfg)):>10} {format_bytes(weight_bytes(cfg)):>10} |"
              "   weights alone exceed 80 GiB")
        continue
    gs = infer_optimal_batch_size(cfg, free, "gather_scatter")
    ip = infer_optimal_batch_size(cfg, free, "in_place")
    print(f"{name:>10} {format_bytes(state_bytes_per_request(cfg)):>10} {format_bytes(weight_bytes(cfg)):>10} |"
          f" {gs:>24} {ip:>15}")
    checks[f"{name}: in place holds 3x (0..2 more from the floor)"] = (ip - 3 * gs if ip >= 3 * gs else 99, 2)

# %% [markdown]
# **Measured, not just claimed.**  Below, a small model whose state is large next to its activations (16 value
# heads of 64×64 per linear layer), 8 requests, one decode step of the reference model, with Python's `tracemalloc`
# watching every NumPy allocation: the step's peak is about **2 pools** on top of the pool itself (the gathered
# inputs and the outputs) — 3× in all.  The optimized model's decode writes into its pools in place: same storage
# before and after, new values.

# %%
import tempfile
import tracemalloc

import torch

from optimized.model import Qwen35Model as OptModel
from reference.checkpoint import write_checkpoint
from reference.context import TextContext
from reference.model import Qwen35Model as RefModel

wide = Qwen35Config.tiny(hidden_size=64, linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64,
                         linear_value_head_dim=64)
B = 8
with tempfile.TemporaryDirectory() as ckpt:
    write_checkpoint(ckpt, wide, seed=0)
    ref_model = RefModel.from_pretrained(ckpt, max_batch_size=B)
    opt_model = OptModel.from_pretrained(ckpt, max_batch_size=B)
prompts = [TextContext(request_id=f"r{i}", tokens=[1, 2, 3 + i]) for i in range(B)]
inputs = ref_model.prepare_initial_token_inputs(prompts)
ref_model.execute(inputs)
pool_bytes = ref_model.state_cache.nbytes
tracemalloc.start()
step = ref_model.prepare_next_token_inputs(np.arange(B) + 5, inputs)  # gather ...
ref_model.execute(step)  # ... run the layers, scatter back
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(f"reference (gather/scatter): pool {format_bytes(pool_bytes)}; a decode step's peak allocations "
      f"{format_bytes(peak)} = {peak / pool_bytes:.2f} pools on top of the pool -> {1 + peak / pool_bytes:.2f}x")
checks["gather/scatter decode peak is ~2 extra pools (1.8..2.5)"] = (abs(peak / pool_bytes - 2.15), 0.35)

opt_inputs = opt_model.prepare_initial_token_inputs(prompts)
opt_model.execute(opt_inputs)
ptrs = [p.data_ptr() for p in opt_model.state_pools]
before = [p.clone() for p in opt_model.state_pools]
opt_model.execute(opt_model.prepare_next_token_inputs(np.arange(B) + 5, opt_inputs))
same_storage = all(p.data_ptr() == q for p, q in zip(opt_model.state_pools, ptrs, strict=True))
changed = all(not torch.equal(p, b) for p, b in zip(opt_model.state_pools, before, strict=True))
opt_pool = sum(p.nbytes for p in opt_model.state_pools) + sum(p.nbytes for p in opt_model.conv_pools)
print(f"optimized (in place): pools {format_bytes(opt_pool)} = {B} x {opt_model.state_bytes_per_request():,} B; "
      f"decode kept the same storage: {same_storage}, and updated it: {changed}")
checks["optimized pools == max_batch x state_bytes_per_request (fp32 state)"] = (
    abs(opt_pool - B * state_bytes_per_request(wide, "float32")), 0)
checks["optimized decode updates the pools in place"] = (0.0 if same_storage and changed else 1.0, 0.0)

# %% [markdown]
# Max batch vs device memory for every published size, under both rules (this is `docs/plots/memory.png`,
# computed here from `reference.memory`; `qwen35 plot` writes the same figure from `results/memory.json`):

# %%
sweep = memory_sweep()
fig = plot_memory(sweep, out_dir=None)
plt.show()

# %% [markdown]
# ## 4. When does the state, not the KV cache, bound concurrency?
#
# After the state reservation, the rest of free memory holds KV.  At a short context the KV cache of many requests
# fits easily and the **state budget** is the limit; at a long context the **KV cache** runs out first.  For 27B on
# one 141 GB device:

# %%
contexts = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
budgets = {c: memory_budget(big, 141 * 10**9, c) for c in contexts}
fig, ax = plt.subplots(figsize=(8, 3.8))
for rule, ls in (("in_place", "-"), ("gather_scatter", "--")):
    ax.plot(contexts, [budgets[c].rules[rule]["state_max_batch"] for c in contexts], ls, color="tab:red",
            label=f"state bound ({rule})")
    ax.plot(contexts, [budgets[c].rules[rule]["kv_max_batch"] for c in contexts], ls, color="tab:blue",
            label=f"KV bound ({rule})")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.grid(alpha=0.3, which="both")
ax.set_xlabel("context length per request (tokens)")
ax.set_ylabel("max concurrent requests")
ax.legend(fontsize=8)
ax.set_title("Qwen3.5-27B on 141 GB (bf16): the smaller bound wins", fontsize=10)
plt.show()
print(f"{'context':>8} | {'bound (in place)':>16} {'batch':>6} | {'bound (gather/scatter)':>22} {'batch':>6}")
for c in contexts:
    r1, r3 = budgets[c].rules["in_place"], budgets[c].rules["gather_scatter"]
    print(f"{c:>8} | {r1['bound_by']:>16} {r1['max_batch']:>6} | {r3['bound_by']:>22} {r3['max_batch']:>6}")
crossover = next(c for c in contexts if budgets[c].rules["in_place"]["bound_by"] == "KV cache")
print(f"\nwith the in-place pool, KV becomes the limit from about {crossover:,} tokens per request")
checks["short contexts are state-bound"] = (float(budgets[256].rules["in_place"]["bound_by"] != "state"), 0.0)
checks["long contexts are KV-bound"] = (float(budgets[131072].rules["in_place"]["bound_by"] != "KV cache"), 0.0)

# %% [markdown]
# ## 5. Check: analytic bytes == allocated bytes
#
# The memory model is only useful if it matches what the code allocates.  Two independent measurements:
# the pools of a `GatedDeltaNetStateCache` (its arrays' `nbytes`), and the states a Gated DeltaNet layer actually
# returns after a prefill (whatever shape the layer chose to produce).

# %%
rows = []
for name, dtype in [("0.8b", np.float32), ("2b", np.float64)] + ([("27b", np.float32)] if FULL else []):
    cfg = Qwen35Config.preset(name)
    pool = GatedDeltaNetStateCache(cfg, max_batch_size=2, dtype=dtype)
    analytic = state_bytes_per_request(cfg, np.dtype(dtype).name)
    rows.append((name, np.dtype(dtype).name, analytic, pool.bytes_per_slot, pool.nbytes))
    checks[f"{name} {np.dtype(dtype).name}: pool bytes per slot == analytic"] = (abs(pool.bytes_per_slot - analytic), 0)
    checks[f"{name} {np.dtype(dtype).name}: pool total == 2 x analytic"] = (abs(pool.nbytes - 2 * analytic), 0)
    del pool
# The layer itself: prefill 3 sequences on the tiny config and measure the states it returns.
x = np.random.default_rng(2).standard_normal((10, tiny.hidden_size))
_, conv_s, rec_s = gated_deltanet(x, DeltaNetWeights.random(tiny, 3), tiny, cu_seqlens=np.array([0, 2, 7, 10]))
measured = (conv_s.nbytes + rec_s.nbytes) * tiny.num_linear_layers // 3  # per request, all linear layers
rows.append(("tiny (layer output)", "float64", state_bytes_per_request(tiny, "float64"), measured, None))
checks["tiny: layer's returned states == analytic"] = (abs(measured - state_bytes_per_request(tiny, "float64")), 0)
print(f"{'config':>20} {'dtype':>8} {'analytic/req':>14} {'measured/req':>14} {'pool total':>12}")
for name, dt, a, m, tot in rows:
    print(f"{name:>20} {dt:>8} {a:>14,} {m:>14,} {'' if tot is None else f'{tot:,}':>12}")

# %% [markdown]
# ## 6. Discussion
#
# * **Fixed cost, paid up front.**  A request's state costs the same at token 1 and token 100 000; for 27B it equals
#   the KV cache of ~1 200 tokens.  Short-context, high-concurrency serving (chat, agents) is therefore bounded by
#   state memory, and the 3× vs 1× choice is a 3× difference in concurrency.
# * **Engines differ.**  vLLM keeps the recurrent state in fp32 and the conv state in bf16 (docs/pitfalls.md, B8); every
#   such choice changes `per_req` (`state_bytes_per_request(config, dtype, conv_dtype=...)`).  Prefix caching and
#   speculative decoding add more state copies per request (B20) — this model does not count them.
# * **Refuse, do not truncate.**  A full pool raises `PoolFullError`; the optimized model refuses a `max_batch_size`
#   that does not fit at start, with the numbers (vLLM does the same; B20).
# * Commands: `qwen35 memory --preset 27b --memory 141GB --context 8192`; docs: `docs/config_and_memory.md`,
#   `docs/state_cache.md`.

# %% [markdown]
# ## What was checked

# %%
for name, (value, bound) in checks.items():
    print(f"{'ok ' if value <= bound else 'FAIL'}  {name}: {value} <= {bound}")
for name, (value, bound) in checks.items():
    assert value <= bound, f"{name}: {value} > {bound}"
assert len(checks) >= 10
