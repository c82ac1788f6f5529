"""Multimodal prompts: images / videos in, LM embedding rows and MRoPE positions out.

See docs/vision.md and docs/rope_and_mrope.md.

A multimodal request arrives in the form a Hugging Face Qwen processor emits (`TextAndVisionContext`): the tokens
already hold, per image, `<vision_start> <image_pad>×n <vision_end>` with n = t·h·w / m² merged tokens, and
`pixel_values` holds the patchified pixels of all images ([Σ t·h·w, C·T_p·P·P], merge-block order).

`multimodal_prefill_inputs` does, once per prompt, what the model needs before its first prefill chunk:

    1. run the vision tower on all images (then, separately, all videos)       → features [n_img, H] (+ videos)
    2. find the placeholder rows (tokens == image_token_id / video_token_id)   → image_rows [n], ascending
       and check their count equals the feature count (a clear error otherwise, as HF's masked scatter)
    3. MRoPE positions of the whole prompt with `get_rope_index` (below)        → position_ids [3, T], rope_delta

The model then replaces the embedding rows `image_rows` by `embeddings` (each prefill chunk takes its slice, see
`MultimodalPrefill.chunk`), uses `position_ids` for the prompt, and continues decode at
`past_len + rope_delta` on all three axes (`reference.rope.decode_position_ids`).

Shape legend: T prompt tokens, n placeholder rows, H LM hidden size (= vision out_hidden_size).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference.context import TextContext, check_no_placeholders, request_name
from reference.errors import RequestError
from reference.rope import decode_position_ids, text_position_ids
from reference.vision import VisionWeights, check_grid_thw, num_merged_tokens, num_patches, vision_tower

__all__ = ["TextAndVisionContext", "VisionWeights", "MultimodalPrefill", "MultimodalPlan", "plan_multimodal_prefill",
           "multimodal_prefill_inputs", "split_visual_state_dict", "get_rope_index", "mm_token_types",
           "vision_position_ids"]


@dataclass
class TextAndVisionContext(TextContext):
    """A request with images and/or videos, in Hugging Face processor form.

    Attributes (beyond TextContext's request_id, tokens):
        pixel_values:        [Σ t·h·w, C·T_p·P·P] patchified images (None if none).
        image_grid_thw:      [n_images, 3] (t, h, w) in patches (t = 1 for a still image).
        pixel_values_videos: [Σ t·h·w, C·T_p·P·P] patchified videos (None if none).
        video_grid_thw:      [n_videos, 3].
        chunk_end:           chunked prefill of the prompt: process only tokens[:chunk_end] in this step (None:
                             the whole prompt).  `tokens` is still the *whole* prompt, so the placeholders are
                             checked, the tower runs and the MRoPE positions are computed once, for all of it; the
                             caller then feeds tokens[chunk_end:] (in any number of pieces) as plain `TextContext`s
                             of the same request id, which the model checks against the stored prompt.  Any
                             1 <= chunk_end <= len(tokens) is valid, also inside a run of placeholders.
    `tokens` must already hold the expanded placeholders (`reference.image_processing.expand_vision_placeholders`).
    """

    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    chunk_end: int | None = None

    def __post_init__(self):
        for pix, grid, what in ((self.pixel_values, self.image_grid_thw, "image"),
                                (self.pixel_values_videos, self.video_grid_thw, "video")):
            if (pix is None) != (grid is None):
                raise RequestError(f"{request_name(self.request_id)}: {what} pixels and {what} grid_thw must be "
                                   "given together")
        if self.chunk_end is not None:
            self.prompt_chunk_end()  # validate now: a bad value is the caller's error, not the model's

    def prompt_chunk_end(self) -> int:
        """The end (exclusive) of the tokens to process in this step: `chunk_end`, or len(tokens) when None."""
        n = len(self)
        if self.chunk_end is None:
            return n
        end = self.chunk_end
        if isinstance(end, (bool, np.bool_)) or not isinstance(end, (int, np.integer)) or not 1 <= end <= n:
            raise RequestError(f"{request_name(self.request_id)}: chunk_end must be an int in [1, {n}] (the prompt "
                               f"has {n} tokens), got {end!r}")
        return int(end)

    @property
    def has_vision_inputs(self) -> bool:
        return self.pixel_values is not None or self.pixel_values_videos is not None


@dataclass
class MultimodalPrefill:
    """What the model needs to prefill one multimodal prompt.

    image_rows:   [n] int64   ascending indices into the prompt's tokens whose embeddings are replaced
                              (image and video placeholders alike)
    embeddings:   [n, H]      the replacement rows, in the order of `image_rows`
    position_ids: [3, T] int64  MRoPE (t, h, w) positions of the whole prompt
    rope_delta:   int         max(position) + 1 − T; decode continues at past_len + rope_delta
    """

    image_rows: np.ndarray
    embeddings: np.ndarray
    position_ids: np.ndarray
    rope_delta: int

    @property
    def num_tokens(self) -> int:
        return int(self.position_ids.shape[1])

    def chunk(self, start: int, end: int):
        """The slice for prefill chunk tokens [start, end): (rows relative to `start`, embeddings, position_ids)."""
        if not 0 <= start <= end <= self.num_tokens:
            raise ValueError(f"chunk [{start}, {end}) is outside the prompt of {self.num_tokens} tokens")
        i0, i1 = (int(i) for i in np.searchsorted(self.image_rows, [start, end]))  # rows are ascending
        # a contiguous slice: a view, and it works whether `embeddings` is a NumPy array or a torch tensor
        return self.image_rows[i0:i1] - start, self.embeddings[i0:i1], self.position_ids[:, start:end]

    def decode_position_ids(self, past_len: int, num_tokens: int = 1) -> np.ndarray:
        """[3, num_tokens] positions of tokens appended after `past_len` tokens (past the prompt)."""
        return decode_position_ids(past_len, num_tokens, self.rope_delta)


def split_visual_state_dict(tensors, prefix: str = "model.visual."):
    """Split a checkpoint dict into (the `prefix` tensors with the prefix stripped, everything else)."""
    vis = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    return vis, rest


# ----------------------------------------------------------------------------------------------------------------
# get_rope_index: (t, h, w) MRoPE positions of a prompt with image / video runs (docs/rope_and_mrope.md)
# ----------------------------------------------------------------------------------------------------------------

TEXT, IMAGE, VIDEO = 0, 1, 2


def vision_position_ids(start: int, grid_thw, spatial_merge_size: int = 2) -> np.ndarray:
    """Positions of one image (or one video frame) run, in the merged-token order of the vision tower.

    With Lt = gt, Lh = gh / m, Lw = gw / m (m = spatial_merge_size), token (t, h, w) in row-major order gets

        (start + t,  start + h,  start + w)          (time_interval = 1)

    Args:
        start: the running position `cur` at the run.
        grid_thw: (gt, gh, gw) in patches (before the spatial merge).
    Returns:
        [3, Lt·Lh·Lw] int64.
    """
    gt, gh, gw = (int(g) for g in grid_thw)
    if gh % spatial_merge_size or gw % spatial_merge_size:
        raise ValueError(f"grid {tuple(grid_thw)} is not divisible by spatial_merge_size {spatial_merge_size}")
    Lt, Lh, Lw = gt, gh // spatial_merge_size, gw // spatial_merge_size
    t, h, w = np.meshgrid(np.arange(Lt), np.arange(Lh), np.arange(Lw), indexing="ij")  # each [Lt, Lh, Lw]
    return np.stack([t.ravel(), h.ravel(), w.ravel()]).astype(np.int64) + int(start)  # [3, Lt·Lh·Lw]


def mm_token_types(input_ids, image_token_id: int, video_token_id: int) -> np.ndarray:
    """0 for text, 1 where input_ids == image_token_id, 2 where == video_token_id ([T] int64)."""
    ids = np.asarray(input_ids)
    types = np.zeros(ids.shape, dtype=np.int64)
    types[ids == image_token_id] = IMAGE
    types[ids == video_token_id] = VIDEO
    return types


def _runs(types: np.ndarray):
    """Maximal runs of equal type: list of (type, start, end)."""
    if types.size == 0:
        return []
    change = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [types.size]])
    return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def get_rope_index(
    input_ids,
    *,
    mm_token_type_ids=None,
    image_grid_thw=None,
    video_grid_thw=None,
    config=None,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    spatial_merge_size: int | None = None,
):
    """MRoPE positions of one prompt that may contain image and video runs.

    Walk the maximal runs of equal token type with a running position `cur` (starting at 0):
      * text run of n tokens: all three axes = cur + [0 .. n−1];  cur += n.
      * image run: the next grid (gt, gh, gw) of `image_grid_thw`; tokens enumerate (t, h, w) over
        gt × gh/m × gw/m as `vision_position_ids(cur, grid)`;  cur += max(gh, gw) / m.
      * video run: as an image run, but each video (gt, gh, gw) is first split into gt frames (1, gh, gw),
        one frame per run, because Qwen3.5 separates video frames with text timestamps (HF `get_rope_index`).
    rope_delta = max(all positions) + 1 − T.  Vision start/end tokens are ordinary text tokens.

    Token types come from `mm_token_type_ids` (0 text, 1 image, 2 video; what the HF processor emits) or, if
    that is absent, from the token ids (`image_token_id`/`video_token_id`, or the ones in `config`).

    Args:
        input_ids: [T] integer token ids of one sequence (padding removed).
        mm_token_type_ids: [T] optional.
        image_grid_thw: [num_images, 3] patch grids, in prompt order.
        video_grid_thw: [num_videos, 3] patch grids, in prompt order.
        config: optional Qwen35Config (reads image_token_id, video_token_id, vision_config.spatial_merge_size).
        spatial_merge_size: m (default: from config.vision_config, else 2).
    Returns:
        position_ids: [3, T] int64;  rope_delta: int (0 for text-only prompts).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be one sequence [T], got shape {ids.shape}; call once per sequence")
    T = ids.shape[0]
    if spatial_merge_size is None:
        vc = getattr(config, "vision_config", None) if config is not None else None
        spatial_merge_size = int(getattr(vc, "spatial_merge_size", 2)) if vc is not None else 2
    m = int(spatial_merge_size)

    if mm_token_type_ids is not None:
        types = np.asarray(mm_token_type_ids).astype(np.int64)
        if types.shape != ids.shape:
            raise ValueError(f"mm_token_type_ids shape {types.shape} != input_ids shape {ids.shape}")
        if not np.isin(types, (TEXT, IMAGE, VIDEO)).all():
            raise ValueError(f"mm_token_type_ids must only hold 0 (text), 1 (image) or 2 (video), got "
                             f"{sorted(set(np.unique(types).tolist()) - {TEXT, IMAGE, VIDEO})}")
    else:
        if image_token_id is None and config is not None:
            image_token_id = getattr(config, "image_token_id", None)
        if video_token_id is None and config is not None:
            video_token_id = getattr(config, "video_token_id", None)
        types = mm_token_types(ids, -1 if image_token_id is None else image_token_id,
                               -1 if video_token_id is None else video_token_id)

    image_grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw)]
    frame_grids = []
    if video_grid_thw is not None:
        for gt, gh, gw in np.asarray(video_grid_thw):
            frame_grids.extend([(1, int(gh), int(gw))] * int(gt))  # one run per frame (timestamps in between)
    grids = {IMAGE: iter(image_grids), VIDEO: iter(frame_grids)}
    names = {IMAGE: "image", VIDEO: "video frame"}

    pieces = []
    cur = 0
    for kind, s, e in _runs(types):
        n = e - s
        if kind == TEXT:
            pieces.append(text_position_ids(n, start=cur))  # [3, n]
            cur += n
            continue
        grid = next(grids[kind], None)
        if grid is None:
            raise ValueError(f"more {names[kind]} runs in the prompt than grids were given (run at token {s})")
        pos = vision_position_ids(cur, grid, m)  # [3, gt·gh/m·gw/m]
        if pos.shape[1] != n:
            raise ValueError(
                f"{names[kind]} run at tokens [{s}, {e}) has {n} tokens but grid {grid} gives {pos.shape[1]} "
                f"merged tokens (spatial_merge_size {m})"
            )
        pieces.append(pos)
        cur += max(grid[1], grid[2]) // m
    for kind in (IMAGE, VIDEO):
        if next(grids[kind], None) is not None:
            raise ValueError(f"more {names[kind]} grids were given than {names[kind]} runs in the prompt")

    if T == 0:
        return np.zeros((3, 0), dtype=np.int64), 0
    position_ids = np.concatenate(pieces, axis=1)  # [3, T]
    rope_delta = int(position_ids.max()) + 1 - T
    return position_ids, rope_delta


