# Notebook source (jupytext py:percent). Edit this file, then run `python notebooks/build.py` to regenerate the .ipynb.

# %% [markdown]
# # 02 · Gated DeltaNet: from linear attention to the gated delta rule
#
# Three of every four Qwen3.5 layers are **Gated DeltaNet** layers.  Instead of a KV cache that grows with the
# context, each keeps a fixed-size matrix state per head and updates it token by token.
#
# **You will learn**
# 1. why linear attention gives a constant-size state, and what goes wrong with it (it can only add);
# 2. how the **delta rule** turns the state into a memory that can *overwrite* a key's value;
# 3. how the **gate** (a per-token decay) lets it forget, and why the decay comes *before* the delta correction;
# 4. the per-token **recurrence** (the ground truth, used for decode);
# 5. the **chunked WY form** (used for prefill), derived step by step on one chunk and checked against the recurrence;
# 6. the short **causal conv** in front of the rule, and its own small state.
#
# Everything is computed by `reference/` (NumPy, float64).  The notebook only builds inputs and checks results.
# Narrative: motivation → naive → optimized → check → discussion.

# %%
FULL = False  # True: longer sequences and real head sizes (D = 128); a minute or two on a laptop

import matplotlib.pyplot as plt
import numpy as np

from qwen35.measure import error_metrics, gdn_inputs
from reference.conv import causal_conv1d, causal_conv1d_update
from reference.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule
from reference.norms import l2_norm

T = 512 if FULL else 96  # tokens
D = 128 if FULL else 16  # head size D_k = D_v
checks = {}  # name -> (value, bound); every entry is asserted in the last cell
np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. Motivation: linear attention keeps a state of fixed size
#
# Causal softmax attention reads all previous keys: its cache grows by one key and one value per token.  Drop the
# softmax and the output becomes
#
# $$o_t = \sum_{s \le t} (q_t \cdot k_s)\, v_s = S_t^\top q_t, \qquad
# S_t = S_{t-1} + k_t v_t^\top \in \mathbb{R}^{D_k \times D_v}.$$
#
# The whole past is summarised by $S_t$, of size $D_k \times D_v$ whatever $t$ is.  That is the state a Gated DeltaNet
# layer keeps per head.  But $S \leftarrow S + k v^\top$ can only *add*: store two values under the same key and the
# read-out returns their sum.

# %%
rng = np.random.default_rng(0)
key = rng.standard_normal(D)
key /= np.linalg.norm(key)  # one unit-norm key
v1, v2 = rng.standard_normal(D), rng.standard_normal(D)
S_linear = np.outer(key, v1) + np.outer(key, v2)  # linear attention: two writes under the same key
print("linear attention reads back v1 + v2:", np.allclose(S_linear.T @ key, v1 + v2))

# %% [markdown]
# ## 2. The delta rule: write the *difference*
#
# The delta rule (Widrow–Hoff; Schlag et al. 2021, Yang et al. 2024) first reads what the state already holds for
# $k_t$, and writes only the correction, with a strength $\beta_t \in (0, 1)$:
#
# $$u_t = \beta_t\,(v_t - S_{t-1}^\top k_t), \qquad
# S_t = S_{t-1} + k_t u_t^\top = (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top .$$
#
# With $\beta = 1$ and a unit key, the second write *replaces* the first.  Below, the reference rule does it: two
# tokens with the same key, no decay ($g = 0$), $\beta = 1$, and the query of the second token equal to the key
# (`scale=1` so the read-out is exactly $S^\top k$; `use_qk_l2norm=False` because our key already has unit norm — the
# model's L2 norm adds $10^{-6}$ under the square root, which would shift the result by $5\cdot10^{-7}$).

# %%
def one_head(x):  # [T, D] -> [B=1, T, H=1, D]
    return np.asarray(x)[None, :, None, :]

keys = np.stack([key, key])
vals = np.stack([v1, v2])
o, S = recurrent_gated_delta_rule(one_head(keys), one_head(keys), one_head(vals),
                                  g=np.zeros((1, 2, 1)), beta=np.ones((1, 2, 1)), scale=1.0,
                                  use_qk_l2norm=False)
print("delta rule reads back v2 after overwriting v1:", np.allclose(o[0, 1, 0], v2))
checks["delta rule overwrites (max |o - v2|)"] = (np.abs(o[0, 1, 0] - v2).max(), 1e-12)

