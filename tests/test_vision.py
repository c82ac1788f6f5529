"""The vision tower (reference/vision.py, optimized/vision.py) against Hugging Face and against its own definitions.

HF oracle: `Qwen3_5ForConditionalGeneration.model.visual` of a tiny random checkpoint written by save_pretrained
(tests/hf_checkpoints.py), and transformers' `vision_utils` helpers for the grid-derived inputs.  Properties
(hypothesis): bilinear weights sum to 1, are exact on grid points and reproduce affine tables; merge-block order is
a permutation of whole windows; 2-D rotary is relative; attention never crosses images / frames.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file

from qwen35.measure import rel_rms
from reference.config import VisionConfig
from reference.multimodal import split_visual_state_dict
from reference.vision import (
    VisionWeights,
    interpolate_pos_embed,
    merge_block_coordinates,
    num_merged_tokens,
    pos_embed_interpolation,
    vision_cu_seqlens,
    vision_inputs,
    vision_rope_cos_sin,
    vision_rotary_position_ids,
    vision_tower,
)
from tests._tolerance import assert_close
from tests.hf_checkpoints import load_hf_model, make_hf_checkpoint, tiny_config

torch = pytest.importorskip("torch")

# (t, h, w) in patches: a 6x4 portrait, a 2-frame 4x8 video, the smallest 2x2 image, and a 10x2 strip
GRIDS = np.array([[1, 6, 4], [2, 4, 8], [1, 2, 2], [1, 10, 2]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_hf_checkpoint(tmp_path_factory.mktemp("mm_vision"), kind="multimodal", seed=3)
    cfg = tiny_config("multimodal")
    vis, _ = split_visual_state_dict(load_file(str(d / "model.safetensors")))
    return cfg, VisionWeights.from_state_dict(vis, cfg.vision_config), load_hf_model(d), vis


def _pixels(grid, vc, seed=0):
    n = int(np.prod(np.asarray(grid).reshape(-1, 3), axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, vc.patch_dim)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- HF parity


@pytest.mark.parametrize("grid", [GRIDS, GRIDS[:1], GRIDS[1:2]], ids=["four-mixed", "one-image", "video"])
def test_tower_matches_hf_visual(tiny, grid):
    cfg, vw, hf, _ = tiny
    pv = _pixels(grid, cfg.vision_config)
    merged, hidden = vision_tower(pv, grid, vw, cfg.vision_config, return_hidden=True)
    with torch.no_grad():
        out = hf.model.visual(torch.from_numpy(pv), grid_thw=torch.from_numpy(grid))
    assert merged.shape == (int(num_merged_tokens(grid).sum()), cfg.hidden_size)
    assert_close("vision hidden", hidden, out.last_hidden_state, "f32")
    assert_close("vision merged", merged, out.pooler_output, "f32")


def test_float32_reference_tracks_float64(tiny):
    cfg, vw, _, _ = tiny
    pv = _pixels(GRIDS, cfg.vision_config, seed=1)
    ref = vision_tower(pv, GRIDS, vw, cfg.vision_config)
    got = vision_tower(pv, GRIDS, vw, cfg.vision_config, dtype=np.float32)
    assert got.dtype == np.float32 and ref.dtype == np.float64
    assert_close("vision f32 vs f64", ref, got, "f32")


def test_grid_inputs_match_hf_vision_utils():
    from transformers import vision_utils as vu

    g = torch.from_numpy(GRIDS)
    for side in (4, 48):
        idx, wts = vu.get_vision_interpolation_indices_and_weights(
            g, num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2)
        my_idx, my_wts = pos_embed_interpolation(GRIDS, side, 2)
        np.testing.assert_array_equal(my_idx, idx.numpy())
        np.testing.assert_allclose(my_wts, wts.numpy(), atol=4e-6)  # HF: fp32 src = i·(S−1)/(h−1), ulp(47) ≈ 4e-6
    np.testing.assert_array_equal(vision_rotary_position_ids(GRIDS, 2), vu.get_vision_position_ids(g, 2).numpy())
    np.testing.assert_array_equal(vision_cu_seqlens(GRIDS), vu.get_vision_cu_seqlens(g).numpy())


def test_rope_tables_match_hf():
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionRotaryEmbedding

    vc = VisionConfig(hidden_size=1152, num_heads=16)  # the published geometry: head_dim 72
    rot = Qwen3_5VisionRotaryEmbedding(Qwen3_5VisionConfig(**vc.to_hf_dict()))
    pos = vision_rotary_position_ids(np.array([[1, 12, 20]]), 2)
    cos, sin = rot(torch.zeros(1), torch.from_numpy(pos))
    my_cos, my_sin = vision_rope_cos_sin(pos, vc.head_dim, vc.rope_theta)
    assert my_cos.shape == (240, 72)
    np.testing.assert_allclose(my_cos, cos.numpy(), atol=2e-6)
    np.testing.assert_allclose(my_sin, sin.numpy(), atol=2e-6)


# ---------------------------------------------------------------------------------------------- properties

grid_st = st.tuples(st.integers(1, 2), st.integers(1, 8).map(lambda x: 2 * x), st.integers(1, 8).map(lambda x: 2 * x))


@given(grid=grid_st, side=st.integers(2, 12))
def test_bilinear_weights_sum_to_one_and_are_exact_on_grid_points(grid, side):
    idx, wts = pos_embed_interpolation([grid], side, 2)
    t, h, w = grid
    assert idx.shape == wts.shape == (t * h * w, 4)
    assert np.all(wts >= 0) and np.all((idx >= 0) & (idx < side * side))
    np.testing.assert_allclose(wts.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    row, col = merge_block_coordinates(h, w, 2)
    y = np.tile(row * (side - 1) / max(h - 1, 1), t)
    x = np.tile(col * (side - 1) / max(w - 1, 1), t)
    on_grid = (np.abs(y - np.round(y)) < 1e-9) & (np.abs(x - np.round(x)) < 1e-9)
    # On a grid point the resampled value is the table entry itself: all weight on that one index.
    table = np.random.default_rng(0).standard_normal((side * side, 3))
    vals = interpolate_pos_embed(table, idx, wts)
    exact = (np.round(y) * side + np.round(x)).astype(int)
    np.testing.assert_allclose(vals[on_grid], table[exact[on_grid]], rtol=0, atol=1e-12)
    # Bilinear interpolation reproduces any affine function of the grid coordinates exactly.
    gy, gx = np.divmod(np.arange(side * side), side)
    affine = np.stack([3.0 * gy - 2.0 * gx + 0.5, gy + 0.0 * gx], axis=1)
    np.testing.assert_allclose(interpolate_pos_embed(affine, idx, wts),
                               np.stack([3.0 * y - 2.0 * x + 0.5, y], axis=1), atol=1e-10)


@given(h=st.integers(1, 10), w=st.integers(1, 10), m=st.sampled_from([1, 2, 3]))
def test_merge_block_order_is_a_permutation_of_whole_windows(h, w, m):
    H, W = h * m, w * m
    row, col = merge_block_coordinates(H, W, m)
    assert sorted(zip(row.tolist(), col.tolist(), strict=True)) == [(r, c) for r in range(H) for c in range(W)]
    win = (row // m) * w + col // m  # window id of each patch
    assert np.all(win.reshape(-1, m * m) == win[:: m * m, None])  # m² consecutive rows = one window
    assert np.all(np.diff(win[:: m * m]) == 1)  # windows in row-major order


@given(p1=st.tuples(st.integers(0, 30), st.integers(0, 30)), p2=st.tuples(st.integers(0, 30), st.integers(0, 30)),
       d=st.tuples(st.integers(0, 20), st.integers(0, 20)))
def test_vision_rope_is_relative_in_both_axes(p1, p2, d):
    rng = np.random.default_rng(7)
    q, k = rng.standard_normal((2, 16))
    pos = np.array([p1, p2, (p1[0] + d[0], p1[1] + d[1]), (p2[0] + d[0], p2[1] + d[1])])
    cos, sin = vision_rope_cos_sin(pos, 16, 10000.0)

    def rot(x, i):
        return x * cos[i] + np.concatenate([-x[8:], x[:8]]) * sin[i]

    assert np.isclose(rot(q, 0) @ rot(k, 1), rot(q, 2) @ rot(k, 3), atol=1e-9)
    assert np.isclose(np.linalg.norm(rot(q, 0)), np.linalg.norm(q))


def test_attention_stays_inside_each_image_and_frame(tiny):
    cfg, vw, _, _ = tiny
    vc = cfg.vision_config
    grid = np.array([[1, 4, 4], [2, 4, 4]])  # image, then a 2-frame video: three segments of 16 patches
    pv = _pixels(grid, vc, seed=2)
    base = vision_tower(pv, grid, vw, vc)
    pv2 = pv.copy()
    pv2[16:32] += 1.0  # change only the video's first frame
    out = vision_tower(pv2, grid, vw, vc)
    np.testing.assert_array_equal(out[:4], base[:4])  # the image: untouched
    np.testing.assert_array_equal(out[8:], base[8:])  # the video's second frame: untouched
    assert np.abs(out[4:8] - base[4:8]).max() > 1e-3  # the changed frame did change
    # Packing is invisible: each image alone gives the same rows.
    alone = vision_tower(pv[:16], grid[:1], vw, vc)
    np.testing.assert_allclose(base[:4], alone, rtol=0, atol=1e-12)


def test_weight_loading_checks_names_and_shapes(tiny):
    cfg, _, _, vis = tiny
    vc = cfg.vision_config
    missing = dict(vis)
    del missing["blocks.1.attn.qkv.bias"]
    with pytest.raises(KeyError, match="blocks.1.attn.qkv.bias"):
        VisionWeights.from_state_dict(missing, vc)
    wrong = dict(vis, **{"merger.linear_fc2.weight": np.zeros((7, 128), np.float32)})
    with pytest.raises(ValueError, match="merger.linear_fc2.weight"):
        VisionWeights.from_state_dict(wrong, vc)
    extra = dict(vis, **{"deepstack_merger_list.0.norm.weight": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="unexpected tensors"):
        VisionWeights.from_state_dict(extra, vc)


def test_clear_errors_on_bad_inputs(tiny):
    cfg, vw, _, _ = tiny
    vc = cfg.vision_config
    with pytest.raises(ValueError, match="pixel_values must be"):
        vision_tower(_pixels(GRIDS, vc)[:-1], GRIDS, vw, vc)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        vision_inputs([[1, 3, 4]], vc)
    with pytest.raises(ValueError, match="different grid_thw"):
        vision_tower(_pixels(GRIDS[:1], vc), GRIDS[:1], vw, vc, inputs=vision_inputs(GRIDS[2:3], vc))


# ---------------------------------------------------------------------------------------------- optimized twin


def test_optimized_tower_matches_reference(tiny):
    from optimized.vision import VisionTower

    cfg, vw, _, vis = tiny
    vc = cfg.vision_config
    pv = _pixels(GRIDS, vc, seed=4)
    ref = vision_tower(pv, GRIDS, vw, vc)
    tower32 = VisionTower.from_state_dict(vis, vc, dtype=torch.float32)
    got32 = tower32(torch.from_numpy(pv), GRIDS)
    assert got32.dtype == torch.float32
    r32 = assert_close("optimized vision f32", ref, got32, "f32")
    tower64 = VisionTower.from_state_dict(vis, vc, dtype=torch.float64)
    got64 = tower64(torch.from_numpy(pv), GRIDS)
    r64 = rel_rms(ref, got64)
    assert r64 < 1e-12, f"float64 torch twin differs from the float64 reference: {r64:.2e}"
    assert r32 < 1e-5
    # The precomputed-inputs form (MAX's documented indices / weights / position ids / cu_seqlens) is accepted too.
    pre = vision_inputs(GRIDS, vc)
    again = tower32(torch.from_numpy(pv), GRIDS, inputs=pre)
    assert torch.equal(again, got32)


def test_moe_checkpoint_tower_matches_hf(tmp_path):
    """qwen3_5_moe carries the same tower (HF `Qwen3_5MoeVisionModel`)."""
    d = make_hf_checkpoint(tmp_path, kind="multimodal_moe", seed=1)
    cfg = tiny_config("multimodal_moe")
    vis, _ = split_visual_state_dict(load_file(str(d / "model.safetensors")))
    hf = load_hf_model(d)
    grid = GRIDS[:2]
    pv = _pixels(grid, cfg.vision_config, seed=6)
    with torch.no_grad():
        want = hf.model.visual(torch.from_numpy(pv), grid_thw=torch.from_numpy(grid)).pooler_output
    got = vision_tower(pv, grid, VisionWeights.from_state_dict(vis, cfg.vision_config), cfg.vision_config)
    assert_close("moe-checkpoint vision merged", got, want, "f32")
