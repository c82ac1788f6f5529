"""The Qwen3.5 vision tower in NumPy: pixels (already patchified) → one LM embedding per 2×2 patch window.

Checked against transformers 5.24 `models/qwen3_5/modeling_qwen3_5.py` (`Qwen3_5VisionModel` and its
parts) and `vision_utils.py` (the grid-derived inputs).  Step by step, for N patches of all images / video frames
packed together (N = Σ t·h·w over `grid_thw`, grids in patches), D = vision hidden size, m = spatial merge size:

    x   = pixel_values Wpᵀ + bp                          [N, D]      Conv3d(kernel = stride = (2, P, P)) as a Linear
    x  += Σ_k weights[:, k] · pos_embed[indices[:, k]]   [N, D]      learned S×S grid, bilinear, align_corners=True
    cos, sin = 2-D rotary tables from (row, col)         [N, D_h]    [θ(row) | θ(col) | θ(row) | θ(col)]
    repeat depth times (pre-norm ViT block):
        x += Attn(LN1(x))                                            non-causal, one segment per image / frame
        x += MLP(LN2(x))                                             fc1 → gelu_pytorch_tanh → fc2
    y   = LN_merger(x)  viewed as [N/m², m²·D]                        the m² patches of one window are consecutive
    out = GELU_exact(y W1ᵀ + b1) W2ᵀ + b2                [N/m², out_hidden_size]

Patch rows arrive in *spatial-merge-block order*: inside one frame, the m×m patches of merge window (bh, bw) are
consecutive (row-major inside the window), windows in row-major order.  Everything that depends on a patch's
(row, col) — the position-grid taps and the rotary angles — is emitted in that same order, which is why the
merger can simply view 4 consecutive rows as one window.

No deepstack (Qwen3-VL's intermediate-feature taps; `Qwen3_5VisionModel` has none).  Computation runs in
`dtype`: float64 (the oracle, default) or float32 (HF's fp32 arithmetic).  Shape legend: N patches, D vision
hidden, D_h vision head dim, nh vision heads, S learned grid side, m merge size, H_out LM hidden size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from reference.packing import check_cu_seqlens
from reference.rope import float_dtype, rotate_half

__all__ = [
    "VisionBlockWeights", "VisionWeights", "VisionInputs",
    "check_grid_thw", "num_patches", "num_merged_tokens",
    "merge_block_coordinates", "pos_embed_interpolation", "interpolate_pos_embed",
    "vision_rotary_position_ids", "vision_rope_inv_freq", "vision_rope_cos_sin", "vision_cu_seqlens",
    "vision_inputs", "layer_norm", "gelu_tanh", "gelu_exact",
    "patch_embed", "vision_attention", "vision_block", "patch_merger", "vision_tower",
]



# ----------------------------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------------------------


def check_grid_thw(grid_thw, spatial_merge_size: int = 2) -> np.ndarray:
    """Validate `grid_thw` ([n, 3] positive ints, h and w divisible by m); return it as int64 [n, 3]."""
    g = np.asarray(grid_thw)
    if g.ndim == 1 and g.shape[0] == 3:
        g = g[None]
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"grid_thw must be [num_images, 3] (t, h, w in patches), got shape {g.shape}")
    if g.size and (not np.issubdtype(g.dtype, np.integer)):
        if not np.all(g == np.round(g)):
            raise ValueError(f"grid_thw must hold integers, got {g.tolist()}")
    g = g.astype(np.int64)
    if np.any(g <= 0):
        raise ValueError(f"grid_thw entries must be positive, got {g.tolist()}")
    m = int(spatial_merge_size)
    if np.any(g[:, 1] % m) or np.any(g[:, 2] % m):
        raise ValueError(f"grid h and w must be multiples of spatial_merge_size {m}, got {g.tolist()}")
    return g


def num_patches(grid_thw) -> int:
    """N = Σ t·h·w: rows of `pixel_values` for these grids."""
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return int(np.prod(g, axis=1).sum())


def num_merged_tokens(grid_thw, spatial_merge_size: int = 2) -> np.ndarray:
    """Merged LM tokens per grid: t·h·w / m² ([n] int64).  The prompt holds this many placeholders per image."""
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return np.prod(g, axis=1) // (int(spatial_merge_size) ** 2)


def merge_block_coordinates(h: int, w: int, spatial_merge_size: int = 2):
    """(row, col) of every patch of one h×w frame, listed in spatial-merge-block order.

    Patch number i (0 .. h·w−1) of a frame sits in merge window (bh, bw) at in-window offset (ih, iw):

        iw = i % m,  ih = (i // m) % m,  bw = (i // m²) % (w/m),  bh = i // (m² · w/m)
        row = bh·m + ih,  col = bw·m + iw

    Example h = w = 4, m = 2: rows 0,0,1,1,0,0,1,1,2,2,3,3,2,2,3,3 and cols 0,1,0,1,2,3,2,3,0,1,0,1,2,3,2,3.

    Returns:
        row, col: [h·w] int64 each.
    """
    m = int(spatial_merge_size)
    if h % m or w % m:
        raise ValueError(f"frame {h}x{w} (patches) is not divisible by spatial_merge_size {m}")
    i = np.arange(h * w, dtype=np.int64)
    iw = i % m
    ih = (i // m) % m
    bw = (i // (m * m)) % (w // m)
    bh = i // (m * m * (w // m))
    return bh * m + ih, bw * m + iw


# ----------------------------------------------------------------------------------------------------------------
# Learned position grid, resampled bilinearly (align_corners=True)
# ----------------------------------------------------------------------------------------------------------------


def _axis_taps(coord: np.ndarray, size: int, side: int, dt: np.dtype):
    """Two bilinear taps on one axis: source position src = coord·(S−1)/(size−1) (align_corners=True).

    Taps floor(src) and floor(src)+1 (clamped to S−1, where its weight is 0 anyway), weights 1−frac and frac.
    size == 1 maps the single patch to grid position 0.
    """
    src = coord.astype(dt) * dt.type(side - 1) / dt.type(max(size - 1, 1))  # [n]
    lo = np.floor(src)
    frac = src - lo
    lo = lo.astype(np.int64)
    taps = np.stack([lo, np.minimum(lo + 1, side - 1)], axis=1)  # [n, 2]
    weights = np.stack([1 - frac, frac], axis=1).astype(dt)  # [n, 2]
    return taps, weights


def pos_embed_interpolation(grid_thw, num_grid_per_side: int, spatial_merge_size: int = 2, *,
                            dtype=np.float64):
    """Gather indices and weights that resample the learned S×S position table to every patch (4 taps each).

    For a frame of h×w patches, patch (row, col) reads the table at the continuous grid point

        (y, x) = (row·(S−1)/(h−1),  col·(S−1)/(w−1))            (bilinear, align_corners=True; /1 when h or w = 1)

    with the four taps (⌊y⌋, ⌊x⌋), (⌊y⌋, ⌊x⌋+1), (⌊y⌋+1, ⌊x⌋), (⌊y⌋+1, ⌊x⌋+1) (clamped to S−1) and weights the
    outer product of the 1-D hat weights (1−fy, fy) ⊗ (1−fx, fx).  They sum to 1 and reduce to a single weight-1
    tap whenever (y, x) is a grid point.  Rows come in spatial-merge-block order and repeat over t frames —
    the documented `indices` / `weights` inputs of MAX's Qwen3_5Inputs, HF's
    `get_vision_interpolation_indices_and_weights(mode="bilinear", align_corners=True)`.

    Args:
        grid_thw: [n, 3] (t, h, w) in patches.
        num_grid_per_side: S = sqrt(num_position_embeddings) (48 for Qwen3.5).
    Returns:
        indices: [N, 4] int64 into the flattened [S·S, D] table;  weights: [N, 4] in `dtype`.
    """
    dt = float_dtype(dtype)
    g = check_grid_thw(grid_thw, spatial_merge_size)
    S = int(num_grid_per_side)
    all_idx, all_w = [], []
    for t, h, w in g.tolist():
        row, col = merge_block_coordinates(h, w, spatial_merge_size)  # [h·w] each
        h_taps, h_wts = _axis_taps(row, h, S, dt)  # [h·w, 2]
        w_taps, w_wts = _axis_taps(col, w, S, dt)  # [h·w, 2]
        idx = (h_taps[:, :, None] * S + w_taps[:, None, :]).reshape(-1, 4)  # [h·w, 4]
        wts = (h_wts[:, :, None] * w_wts[:, None, :]).reshape(-1, 4)  # [h·w, 4]
        all_idx.append(np.tile(idx, (t, 1)))  # [t·h·w, 4]  same positions for every frame
        all_w.append(np.tile(wts, (t, 1)))
    if not all_idx:
        return np.zeros((0, 4), dtype=np.int64), np.zeros((0, 4), dtype=dt)
    return np.concatenate(all_idx), np.concatenate(all_w)


def interpolate_pos_embed(pos_embed: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_k weights[:, k] · pos_embed[indices[:, k]]: [S·S, D] table, [N, 4] taps → [N, D]."""
    return np.einsum("nk,nkd->nd", weights, pos_embed[indices])


# ----------------------------------------------------------------------------------------------------------------
# 2-D rotary embedding
# ----------------------------------------------------------------------------------------------------------------


def vision_rotary_position_ids(grid_thw, spatial_merge_size: int = 2) -> np.ndarray:
    """(row, col) of every patch in merge-block order, repeated over each grid's t frames ([N, 2] int64).

    The documented `vision_position_ids` input (HF `get_vision_position_ids`, without a temporal column).
    """
    g = check_grid_thw(grid_thw, spatial_merge_size)
    out = []
    for t, h, w in g.tolist():
        row, col = merge_block_coordinates(h, w, spatial_merge_size)
        out.append(np.tile(np.stack([row, col], axis=1), (t, 1)))  # [t·h·w, 2]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def vision_rope_inv_freq(head_dim: int, theta: float, *, dtype=np.float64) -> np.ndarray:
    """inv_freq[j] = θ^(−2j / (D_h/2)), j = 0 .. D_h/4 − 1 (18 values for D_h = 72).

    HF `Qwen3_5VisionRotaryEmbedding.compute_axial_rope_parameters`: the same frequencies serve the row and the
    column axis; each axis gets D_h/4 of them, and the [row | col] angles, duplicated, cover the full head.
    """
    dt = float_dtype(dtype)
    if head_dim % 4:
        raise ValueError(f"vision head_dim must be a multiple of 4 for 2-D rotary, got {head_dim}")
    spatial = head_dim // 2
    return (dt.type(1.0) / dt.type(theta) ** (np.arange(0, spatial, 2, dtype=dt) / dt.type(spatial))).astype(dt)


def vision_rope_cos_sin(position_ids: np.ndarray, head_dim: int, theta: float, *, dtype=np.float64):
    """cos/sin tables [N, D_h] of the vision tower's 2-D rotary embedding.

        θ_r = row · inv_freq,  θ_c = col · inv_freq                     [N, D_h/4] each
        cos = cos([θ_r | θ_c | θ_r | θ_c]),  sin likewise               [N, D_h]

    rotate_half then pairs channel i with i + D_h/2, so the first quarter and third quarter rotate with the row,
    the second and fourth with the column; no channel passes through (unlike the LM's partial RoPE).
    """
    dt = float_dtype(dtype)
    p = np.asarray(position_ids)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"vision position ids must be [N, 2] (row, col), got shape {p.shape}")
    f = vision_rope_inv_freq(head_dim, theta, dtype=dt)  # [D_h/4]
    ang = p.astype(dt)[:, :, None] * f  # [N, 2, D_h/4]
    half = np.concatenate([ang[:, 0], ang[:, 1]], axis=-1)  # [N, D_h/2]
    emb = np.concatenate([half, half], axis=-1)  # [N, D_h]
    return np.cos(emb), np.sin(emb)



