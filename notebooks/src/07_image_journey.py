# Notebook source (jupytext py:percent). Edit this file, then run `python notebooks/build.py` to regenerate the .ipynb.

# %% [markdown]
# # 07 · An image's journey: pixels → patches → merged tokens → positions in the prompt
#
# Qwen3.5 checkpoints are multimodal: a ViT-style vision tower turns an image into embeddings that take the place of
# placeholder tokens in the prompt, and MRoPE gives them 2-D positions.
#
# **You will learn**
# 1. how an image is **resized** to a multiple of 32 pixels and cut into 16×16 **patches** (two frames deep);
# 2. the **merge-block order** in which patches are listed — and why it lets the merger fuse 2×2 patches into one token;
# 3. what the **vision tower** computes, and how many **LM tokens** an image becomes;
# 4. how the prompt's `<image_pad>` placeholders are **expanded**, replaced by the image embeddings, and given
#    **(t, h, w) positions**; and how decode continues with `rope_delta`;
# 5. that the reference model runs the whole path, and that decode after an image equals one stateless pass.
#
# Pixels are made up here (no downloads); the tower and the model are tiny, with random weights, written by
# `reference.checkpoint`.  Narrative: motivation → naive → optimized → check → discussion.

# %%
FULL = False  # True: a larger image for the tiny model

import tempfile

import matplotlib.pyplot as plt
import numpy as np

from reference.checkpoint import random_state_dict, write_checkpoint
from reference.config import Qwen35Config, VisionConfig
from reference.image_processing import ImageProcessor, expand_vision_placeholders, smart_resize
from reference.model import Qwen35Model
from reference.multimodal import (
    TextAndVisionContext,
    get_rope_index,
    multimodal_prefill_inputs,
    split_visual_state_dict,
)
from reference.vision import VisionWeights, merge_block_coordinates, num_merged_tokens, vision_tower

checks = {}