# %% [markdown]
# ## 3. The gate: forget a little at every token
#
# Gated DeltaNet adds a per-token, per-head decay $\alpha_t = e^{g_t}$ with $g_t \le 0$ (in the model
# $g = -e^{A_{\log}} \cdot \mathrm{softplus}(a + \text{dt\_bias})$).  The state decays **first**, and the delta
# correction is taken against the *decayed* state:
#
# $$S \leftarrow \alpha_t S, \quad u_t = \beta_t (v_t - S^\top k_t), \quad
# S \leftarrow S + k_t u_t^\top, \quad o_t = S^\top q_t .$$
#
# (Correcting against the undecayed state is a real bug class: docs/pitfalls.md, B1, fla#885.)  A memory written once
# then fades as $\prod \alpha_t$: below, one value is written at t = 0 and read back with the same key later, for three
# decay strengths.  (Notebook 08 shows the gates $e^{g}$ and $\beta$ that the demo model computes, head by head, on a
# passage of real text, and the state they build.)

# %%
steps = 40
fig, ax = plt.subplots(figsize=(7, 3.2))
for g_value in (0.0, -0.05, -0.3):
    qs = np.tile(key, (steps, 1))  # query = the stored key at every step
    ks = np.zeros((steps, D))
    ks[0] = key  # write only at t = 0 (a zero key writes nothing)
    vs = np.zeros((steps, D))
    vs[0] = v1
    o, _ = recurrent_gated_delta_rule(one_head(qs), one_head(ks), one_head(vs), g=np.full((1, steps, 1), g_value),
                                      beta=np.ones((1, steps, 1)), scale=1.0, use_qk_l2norm=False)
    recall = o[0, :, 0] @ v1 / (v1 @ v1)  # fraction of v1 still retrievable
    ax.plot(recall, label=f"g = {g_value}  (α = {np.exp(g_value):.3f})")
    if g_value == -0.05:
        checks["recall after 20 steps == α^20"] = (abs(recall[20] - np.exp(-0.05 * 20)), 1e-12)
ax.set_xlabel("tokens after the write")
ax.set_ylabel("fraction of v recalled")
ax.legend()
ax.grid(alpha=.3)
ax.set_title("The gate: a stored value fades as α^t")
plt.show()

# %% [markdown]
# ## 4. Naive: the per-token recurrence (the ground truth)
#
# `recurrent_gated_delta_rule` runs the four lines above for every token, with the model's normalisations inside:
# $q$ and $k$ are L2-normalised and $q$ is scaled by $D_k^{-1/2}$.  Its arguments are the shared signature of every
# implementation in the project (and of flash-linear-attention):
#
# ```
# q, k [B, T, H_k, D_k]   v [B, T, H_v, D_v]   g, beta [B, T, H_v]   initial_state [N, H_v, D_k, D_v]
# ```
#
# with keyword-only `g=` and `beta=` so the two cannot be swapped.  Value head $h$ reads key head
# $h \,/\!/\, (H_v/H_k)$.  The inputs come from the project's recipe for physically valid inputs:
# $g = \log\sigma(\cdot) \le 0$ with some entries 0, $\beta = \sigma(\cdot)$.

# %%
x = gdn_inputs(seed=1, B=1, T=T, H_k=2, H_v=4, D_k=D, D_v=D).as_dict()
o_rec, S_rec = recurrent_gated_delta_rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"])
print("o:", o_rec.shape, " final state:", S_rec.shape, " (state size does not depend on T =", T, ")")

# %% [markdown]
# The recurrence is exact but sequential: T steps, each a handful of matrix–vector products, which keeps a GPU
# mostly idle during prefill.  It is what a server runs for **decode** (one token per request per step).

# %% [markdown]
# ## 5. Optimized: the chunked WY form, one chunk step by step
#
# Split the sequence into chunks of $C$ tokens.  Inside a chunk, unroll the recurrence.  Write
# $G_i = \sum_{j \le i} g_j$ (cumulative log-decay inside the chunk), $\gamma_i = e^{G_i}$, and $S_0$ for the state at
# the start of the chunk.  The corrected values $u_i$ depend on each other only through earlier tokens:
#
# $$u_i = \beta_i \Big(v_i - \gamma_i S_0^\top k_i - \sum_{j<i} e^{G_i - G_j} (k_i \cdot k_j)\, u_j\Big).$$
#
# That is a unit lower-triangular system
# $(I + A)\,U_{\text{all}} = \mathrm{diag}(\beta)\,V - \mathrm{diag}(\beta\gamma) K S_0$ with
# $A_{ij} = \beta_i (k_i\cdot k_j)\, e^{G_i - G_j}$ for $i > j$.  Splitting the right-hand side gives the **WY form**
#
# $$W = (I+A)^{-1}\mathrm{diag}(\beta\gamma)K, \qquad U = (I+A)^{-1}\mathrm{diag}(\beta)V, \qquad u = U - W S_0,$$
#
# and then everything else is matrix products:
#
# $$O = (Q \odot \gamma) S_0 + \big[(QK^\top) \odot e^{G_i - G_j} \odot \mathbb{1}_{i \ge j}\big]\, u, \qquad
# S_1 = \gamma_C S_0 + (K \odot e^{G_C - G})^\top u .$$
#
# Below we compute each piece for one head and one chunk in the middle of the sequence, and check it against the
# recurrence: the $u_i$ against the corrections the recurrence makes, $O$ against its outputs, $S_1$ against its state.