def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [N, nh, D_h] rotated over all D_h channels (HF applies this in fp32)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def vision_cu_seqlens(grid_thw) -> np.ndarray:
    """Attention segment boundaries: one segment of h·w patches per frame ([num_frames + 1] int64).

    A t-frame video gives t segments (frames attend only within themselves, as HF's default
    `merge_temporal=False`); a still image (t = 1) gives one.
    """
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    lengths = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


@dataclass
class VisionInputs:
    """Everything the tower derives from `grid_thw` alone (MAX precomputes these on the host; names as documented).

    grid_thw:     [n, 3] int64
    indices:      [N, 4] int64   bilinear taps into the flattened position table
    weights:      [N, 4] float   their weights
    position_ids: [N, 2] int64   (row, col) for the 2-D rotary embedding (`vision_position_ids`)
    cu_seqlens:   [F + 1] int64  attention segments, one per frame
    max_seqlen:   int            longest segment
    """

    grid_thw: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    max_seqlen: int


def vision_inputs(grid_thw, vision_config, *, dtype=np.float64) -> VisionInputs:
    """Precompute the grid-derived inputs of `vision_tower` for `grid_thw` ([n, 3] in patches)."""
    m = vision_config.spatial_merge_size
    g = check_grid_thw(grid_thw, m)
    idx, wts = pos_embed_interpolation(g, vision_config.num_grid_per_side, m, dtype=dtype)
    cu = vision_cu_seqlens(g)
    return VisionInputs(grid_thw=g, indices=idx, weights=wts, position_ids=vision_rotary_position_ids(g, m),
                        cu_seqlens=cu, max_seqlen=int(np.diff(cu).max()) if len(cu) > 1 else 0)


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VisionBlockWeights:
    """One ViT block (checkpoint names `blocks.i.*`, PyTorch [out, in] layout)."""

    norm1_weight: np.ndarray  # [D]
    norm1_bias: np.ndarray  # [D]
    qkv_weight: np.ndarray  # [3D, D]  output rows: all q, then all k, then all v (each nh × D_h)
    qkv_bias: np.ndarray  # [3D]
    proj_weight: np.ndarray  # [D, D]
    proj_bias: np.ndarray  # [D]
    norm2_weight: np.ndarray  # [D]
    norm2_bias: np.ndarray  # [D]
    fc1_weight: np.ndarray  # [I, D]
    fc1_bias: np.ndarray  # [I]
    fc2_weight: np.ndarray  # [D, I]
    fc2_bias: np.ndarray  # [D]