# ----------------------------------------------------------------------------------------------------------------
# The plan of a multimodal prefill, and the tower run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MultimodalPlan:
    """Everything about a multimodal prompt that does not need the tower (validated, tower-independent).

    inputs:       list of (kind, pixel_values [N_k, C·T_p·P·P], grid_thw [n_k, 3]) to run through the tower, in the
                  order their features are concatenated (images, then videos)
    image_rows:   [n] int64 ascending placeholder rows (all kinds)
    order:        [n] int64 permutation: ascending rows take concatenated feature rows `order`
    position_ids: [3, T] int64;  rope_delta: int
    Shared by the reference and the optimized tower (optimized/vision.py), so the checks exist once.
    """

    inputs: list
    image_rows: np.ndarray
    order: np.ndarray
    position_ids: np.ndarray
    rope_delta: int


def plan_multimodal_prefill(ctx, config) -> MultimodalPlan:
    """Validate a context against its placeholders and compute its MRoPE positions (no tower run).

    Raises:
        RequestError (a ValueError) when the placeholder count of a modality differs from its feature count
        (t·h·w/m² per grid), when pixels come without placeholders or placeholders without pixels
        (`reference.context.check_no_placeholders`), or when grids and pixels disagree.
    """
    who = request_name(getattr(ctx, "request_id", "?"))
    tokens = ctx.token_array
    T = tokens.shape[0]
    if not getattr(config, "is_multimodal", False) or config.vision_config is None:
        if getattr(ctx, "has_vision_inputs", False):
            raise RequestError(f"{who} carries pixels but the model config has no vision tower")
        return MultimodalPlan([], np.zeros(0, np.int64), np.zeros(0, np.int64), decode_position_ids(0, T), 0)
    vc = config.vision_config
    if vc.out_hidden_size != config.hidden_size:
        raise ValueError(f"vision out_hidden_size {vc.out_hidden_size} != LM hidden_size {config.hidden_size}")
    types = mm_token_types(tokens, config.image_token_id, config.video_token_id)  # [T] 0 text, 1 image, 2 video
    inputs, all_rows, grids = [], [], {}
    for kind, code, pix_name, grid_name in (("image", 1, "pixel_values", "image_grid_thw"),
                                            ("video", 2, "pixel_values_videos", "video_grid_thw")):
        rows = np.flatnonzero(types == code)
        pixels, grid = getattr(ctx, pix_name, None), getattr(ctx, grid_name, None)
        if pixels is None:
            check_no_placeholders(ctx.request_id, tokens, config, kinds=(kind,))
            continue
        g = check_grid_thw(grid, vc.spatial_merge_size)
        if not hasattr(pixels, "shape"):  # a nested list; arrays and (device) tensors keep their type
            pixels = np.asarray(pixels)
        shape = tuple(pixels.shape)
        if len(shape) != 2 or shape[0] != num_patches(g) or shape[1] != vc.patch_dim:
            raise RequestError(f"{who}: {kind} pixel values have shape {shape}, but grid_thw "
                               f"{g.tolist()} needs [{num_patches(g)}, {vc.patch_dim}]")
        per_grid = num_merged_tokens(g, vc.spatial_merge_size)
        if int(per_grid.sum()) != rows.size:
            raise RequestError(
                f"{who}: {kind} features and {kind} tokens do not match: the prompt holds {rows.size} "
                f"{kind} placeholder tokens but grid_thw {g.tolist()} gives {per_grid.tolist()} = "
                f"{int(per_grid.sum())} merged tokens (expand each placeholder to t·h·w/m² tokens)")
        inputs.append((kind, pixels, g))
        all_rows.append(rows)
        grids[kind] = g
    rows = np.concatenate(all_rows).astype(np.int64) if all_rows else np.zeros(0, np.int64)
    order = np.argsort(rows, kind="stable")
    position_ids, rope_delta = get_rope_index(
        tokens, mm_token_type_ids=types, image_grid_thw=grids.get("image"), video_grid_thw=grids.get("video"),
        spatial_merge_size=vc.spatial_merge_size)
    return MultimodalPlan(inputs=inputs, image_rows=rows[order], order=order, position_ids=position_ids,
                          rope_delta=int(rope_delta))


