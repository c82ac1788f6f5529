"""Rotary position embedding for Qwen3.5: partial RoPE + interleaved multimodal RoPE (MRoPE).

Only the first R = rotary_dim = int(head_dim · partial_rotary_factor) channels of every q/k head rotate
(R = 64 of D_h = 256 in every published Qwen3.5 checkpoint); the other D_h − R channels pass through untouched.
The R rotary channels use the "rotate_half" (NeoX) pairing: channel i is paired with channel i + R/2.

Each of the R/2 frequencies belongs to exactly one of three position axes (t = time, h = height, w = width).
Qwen3.5 uses the *interleaved* assignment inherited from Qwen3-VL (SPEC §7.2, PITFALLS B19):

    axis(j) = h   if j % 3 == 1 and j < 3·s_h
              w   if j % 3 == 2 and j < 3·s_w
              t   otherwise                      j = 0 .. R/2 − 1,  (s_t, s_h, s_w) = mrope_section

For text every axis holds the same position, so MRoPE is exactly 1-D RoPE (SPEC §7.1).  Image and video tokens
get (t, h, w) grid positions from `get_rope_index` (SPEC §15.6); generation continues with the stored
`rope_delta` (SPEC §7.3).

Sources: SPEC §2.4, §6 step 3, §7, §15.6, §16; PITFALLS B18 (partial rotary), B19 (MRoPE layout).
Shape legend: T tokens, R rotary dim, D_h head dim, "heads" any head count.
"""
from __future__ import annotations

import numpy as np

AXIS_NAMES = ("t", "h", "w")


def _float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


# ----------------------------------------------------------------------------------------------------------------
# Frequencies and the frequency → axis assignment
# ----------------------------------------------------------------------------------------------------------------


def inv_freq(rotary_dim: int, theta: float, *, dtype=np.float64) -> np.ndarray:
    """Inverse frequencies of the rotary channels.

        inv_freq[j] = θ^(−2j / R),   j = 0 .. R/2 − 1

    The exponent runs over the *rotary* dim R, never over head_dim (PITFALLS B18: using head_dim agrees at
    position 0 and drifts with distance).  With dtype=float32 the arithmetic is done in float32, as HF does.

    Args:
        rotary_dim: R (even, > 0).
        theta: rope_theta (1e7 for Qwen3.5, SPEC §2.4).
    Returns:
        [R/2] array of `dtype`.
    """
    dt = _float_dtype(dtype)
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even integer, got {rotary_dim}")
    if theta <= 0:
        raise ValueError(f"rope theta must be positive, got {theta}")
    exponent = np.arange(0, rotary_dim, 2, dtype=dt) / dt.type(rotary_dim)  # [R/2]  2j/R
    return (dt.type(1.0) / (dt.type(theta) ** exponent)).astype(dt)


def mrope_axis_of_frequency(mrope_section, *, interleaved: bool = True) -> np.ndarray:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each of the R/2 frequencies.

    interleaved=True (Qwen3.5 / Qwen3-VL, SPEC §7.2): start from t everywhere, then h takes j ≡ 1 (mod 3) for
    j < 3·s_h and w takes j ≡ 2 (mod 3) for j < 3·s_w.
    interleaved=False (Qwen2-VL "sectioned"/chunked layout; NOT Qwen3.5 — kept for teaching and negative tests):
    the first s_t frequencies are t, the next s_h are h, the last s_w are w.

    Args:
        mrope_section: (s_t, s_h, s_w) with s_t + s_h + s_w = R/2.
    Returns:
        [R/2] int array with values in {0, 1, 2}.
    """
    s_t, s_h, s_w = (int(s) for s in mrope_section)
    if min(s_t, s_h, s_w) < 0:
        raise ValueError(f"mrope_section entries must be >= 0, got {tuple(mrope_section)}")
    half = s_t + s_h + s_w
    j = np.arange(half)
    if not interleaved:
        return np.repeat(np.array([0, 1, 2]), [s_t, s_h, s_w])
    axis = np.zeros(half, dtype=np.int64)
    axis[(j % 3 == 1) & (j < 3 * s_h)] = 1
    axis[(j % 3 == 2) & (j < 3 * s_w)] = 2
    counts = np.bincount(axis, minlength=3)
    if tuple(counts) != (s_t, s_h, s_w):
        # e.g. s_h much larger than s_t: the interleaved pattern cannot give each axis its share.
        raise ValueError(
            f"mrope_section {tuple(mrope_section)} is not realisable by the interleaved layout "
            f"(it gives t/h/w = {tuple(int(c) for c in counts)} frequencies)"
        )
    return axis


# ----------------------------------------------------------------------------------------------------------------
# Position ids
# ----------------------------------------------------------------------------------------------------------------


def text_position_ids(num_tokens: int, start: int = 0) -> np.ndarray:
    """Positions of a text-only run: the same `start + arange(T)` on all three axes (SPEC §7.1).

    Returns:
        [3, T] int64.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    row = np.arange(start, start + num_tokens, dtype=np.int64)  # [T]
    return np.broadcast_to(row, (3, num_tokens)).copy()  # [3, T]


