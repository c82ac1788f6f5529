# Notebook source (jupytext py:percent). Edit this file, then run `python notebooks/build.py` to regenerate the .ipynb.

# %% [markdown]
# # 08 · Anatomy of the demo model on real text: gates, state, attention, predictions
#
# Notebooks 02 and 03 take the two token mixers apart on synthetic inputs.  Here the bundled demo checkpoint reads a
# real passage — a paragraph of CPython's own documentation (`pydoc_data.topics`, the text behind `help("for")`) —
# and we look inside while it does.  The demo's shape is read from its `config.json`, so the notebook works for any
# byte-level Qwen3.5 checkpoint in that directory; what the numbers say depends on its weights (its README, printed
# below, says how they were made), so every claim about them is computed and printed, not written here.
#
# **You will learn**
# 1. how to run the NumPy reference model (float64) on a passage and record the residual stream at every layer;
# 2. the Gated DeltaNet **gates** per layer and head along the text: the decay $e^{g}$ (the fraction of the state a
#    token keeps) with the memory length it implies, and the write strength $\beta$;
# 3. the **output gates**: $\sigma(\text{gate})$ of full attention and the $\mathrm{silu}(z)$ gate of the DeltaNet's
#    gated RMSNorm, as distributions over the text;
# 4. how the **DeltaNet state** fills as the document streams in: $\lVert S_t\rVert_F$ and its effective rank per head;
# 5. the **attention maps** of the full-attention layer(s), with the bytes themselves as tick labels;
# 6. the model's **next-byte predictions**: the top 5 at a few positions, the loss in bits per byte against two
#    baselines, and a greedy continuation.
#
# Each quantity is recomputed from the layer's weights and its input with the reference's own functions
# (`reference/norms.py`, `conv.py`, `gated_delta.py`, `attention.py`, `rope.py`) and then checked against the
# reference layer's output, so what is plotted is what the model computes.

# %%
FULL = False  # True: a passage of about 1.5 KB instead of one paragraph, and a longer continuation

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import qwen35
from qwen35.data import load_corpus
from qwen35.evaluation import unigram_bits_per_byte
from qwen35.measure import rel_rms
from qwen35.tokenizer import load_tokenizer
from reference.attention import gated_attention, repeat_kv, softmax, split_q_gate
from reference.config import LINEAR, Qwen35Config
from reference.conv import causal_conv1d
from reference.deltanet import gated_deltanet
from reference.divergence import reference_trace
from reference.gated_delta import recurrent_gated_delta_rule
from reference.memory import parameter_counts
from reference.model import Qwen35Model
from reference.norms import gated_rms_norm, rms_norm, sigmoid, silu, softplus
from reference.rope import apply_partial_rope, rope_tables, text_position_ids

DEMO = Path(qwen35.__file__).parent / "demo"
checks = {}  # name -> (value, bound); every entry is asserted in the last cell
np.set_printoptions(precision=3, suppress=True, linewidth=110)


def show(byte_id):
    """A byte as a printable tick label: '␣' for a space, '⏎' for a newline, '·' for other non-printables."""
    b = int(byte_id)
    return "␣" if b == 32 else "⏎" if b == 10 else chr(b) if 32 < b < 127 else "·"


# %% [markdown]
# ## 1. The checkpoint and the passage
#
# Everything about the model's shape comes from its config: the layer map, the head counts and sizes.  The
# tokenizer is byte-level: token $b < 256$ is the byte $b$ of the UTF-8 text, so a passage of $n$ bytes is $n$ tokens,
# and a loss per token is a loss per byte.

# %%
cfg = Qwen35Config.from_pretrained(DEMO)
model = Qwen35Model.from_pretrained(DEMO, max_batch_size=1)  # float64: the oracle
tok = load_tokenizer(DEMO)
W = model.weights
readme = (DEMO / "README.md").read_text().splitlines() if (DEMO / "README.md").exists() else []
print("\n".join(line for line in readme[2:] if line.strip()))
print()
print(f"layers: {' '.join('L' if t == LINEAR else 'F' for t in cfg.layer_types)}   hidden {cfg.hidden_size}, "
      f"vocab {cfg.vocab_size}, {sum(parameter_counts(cfg).values()):,} parameters")
