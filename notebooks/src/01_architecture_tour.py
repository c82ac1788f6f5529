# Notebook source (jupytext py:percent). Edit this file, then run `python notebooks/build.py` to regenerate the .ipynb.

# %% [markdown]
# # 01 · A tour of the Qwen3.5 architecture
#
# Qwen3.5 is a decoder-only transformer whose token mixers alternate **three Gated DeltaNet (linear attention)
# layers** with **one gated full-attention layer**.  This notebook walks the whole model once, from the config to
# the logits, on the bundled demo checkpoint (tiny, byte-level), and sizes the published models.
#
# **You will learn**
# 1. how the **config** describes the model (Hugging Face field names) and how `layer_types` lays out the 3:1 map;
# 2. what happens to a token in a **linear layer** and in a **full layer**, step by step, down to the **logits** —
#    and that this walk equals the reference model's output;
# 3. where the **parameters** are (per component) and what a request's **state** and **KV cache** cost;
# 4. that the analytic sizes equal the **measured** bytes: the weights on disk and in memory, and the caches the
#    model really allocates.
#
# Every computation is a call into `reference/` (NumPy, float64).  Narrative: motivation → naive → optimized →
# check → discussion; later notebooks zoom in on each part.

# %%
FULL = False  # True: a longer prompt; everything else is already small

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

import qwen35
from qwen35.tokenizer import load_tokenizer
from reference.attention import gated_attention
from reference.config import FULL as FULL_ATTN
from reference.config import LINEAR, Qwen35Config, preset_names
from reference.deltanet import gated_deltanet
from reference.memory import format_bytes, kv_bytes_per_token, parameter_counts, state_bytes_per_request, weight_bytes
from reference.mlp import swiglu_mlp
from reference.model import Qwen35Model
from reference.norms import rms_norm
from reference.rope import text_position_ids

DEMO = Path(qwen35.__file__).parent / "demo"
checks = {}

# %% [markdown]
# ## 1. Motivation: why a hybrid?
#
# Softmax attention keeps every past key and value: memory and per-token work grow with the context.  Linear
# attention keeps a fixed-size state instead, but compresses the past lossily.  Qwen3.5 (like Qwen3-Next) uses
# mostly linear layers — cheap, constant memory — and keeps one full-attention layer in four for exact retrieval.
# The config says which layer is which.

# %%
big = Qwen35Config.preset("27b")
print(f"Qwen3.5-27B: hidden {big.hidden_size}, {big.num_hidden_layers} layers, vocab {big.vocab_size:,}")
print(f"  linear layers (Gated DeltaNet): H_k = {big.linear_num_key_heads} key heads, H_v = "
      f"{big.linear_num_value_heads} value heads, D_k = D_v = {big.linear_key_head_dim}, conv width "
      f"{big.linear_conv_kernel_dim}, conv_dim = 2·H_k·D_k + H_v·D_v = {big.conv_dim}")
print(f"  full layers: {big.num_attention_heads} query heads, {big.num_key_value_heads} KV heads, head_dim "
      f"{big.head_dim}, rotary_dim {big.rotary_dim} (partial_rotary_factor {big.partial_rotary_factor})")
print(f"  MLP: SwiGLU, intermediate {big.intermediate_size};  layer i is full iff (i + 1) % "
      f"{big.full_attention_interval} == 0")

fig, ax = plt.subplots(figsize=(12, 1.4))
kinds = np.array([t == FULL_ATTN for t in big.layer_types])[None].astype(int)
ax.imshow(kinds, cmap=ListedColormap(["tab:blue", "tab:red"]), aspect="auto")
for i in big.full_layer_indices:
    ax.text(i, 0, f"KV{big.kv_cache_index(i)}", ha="center", va="center", fontsize=6, color="w")
ax.set_yticks([])
ax.set_xlabel("layer index (blue: Gated DeltaNet, red: gated full attention + its KV-cache index)")
ax.set_title("Qwen3.5-27B layer map: [L L L F] x 16", fontsize=10)
plt.show()
checks["27B: 48 linear + 16 full layers"] = (abs(big.num_linear_layers - 48) + abs(big.num_full_layers - 16), 0)
checks["27B: layer 7 is the second KV layer"] = (abs(big.kv_cache_index(7) - 1), 0)

# %% [markdown]
# ## 2. The bundled demo model
#
# `qwen35/demo` is a real Hugging Face-format checkpoint (config.json + safetensors) with the same structure in
# miniature: a few layers in the `L L L F` pattern, a small hidden size (printed below), a byte-level vocabulary.
# Its README says how its weights were made; notebook 08 looks at what they do on real text.  `Qwen35Model` is
# the reference pipeline model (float64).