# %%
C = 16
c0 = 2 * C  # the third chunk: it starts from a non-zero state
h, kh = 1, 0  # value head 1 reads key head 1 // (4 // 2) = 0
qn = l2_norm(x["q"][0, :, kh]) * D ** -0.5  # [T, D]  normalised, scaled queries
kn = l2_norm(x["k"][0, :, kh])  # [T, D]
V, g, beta = x["v"][0, :, h], x["g"][0, :, h], x["beta"][0, :, h]

# The recurrence's state at the chunk boundary, and its state after each token of the chunk, from the reference.
def state_after(t):  # state of head h after tokens [0, t)
    if t == 0:
        return np.zeros((D, D))
    _, S_t = recurrent_gated_delta_rule(x["q"][:, :t], x["k"][:, :t], x["v"][:, :t], g=x["g"][:, :t],
                                        beta=x["beta"][:, :t])
    return S_t[0, h]

S0 = state_after(c0)
sl = slice(c0, c0 + C)
Qc, Kc, Vc, bc = qn[sl], kn[sl], V[sl], beta[sl]
G = np.cumsum(g[sl])  # [C] cumulative log-decay in the chunk
gamma = np.exp(G)
decay = np.exp(np.where(np.tril(np.ones((C, C), bool)), G[:, None] - G[None, :], -np.inf))  # e^{Gi-Gj}, i >= j
A = np.tril(bc[:, None] * (Kc @ Kc.T) * decay, k=-1)  # [C, C] strictly lower
I = np.eye(C)
W = np.linalg.solve(I + A, (bc * gamma)[:, None] * Kc)  # [C, D_k]
U = np.linalg.solve(I + A, bc[:, None] * Vc)  # [C, D_v]
u = U - W @ S0  # [C, D_v] the corrected values
O = (Qc * gamma[:, None]) @ S0 + ((Qc @ Kc.T) * decay) @ u  # [C, D_v]
S1 = gamma[-1] * S0 + (Kc * np.exp(G[-1] - G)[:, None]).T @ u  # [D_k, D_v]

# The corrections the recurrence makes: u_t = beta_t (v_t - (alpha_t S_{t-1})^T k_t), from its own states.
u_rec = np.stack([bc[i] * (Vc[i] - (np.exp(g[c0 + i]) * state_after(c0 + i)).T @ Kc[i]) for i in range(C)])
err_u = error_metrics(u_rec, u)["rel_rms"]
err_O = error_metrics(o_rec[0, sl, h], O)["rel_rms"]
err_S = error_metrics(state_after(c0 + C), S1)["rel_rms"]
print(f"u  (WY) vs recurrence: rel. RMS error {err_u:.1e}")
print(f"O  (chunk) vs recurrence: {err_O:.1e}")
print(f"S1 (chunk) vs recurrence: {err_S:.1e}")
checks["WY u == recurrence corrections"] = (err_u, 1e-12)
checks["chunk output == recurrence"] = (err_O, 1e-12)
checks["chunk end state == recurrence"] = (err_S, 1e-12)

# %% [markdown]
# What the picture of one chunk looks like: $A$ is strictly lower triangular (the tokens of the chunk interact
# only with earlier ones), and $(I+A)^{-1}$ is dense lower triangular: every token's correction depends on all earlier
# tokens of the chunk.  That inverse is the one sequential piece, and it is only $C \times C$.

# %%
fig, axs = plt.subplots(1, 3, figsize=(11, 3.3))
for a_, M, title in zip(axs, (A, np.linalg.inv(I + A) - I, (Qc @ Kc.T) * decay),
                        ("A (strictly lower)", "(I + A)⁻¹ − I", "(QKᵀ) ⊙ decay, causal"), strict=True):
    im = a_.imshow(M, cmap="RdBu_r", vmin=-abs(M).max(), vmax=abs(M).max())
    a_.set_title(title)
    a_.set_xlabel("j (key token)")
    a_.set_ylabel("i (query token)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Check: the reference chunked form equals the recurrence, for every chunk size
#
# `chunk_gated_delta_rule` does the above for all heads and all chunks (and a shorter last chunk with no padding).
# In float64 the two forms agree to rounding, for chunk sizes that divide T and ones that do not, with an initial
# state and with several packed sequences (`cu_seqlens`).

# %%
rows = []
for cs in (1, 7, 16, 64, T + 5):
    o_c, S_c = chunk_gated_delta_rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], chunk_size=cs)
    e_o, e_S = error_metrics(o_rec, o_c)["rel_rms"], error_metrics(S_rec, S_c)["rel_rms"]
    rows.append((cs, e_o, e_S))
    checks[f"chunk_size={cs}: output"] = (e_o, 1e-12)
    checks[f"chunk_size={cs}: final state"] = (e_S, 1e-12)
