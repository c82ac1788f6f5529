# Notebook source (jupytext py:percent). Edit this file, then run `python notebooks/build.py` to regenerate the .ipynb.

# %% [markdown]
# # 03 · Gated full attention and multimodal RoPE
#
# Every fourth Qwen3.5 layer is ordinary causal softmax attention (GQA, with a KV cache) with three twists.
#
# **You will learn**
# 1. the **per-head q/gate interleave**: `q_proj` produces a query *and* an output gate for every head, laid out
#    `[q₀ | gate₀ | q₁ | gate₁ | …]` — and what happens if you split it as `[all q | all gates]`;
# 2. **partial RoPE**: only the first $R$ = `rotary_dim` channels of each head rotate (64 of 256);
# 3. **MRoPE**: each rotary frequency follows one of three position axes (time, height, width), assigned
#    *interleaved* in Qwen3.5 and *chunked* in Qwen2-VL — drawn as a picture;
# 4. the **positions of an image prompt** (`get_rope_index`) and the `rope_delta` that decode continues from;
# 5. that the layer with a KV cache (prefill, then decode) equals one shot, and that the gate really acts after
#    attention.
#
# All model code comes from `reference/` (NumPy, float64).  Narrative: motivation → naive → optimized → check →
# discussion.

# %%
FULL = False  # True: the 27B head geometry for the attention checks (slower)

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from qwen35.measure import error_metrics
from reference.attention import AttentionWeights, gated_attention, split_q_gate
from reference.config import Qwen35Config
from reference.multimodal import get_rope_index
from reference.norms import rms_norm, sigmoid
from reference.rope import (
    apply_partial_rope,
    inv_freq,
    mrope_axis_of_frequency,
    mrope_cos_sin,
    rope_cos_sin,
    text_position_ids,
)

big = Qwen35Config.preset("27b")  # the published geometry, for the pictures
cfg = Qwen35Config.tiny(hidden_size=128, head_dim=32, partial_rotary_factor=0.5, mrope_section=(4, 2, 2))
if FULL:
    cfg = Qwen35Config.tiny(hidden_size=2048, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                            partial_rotary_factor=0.25, mrope_section=(11, 11, 10))
checks = {}
print(f"27B: {big.num_attention_heads} query heads, {big.num_key_value_heads} KV heads, head_dim {big.head_dim}, "
      f"rotary_dim {big.rotary_dim}, mrope_section {big.mrope_section}, rope_theta {big.rope_theta:g}")

# %% [markdown]
# ## 1. Motivation: why gate the output of attention?
#
# A softmax row must sum to one, so a head with nothing useful to say still writes a weighted average of values
# (often parking its weight on the first token: an "attention sink").  Qwen3.5 multiplies each head's output,
# channel by channel, by $\sigma(\text{gate})$ computed from the same token, *after* attention and *before* `o_proj`:
#
# $$y = \big(\operatorname{attn}(q, K, V) \odot \sigma(\text{gate})\big)\, W_o^\top .$$
#
# A gate near 0 lets a head stay silent.  The gate comes from `q_proj`, which is twice as wide as usual.

# %% [markdown]
# ## 2. The q/gate interleave, per head
#
# `q_proj` maps $H$ to $2 \cdot n_h \cdot d_h$.  Hugging Face reads its output as `view(T, n_h, 2·d_h)` and then
# splits the *last* axis in half: so each head's query is followed by that head's gate.  Splitting the flat
# vector in half instead runs without any error and gives heads 1…n−1 someone else's numbers (docs/pitfalls.md, B2).

# %%
nh, hd = 4, 3
flat = np.arange(2 * nh * hd)[None].astype(float)  # one token's q_proj output, numbered 0, 1, 2, ...
q, gate = split_q_gate(flat, nh, hd)
role = np.zeros(2 * nh * hd)  # 0 = query, 1 = gate, as the model reads it
for h in range(nh):
    role[h * 2 * hd + hd:(h + 1) * 2 * hd] = 1
fig, axs = plt.subplots(2, 1, figsize=(9, 1.8))
axs[0].imshow(role[None], cmap=ListedColormap(["tab:blue", "tab:orange"]), aspect="auto")
axs[0].set_title("q_proj output as Qwen3.5 lays it out (blue = query, orange = gate; head h = one blue+orange pair)",
                 fontsize=9)
axs[1].imshow((np.arange(2 * nh * hd) >= nh * hd)[None], cmap=ListedColormap(["tab:blue", "tab:orange"]),
              aspect="auto")
axs[1].set_title("what a block split [all q | all gates] believes (wrong)", fontsize=9)
for a in axs:
    a.set_yticks([])
    a.set_xticks(range(0, 2 * nh * hd, hd))