print(f"Gated DeltaNet: H_k = {cfg.linear_num_key_heads}, H_v = {cfg.linear_num_value_heads}, "
      f"D_k = {cfg.linear_key_head_dim}, D_v = {cfg.linear_value_head_dim}")
print(f"full attention: {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} KV heads, head_dim "
      f"{cfg.head_dim}, output gate {cfg.attn_output_gate}")

# %% [markdown]
# The passage comes from the **held-out** part of the training corpus (`qwen35.data`: the pydoc topics sorted by
# name, every 10th one held out), so a model trained on that corpus with `qwen35 train` has not seen it: the topic
# on comparisons, its prose paragraphs up to about 400 bytes (FULL: 1.5 KB).  Paragraphs that start with spaces are
# grammar or code examples; we keep to prose.

# %%
corpus = load_corpus()  # the pydoc topics, split into train / held out
TOPIC = "comparisons"
held_out = {d.name: d.text for d in corpus.held_out}
print("held-out topics:", ", ".join(held_out))
paragraphs = [p for p in held_out[TOPIC].split("\n\n") if len(p) > 150 and not p.startswith(" ")]
text = paragraphs[0]
for p in paragraphs[1:]:
    if len(text) + len(p) > (1500 if FULL else 450):
        break
    text += "\n\n" + p
ids = tok.encode(text)
T = len(ids)
print(text)
print(f"\n{T} bytes -> {T} tokens")
checks["byte tokenizer: ids are the UTF-8 bytes"] = (float(ids != list(text.encode("utf-8"))), 0.0)

# %% [markdown]
# ## 2. One forward pass, recorded
#
# `reference_trace` runs the model statelessly on the passage and returns the residual stream after the embedding
# and after every layer (the tool `qwen35 diverge` uses).  Entry $i$ is the input of layer $i$; applying that layer's
# `input_layernorm` gives exactly what its token mixer reads.  The last entry is the logits, equal to the pipeline
# model's stateless `logits`.

# %%
points = reference_trace(model, ids)
stream = [a for _, a in points[:-2]]  # [L + 1] x [T, H]: embedding, then the output of each layer
logits = points[-1][1]  # [T, V]
mixer_in = [rms_norm(stream[i], layer.input_layernorm, cfg.rms_norm_eps) for i, layer in enumerate(W.layers)]
checks["trace logits == Qwen35Model.logits"] = (rel_rms(model.logits([ids])[0], logits), 1e-12)
linear_layers, full_layers = cfg.linear_layer_indices, cfg.full_layer_indices
print(f"{len(points)} trace points: {', '.join(name for name, _ in points[:3])}, ..., {points[-1][0]}")
print("RMS of the residual stream after each layer:", np.array([np.sqrt(np.mean(s ** 2)) for s in stream]))

# %% [markdown]
# ## 3. The Gated DeltaNet gates along the text
#
# In a Gated DeltaNet layer, every token $t$ and value head $h$ gets two scalars from the layer input $a_t$
# (`reference/deltanet.py`, HF `Qwen3_5GatedDeltaNet`):
#
# $$\beta_{t,h} = \sigma(a_t W_b^\top)_h, \qquad
# g_{t,h} = -e^{A_{\log,h}}\;\mathrm{softplus}\big((a_t W_a^\top)_h + \text{dt\_bias}_h\big) \le 0 .$$
#
# The state is multiplied by $\alpha_{t,h} = e^{g_{t,h}} \in (0, 1]$ before token $t$ writes into it with strength
# $\beta_{t,h}$ (notebook 02).  A constant $\alpha$ keeps a write for about $1/(1-\alpha)$ tokens (the sum
# $\sum_s \alpha^s$), so the mean $\alpha$ of a head translates into an **effective memory length**.
#
# The cell below recomputes $q, k, v, \beta, g, z$ of every linear layer with the same reference functions the
# layer calls (`sigmoid`, `softplus`, `causal_conv1d` with SiLU), runs the per-token rule and the gated RMSNorm, and
# checks that this reproduces the layer's output `gated_deltanet(...)` — so the gates below are the layer's gates.