_BLOCK_NAMES = {
    "norm1_weight": "norm1.weight", "norm1_bias": "norm1.bias",
    "qkv_weight": "attn.qkv.weight", "qkv_bias": "attn.qkv.bias",
    "proj_weight": "attn.proj.weight", "proj_bias": "attn.proj.bias",
    "norm2_weight": "norm2.weight", "norm2_bias": "norm2.bias",
    "fc1_weight": "mlp.linear_fc1.weight", "fc1_bias": "mlp.linear_fc1.bias",
    "fc2_weight": "mlp.linear_fc2.weight", "fc2_bias": "mlp.linear_fc2.bias",
}


@dataclass
class VisionWeights:
    """All vision-tower weights (checkpoint prefix `model.visual.`).

    patch_embed_weight: [D, C·T_p·P·P]  the Conv3d kernel [D, C, T_p, P, P] flattened in (C, T_p, P, P) order,
                                         the order of a `pixel_values` row
    patch_embed_bias:   [D]
    pos_embed:          [S·S, D]        learned position grid, row-major (index = y·S + x)
    blocks:             list of VisionBlockWeights (depth)
    merger_*:           norm [D] (+bias), fc1 [m²D, m²D] (+bias), fc2 [H_out, m²D] (+bias)
    """

    patch_embed_weight: np.ndarray
    patch_embed_bias: np.ndarray
    pos_embed: np.ndarray
    blocks: list
    merger_norm_weight: np.ndarray
    merger_norm_bias: np.ndarray
    merger_fc1_weight: np.ndarray
    merger_fc1_bias: np.ndarray
    merger_fc2_weight: np.ndarray
    merger_fc2_bias: np.ndarray

    @classmethod
    def from_state_dict(cls, tensors, vision_config, *, dtype=np.float64) -> VisionWeights:
        """Build from the `model.visual.*` tensors with that prefix stripped (`patch_embed.proj.weight`, …).

        Every expected name must be present with the expected shape, and no other name may be left over
        (full key coverage); errors name the offending tensor.
        """
        dt = float_dtype(dtype)
        vc = vision_config
        D, I, m2 = vc.hidden_size, vc.intermediate_size, vc.merge_unit
        used = set()

        def get(name, shape):
            if name not in tensors:
                raise KeyError(f"vision weights: missing tensor {name!r} (expected shape {shape})")
            a = np.asarray(tensors[name])
            if tuple(a.shape) != tuple(shape):
                raise ValueError(f"vision weights: {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
            used.add(name)
            return a.astype(dt)

        conv = get("patch_embed.proj.weight", (D, vc.in_channels, vc.temporal_patch_size, vc.patch_size,
                                                vc.patch_size))
        blocks = []
        block_shapes = {
            "norm1_weight": (D,), "norm1_bias": (D,), "qkv_weight": (3 * D, D), "qkv_bias": (3 * D,),
            "proj_weight": (D, D), "proj_bias": (D,), "norm2_weight": (D,), "norm2_bias": (D,),
            "fc1_weight": (I, D), "fc1_bias": (I,), "fc2_weight": (D, I), "fc2_bias": (D,),
        }
        for i in range(vc.depth):
            blocks.append(VisionBlockWeights(**{
                field: get(f"blocks.{i}.{name}", block_shapes[field]) for field, name in _BLOCK_NAMES.items()}))
        w = cls(
            patch_embed_weight=conv.reshape(D, -1),  # [D, C·T_p·P·P]
            patch_embed_bias=get("patch_embed.proj.bias", (D,)),
            pos_embed=get("pos_embed.weight", (vc.num_position_embeddings, D)),
            blocks=blocks,
            merger_norm_weight=get("merger.norm.weight", (D,)),
            merger_norm_bias=get("merger.norm.bias", (D,)),
            merger_fc1_weight=get("merger.linear_fc1.weight", (m2 * D, m2 * D)),
            merger_fc1_bias=get("merger.linear_fc1.bias", (m2 * D,)),
            merger_fc2_weight=get("merger.linear_fc2.weight", (vc.out_hidden_size, m2 * D)),
            merger_fc2_bias=get("merger.linear_fc2.bias", (vc.out_hidden_size,)),
        )
        extra = sorted(set(tensors) - used)
        if extra:
            raise ValueError(f"vision weights: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                             "(deepstack mergers do not exist in Qwen3.5)")
        return w

    @property
    def dtype(self) -> np.dtype:
        return self.patch_embed_weight.dtype


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Plain LayerNorm over the last axis: (x − mean) / sqrt(var + eps) · w + b (biased variance)."""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + x.dtype.type(eps)) * weight + bias


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """gelu_pytorch_tanh: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) — the vision blocks' MLP activation."""
    c = x.dtype.type(math.sqrt(2.0 / math.pi))
    return x.dtype.type(0.5) * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x ** 3)))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_exact(x: np.ndarray) -> np.ndarray:
    """Exact GELU 0.5·x·(1 + erf(x/√2)) — the merger's activation (`nn.GELU()`); erf evaluated in float64."""
    return (0.5 * x * (1.0 + _erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))).astype(x.dtype)