plt.tight_layout()
plt.show()
print("head 1 query channels:", q[0, 1], " head 1 gate channels:", gate[0, 1])
checks["q of head 1 = flat[6:9]"] = (np.abs(q[0, 1] - flat[0, 6:9]).max(), 0.0)
checks["gate of head 1 = flat[9:12]"] = (np.abs(gate[0, 1] - flat[0, 9:12]).max(), 0.0)

# %% [markdown]
# ## 3. Partial RoPE: a quarter of each head rotates
#
# RoPE rotates pairs of channels by an angle proportional to the position, $\theta_j = \text{pos}\cdot
# \text{base}^{-2j/R}$, pairing channel $i$ with $i + R/2$ ("rotate half").  Qwen3.5 rotates only the first
# $R = d_h \cdot$ `partial_rotary_factor` channels (64 of 256); the other 192 carry no position at all, so attention
# can match on content regardless of distance.  Two facts to check: the non-rotary channels pass through bit for
# bit, and the score $q\cdot k$ depends only on the *distance* between the two positions.

# %%
R, D_h = cfg.rotary_dim, cfg.head_dim
f = inv_freq(R, cfg.rope_theta)  # [R/2]
rng = np.random.default_rng(0)
qv, kv = rng.standard_normal((1, 1, D_h)), rng.standard_normal((1, 1, D_h))


def score(m, n):  # q at position m, k at position n
    cq, sq = rope_cos_sin(np.array([m]), f)
    ck, sk = rope_cos_sin(np.array([n]), f)
    return float(apply_partial_rope(qv, cq, sq).ravel() @ apply_partial_rope(kv, ck, sk).ravel())


rot = apply_partial_rope(qv, *rope_cos_sin(np.array([37]), f))
checks["pass-through channels unchanged"] = (np.abs(rot[..., R:] - qv[..., R:]).max(), 0.0)
checks["score depends on distance only"] = (abs(score(10, 3) - score(1010, 1003)), 1e-9)
print(f"rotary channels: {R} of {D_h};  score(10, 3) = {score(10, 3):.6f},  "
      f"score(1010, 1003) = {score(1010, 1003):.6f}")

# %% [markdown]
# ## 4. MRoPE: three position axes share the frequencies
#
# For images, a token has a time, a row and a column.  MRoPE gives each of the $R/2$ frequencies to one axis.
# `mrope_section = (s_t, s_h, s_w)` says how many each axis gets (11, 11, 10 in every published Qwen3.5).  *Which*
# ones is the layout:
#
# * **chunked** (Qwen2-VL): the first $s_t$ frequencies follow time, the next $s_h$ height, the last $s_w$ width —
#   so width only ever sees the lowest frequencies (the slowest rotations);
# * **interleaved** (Qwen3-VL, Qwen3.5): t, h, w, t, h, w, … so every axis spans high to low frequencies.
#
# Mixing the two up still runs and quietly degrades grounding (docs/pitfalls.md, B19).

# %%
fig, axs = plt.subplots(2, 1, figsize=(10, 2.6), sharex=True)
cmap = ListedColormap(["tab:blue", "tab:green", "tab:red"])
for a, inter in zip(axs, (True, False), strict=True):
    axis = mrope_axis_of_frequency(big.mrope_section, interleaved=inter)
    a.imshow(axis[None], cmap=cmap, vmin=0, vmax=2, aspect="auto")
    a.set_yticks([])
    a.set_title(("interleaved (Qwen3.5)" if inter else "chunked (Qwen2-VL; not Qwen3.5)")
                + f": frequency j → axis  (blue t, green h, red w), mrope_section = {big.mrope_section}", fontsize=9)
axs[1].set_xlabel("frequency index j (0 = fastest rotation, 31 = slowest)")
plt.tight_layout()
plt.show()

fb = inv_freq(big.rotary_dim, big.rope_theta)
for inter in (True, False):
    axis = mrope_axis_of_frequency(big.mrope_section, interleaved=inter)
    span = {name: (fb[axis == i].max(), fb[axis == i].min()) for i, name in enumerate("thw")}
    print(("interleaved" if inter else "chunked    "),
          " ".join(f"{n}: {hi:.1e}..{lo:.1e}" for n, (hi, lo) in span.items()))
inter_axis = mrope_axis_of_frequency(big.mrope_section, interleaved=True)
checks["interleaved: counts = mrope_section"] = (
    float(np.abs(np.bincount(inter_axis, minlength=3) - np.array(big.mrope_section)).max()), 0.0)
checks["interleaved: w owns one of the 3 fastest frequencies"] = (float(np.flatnonzero(inter_axis == 2).min()), 2.0)