# %%
H_k, H_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
D_k, D_v = cfg.linear_key_head_dim, cfg.linear_value_head_dim


def deltanet_parts(i):
    """q, k, v (the rule's inputs), g, beta, z of linear layer i on the passage, from its weights and its input."""
    w, a = W.layers[i].mixer, mixer_in[i]  # a [T, H]
    qkv = a @ w.in_proj_qkv.T  # [T, conv_dim]
    mixed, _ = causal_conv1d(qkv, w.conv1d, activation="silu")  # [T, conv_dim]
    q = mixed[:, :cfg.key_dim].reshape(1, T, H_k, D_k)
    k = mixed[:, cfg.key_dim:2 * cfg.key_dim].reshape(1, T, H_k, D_k)
    v = mixed[:, 2 * cfg.key_dim:].reshape(1, T, H_v, D_v)
    beta = sigmoid(a @ w.in_proj_b.T)  # [T, H_v]
    g = -np.exp(w.A_log) * softplus(a @ w.in_proj_a.T + w.dt_bias)  # [T, H_v]  log-decay <= 0
    z = (a @ w.in_proj_z.T).reshape(T, H_v, D_v)  # [T, H_v, D_v]  the output gate's input
    return dict(q=q, k=k, v=v, g=g, beta=beta, z=z)


gdn = {}
for i in linear_layers:
    p = gdn[i] = deltanet_parts(i)
    w = W.layers[i].mixer
    o, _ = recurrent_gated_delta_rule(p["q"], p["k"], p["v"], g=p["g"][None], beta=p["beta"][None])  # [1,T,H_v,D_v]
    y = gated_rms_norm(o[0], p["z"], w.norm, cfg.rms_norm_eps).reshape(T, H_v * D_v) @ w.out_proj.T  # [T, H]
    y_layer, _, rec_state = gated_deltanet(mixer_in[i], w, cfg)
    p["final_state"] = rec_state[0]  # [H_v, D_k, D_v]  the layer's state after the passage (chunked form)
    checks[f"layer {i}: recomputed gates reproduce gated_deltanet"] = (rel_rms(y_layer, y), 1e-10)
    checks[f"layer {i}: g <= 0 and 0 < beta < 1"] = (
        float(p["g"].max() > 0 or p["beta"].min() <= 0 or p["beta"].max() >= 1), 0.0)
print("recomputed layer outputs vs gated_deltanet:",
      ", ".join(f"layer {i}: {checks[f'layer {i}: recomputed gates reproduce gated_deltanet'][0]:.1e}"
                for i in linear_layers))

# %% [markdown]
# Heatmaps, one row of panels per linear layer, tokens along x and value heads along y.  On the left the decay
# $e^{g}$: dark cells are tokens at which a head wipes most of its state; a head that stays bright keeps a long
# memory.  On the right the write strength $\beta$: bright cells are tokens the head writes strongly.  Look for
# vertical stripes (every head reacting to the same byte, e.g. a space or a newline) versus heads that behave
# on their own.