def multimodal_prefill_inputs(ctx, vision_weights: VisionWeights | None, config, *, dtype=None) -> MultimodalPrefill:
    """Run the vision tower for a prompt and place its output (see the module docstring).

    Args:
        ctx: TextAndVisionContext (a plain TextContext gives the text-only result: no rows, arange positions).
        vision_weights: the tower's weights (None allowed only without pixels).
        config: reference.config.Qwen35Config with a vision_config.
        dtype: compute dtype of the tower (default: the weights' dtype).
    Returns:
        MultimodalPrefill.
    Raises:
        RequestError as `plan_multimodal_prefill` (checked before the tower runs).
    """
    plan = plan_multimodal_prefill(ctx, config)
    if plan.inputs and vision_weights is None:
        raise RequestError(f"{request_name(getattr(ctx, 'request_id', '?'))} carries pixels but no vision weights "
                         "were given")
    feats = [vision_tower(np.asarray(pix), g, vision_weights, config.vision_config, dtype=dtype)
             for _, pix, g in plan.inputs]  # each [Σ t·h·w / m², H]
    emb = np.concatenate(feats)[plan.order] if feats else np.zeros((0, config.hidden_size))
    return MultimodalPrefill(image_rows=plan.image_rows, embeddings=emb, position_ids=plan.position_ids,
                             rope_delta=plan.rope_delta)