# %% [markdown]
# For **text**, all three axes hold the same position, so MRoPE is exactly 1-D RoPE whatever the layout:

# %%
pos = text_position_ids(50)  # [3, 50]: three equal rows
c3, s3 = mrope_cos_sin(pos, f, cfg.mrope_section)
c1, s1 = rope_cos_sin(np.arange(50), f)
checks["text MRoPE == 1-D RoPE"] = (max(np.abs(c3 - c1).max(), np.abs(s3 - s1).max()), 0.0)
print("text-only MRoPE equals 1-D RoPE:", checks["text MRoPE == 1-D RoPE"][0] == 0.0)

# %% [markdown]
# ## 5. The positions of an image prompt
#
# The processor expands an image into `<|image_pad|>` tokens, one per **merged** 2×2 group of 16-pixel patches.
# `get_rope_index` walks the prompt: text tokens advance all three axes by one; an image of $g_h \times g_w$
# patches gets a grid of $(g_h/2) \times (g_w/2)$ tokens whose t axis stays put and whose h, w axes enumerate the
# grid; after it, the position jumps by only $\max(g_h, g_w)/2$.  So positions end *below* the token count, and
# `rope_delta` = (max position + 1) − T (negative) is kept to continue decode.

# %%
mm = Qwen35Config.tiny(model_type="qwen3_5")
grid = (1, 8, 12)  # (t, h, w) in 16-px patches: a 128 x 192 pixel image
n_img = (grid[1] // 2) * (grid[2] // 2)  # merged tokens
ids = np.array([5, 6, 7, mm.vision_start_token_id] + [mm.image_token_id] * n_img + [mm.vision_end_token_id, 8, 9, 10])
position_ids, rope_delta = get_rope_index(ids, image_grid_thw=[grid], config=mm)
fig, axs = plt.subplots(1, 2, figsize=(12, 3.4), gridspec_kw={"width_ratios": [2, 1]})
for row, name, col in zip(position_ids, "thw", ("tab:blue", "tab:green", "tab:red"), strict=True):
    axs[0].plot(row, ".-", color=col, label=name, ms=4)
img = np.flatnonzero(ids == mm.image_token_id)
axs[0].axvspan(img[0] - 0.5, img[-1] + 0.5, color="0.9", zorder=0, label="image tokens")
axs[0].set_xlabel("token index")
axs[0].set_ylabel("position")
axs[0].legend(fontsize=8)
axs[0].grid(alpha=.3)
axs[0].set_title(f"{len(ids)} tokens, positions up to {position_ids.max()}: rope_delta = {rope_delta}", fontsize=9)
hw = position_ids[1:, img] - position_ids[1:, img].min(axis=1, keepdims=True)
axs[1].imshow(np.arange(n_img).reshape(grid[1] // 2, grid[2] // 2), cmap="Greys", alpha=0.3)
for i, (hh, ww) in enumerate(hw.T):
    axs[1].text(ww, hh, f"{i}", ha="center", va="center", fontsize=7)
axs[1].set_title("image tokens in order, placed at their (h, w) positions", fontsize=9)
plt.tight_layout()
plt.show()
checks["rope_delta = max + 1 - T"] = (abs(rope_delta - (position_ids.max() + 1 - len(ids))), 0)
checks["image tokens share one t position"] = (float(np.ptp(position_ids[0, img])), 0.0)
checks["text after the image resumes at start + max(gh, gw)/2"] = (
    abs(position_ids[0, img[-1] + 1] - (position_ids[0, img[0]] + max(grid[1:]) // 2)), 0)

# %% [markdown]
# ## 6. Naive: one head by hand
#
# Now the whole layer for a short text sequence.  First one query head written out from its pieces: the per-head
# split, the zero-centred RMSNorm of q and k (*before* RoPE), partial RoPE, a causal softmax, the gate.  With
# `o_proj` set to the identity we can read the gated head output straight out of the layer's result.

# %%
T_seq = 48 if FULL else 12
w = AttentionWeights.random(cfg, seed=1)
w.o_proj = np.eye(cfg.hidden_size)  # identity (hidden_size = n_h · d_h here): y = the gated head outputs
x = np.random.default_rng(2).standard_normal((T_seq, cfg.hidden_size))
y, kv_cache = gated_attention(x, w, cfg)  # the reference layer (all heads, batched)

head, hd = 1, cfg.head_dim
kv_head = head // (cfg.num_attention_heads // cfg.num_key_value_heads)  # GQA: consecutive query heads share
q_all, gate_all = split_q_gate(x @ w.q_proj.T, cfg.num_attention_heads, hd)  # [T, nh, hd] each
k_all = (x @ w.k_proj.T).reshape(T_seq, cfg.num_key_value_heads, hd)
v_all = (x @ w.v_proj.T).reshape(T_seq, cfg.num_key_value_heads, hd)
cos, sin = rope_cos_sin(np.arange(T_seq), inv_freq(cfg.rotary_dim, cfg.rope_theta))
qh = apply_partial_rope(rms_norm(q_all[:, head:head + 1], w.q_norm, cfg.rms_norm_eps), cos, sin)[:, 0]  # [T, hd]
kh = apply_partial_rope(rms_norm(k_all[:, kv_head:kv_head + 1], w.k_norm, cfg.rms_norm_eps), cos, sin)[:, 0]
scores = qh @ kh.T / np.sqrt(hd) + np.triu(np.full((T_seq, T_seq), -np.inf), k=1)  # causal mask
p = np.exp(scores - scores.max(1, keepdims=True))
p /= p.sum(1, keepdims=True)
o_head = (p @ v_all[:, kv_head]) * sigmoid(gate_all[:, head])  # [T, hd]
err = error_metrics(o_head, y[:, head * hd:(head + 1) * hd])["rel_rms"]
print(f"head {head} by hand vs gated_attention: rel. RMS error {err:.1e}")
checks["one head by hand == gated_attention"] = (err, 1e-13)

# %% [markdown]
# ## 7. Optimized: the KV cache — prefill, then decode
#
# Serving never recomputes the past: the layer returns the (normed, rotated) keys and values it saw, and the next
# call attends to them.  Prefilling the first part and then decoding one token at a time gives the one-shot result.
# (Only these layers keep a KV cache; the linear layers keep a fixed-size state instead, notebook 04.)

# %%
cut = T_seq - 4
y_pre, cache = gated_attention(x[:cut], w, cfg)
ys = [y_pre]
for t in range(cut, T_seq):
    y_t, cache = gated_attention(x[t:t + 1], w, cfg, past_kv=cache)
    ys.append(y_t)
err_cache = error_metrics(y, np.concatenate(ys))["rel_rms"]
print(f"prefill {cut} + decode {T_seq - cut} one at a time vs one shot: rel. RMS error {err_cache:.1e}; "
      f"cache now holds {cache[0][0].shape[0]} keys of shape {cache[0][0].shape[1:]}")
checks["prefill + decode == one shot"] = (err_cache, 1e-13)

# %% [markdown]
# The gate acts after attention: turn it off and the output changes by exactly the factor $\sigma(\text{gate})$,
# token by token and channel by channel (a gate applied to the values *before* attention would mix the gates of
# different tokens).

# %%
cfg_nogate = cfg.replace(attn_output_gate=False)  # the same layer with q_proj's gate rows dropped
y_nogate, _ = gated_attention(x, w.without_gate(cfg_nogate), cfg_nogate)
_, gate_flat = split_q_gate(x @ w.q_proj.T, cfg.num_attention_heads, hd)
err_gate = error_metrics(y, y_nogate * sigmoid(gate_flat.reshape(T_seq, -1)))["rel_rms"]
checks["y == y_without_gate ⊙ σ(gate)"] = (err_gate, 1e-13)
print(f"mean σ(gate) = {sigmoid(gate_flat).mean():.3f}; rel. RMS check error {err_gate:.1e}")

# %% [markdown]
# ## 8. Discussion
#
# * **Cost.**  Per token, a full-attention layer reads the whole KV cache: $2 \cdot n_{kv} \cdot d_h$ numbers per past
#   token (4 KV heads × 256 in 27B: 4 KiB per token per layer in bf16).  Only one layer in four pays it; the linear
#   layers pay a constant instead.  Notebook 04 puts the two side by side.
# * **What can silently go wrong:** a block split of `q_proj` (B2), RoPE over all of `head_dim` or with the exponent
#   over `head_dim` instead of $R$ (B18), the chunked MRoPE layout (B19), the RMSNorm weight read as $w$ instead of
#   $1 + w$ (B4).  Each is a one-line change that still runs; each has a test in `tests/`.
# * **Where the numbers come from:** HF `Qwen3_5Attention` and `Qwen3_5TextRotaryEmbedding`; `docs/gated_attention.md`,
#   `docs/rope_and_mrope.md`.  Notebook 07 follows an image from pixels to these positions.

# %% [markdown]
# ## What was checked

# %%
for name, (value, bound) in checks.items():
    print(f"{'ok ' if value <= bound else 'FAIL'}  {name}: {float(value):.1e} <= {bound:.0e}")
for name, (value, bound) in checks.items():
    assert value <= bound, f"{name}: {value} > {bound}"
assert len(checks) >= 10