# %%
tick_at = np.arange(0, T, max(1, T // 12))
fig, axs = plt.subplots(len(linear_layers), 2, figsize=(13, 0.9 + 0.32 * H_v * len(linear_layers)), squeeze=False)
for row, i in enumerate(linear_layers):
    for col, (name, M) in enumerate((("decay e^g", np.exp(gdn[i]["g"])), ("write strength β", gdn[i]["beta"]))):
        ax = axs[row, col]
        im = ax.imshow(M.T, aspect="auto", vmin=0, vmax=1, cmap="magma", interpolation="nearest")  # [H_v, T]
        ax.set_yticks(range(H_v))
        ax.set_ylabel(f"layer {i}\nhead", fontsize=8)
        ax.set_xticks(tick_at)
        ax.set_xticklabels([f"{t}\n{show(ids[t])}" for t in tick_at], fontsize=7)
        if row == 0:
            ax.set_title(name)
fig.colorbar(im, ax=axs, fraction=0.02)
plt.show()

# %% [markdown]
# The summary per head: the mean decay, the memory length $1/(1-\overline{\alpha})$ it implies, and the mean write
# strength.  Then the same decay averaged over the heads of a layer, split by the kind of byte being read: whether
# a layer forgets more at spaces, punctuation or newlines than inside words is a question the numbers answer.

# %%
print(f"{'layer':>5} {'head':>4} {'mean e^g':>9} {'memory (tokens)':>16} {'mean β':>7}")
memory = {}
for i in linear_layers:
    alpha = np.exp(gdn[i]["g"]).mean(axis=0)  # [H_v]
    memory[i] = 1.0 / np.maximum(1.0 - alpha, 1e-12)  # [H_v]
    for h in range(H_v):
        print(f"{i:>5} {h:>4} {alpha[h]:9.4f} {memory[i][h]:16.1f} {gdn[i]['beta'][:, h].mean():7.3f}")

kinds = {"letter": [c.isalpha() for c in text], "space": [c == " " for c in text],
         "newline": [c == "\n" for c in text], "punctuation": [not c.isalnum() and not c.isspace() for c in text]}
print(f"\nmean e^g over the heads, by the byte read:  {'  '.join(f'{k:>11}' for k in kinds)}")
for i in linear_layers:
    a_t = np.exp(gdn[i]["g"]).mean(axis=1)  # [T]
    row = [a_t[np.array(m)].mean() if any(m) else float("nan") for m in kinds.values()]
    print(f"{'layer ' + str(i):>42}  {'  '.join(f'{v:11.3f}' for v in row)}")

fig, ax = plt.subplots(figsize=(7, 3))
for n, i in enumerate(linear_layers):
    ax.scatter(np.full(H_v, n), memory[i], s=25)
ax.set_yscale("log")
ax.set_xticks(range(len(linear_layers)))
ax.set_xticklabels([f"layer {i}" for i in linear_layers])
ax.set_ylabel("1 / (1 − mean e^g)  [tokens]")
ax.axhline(T, color="gray", lw=0.8, ls="--", label=f"passage length ({T})")
ax.legend(fontsize=8)
ax.grid(alpha=.3)
ax.set_title("Effective memory length of each DeltaNet head")
plt.show()

# %% [markdown]
# One dot per head.  Heads near the bottom keep only the last few bytes (a local, n-gram-like memory); heads near
# or above the dashed line keep writes for longer than this passage.  A spread of memory lengths within a layer
# means the layer mixes short- and long-range heads.

# %% [markdown]
# ## 4. The output gates
#
# Both mixers end with a multiplicative gate computed from the layer input:
#
# * full attention: $o \odot \sigma(\text{gate})$, the gate being the second half of each head's `q_proj` rows
#   (`split_q_gate`, pitfall B2), so every channel is scaled by a number in $(0, 1)$;
# * Gated DeltaNet: the gated RMSNorm $\big[\hat o\, w\big] \odot \mathrm{silu}(z)$, with $z = a W_z^\top$; silu is not
#   bounded above and dips to $-0.278$ below zero.
#
# The histograms show the distribution of the multiplier over all tokens, heads and channels.  A mass near 0 means
# the gate mostly closes channels (the layer writes little into the residual stream); a mass spread out means it
# selects channels token by token.

# %%
att_gate = {}
for i in full_layers:
    w = W.layers[i].mixer
    _, gate = split_q_gate(mixer_in[i] @ w.q_proj.T, cfg.num_attention_heads, cfg.head_dim,
                           gated=cfg.attn_output_gate)  # [T, nh, hd] or None
    if gate is not None:
        att_gate[i] = sigmoid(gate)
z_gate = {i: silu(gdn[i]["z"]) for i in linear_layers}  # [T, H_v, D_v]

fig, axs = plt.subplots(1, 2, figsize=(12, 3.2))
for i, s in att_gate.items():
    axs[0].hist(s.ravel(), bins=50, range=(0, 1), histtype="step", density=True, label=f"layer {i}")
axs[0].set_title("full attention: σ(gate)" if att_gate else "full attention: no output gate in this config")
lo = min(float(s.min()) for s in z_gate.values())
hi = max(float(s.max()) for s in z_gate.values())
for i, s in z_gate.items():
    axs[1].hist(s.ravel(), bins=60, range=(lo, hi), histtype="step", density=True, label=f"layer {i}")
axs[1].set_title("Gated DeltaNet: silu(z)")
for ax in axs:
    ax.set_xlabel("gate value")
    ax.legend(fontsize=8)
    ax.grid(alpha=.3)
plt.show()
for i, s in att_gate.items():
    print(f"attention layer {i}: mean σ(gate) {s.mean():.3f}, fraction < 0.1: {(s < 0.1).mean():.2f}, "
          f"> 0.9: {(s > 0.9).mean():.2f}")
    checks[f"layer {i}: sigma(gate) in (0, 1)"] = (float(s.min() <= 0 or s.max() >= 1), 0.0)
for i, s in z_gate.items():
    print(f"DeltaNet layer {i}: mean silu(z) {s.mean():.3f}, fraction |silu(z)| < 0.1: {(abs(s) < 0.1).mean():.2f}")
    checks[f"layer {i}: silu(z) >= -0.2785"] = (float(s.min() < -0.2785), 0.0)

# %% [markdown]
# ## 5. The DeltaNet state along the document
#
# A linear layer's memory is a matrix $S_t \in \mathbb{R}^{D_k \times D_v}$ per head.  Stepping the reference
# recurrence one token at a time (`recurrent_gated_delta_rule` on a single token, with the previous state as
# `initial_state`: exactly what decode does) gives the state after every prefix of the passage.  Two numbers
# describe it: its size $\lVert S_t\rVert_F$, and its **effective rank** $\exp\!\big(-\sum_j p_j \log p_j\big)$ with
# $p_j = \sigma_j / \sum_i \sigma_i$ from the singular values $\sigma$: about how many independent key→value
# associations the head holds.  The rank cannot exceed $\min(t, D_k, D_v)$ after $t$ writes; the decay keeps
# removing old ones.  At the end, the stepped state must equal the layer's own final state (chunked form).

# %%
def state_along(p):
    """||S_t||_F and the effective rank of S_t per head, for t = 1..T, stepping the recurrence token by token."""
    S = np.zeros((1, H_v, D_k, D_v))
    norms, ranks = np.empty((T, H_v)), np.empty((T, H_v))
    for t in range(T):
        sl = slice(t, t + 1)
        _, S = recurrent_gated_delta_rule(p["q"][:, sl], p["k"][:, sl], p["v"][:, sl], g=p["g"][None, sl],
                                          beta=p["beta"][None, sl], initial_state=S)  # S [1, H_v, D_k, D_v]
        sv = np.linalg.svd(S[0], compute_uv=False)  # [H_v, min(D_k, D_v)]
        norms[t] = np.sqrt((sv ** 2).sum(-1))
        pj = sv / np.maximum(sv.sum(-1, keepdims=True), 1e-300)
        ranks[t] = np.exp(-(pj * np.log(np.where(pj > 0, pj, 1.0))).sum(-1))
    return norms, ranks, S[0]


along = {}
for i in linear_layers:
    norms, ranks, S_end = state_along(gdn[i])
    along[i] = (norms, ranks)
    checks[f"layer {i}: stepped state == the layer's final state"] = (rel_rms(gdn[i]["final_state"], S_end), 1e-10)
    bound = np.minimum(np.arange(1, T + 1), min(D_k, D_v))[:, None]  # [T, 1]
    checks[f"layer {i}: effective rank <= min(t, D)"] = (float((ranks - bound).max(initial=-1) > 1e-9), 0.0)

fig, axs = plt.subplots(2, len(linear_layers), figsize=(min(16, 3.4 * len(linear_layers)), 5.4), squeeze=False,
                        sharex=True)
for col, i in enumerate(linear_layers):
    norms, ranks = along[i]
    axs[0, col].plot(norms, lw=1)
    axs[1, col].plot(ranks, lw=1)
    axs[1, col].axhline(min(D_k, D_v), color="gray", ls="--", lw=0.8)
    axs[0, col].set_title(f"layer {i}")
    axs[1, col].set_xlabel("tokens read")
axs[0, 0].set_ylabel("‖S_t‖_F per head")
axs[1, 0].set_ylabel("effective rank (dashed: D)")
for ax in axs.ravel():
    ax.grid(alpha=.3)
plt.tight_layout()
plt.show()
for i in linear_layers:
    print(f"layer {i}: final ‖S‖_F per head {along[i][0][-1]},  effective rank {along[i][1][-1]}")

# %% [markdown]
# One line per head.  The norm rises while the head writes faster than it forgets and then levels off where the
# two balance; a head with a short memory (section 3) settles early, a long-memory head keeps growing.  The rank
# panel says how much of the $D$-dimensional key space the head uses: compare each head's plateau with the dashed
# line at $D$.

# %% [markdown]
# ## 6. Attention maps of the full-attention layer(s)
#
# The full layer's weights are $\mathrm{softmax}\big(q_t \cdot k_s / \sqrt{d} + \text{causal mask}\big)$ per head,
# with $q$ and $k$ after their RMSNorm and the partial RoPE — the steps of `gated_attention`, recomputed here with
# `split_q_gate`, `rms_norm`, `rope_tables`, `apply_partial_rope` and `softmax`.  Multiplying the maps into $v$,
# applying the output gate and `o_proj` must give the layer's output.

# %%
nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim


def attention_maps(i):
    """Attention probabilities [nh, T, T] of full layer i on the passage, and the layer output they imply."""
    w, a = W.layers[i].mixer, mixer_in[i]
    q, gate = split_q_gate(a @ w.q_proj.T, nh, hd, gated=cfg.attn_output_gate)  # [T, nh, hd]
    k = (a @ w.k_proj.T).reshape(T, nkv, hd)
    v = (a @ w.v_proj.T).reshape(T, nkv, hd)
    q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)  # norm before RoPE
    cos, sin = rope_tables(text_position_ids(T), cfg)  # [T, R]
    q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
    scores = np.einsum("thd,shd->hts", q, repeat_kv(k, nh // nkv)) * cfg.attention_scale  # [nh, T, T]
    probs = softmax(np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf))  # [nh, T, T]
    o = np.einsum("hts,shd->thd", probs, repeat_kv(v, nh // nkv)).reshape(T, nh * hd)  # [T, nh·hd]
    if gate is not None:
        o = o * sigmoid(gate.reshape(T, nh * hd))
    return probs, o @ w.o_proj.T


maps = {}
for i in full_layers:
    maps[i], y = attention_maps(i)
    y_layer, _ = gated_attention(mixer_in[i], W.layers[i].mixer, cfg)
    checks[f"layer {i}: recomputed attention maps reproduce gated_attention"] = (rel_rms(y_layer, y), 1e-10)
    checks[f"layer {i}: rows sum to 1, nothing above the diagonal"] = (
        max(abs(maps[i].sum(-1) - 1).max(), maps[i][:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]].max()),
        1e-12)

# %% [markdown]
# First the whole passage, one panel per head (query token down, key token across; log colour scale, so faint
# weights stay visible).  A bright diagonal is a head that looks at the latest bytes; a bright first column is an
# "attention sink" on the first token; vertical stripes are keys many later queries read.

# %%
panels = [(i, h) for i in full_layers for h in range(nh)]
ncols = min(len(panels), 4)
nrows = -(-len(panels) // ncols)
fig, axs = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.7 * nrows), squeeze=False)
for ax in axs.ravel():
    ax.set_axis_off()
for ax, (i, h) in zip(axs.ravel(), panels, strict=False):
    ax.set_axis_on()
    ax.imshow(np.log10(maps[i][h] + 1e-4), cmap="viridis", vmin=-4, vmax=0, interpolation="nearest")
    ax.set_title(f"layer {i}, head {h}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# Then a window of 40 bytes from the middle of the passage, with the bytes as tick labels, for the head of each
# full layer that spreads its attention least (lowest mean entropy).  The window shows the weights among its own
# bytes only (weights on earlier keys are cut off, so a row may sum to less than 1).

# %%
w0 = max(0, T // 2 - 20)
win = np.arange(w0, min(T, w0 + 40))
labels = [show(ids[t]) for t in win]
fig, axs = plt.subplots(1, len(full_layers), figsize=(6.2 * len(full_layers), 5.6), squeeze=False)
for col, i in enumerate(full_layers):
    P = maps[i]  # [nh, T, T]
    entropy = -(P * np.log(np.where(P > 0, P, 1.0))).sum(-1).mean(-1)  # [nh]
    h = int(entropy.argmin())
    ax = axs[0, col]
    ax.imshow(P[h][np.ix_(win, win)], cmap="Blues", vmin=0, interpolation="nearest")
    ax.set_xticks(range(len(win)))
    ax.set_xticklabels(labels, fontsize=7, family="monospace")
    ax.set_yticks(range(len(win)))
    ax.set_yticklabels(labels, fontsize=7, family="monospace")
    ax.set_xlabel("key byte")
    ax.set_ylabel("query byte")
    ax.set_title(f"layer {i}, head {h} (lowest entropy)", fontsize=10)
plt.tight_layout()
plt.show()

print(f"{'layer':>5} {'head':>4} {'mean distance':>14} {'on itself':>10} {'on previous':>12} {'on token 0':>11}")
for i in full_layers:
    P = maps[i]
    dist = np.arange(T)[:, None] - np.arange(T)[None, :]  # [T, T]  t - s
    for h in range(nh):
        print(f"{i:>5} {h:>4} {(P[h] * dist).sum(-1).mean():14.1f} {np.diag(P[h]).mean():10.3f} "
              f"{np.diag(P[h], -1).mean():12.3f} {P[h][:, 0].mean():11.3f}")

# %% [markdown]
# In the table, "mean distance" is how far back a head reads on average (in bytes); the last three columns are the
# average weight a query puts on itself, on the byte before it, and on the first byte of the passage.

# %% [markdown]
# ## 7. What the model predicts
#
# The logits at position $t$ are the model's distribution over byte $t+1$.  The loss of the passage is the mean of
# $-\log_2 p(\text{byte}_{t+1} \mid \text{bytes}_{\le t})$: **bits per byte**.  Two baselines put it in scale: the
# uniform distribution over the vocabulary ($\log_2 V$ bits) and the byte frequencies of the training split
# (a unigram model, add-one smoothed), which knows which bytes are common but nothing about order.

# %%
def log_softmax(x):  # [..., V]
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


logp = log_softmax(logits)  # [T, V]
nll_bits = -logp[np.arange(T - 1), ids[1:]] / np.log(2)  # [T-1]  bits for byte t+1
train_bytes = np.frombuffer(corpus.split_bytes("train"), np.uint8)
counts = np.bincount(train_bytes, minlength=256) + 1.0  # [256] add-one smoothing over the byte values
unigram_bits = -np.log2(counts / counts.sum())[ids[1:]]  # [T-1]  (the passage holds no special tokens)
bpb, bpb_uniform, bpb_unigram = nll_bits.mean(), np.log2(cfg.vocab_size), unigram_bits.mean()
print(f"model:    {bpb:.3f} bits per byte on this passage")
print(f"unigram:  {bpb_unigram:.3f} bits per byte (byte frequencies of the {len(train_bytes):,} training bytes)")
print(f"uniform:  {bpb_uniform:.3f} bits per byte (log2 of the vocabulary, {cfg.vocab_size})")
print(f"the model {'beats' if bpb < bpb_unigram else 'does not beat'} the unigram baseline on this passage")
checks["probabilities sum to 1"] = (float(abs(np.exp(logp).sum(-1) - 1).max()), 1e-12)
checks["unigram here == qwen35.evaluation's baseline"] = (
    abs(bpb_unigram - unigram_bits_per_byte(corpus.split_bytes("train"), bytes(ids[1:]))), 1e-12)

# %% [markdown]
# Where the bits go: the surprisal of each byte of the window used above (tall bars are bytes the model did not
# expect), next to the unigram's.  Then the average surprisal of the first letter of a word against the letters
# after it — on any model that has learned something about words, the later letters should be cheaper.

# %%
fig, ax = plt.subplots(figsize=(13, 3))
xs = np.arange(len(win) - 1)
ax.bar(xs - 0.2, nll_bits[win[:-1]], width=0.4, label="model")
ax.bar(xs + 0.2, unigram_bits[win[:-1]], width=0.4, label="unigram", alpha=0.6)
ax.set_xticks(xs)
ax.set_xticklabels([show(ids[t + 1]) for t in win[:-1]], family="monospace")
ax.set_ylabel("bits")
ax.set_title("surprisal of each byte, given the bytes before it")
ax.legend(fontsize=8)
ax.grid(alpha=.3, axis="y")
plt.show()

nxt = np.array(ids[1:])  # the predicted byte at each position
prev = np.array(ids[:-1])
is_letter = np.array([chr(b).isalpha() for b in nxt])
after_letter = np.array([chr(b).isalpha() for b in prev])
first, rest = is_letter & ~after_letter, is_letter & after_letter
print(f"first letter of a word:  model {nll_bits[first].mean():.2f} bits, unigram {unigram_bits[first].mean():.2f}")
print(f"later letters of a word: model {nll_bits[rest].mean():.2f} bits, unigram {unigram_bits[rest].mean():.2f}")

# %% [markdown]
# The five most likely next bytes at a few positions, with their probabilities (the true next byte in brackets).

# %%
probs_next = np.exp(logp)
for t in np.linspace(8, T - 2, 6).astype(int):
    context = "".join(show(b) for b in ids[max(0, t - 24):t + 1])
    top = np.argsort(-logp[t])[:5]
    cands = "  ".join(f"{show(c) if c < 256 else '<' + str(c) + '>'} {probs_next[t, c]:.2f}" for c in top)
    print(f"…{context:>25} [{show(ids[t + 1])}]  ->  {cands}")

# %% [markdown]
# Finally, a greedy continuation through the pipeline (prefill, then decode steps with the caches; notebook 04) of
# the passage's first sentence, cut after its first few words.

# %%
n_new = 160 if FULL else 60
prompt = ids[:text.index(" ", 40) + 1] if " " in text[40:] else ids[:40]
new = model.generate([prompt], max_new_tokens=n_new, stop_token_ids=tok.eos_token_ids)[0]
print(repr(tok.decode(prompt)), "->")
print(repr(tok.decode(new)))

# Greedy means: each new byte is the argmax of the stateless logits of everything before it.
replay = model.logits([prompt + new])[0]  # [len(prompt) + n, V]
rows = replay[len(prompt) - 1:len(prompt) - 1 + len(new)]  # the logits that chose each new byte
gap = float((rows.max(-1) - rows[np.arange(len(new)), new]).max())
checks["greedy decode == argmax of the stateless logits"] = (gap, 1e-9)

# %% [markdown]
# ## 8. Discussion
#
# * **Two kinds of memory.**  The DeltaNet heads hold a fixed $D_k \times D_v$ matrix each; their decay gates
#   decide, byte by byte, how long a write survives (section 3), and the effective rank says how many associations
#   fit at once (section 5).  The full-attention layer keeps every key and can look back exactly, at the price of a
#   KV cache that grows with the text (section 6).  The hybrid leaves long-range lookup to the one layer in four
#   that can do it.
# * **Gates are data-dependent.**  $g$, $\beta$, $\sigma(\text{gate})$ and $\mathrm{silu}(z)$ are all functions of
#   the current token's hidden state, which is what separates Gated DeltaNet from a fixed-decay linear RNN.
# * **Bits per byte** are the number to compare across tokenizers; for a byte-level model it is the loss per token
#   divided by $\ln 2$.  `qwen35 eval` computes it on the held-out split of the same corpus (docs/training.md), and
#   notebook 09 trains a model of your own.
# * **Precision.**  Everything here is float64; the same quantities from the optimized engine in fp32 / bf16 differ
#   by the amounts notebook 06 measures.

# %% [markdown]
# ## What was checked

# %%
for name, (value, bound) in checks.items():
    print(f"{'ok ' if value <= bound else 'FAIL'}  {name}: {value:.1e} <= {bound:.0e}")
for name, (value, bound) in checks.items():
    assert value <= bound, f"{name}: {value} > {bound}"
assert len(checks) >= 10