def synthetic_image(h, w, seed=0):
    """A made-up RGB picture (uint8): a sky gradient, a sun and a house, so the patches have something to show."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float64)
    img[..., 2] = 200 - 120 * yy / h  # blue sky, darker at the top
    img[..., 1] = 120 + 60 * yy / h
    img[..., 0] = 60
    sun = (yy - 0.25 * h) ** 2 + (xx - 0.75 * w) ** 2 < (0.12 * min(h, w)) ** 2
    img[sun] = (250, 210, 40)
    house = (yy > 0.5 * h) & (yy < 0.9 * h) & (xx > 0.15 * w) & (xx < 0.45 * w)
    img[house] = (170, 40, 30)
    img += np.random.default_rng(seed).normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)

# %% [markdown]
# ## 1. Motivation
#
# A language model reads a sequence of vectors.  An image is a 2-D grid of pixels of any size.  Three problems: cut
# it into pieces of a fixed size (patches), keep the sequence short (merge neighbouring patches), and tell the model
# *where* each piece sits (2-D positions) without breaking the 1-D positions of the text around it.

# %% [markdown]
# ## 2. Resize and cut into patches (published geometry: 16-px patches, 2×2 merge)
#
# `smart_resize` picks a size divisible by $16 \cdot 2 = 32$ with about the same aspect ratio and a pixel count
# within [min_pixels, max_pixels].  The picture is then normalised and cut into 16×16 patches; a still image is
# repeated to fill the temporal patch of 2 frames, so each patch row holds $3 \cdot 2 \cdot 16 \cdot 16 = 1536$ values.

# %%
vc_pub = VisionConfig()  # the published vision geometry (patch 16, merge 2, temporal patch 2)
img = synthetic_image(200, 300)
H2, W2 = smart_resize(*img.shape[:2], factor=vc_pub.patch_size * vc_pub.spatial_merge_size)
proc_pub = ImageProcessor.from_vision_config(vc_pub)
out_pub = proc_pub.preprocess(img)
t, gh, gw = out_pub["image_grid_thw"][0]
print(f"image {img.shape[0]}x{img.shape[1]} -> resized {H2}x{W2} -> grid (t, h, w) = ({t}, {gh}, {gw}) patches")
print(f"pixel_values {out_pub['pixel_values'].shape}: {t * gh * gw} patches of {vc_pub.patch_dim} values; "
      f"{num_merged_tokens([t, gh, gw])[0]} LM tokens after the 2x2 merge")
checks["grid = resized size / 16"] = (abs(gh - H2 // 16) + abs(gw - W2 // 16), 0)
checks["patch rows = t·h·w, 1536 values each"] = (
    abs(out_pub["pixel_values"].shape[0] - t * gh * gw) + abs(out_pub["pixel_values"].shape[1] - 1536), 0)

# %% [markdown]
# ## 3. The merge-block order, as a picture
#
# Patches are **not** listed row by row.  The four patches of each 2×2 merge window come one after the other
# (row-major inside the window), and the windows follow in row-major order.  So the merger can fuse "4 consecutive
# rows" into one token.  The numbers below are the row index of each patch in `pixel_values` (first windows only).

# %%
row, col = merge_block_coordinates(gh, gw, vc_pub.spatial_merge_size)  # patch i sits at (row[i], col[i])
from reference.image_processing import resize  # the processor's own resize, for the picture

shown = resize(img, (H2, W2))
fig, ax = plt.subplots(figsize=(9, 6.5))
ax.imshow(shown)
P, m = vc_pub.patch_size, vc_pub.spatial_merge_size
for x in range(0, W2 + 1, P):
    ax.axvline(x - 0.5, color="w", lw=0.4 if x % (P * m) else 1.6)
for y in range(0, H2 + 1, P):
    ax.axhline(y - 0.5, color="w", lw=0.4 if y % (P * m) else 1.6)
for i in range(4 * (gw // m) + 4):  # the first two rows of windows, and a bit
    ax.text(col[i] * P + P / 2, row[i] * P + P / 2, str(i), color="k", ha="center", va="center", fontsize=6,
            bbox=dict(boxstyle="round,pad=0.1", fc="w", alpha=0.7, lw=0))
ax.set_title(f"{gh}x{gw} patches of 16 px (thin lines), 2x2 merge windows (thick): patch index in pixel_values",
             fontsize=9)
ax.axis("off")
plt.show()

# The first patch row really is the top-left 16x16 patch, frames (t=0, t=1) both = the image:
first = out_pub["pixel_values"][5].reshape(3, 2, P, P)  # (C, T_p, P, P)
r5, c5 = row[5], col[5]
resized_norm = (shown.astype(np.float32) / 255 - 0.5) / 0.5  # the processor's mean = std = 0.5
patch5 = resized_norm[r5 * P:(r5 + 1) * P, c5 * P:(c5 + 1) * P].transpose(2, 0, 1)  # [C, P, P]
checks["row 5 of pixel_values = the patch at merge_block_coordinates[5]"] = (
    float(np.abs(first[:, 0] - patch5).max() + np.abs(first[:, 1] - patch5).max()), 1e-6)
print(f"row 5 is the patch at (row, col) = ({r5}, {c5}): max difference "
      f"{checks['row 5 of pixel_values = the patch at merge_block_coordinates[5]'][0]:.1e}")

# %% [markdown]
# ## 4. Naive: the vision tower, step by step (a tiny tower)
#
# The tower (`reference.vision.vision_tower`) is a ViT:
#
# 1. **patch embedding**: a Conv3d with kernel = stride = (2, P, P), i.e. one matrix product per patch row;
# 2. **learned positions**: a learned $S \times S$ grid, resampled bilinearly to the image's patch grid;
# 3. **blocks**: pre-norm attention (non-causal, within each image only, with 2-D RoPE on (row, col)) + MLP;
# 4. **merger**: LayerNorm, then 4 consecutive rows (one 2×2 window) viewed as one vector, and a 2-layer MLP into the
#    LM's hidden size.
#
# We use the tiny multimodal config (patch 4, 2 blocks, hidden 32) and random weights from `reference.checkpoint`.

# %%
cfg = Qwen35Config.tiny(model_type="qwen3_5")
vc = cfg.vision_config
tensors = random_state_dict(cfg, seed=0)
visual, _ = split_visual_state_dict(tensors)
vw = VisionWeights.from_state_dict(visual, vc)
proc = ImageProcessor.from_vision_config(vc, min_pixels=16 * 16, max_pixels=(96 if FULL else 48) ** 2)
small = synthetic_image(60 if FULL else 30, 90 if FULL else 45, seed=1)
pix = proc.preprocess(small)
grid = tuple(int(v) for v in pix["image_grid_thw"][0])
merged, hidden = vision_tower(pix["pixel_values"], pix["image_grid_thw"], vw, vc, return_hidden=True)
n_tok = int(num_merged_tokens(grid, vc.spatial_merge_size)[0])
print(f"tiny tower: image {small.shape[:2]} -> grid {tuple(grid)} -> pixel_values {pix['pixel_values'].shape}")
print(f"  last block output {hidden.shape} (one row per patch) -> merged {merged.shape} (one row per LM token)")
checks["merged rows = t·h·w / 4"] = (abs(merged.shape[0] - n_tok), 0)
checks["merged width = LM hidden size"] = (abs(merged.shape[1] - cfg.hidden_size), 0)

checks["merged tokens are finite"] = (0.0 if np.all(np.isfinite(merged)) else 1.0, 0.0)

# %% [markdown]
# ## 5. Into the prompt: placeholders, embeddings, positions
#
# The prompt is written with one `<image_pad>` per image; `expand_vision_placeholders` turns it into
# `<vision_start> <image_pad>×n <vision_end>` with n = merged tokens.  `multimodal_prefill_inputs` then runs the
# tower, finds the placeholder rows (their embeddings get replaced) and computes MRoPE positions with
# `get_rope_index`: text advances all three axes; the image's tokens share one t and enumerate (h, w) over the
# merged grid; after the image the position jumps by only max(h, w)/2, so `rope_delta` < 0.

# %%
prompt = [5, 6, 7, cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, 8, 9, 10, 11]
tokens = expand_vision_placeholders(prompt, cfg, image_grid_thw=pix["image_grid_thw"])
ctx = TextAndVisionContext(request_id="img", tokens=tokens, pixel_values=pix["pixel_values"],
                           image_grid_thw=pix["image_grid_thw"])
pre = multimodal_prefill_inputs(ctx, vw, cfg)
print(f"prompt {len(prompt)} tokens -> expanded {len(tokens)}; image rows {pre.image_rows[0]}..{pre.image_rows[-1]}; "
      f"rope_delta {pre.rope_delta}")
pos, delta = get_rope_index(np.array(tokens), image_grid_thw=pix["image_grid_thw"], config=cfg)
checks["embeddings = tower output, in order"] = (float(np.abs(pre.embeddings - merged).max()), 1e-12)
checks["positions = get_rope_index"] = (float(np.abs(pre.position_ids - pos).max()), 0.0)
checks["placeholders = merged tokens"] = (abs(len(pre.image_rows) - n_tok), 0)

fig, axs = plt.subplots(1, 2, figsize=(12, 3.4), gridspec_kw={"width_ratios": [2, 1]})
for r_, name, c_ in zip(pos, "thw", ("tab:blue", "tab:green", "tab:red"), strict=True):
    axs[0].plot(r_, ".-", color=c_, label=name, ms=3)
axs[0].axvspan(pre.image_rows[0] - 0.5, pre.image_rows[-1] + 0.5, color="0.9", zorder=0, label="image tokens")
axs[0].set_xlabel("token index")
axs[0].set_ylabel("MRoPE position")
axs[0].legend(fontsize=8)
axs[0].set_title(f"{len(tokens)} tokens, positions 0..{pos.max()} (rope_delta = {delta})", fontsize=9)
lh, lw = grid[1] // 2, grid[2] // 2
emb_norm = np.linalg.norm(merged, axis=1).reshape(lh, lw)  # one value per merged token, on its (h, w) cell
axs[1].imshow(emb_norm, cmap="viridis")
axs[1].set_title("‖embedding‖ of each image token at its (h, w)", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Optimized / serving: the model runs it, and decode continues after the image
#
# The reference `Qwen35Model` accepts a `TextAndVisionContext` for a request's first chunk: it runs the tower once,
# replaces the placeholder rows, prefills with the image positions, and keeps `rope_delta` so that decode token
# $k$ sits at position `prompt_len + k + rope_delta` on all three axes.  Check: prefill + 3 decode steps give the
# logits of one stateless pass over the prompt plus those 3 tokens.

# %%
with tempfile.TemporaryDirectory() as tmp:
    write_checkpoint(tmp, cfg, tensors=tensors)
    model = Qwen35Model.from_pretrained(tmp, max_batch_size=2)
inputs = model.prepare_initial_token_inputs([ctx])
out = model.execute(inputs)
extra = [12, 13, 14]
step_logits = [out.logits[-1]]
for tkn in extra:
    inputs = model.prepare_next_token_inputs(np.array([tkn]), inputs)
    step_logits.append(model.execute(inputs).logits[-1])
full_ctx = TextAndVisionContext(request_id="full", tokens=tokens + extra, pixel_values=pix["pixel_values"],
                                image_grid_thw=pix["image_grid_thw"])
one_pass = model.logits([full_ctx])[0]  # [T + 3, V]
err = float(np.abs(np.stack(step_logits) - one_pass[len(tokens) - 1:]).max() / np.abs(one_pass).max())
print(f"prefill ({len(tokens)} tokens incl. {n_tok} image tokens) + {len(extra)} decode steps vs one pass: "
      f"max relative difference {err:.1e}")
checks["prefill with image + decode == one stateless pass"] = (err, 1e-12)
# The same token ids with another image (the pixels negated) give different logits: the placeholder rows really
# carry the image.  (Placeholders without any pixels are refused with a RequestError.)
other_ctx = TextAndVisionContext(request_id="other", tokens=tokens, pixel_values=-pix["pixel_values"],
                                 image_grid_thw=pix["image_grid_thw"])
other = model.logits([other_ctx])[0]
checks["the image changes the logits"] = (1e-6 / max(float(np.abs(other - one_pass[:len(tokens)]).max()), 1e-300), 1.0)
model.release("img")

# %% [markdown]
# **Chunked prefill through the middle of the image.**  A server prefills long prompts in chunks.  With an image the
# first chunk still carries the whole prompt and the pixels (`chunk_end` says how much of it to run now), so the
# tower runs and the positions are computed once; the rest of the prompt follows as plain text chunks of the same
# request.  Cutting inside the run of image tokens gives the same last-token logits as one pass:

# %%
from reference.context import TextContext

cut = int(pre.image_rows[len(pre.image_rows) // 2])  # in the middle of the image tokens
first = TextAndVisionContext(request_id="chunked", tokens=tokens, pixel_values=pix["pixel_values"],
                             image_grid_thw=pix["image_grid_thw"], chunk_end=cut)
model.execute(model.prepare_initial_token_inputs([first]))
rest = model.execute(model.prepare_initial_token_inputs([TextContext(request_id="chunked", tokens=tokens[cut:])]))
err_chunk = float(np.abs(rest.logits[-1] - one_pass[len(tokens) - 1]).max() / np.abs(one_pass).max())
print(f"prefill tokens [0, {cut}) with the image, then [{cut}, {len(tokens)}) as text: max relative difference "
      f"{err_chunk:.1e}")
checks["chunked prefill cut inside the image == one pass"] = (err_chunk, 1e-12)
model.release("chunked")

# %% [markdown]
# ## 7. Discussion
#
# * **Token budget.**  An image costs $\lceil H/32 \rceil \cdot \lceil W/32 \rceil$ LM tokens (after resizing) —
#   a 1024×1024 picture is 1024 tokens.  `min_pixels`/`max_pixels` bound it; for a hybrid model those tokens cost
#   KV only in the full-attention layers, and a fixed state in the others (notebook 04).
# * **Order matters twice.**  Patches must be in merge-block order (or the merger fuses the wrong neighbours), and
#   MRoPE frequencies must be interleaved (notebook 03) — both fail silently if wrong.
# * **Where the numbers come from:** HF `Qwen3_5VisionModel`; `docs/vision.md`; `reference/image_processing.py`,
#   `reference/vision.py`, `reference/multimodal.py`.  `optimized/vision.py` is the PyTorch twin of the tower.

# %% [markdown]
# ## What was checked

# %%
for name, (value, bound) in checks.items():
    print(f"{'ok ' if value <= bound else 'FAIL'}  {name}: {value} <= {bound}")
for name, (value, bound) in checks.items():
    assert value <= bound, f"{name}: {value} > {bound}"
assert len(checks) >= 9
