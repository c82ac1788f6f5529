"""The NumPy preprocessor (reference/image_processing.py) against Pillow and Hugging Face's Qwen image processor.

Oracles: Pillow's `Image.resize` (the resampler HF's PIL backend calls), transformers' `Qwen2VLImageProcessorPil`
(what `qwen3_5` maps to; it runs offline — no hub access, no torchvision), the Qwen2-VL `smart_resize` and the
Qwen3-VL video `smart_resize` / `patchify`.  Properties: patch rows are the image's patches in merge-block order,
a still image fills both temporal slots, videos pad with their last frame, placeholder expansion matches the grid.
"""
from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.image_processing import (
    ImageProcessor,
    expand_vision_placeholders,
    image_placeholder_tokens,
    patchify,
    resample_weights,
    resize,
    smart_resize,
    smart_resize_video,
)
from reference.vision import merge_block_coordinates, num_merged_tokens
from tests.hf_checkpoints import tiny_config

PIL = pytest.importorskip("PIL.Image")


def _images(seed=0):
    """Synthetic RGB test images: noise, a smooth gradient, a checkerboard, a flat colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:57, 0:91]
    grad = np.stack([yy * 4, xx * 2, (yy + xx) % 256], axis=-1).clip(0, 255).astype(np.uint8)
    checker = (((np.mgrid[0:40, 0:150].sum(0) // 5) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
    return [rng.integers(0, 256, (300, 410, 3), dtype=np.uint8), grad, checker,
            np.full((33, 20, 3), (200, 30, 90), np.uint8)]


# ---------------------------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("method,flt", [("bicubic", 3), ("bilinear", 2)])
@pytest.mark.parametrize("src,dst", [((37, 53), (64, 32)), ((31, 200), (64, 320)), ((64, 64), (64, 96)),
                                     ((5, 7), (32, 32)), ((80, 100), (64, 32)), ((120, 90), (120, 40))])
def test_uint8_resize_is_bit_exact_with_pillow(method, flt, src, dst):
    # Cases where the height is not scaled down more than the width: Pillow 13 runs the horizontal pass first
    # there, as PIL always did (python-pillow/Pillow#9549 moved the other case to vertical-first).
    img = np.random.default_rng(sum(src)).integers(0, 256, src + (3,), dtype=np.uint8)
    want = np.asarray(PIL.fromarray(img).resize(dst[::-1], resample=flt))
    np.testing.assert_array_equal(resize(img, dst, method), want)


def test_pillow_13_vertical_first_order_is_available():
    img = np.random.default_rng(0).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    want = np.asarray(PIL.fromarray(img).resize((64, 32), resample=3))  # height shrinks 3.1x, width 1.25x
    got_vh = resize(img, (32, 64), order="vh")
    got_hv = resize(img, (32, 64), order="hv")
    if np.array_equal(want, got_hv):  # an older Pillow: classic order
        pytest.skip(f"Pillow {PIL.__version__} resizes horizontally first here")
    np.testing.assert_array_equal(got_vh, want)
    assert np.abs(got_hv.astype(int) - want).max() <= 8  # the order moves a few pixels by a few levels only


@given(n_in=st.integers(1, 200), n_out=st.integers(1, 200), method=st.sampled_from(["bicubic", "bilinear"]))
def test_resample_rows_sum_to_one_and_keep_constants(n_in, n_out, method):
    M = resample_weights(n_in, n_out, method)
    np.testing.assert_allclose(M.sum(axis=1), 1.0, atol=1e-12)
    flat = np.full((n_in, 3, 3), 0.25)
    np.testing.assert_allclose(resize(flat, (n_out, 3), method), 0.25, atol=1e-12)
    if n_in == n_out and method == "bilinear":
        np.testing.assert_allclose(M, np.eye(n_in), atol=1e-12)  # same size: the identity


def test_float_resize_agrees_with_uint8_path():
    img = _images()[1]
    a = resize(img, (96, 128)).astype(np.float64)
    b = resize(img.astype(np.float64), (96, 128))
    assert np.abs(np.clip(np.round(b), 0, 255) - a).max() <= 1  # uint8 rounds once per pass


# ---------------------------------------------------------------------------------------------- target size


@given(h=st.integers(1, 5000), w=st.integers(1, 5000), factor=st.sampled_from([28, 32]),
       lo=st.sampled_from([56 * 56, 65536, 128 * 32 * 32]), hi=st.sampled_from([28 * 28 * 1280, 16777216]))
def test_smart_resize_matches_hf_and_its_rule(h, w, factor, lo, hi):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    if max(h, w) / min(h, w) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
        return
    H, W = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
    assert (H, W) == hf_smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
    assert H % factor == 0 and W % factor == 0 and H >= factor and W >= factor
    assert H * W <= max(hi, factor * factor * max(1, round(max(h, w) / min(h, w))))  # the floor of one factor
    assert H * W >= lo or round(h / factor) * round(w / factor) * factor * factor > hi


@given(f=st.integers(2, 64), h=st.integers(8, 2000), w=st.integers(8, 2000))
def test_video_smart_resize_matches_hf(f, h, w):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video_resize

    if max(h, w) / min(h, w) > 150:
        return
    assert smart_resize_video(f, h, w) == hf_video_resize(f, h, w, temporal_factor=2, factor=32,
                                                         min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768)


# ---------------------------------------------------------------------------------------------- HF processor


def test_preprocess_matches_hf_qwen_image_processor_bitwise():
    """Bit for bit, per image, with one of the two PIL pass orders (Pillow 13 picks the order by a size heuristic,
    python-pillow/Pillow#9549, that is not reproduced here; both orders are otherwise the same arithmetic)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    bounds = dict(min_pixels=64 * 64, max_pixels=256 * 256)
    hf = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3, size={"shortest_edge": bounds["min_pixels"],
                                                             "longest_edge": bounds["max_pixels"]})
    imgs = _images()
    want = hf(imgs, return_tensors="np")
    got = {o: ImageProcessor(**bounds, resize_order=o).preprocess(imgs) for o in ("hv", "vh")}
    np.testing.assert_array_equal(got["hv"]["image_grid_thw"], want["image_grid_thw"])
    assert got["hv"]["pixel_values"].dtype == np.float32
    ends = np.cumsum([0] + np.prod(want["image_grid_thw"], axis=1).tolist())
    for i, (s, e) in enumerate(pairwise(ends)):
        ref = want["pixel_values"][s:e]
        assert any(np.array_equal(got[o]["pixel_values"][s:e], ref) for o in ("hv", "vh")), f"image {i}"