print("chunk size | rel. RMS error of o | of the final state")
for cs, e_o, e_S in rows:
    print(f"{cs:>10} | {e_o:19.1e} | {e_S:.1e}")

# Packed sequences with their own initial states: equal to running each one alone.
lengths = [5, 1, T - 6]
cu = np.concatenate([[0], np.cumsum(lengths)])
h0 = 0.5 * np.random.default_rng(2).standard_normal((3, 4, D, D))
o_pack, S_pack = chunk_gated_delta_rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], initial_state=h0,
                                        cu_seqlens=cu, chunk_size=16)
worst = 0.0
for n in range(3):
    s, e = cu[n], cu[n + 1]
    o_n, S_n = recurrent_gated_delta_rule(x["q"][:, s:e], x["k"][:, s:e], x["v"][:, s:e], g=x["g"][:, s:e],
                                          beta=x["beta"][:, s:e], initial_state=h0[n:n + 1])
    worst = max(worst, error_metrics(o_n, o_pack[:, s:e])["rel_rms"], error_metrics(S_n, S_pack[n:n + 1])["rel_rms"])
print(f"varlen (lengths {lengths}) vs one sequence at a time: worst rel. RMS error {worst:.1e}")
checks["varlen chunked == per-sequence recurrence"] = (worst, 1e-12)

# %% [markdown]
# ## 7. The causal conv and its state
#
# Before the rule, q, k and v pass (together, as one `conv_dim`-channel signal) through a depthwise causal conv
# of width $K = 4$ and a SiLU.  To continue a sequence later, a layer only needs the last $K - 1$ **pre-activation**
# inputs of every channel: the conv state `[N, conv_dim, K-1]`, oldest column first.  Decode then costs one
# multiply-add per tap.  Prefilling in two pieces, or one piece and then token-by-token decode, gives the same
# result as one shot.

# %%
Cc, K = 6, 4
xc = np.random.default_rng(3).standard_normal((T, Cc))  # [T, C]
wc = np.random.default_rng(4).standard_normal((Cc, K))  # [C, K]
y_one, st_one = causal_conv1d(xc, wc)  # one shot
cut = T // 3
y_a, st_a = causal_conv1d(xc[:cut], wc)  # prefill the first part ...
y_b, st_b = causal_conv1d(xc[cut:-3], wc, conv_state=st_a)  # ... continue with the state ...
ys, st = [], st_b
for t in range(T - 3, T):  # ... and decode the last three tokens one at a time
    y_t, st = causal_conv1d_update(xc[t][None], wc, conv_state=st)
    ys.append(y_t[0])
y_pieces = np.concatenate([y_a, y_b, np.stack(ys)])
checks["conv: pieces + decode == one shot"] = (np.abs(y_pieces - y_one).max(), 1e-12)
checks["conv state == last K-1 raw inputs"] = (np.abs(st[0] - xc[-(K - 1):].T).max(), 0.0)
print("state after the sequence (channel 0):", st[0, 0], "  last 3 inputs:", xc[-3:, 0])

# %% [markdown]
# ## 8. Discussion
#
# * **Cost.**  Per token and head, the recurrence does about $6 D_k D_v$ flops in matrix–vector products; the chunked
#   form does about $6CD_k + 4CD_v + 6D_kD_v$ flops, but in $C \times D$ matrix products, which is what GPUs are fast
#   at.  Prefill uses the chunked form; decode, with one token per request, uses the recurrence
#   (`fused_recurrent_gated_delta_rule_update`, updating a state pool in place; notebook 04).  Where the crossover
#   between the two lies is measured in notebook 06.
# * **State.**  One request holds, per linear layer, $H_v D_k D_v$ recurrent-state numbers plus
#   $\text{conv\_dim} \cdot (K-1)$ conv-state numbers, independent of the context length (notebook 04 sizes it).
# * **Precision.**  The state is a running product of $T$ contractions: keep it in fp32 (docs/pitfalls.md, B8).
#   Notebook 06 shows the drift of a bf16 state over a long decode.
# * **Further reading.**  `docs/gated_deltanet.md`; HF `Qwen3_5GatedDeltaNet`; Yang, Kautz & Hatamizadeh, *Gated Delta
#   Networks* (2024); the WY representation of products of Householder-like matrices (Bischof & Van Loan 1987).

# %% [markdown]
# ## What was checked

# %%
for name, (value, bound) in checks.items():
    print(f"{'ok ' if value <= bound else 'FAIL'}  {name}: {value:.1e} <= {bound:.0e}")
for name, (value, bound) in checks.items():
    assert value <= bound, f"{name}: {value} > {bound}"
assert len(checks) >= 10