def decode_position_ids(past_len: int, num_tokens: int = 1, rope_delta: int = 0) -> np.ndarray:
    """Positions of tokens appended after `past_len` cached tokens (decode, or a later prefill chunk).

        pos = past_len + i + rope_delta  on all three axes,  i = 0 .. num_tokens − 1

    `rope_delta` (= max(prompt position) + 1 − prompt length, from `get_rope_index`) is 0 for text-only
    prompts and negative after images, whose grid positions advance slower than their token count (SPEC §7.3).
    Only valid once every multimodal run has been consumed; chunks that still contain image tokens must slice
    the one-shot `get_rope_index` result instead.

    Returns:
        [3, num_tokens] int64.
    """
    if past_len < 0:
        raise ValueError(f"past_len must be >= 0, got {past_len}")
    return text_position_ids(num_tokens, start=int(past_len) + int(rope_delta))


def _check_position_ids(position_ids) -> np.ndarray:
    p = np.asarray(position_ids)
    if p.ndim == 1:  # plain 1-D positions: broadcast to the three axes
        p = np.broadcast_to(p, (3, p.shape[0]))
    if p.ndim != 2 or p.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, T] (t, h, w rows) or [T], got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"position_ids must be integers, got dtype {p.dtype}")
    return p


# ----------------------------------------------------------------------------------------------------------------
# cos / sin tables
# ----------------------------------------------------------------------------------------------------------------


def mrope_angles(position_ids, inv_freq_, mrope_section, *, interleaved: bool = True) -> np.ndarray:
    """Rotation angles θ[t, j] = pos_{axis(j)}[t] · inv_freq[j] (SPEC §7.2).

    Each row of `position_ids` is read through its own stride, so non-contiguous slices of a larger
    [3, max_tokens] buffer are fine (PITFALLS B19: a kernel that read only row 0 broke grounding).

    Args:
        position_ids: [3, T] integer (rows t, h, w) or [T] (broadcast to all rows).
        inv_freq_: [R/2], float32 or float64 (its dtype is the compute dtype).
        mrope_section: (s_t, s_h, s_w), summing to R/2.
    Returns:
        [T, R/2] angles in inv_freq's dtype.
    """
    p = _check_position_ids(position_ids)
    f = np.asarray(inv_freq_)
    dt = _float_dtype(f.dtype)
    if f.ndim != 1:
        raise ValueError(f"inv_freq must be 1-D [R/2], got shape {f.shape}")
    if sum(int(s) for s in mrope_section) != f.shape[0]:
        raise ValueError(
            f"sum(mrope_section) = {sum(int(s) for s in mrope_section)} must equal R/2 = {f.shape[0]} "
            "(PITFALLS B18: a mismatch means the rotary dim was taken over the wrong width)"
        )
    axis = mrope_axis_of_frequency(mrope_section, interleaved=interleaved)  # [R/2]
    pos = p.astype(dt)  # [3, T]  (positions < 2^24 are exact in float32)
    angles_all = pos[:, :, None] * f[None, None, :]  # [3, T, R/2]  one product per axis, as HF
    j = np.arange(f.shape[0])
    return angles_all[axis, :, j].T.copy()  # [T, R/2]  pick axis(j) for frequency j