def test_preprocess_with_hf_class_defaults_clip_mean():
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil()  # Qwen2-VL class defaults: patch 14, CLIP mean/std, 56² .. 28²·1280 pixels
    mine = ImageProcessor(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
                          image_mean=tuple(OPENAI_CLIP_MEAN), image_std=tuple(OPENAI_CLIP_STD))
    img = _images()[1]
    want, got = hf(img, return_tensors="np"), mine.preprocess(img)
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])


# ---------------------------------------------------------------------------------------------- patchify


def test_patch_rows_are_the_image_patches_in_merge_block_order():
    P, m = 4, 2
    img = np.random.default_rng(1).standard_normal((16, 24, 3))
    rows, (t, h, w) = patchify(img[None], P, 2, m)
    assert (t, h, w) == (1, 4, 6) and rows.shape == (24, 3 * 2 * P * P)
    r, c = merge_block_coordinates(h, w, m)
    for i in range(h * w):
        patch = rows[i].reshape(3, 2, P, P)  # (C, T_p, P, P): the Conv3d kernel layout
        crop = img[r[i] * P:(r[i] + 1) * P, c[i] * P:(c[i] + 1) * P].transpose(2, 0, 1)  # [C, P, P]
        np.testing.assert_array_equal(patch[:, 0], crop)
        np.testing.assert_array_equal(patch[:, 1], crop)  # a still image fills both temporal slots


@pytest.mark.parametrize("frames", [3, 4])
def test_video_patchify_matches_hf_and_pads_with_the_last_frame(frames):
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    v = np.random.default_rng(frames).standard_normal((frames, 64, 96, 3)).astype(np.float32)
    rows, grid = patchify(v, 16, 2, 2)
    want, *want_grid = Qwen3VLVideoProcessor.patchify(None, torch.from_numpy(v.transpose(0, 3, 1, 2))[None], 16, 2, 2)
    assert grid == tuple(want_grid) == ((frames + 1) // 2, 4, 6)
    np.testing.assert_array_equal(rows, want[0].numpy())
    if frames % 2:
        last = rows[-24:].reshape(24, 3, 2, 16, 16)
        np.testing.assert_array_equal(last[:, :, 0], last[:, :, 1])  # the padded slot repeats the last frame


def test_video_preprocess_shapes_and_placeholders():
    cfg = tiny_config("multimodal")
    proc = ImageProcessor.from_vision_config(cfg.vision_config, video_min_pixels=4 * 32 * 32,
                                             video_max_pixels=16 * 32 * 32)
    video = np.random.default_rng(0).integers(0, 256, (5, 40, 60, 3), dtype=np.uint8)
    out = proc.preprocess_video(video)
    (t, h, w), = out["video_grid_thw"].tolist()
    assert t == 3 and out["pixel_values_videos"].shape == (t * h * w, cfg.vision_config.patch_dim)
    toks = expand_vision_placeholders([1, cfg.video_token_id, 2], cfg, video_grid_thw=out["video_grid_thw"],
                                      video_timestamp_tokens=[[[50], [51], [52]]])
    per_frame = h * w // 4
    assert toks.count(cfg.video_token_id) == t * per_frame
    assert toks[1:4] == [50, cfg.vision_start_token_id, cfg.video_token_id]


# ---------------------------------------------------------------------------------------------- prompt expansion


def test_placeholder_expansion_follows_the_grids():
    cfg = tiny_config("multimodal")
    grids = np.array([[1, 4, 6], [1, 2, 2]])
    prompt = [5, cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, 6,
              cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id]
    out = expand_vision_placeholders(prompt, cfg, grids)
    n = num_merged_tokens(grids).tolist()
    assert n == [6, 1]
    assert out == [5] + image_placeholder_tokens(grids[0], cfg) + [6] + image_placeholder_tokens(grids[1], cfg)
    with pytest.raises(ValueError, match="more image placeholders"):
        expand_vision_placeholders(prompt, cfg, grids[:1])
    with pytest.raises(ValueError, match="2 image and 0 video grids"):
        expand_vision_placeholders(prompt[:4], cfg, grids)