# %%
cfg = Qwen35Config.from_pretrained(DEMO)
model = Qwen35Model.from_pretrained(DEMO, max_batch_size=2)
tok = load_tokenizer(DEMO)
text = "Qwen3.5 mixes linear and full attention." if FULL else "Hello, hybrid!"
tokens = np.array(tok.encode(text))
print(f"demo: {cfg.layer_types}, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
print(f"prompt {text!r} -> {len(tokens)} tokens: {tokens.tolist()}")

# %% [markdown]
# ## 3. Naive: the tokens through every layer, by hand
#
# Each decoder layer is pre-norm, with the same shape for both kinds (HF `Qwen3_5DecoderLayer`):
#
# $$x \leftarrow x + \text{mixer}(\text{RMSNorm}(x)), \qquad x \leftarrow x + \text{MLP}(\text{RMSNorm}(x)),$$
#
# where the mixer is `gated_deltanet` in a linear layer and `gated_attention` in a full one.  The RMSNorms are
# zero-centred: the checkpoint stores $w$ and the layer multiplies by $1 + w$.  At the end: a final RMSNorm and the
# LM head.  Below, the prompt goes through every layer with the package's functions, printing the residual
# stream after each step.

# %%
W = model.weights
T = len(tokens)
x = W.embed_tokens[tokens]  # [T, H]  the residual stream
cu = np.array([0, T])  # one sequence
states = {}
print(f"{'step':<42} {'shape':>10} {'RMS of x':>9}")
print(f"{'embedding':<42} {str(x.shape):>10} {np.sqrt(np.mean(x ** 2)):9.4f}")
for i, layer in enumerate(W.layers):
    a = rms_norm(x, layer.input_layernorm, cfg.rms_norm_eps)  # [T, H]
    if layer.layer_type == LINEAR:
        y, conv_state, rec_state = gated_deltanet(a, layer.mixer, cfg, cu_seqlens=cu)
        states[i] = (conv_state, rec_state)
        what = f"layer {i} Gated DeltaNet (state {rec_state.shape[1:]})"
    else:
        y, kv = gated_attention(a, layer.mixer, cfg, position_ids=text_position_ids(T), cu_seqlens=cu)
        states[i] = kv
        what = f"layer {i} gated attention (KV {kv[0][0].shape})"
    x = x + y
    print(f"{what:<42} {str(x.shape):>10} {np.sqrt(np.mean(x ** 2)):9.4f}")
    m = rms_norm(x, layer.post_attention_layernorm, cfg.rms_norm_eps)
    x = x + swiglu_mlp(m, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    print(f"{f'layer {i} SwiGLU MLP':<42} {str(x.shape):>10} {np.sqrt(np.mean(x ** 2)):9.4f}")
h = rms_norm(x, W.norm, cfg.rms_norm_eps)  # [T, H]
logits = h @ W.lm_head.T  # [T, V]
print(f"{'final norm + lm_head -> logits':<42} {str(logits.shape):>10}")
print("greedy next token after the prompt:", int(logits[-1].argmax()), repr(tok.decode([int(logits[-1].argmax())])))

# %% [markdown]
# ## 4. Optimized: the pipeline model does the same, and serves requests
#
# `Qwen35Model` packs ragged batches, keeps each request's state in a pool and its K/V in a cache, and continues a
# request from where it stopped.  Its stateless `logits` must equal the walk above; and a prefill followed by decode
# steps must give the logits of one long prefill (the caches carry everything needed).

# %%
ref_logits = model.logits([tokens])[0]  # [T, V]
err_walk = float(np.abs(ref_logits - logits).max() / np.abs(ref_logits).max())
print(f"hand walk vs Qwen35Model.logits: max relative difference {err_walk:.1e}")
checks["hand walk == Qwen35Model.logits"] = (err_walk, 1e-12)

from reference.context import TextContext

cut = T - 3
inputs = model.prepare_initial_token_inputs([TextContext(request_id="r", tokens=tokens[:cut].tolist())])
out = model.execute(inputs)  # prefill: logits of the last prompt token
steps = [out.logits[-1]]
for t in range(cut, T):  # decode the rest one token at a time (teacher forcing)
    inputs = model.prepare_next_token_inputs(np.array([tokens[t]]), inputs)
    steps.append(model.execute(inputs).logits[-1])
err_dec = float(np.abs(np.stack(steps) - ref_logits[cut - 1:]).max() / np.abs(ref_logits).max())
print(f"prefill {cut} + decode {T - cut}: max relative difference to one-shot logits {err_dec:.1e}")
checks["prefill + decode == one shot"] = (err_dec, 1e-12)
model.release("r")

# %% [markdown]
# ## 5. Where the parameters are
#
# `reference.memory.parameter_counts` counts every checkpoint tensor by component.  For 27B, the MLPs hold most
# of the weights; among the mixers, the linear layers (48 of them) hold more than the full ones (16):

# %%
fig, axs = plt.subplots(1, 2, figsize=(12, 3.6))
for ax, name in zip(axs, ("27b", "35b-a3b"), strict=True):
    c = Qwen35Config.preset(name)
    counts = {k: v for k, v in parameter_counts(c).items() if v}
    total = sum(counts.values())
    ax.barh(list(counts), [v / 1e9 for v in counts.values()], color="tab:blue")
    for j, v in enumerate(counts.values()):
        ax.text(v / 1e9, j, f" {v / 1e9:.2f} B ({100 * v / total:.0f} %)", va="center", fontsize=8)
    ax.set_xlim(0, max(counts.values()) / 1e9 * 1.45)
    ax.set_title(f"{name}: {total / 1e9:.1f} B parameters, {format_bytes(weight_bytes(c))} in bf16", fontsize=10)
    ax.set_xlabel("parameters (billions)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Check: analytic sizes vs measured bytes
#
# Three measurements against the analytic formulas of `reference.memory`, in the spirit of nanoGPT's sizing
# notebook (analytic → measured → explain the gap):
#
# * **weights in memory**: the sum of `nbytes` of the loaded demo weights (float64) vs `weight_bytes(cfg, "float64")`;
# * **weights on disk**: the safetensors file vs `weight_bytes(cfg, "float32")` (the gap is the file's JSON header);
# * **state and KV**: the states the linear layers returned in the walk above and the K/V the full layer returned,
#   vs `state_bytes_per_request` and `kv_bytes_per_token · T`.

# %%
arrays = [W.embed_tokens, W.norm] + ([] if cfg.tie_word_embeddings else [W.lm_head])
for layer in W.layers:
    arrays += [layer.input_layernorm, layer.post_attention_layernorm]
    arrays += [np.asarray(v) for v in vars(layer.mixer).values() if isinstance(v, np.ndarray)]
    arrays += [np.asarray(v) for v in vars(layer.mlp).values() if isinstance(v, np.ndarray)]
mem_measured = sum(a.nbytes for a in arrays)
mem_analytic = weight_bytes(cfg, "float64")
disk = (DEMO / "model.safetensors").stat().st_size
disk_analytic = weight_bytes(cfg, "float32")
header = 8 + int.from_bytes((DEMO / "model.safetensors").read_bytes()[:8], "little")  # safetensors: u64 length + JSON
state_measured = sum(c.nbytes + r.nbytes
                     for i, (c, r) in ((i, s) for i, s in states.items() if i in cfg.linear_layer_indices))
kv_measured = sum(k.nbytes + v.nbytes for i, kv in states.items() if i in cfg.full_layer_indices for k, v in kv)
rows = [("weights in memory (float64)", mem_analytic, mem_measured),
        ("weights on disk (float32) + header", disk_analytic + header, disk),
        ("state of one request (float64)", state_bytes_per_request(cfg, "float64"), state_measured),
        (f"KV cache after {T} tokens (float64)", kv_bytes_per_token(cfg, "float64") * T, kv_measured)]
print(f"{'':<36} {'analytic':>12} {'measured':>12}")
for name, a, b in rows:
    print(f"{name:<36} {a:>12,} {b:>12,}")
    checks[f"{name}: analytic == measured"] = (abs(a - b), 0)

# %% [markdown]
# For the published sizes the same formulas give (bf16 weights, bf16 state, bf16 KV):

# %%
print(f"{'preset':>10} {'params':>9} {'weights':>10} {'state/request':>14} {'KV/token':>9} {'state = KV of':>14}")
for name in preset_names():
    c = Qwen35Config.preset(name)
    n = sum(parameter_counts(c).values())
    s, kv = state_bytes_per_request(c), kv_bytes_per_token(c)
    print(f"{name:>10} {n / 1e9:8.2f}B {format_bytes(weight_bytes(c)):>10} {format_bytes(s):>14} "
          f"{format_bytes(kv):>9} {s / kv:>10,.0f} tok")

# %% [markdown]
# ## 7. Discussion
#
# * **The same skeleton, two mixers.**  Both layer kinds share the pre-norm residual block and the MLP; only the
#   token mixer differs.  Notebook 02 opens the Gated DeltaNet, notebook 03 the gated attention and its RoPE.
# * **Constant vs growing memory.**  A 27B request holds 74.8 MiB of state from its first token, then adds 64 KiB
#   of KV per token: the two are equal at ~1 200 tokens.  Notebook 04 turns that into batch sizes per GPU.
# * **Same API, faster engine.**  `optimized.model.Qwen35Model` has the same methods on PyTorch (+ Triton on GPU);
#   notebook 05 checks its kernels against this reference, notebook 06 plots speed and accuracy, and
#   `qwen35 compare` diffs the two models layer by layer.
# * Docs: `docs/index.md` (map of all pages), `docs/config_and_memory.md`, `docs/pipeline_api.md`.

# %% [markdown]
# ## What was checked

# %%
for name, (value, bound) in checks.items():
    print(f"{'ok ' if value <= bound else 'FAIL'}  {name}: {value} <= {bound}")
for name, (value, bound) in checks.items():
    assert value <= bound, f"{name}: {value} > {bound}"
assert len(checks) >= 8