def mrope_cos_sin(position_ids, inv_freq_, mrope_section, *, interleaved: bool = True):
    """cos and sin tables of width R for partial (M)RoPE.

        θ = mrope_angles(...)           [T, R/2]
        cos = cos(cat(θ, θ)),  sin = sin(cat(θ, θ))          (SPEC §7.2; rotate_half pairs j with j + R/2)

    Text-only positions (three equal rows) give exactly the 1-D RoPE table.

    Args:
        position_ids: [3, T] integer (t, h, w) or [T].
        inv_freq_: [R/2] (float32 mirrors HF's fp32 tables; float64 is the oracle).
        mrope_section: (s_t, s_h, s_w).
        interleaved: True for Qwen3.5; False gives the Qwen2-VL sectioned layout (negative tests only).
    Returns:
        cos, sin: [T, R] in inv_freq's dtype.
    """
    theta = mrope_angles(position_ids, inv_freq_, mrope_section, interleaved=interleaved)  # [T, R/2]
    emb = np.concatenate([theta, theta], axis=-1)  # [T, R]
    return np.cos(emb), np.sin(emb)


def rope_cos_sin(positions, inv_freq_):
    """Plain 1-D RoPE tables (the text-only special case, used as an independent check).

    Args:
        positions: [T] integer.  inv_freq_: [R/2].
    Returns:
        cos, sin: [T, R].
    """
    f = np.asarray(inv_freq_)
    theta = np.asarray(positions).astype(f.dtype)[:, None] * f[None, :]  # [T, R/2]
    emb = np.concatenate([theta, theta], axis=-1)  # [T, R]
    return np.cos(emb), np.sin(emb)


# ----------------------------------------------------------------------------------------------------------------
# Applying the rotation
# ----------------------------------------------------------------------------------------------------------------


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[x1, x2] → [−x2, x1] over the last axis (halves of width R/2)."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_partial_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first R channels of every head; copy channels R..D_h−1 bit-exactly (PITFALLS B18).

        x_rot = x[..., :R] · cos + rotate_half(x[..., :R]) · sin
        out   = [x_rot | x[..., R:]]

    cos/sin are cast to x's dtype first (HF casts the tables to the activation dtype, SPEC §16).

    Args:
        x: [T, heads, D_h] (float32 or float64).
        cos, sin: [T, R] with R even and R <= D_h.
    Returns:
        [T, heads, D_h], same dtype as x.
    """
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must be [T, heads, D_h], got shape {x.shape}")
    if cos.shape != sin.shape or cos.ndim != 2:
        raise ValueError(f"cos and sin must both be [T, R], got {cos.shape} and {sin.shape}")
    T, _, D_h = x.shape
    R = cos.shape[1]
    if cos.shape[0] != T:
        raise ValueError(f"cos/sin have {cos.shape[0]} rows but x has T = {T}")
    if R % 2 or R > D_h or R == 0:
        raise ValueError(f"rotary width R = {R} must be even, positive and <= head_dim {D_h}")
    c = cos.astype(x.dtype)[:, None, :]  # [T, 1, R]
    s = sin.astype(x.dtype)[:, None, :]  # [T, 1, R]
    out = x.copy()  # pass-through channels keep their exact bits
    x_rot = x[..., :R]  # [T, heads, R]
    out[..., :R] = x_rot * c + rotate_half(x_rot) * s
    return out


# ----------------------------------------------------------------------------------------------------------------
# get_rope_index: (t, h, w) positions for prompts with image / video runs (SPEC §15.6)
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
    return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends)]


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
    """MRoPE positions of one prompt that may contain image and video runs (SPEC §15.6).

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