def patch_embed(pixel_values: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv3d with kernel = stride = (T_p, P, P) over one patch = a Linear on the flattened patch.

    Args:
        pixel_values: [N, C·T_p·P·P] rows in (C, T_p, P, P) order.  weight: [D, C·T_p·P·P].  bias: [D].
    Returns:
        [N, D].
    """
    if pixel_values.ndim != 2 or pixel_values.shape[1] != weight.shape[1]:
        raise ValueError(f"pixel_values must be [num_patches, {weight.shape[1]}] (C·T_p·P·P), "
                         f"got shape {pixel_values.shape}")
    return pixel_values @ weight.T + bias


def vision_attention(x: np.ndarray, w: VisionBlockWeights, num_heads: int, cos: np.ndarray, sin: np.ndarray,
                     cu_seqlens: np.ndarray) -> np.ndarray:
    """Bidirectional multi-head attention inside each segment of `cu_seqlens` (one image / frame each).

        [q | k | v] = x W_qkvᵀ + b        [N, 3, nh, D_h]   (q rows first, then k, then v)
        q, k ← rotary(q), rotary(k)       full-width 2-D rotary
        o_seg = softmax(q kᵀ / √D_h) v    per segment, no mask inside the segment
        y = o W_projᵀ + b                 [N, D]

    Args:
        x: [N, D] (already LayerNorm'ed).  cos, sin: [N, D_h].  cu_seqlens: [F + 1].
    """
    N, D = x.shape
    hd = D // num_heads
    qkv = (x @ w.qkv_weight.T + w.qkv_bias).reshape(N, 3, num_heads, hd)  # [N, 3, nh, D_h]
    q = _apply_rope(qkv[:, 0], cos, sin)  # [N, nh, D_h]
    k = _apply_rope(qkv[:, 1], cos, sin)  # [N, nh, D_h]
    v = qkv[:, 2]  # [N, nh, D_h]
    scale = x.dtype.type(hd ** -0.5)
    out = np.empty_like(q)  # [N, nh, D_h]
    cu = check_cu_seqlens(cu_seqlens, N, "vision_attention", nonempty=True)  # one non-empty segment per frame
    for s, e in pairwise(cu):
        for h in range(num_heads):  # one head at a time keeps the [L, L] score matrix small
            scores = (q[s:e, h] @ k[s:e, h].T) * scale  # [L, L]
            scores = scores - scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=-1, keepdims=True)
            out[s:e, h] = p @ v[s:e, h]  # [L, D_h]
    return out.reshape(N, D) @ w.proj_weight.T + w.proj_bias  # [N, D]


def vision_block(x: np.ndarray, w: VisionBlockWeights, num_heads: int, cos: np.ndarray, sin: np.ndarray,
                 cu_seqlens: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Pre-norm ViT block: x + Attn(LN1(x)), then + MLP(LN2(x)) with gelu_pytorch_tanh.

    Args:
        x:          [N, D] patch embeddings of all images / frames, packed
        cos, sin:   [N, D_h] the 2-D rotary tables (D_h = D / num_heads)
        cu_seqlens: [F + 1] boundaries of the attention segments (one per image / frame)
    Returns:
        [N, D]
    """
    x = x + vision_attention(layer_norm(x, w.norm1_weight, w.norm1_bias, eps), w, num_heads, cos, sin, cu_seqlens)
    hmid = gelu_tanh(layer_norm(x, w.norm2_weight, w.norm2_bias, eps) @ w.fc1_weight.T + w.fc1_bias)  # [N, I]
    return x + hmid @ w.fc2_weight.T + w.fc2_bias


def patch_merger(x: np.ndarray, w: VisionWeights, spatial_merge_size: int = 2, eps: float = 1e-6) -> np.ndarray:
    """LayerNorm per patch, then each run of m² consecutive patches (one merge window) → one LM embedding.

    Args:
        x: [N, D] in merge-block order (N divisible by m²).
    Returns:
        [N/m², H_out].
    """
    N, D = x.shape
    m2 = int(spatial_merge_size) ** 2
    if N % m2:
        raise ValueError(f"{N} patches cannot be merged in groups of {m2}")
    y = layer_norm(x, w.merger_norm_weight, w.merger_norm_bias, eps).reshape(N // m2, m2 * D)  # [N/m², m²·D]
    y = gelu_exact(y @ w.merger_fc1_weight.T + w.merger_fc1_bias)  # [N/m², m²·D]
    return y @ w.merger_fc2_weight.T + w.merger_fc2_bias  # [N/m², H_out]


def vision_tower(pixel_values, grid_thw, weights: VisionWeights, vision_config, *, dtype=None,
                 inputs: VisionInputs | None = None, return_hidden: bool = False):
    """Run the whole tower: patchified pixels of all images / frames → merged LM embeddings.

    Args:
        pixel_values: [N, C·T_p·P·P], N = Σ t·h·w, rows in merge-block order (what the processor emits).
        grid_thw: [n, 3] (t, h, w) in patches, one row per image or video.
        weights: VisionWeights.  vision_config: reference.config.VisionConfig.
        dtype: compute dtype (default: the weights' dtype; float64 for the oracle).
        inputs: precomputed `vision_inputs(grid_thw, ...)` (computed here if None).
        return_hidden: also return the last block's output [N, D] (HF's `last_hidden_state`).
    Returns:
        merged [N/m², H_out] (images in order, each t·h·w/m² rows), or (merged, hidden) with return_hidden.
    """
    vc = vision_config
    dt = float_dtype(weights.dtype if dtype is None else dtype)
    inp = inputs if inputs is not None else vision_inputs(grid_thw, vc, dtype=dt)
    if inputs is not None and not np.array_equal(inputs.grid_thw, check_grid_thw(grid_thw, vc.spatial_merge_size)):
        raise ValueError(f"precomputed vision inputs were built for a different grid_thw "
                         f"({np.asarray(inputs.grid_thw).tolist()}, not {np.asarray(grid_thw).tolist()})")
    pv = np.asarray(pixel_values)
    N = num_patches(inp.grid_thw)
    if pv.ndim != 2 or pv.shape != (N, vc.patch_dim):
        raise ValueError(f"pixel_values must be [{N}, {vc.patch_dim}] for grid_thw {inp.grid_thw.tolist()} "
                         f"(Σ t·h·w patches of C·T_p·P·P values), got shape {pv.shape}")

    def cast(a):
        return a.astype(dt, copy=False)

    x = patch_embed(cast(pv), cast(weights.patch_embed_weight), cast(weights.patch_embed_bias))  # [N, D]
    x = x + interpolate_pos_embed(cast(weights.pos_embed), inp.indices, cast(inp.weights))  # [N, D]
    cos, sin = vision_rope_cos_sin(inp.position_ids, vc.head_dim, vc.rope_theta, dtype=dt)  # [N, D_h] each
    for blk in weights.blocks:
        if dt != weights.dtype:
            blk = VisionBlockWeights(**{k: cast(v) for k, v in vars(blk).items()})
        x = vision_block(x, blk, vc.num_heads, cos, sin, inp.cu_seqlens, vc.layer_norm_eps)
    w = weights
    if dt != weights.dtype:
        w = VisionWeights(**{k: (cast(v) if isinstance(v, np.ndarray) else v) for k, v in vars(weights).items()})
    merged = patch_merger(x, w, vc.spatial_merge_size, vc.layer_norm_eps)
    return (merged, x) if return_hidden else merged
