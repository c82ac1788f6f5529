"""Multimodal prompts end to end: reference/multimodal.py and its use by reference/model.py, against Hugging Face.

HF oracle: `Qwen3_5ForConditionalGeneration` of a tiny random checkpoint (tests/hf_checkpoints.py).  HF needs
`mm_token_type_ids` with image prompts (it computes MRoPE positions from them).  Checked: the embedding rows and
MRoPE positions HF feeds its language model; logits of prompts with one image, two images of different grid sizes,
and a video; greedy generation after an image (decode positions continue with rope_delta); placeholder-count
errors; text-only prompts reduce to arange positions (hypothesis).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file

from reference.context import TextContext
from reference.image_processing import expand_vision_placeholders
from reference.multimodal import (
    TextAndVisionContext,
    VisionWeights,
    get_rope_index,
    multimodal_prefill_inputs,
    split_visual_state_dict,
)
from tests._tolerance import assert_close
from tests.hf_checkpoints import load_hf_model, make_hf_checkpoint, tiny_config

torch = pytest.importorskip("torch")

CFG = tiny_config("multimodal")
V, VID, S, E = CFG.image_token_id, CFG.video_token_id, CFG.vision_start_token_id, CFG.vision_end_token_id


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = make_hf_checkpoint(tmp_path_factory.mktemp("mm"), kind="multimodal", seed=5)
    vis, _ = split_visual_state_dict(load_file(str(d / "model.safetensors")))
    return d, load_hf_model(d), VisionWeights.from_state_dict(vis, CFG.vision_config)


@pytest.fixture(scope="module")
def ref_model(ckpt):
    from reference.model import Qwen35Model

    return Qwen35Model.from_pretrained(ckpt[0], max_batch_size=4)


def _pixels(grid, seed):
    n = int(np.prod(np.asarray(grid).reshape(-1, 3), axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, CFG.vision_config.patch_dim)).astype(np.float32)


def _prompt(text_runs, image_grid=None, video_grid=None):
    """Text runs joined by one `<vs> <pad> <ve>` per image / video (in order: images, then videos), expanded."""
    toks, k = [], 0
    n_img = 0 if image_grid is None else len(image_grid)
    for run in text_runs:
        toks += list(run)
        if k < n_img:
            toks += [S, V, E]
        elif video_grid is not None and k < n_img + len(video_grid):
            toks += [VID]
        k += 1
    return expand_vision_placeholders(toks, CFG, image_grid, video_grid)


def _case(name):
    """(tokens, TextAndVisionContext kwargs) for the named prompt."""
    if name == "one-image":
        grid = np.array([[1, 6, 4]])
        toks = _prompt([[1, 2, 3], [5, 6, 7]], grid)
        return toks, dict(pixel_values=_pixels(grid, 1), image_grid_thw=grid)
    if name == "two-images":
        grid = np.array([[1, 4, 8], [1, 6, 2]])  # different grid sizes, wide then tall
        toks = _prompt([[4, 5], [8], [9, 10, 11]], grid)
        return toks, dict(pixel_values=_pixels(grid, 2), image_grid_thw=grid)
    if name == "video":
        grid = np.array([[2, 4, 4]])  # two temporal patches: two runs of 4 tokens, each inside <vs> … <ve>
        toks = _prompt([[3, 4], [12, 13]], None, grid)
        return toks, dict(pixel_values_videos=_pixels(grid, 3), video_grid_thw=grid)
    raise KeyError(name)


def _hf_kwargs(toks, kw):
    ids = torch.tensor([toks])
    types = torch.zeros_like(ids)
    types[ids == V] = 1
    types[ids == VID] = 2
    out = dict(input_ids=ids, mm_token_type_ids=types)
    for k, v in kw.items():
        out[k] = torch.from_numpy(np.asarray(v))
    return out


# ---------------------------------------------------------------------------------------------- what HF feeds its LM


@pytest.mark.parametrize("name", ["one-image", "two-images", "video"])
def test_prefill_inputs_match_what_hf_feeds_its_language_model(ckpt, name):
    _, hf, vw = ckpt
    toks, kw = _case(name)
    pre = multimodal_prefill_inputs(TextAndVisionContext("r", toks, **kw), vw, CFG)
    seen = {}
    hook = hf.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            hf(**_hf_kwargs(toks, kw), use_cache=False)
    finally:
        hook.remove()
    placeholders = np.flatnonzero(np.isin(toks, [V, VID]))
    np.testing.assert_array_equal(pre.image_rows, placeholders)
    assert_close("scattered vision rows", pre.embeddings, seen["inputs_embeds"][0].numpy()[placeholders], "f32")
    np.testing.assert_array_equal(pre.position_ids, seen["position_ids"][:, 0].numpy())
    assert pre.rope_delta == int(hf.model.rope_deltas.reshape(-1)[0]) < 0


# ---------------------------------------------------------------------------------------------- logits, generation


@pytest.mark.parametrize("name", ["one-image", "two-images", "video"])
def test_logits_match_hf(ckpt, ref_model, name):
    _, hf, _ = ckpt
    toks, kw = _case(name)
    with torch.no_grad():
        want = hf(**_hf_kwargs(toks, kw), use_cache=False).logits[0].double().numpy()
    got = ref_model.logits([TextAndVisionContext("r", toks, **kw)])[0]
    assert_close(f"logits ({name})", want, got, "f32_logits")


def test_batch_of_image_and_text_prompts_matches_one_by_one(ref_model):
    toks1, kw1 = _case("one-image")
    toks2, kw2 = _case("two-images")
    text = [7, 8, 9, 10]
    batch = ref_model.logits([TextAndVisionContext("a", toks1, **kw1), TextContext("b", text),
                              TextAndVisionContext("c", toks2, **kw2)])
    for got, single in zip(batch, [TextAndVisionContext("a", toks1, **kw1), TextContext("b", text),
                                   TextAndVisionContext("c", toks2, **kw2)], strict=True):
        np.testing.assert_allclose(got, ref_model.logits([single])[0], rtol=0, atol=1e-10)


def test_greedy_generation_after_an_image_matches_hf(ckpt, ref_model):
    _, hf, _ = ckpt
    toks, kw = _case("one-image")
    n_new = 6
    steps = []
    hook = hf.model.language_model.register_forward_pre_hook(
        lambda m, a, k: steps.append(k["position_ids"][:, 0].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            out = hf.generate(**_hf_kwargs(toks, kw), max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)
    finally:
        hook.remove()
    want = out[0, len(toks):].tolist()
    got = ref_model.generate([TextAndVisionContext("g", toks, **kw)], max_new_tokens=n_new)[0]
    assert got == want
    # Decode positions continue at (tokens seen) + rope_delta on all three axes (docs/rope_and_mrope.md, pitfall B19 d).
    pre = multimodal_prefill_inputs(TextAndVisionContext("g", toks, **kw), ckpt[2], CFG)
    assert len(steps) == n_new
    for i, p in enumerate(steps[1:]):  # during generate HF prepends a text-position row: [4, T] = (text, t, h, w)
        np.testing.assert_array_equal(p.numpy()[-3:], pre.decode_position_ids(len(toks) + i))


def test_prefill_then_decode_equals_one_shot(ref_model):
    """Pipeline prefill of an image prompt + one decode step == stateless logits of prompt + token."""
    toks, kw = _case("two-images")
    nxt = 17
    full = ref_model.logits([TextAndVisionContext("x", toks + [nxt], **kw)])[0]
    try:
        inp = ref_model.prepare_initial_token_inputs([TextAndVisionContext("pd", toks, **kw)])
        first = ref_model.execute(inp).logits[-1]
        second = ref_model.execute(ref_model.prepare_next_token_inputs([nxt], inp)).logits[-1]
    finally:
        ref_model.release("pd")
    np.testing.assert_allclose(first, full[-2], rtol=0, atol=1e-9)
    np.testing.assert_allclose(second, full[-1], rtol=0, atol=1e-9)


def test_prefill_chunks_tile_the_prompt(ckpt):
    toks, kw = _case("two-images")
    pre = multimodal_prefill_inputs(TextAndVisionContext("x", toks, **kw), ckpt[2], CFG)
    k = int(pre.image_rows[3]) + 1  # split inside the first image's placeholder run
    rows_a, emb_a, pos_a = pre.chunk(0, k)
    rows_b, emb_b, pos_b = pre.chunk(k, len(toks))
    assert len(rows_a) == 4 and len(rows_a) + len(rows_b) == len(pre.image_rows)
    np.testing.assert_array_equal(np.concatenate([pos_a, pos_b], axis=1), pre.position_ids)
    np.testing.assert_array_equal(np.concatenate([emb_a, emb_b]), pre.embeddings)
    np.testing.assert_array_equal(np.concatenate([rows_a, rows_b + k]), pre.image_rows)
    with pytest.raises(ValueError, match="outside the prompt"):
        pre.chunk(0, len(toks) + 1)


# ---------------------------------------------------------------------------------------------- errors


def test_placeholder_count_mismatch_is_a_clear_error(ckpt):
    vw = ckpt[2]
    toks, kw = _case("one-image")
    with pytest.raises(ValueError, match=r"image features and image tokens do not match.*5 image placeholder"):
        multimodal_prefill_inputs(TextAndVisionContext("r", [t for i, t in enumerate(toks) if i != 5], **kw),
                                  vw, CFG)
    with pytest.raises(ValueError, match=r"7 image placeholder"):
        multimodal_prefill_inputs(TextAndVisionContext("r", toks[:5] + [V] + toks[5:], **kw), vw, CFG)
    with pytest.raises(ValueError, match="no image pixels"):
        multimodal_prefill_inputs(TextContext("r", toks), vw, CFG)
    with pytest.raises(ValueError, match="pixel values have shape"):
        multimodal_prefill_inputs(TextAndVisionContext("r", toks, pixel_values=kw["pixel_values"][:-4],
                                                       image_grid_thw=kw["image_grid_thw"]), vw, CFG)
    with pytest.raises(ValueError, match="must be given together"):
        TextAndVisionContext("r", toks, pixel_values=kw["pixel_values"])


def test_model_reports_placeholder_mismatch(ref_model):
    toks, kw = _case("one-image")
    with pytest.raises(ValueError, match="do not match"):
        ref_model.logits([TextAndVisionContext("r", toks[:-3] + [V] + toks[-3:], **kw)])


# ---------------------------------------------------------------------------------------------- text-only


@given(tokens=st.lists(st.integers(0, CFG.vocab_size - 1).filter(lambda t: t not in (V, VID)), min_size=1,
                       max_size=40))
def test_text_only_positions_reduce_to_arange(tokens):
    pos, delta = get_rope_index(tokens, config=CFG)
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(len(tokens)), (3, len(tokens))))
    assert delta == 0
    pre = multimodal_prefill_inputs(TextContext("t", tokens), None, CFG)
    np.testing.assert_array_equal(pre.position_ids, pos)
    assert pre.rope_delta == 0 and pre.image_rows.size == 0 and pre.embeddings.shape == (0, CFG.hidden_size)


# ---------------------------------------------------------------------------------------------- an image's journey


def test_rgb_image_to_logits_through_the_numpy_preprocessor(ckpt, ref_model):
    """RGB array → ImageProcessor → expanded prompt → reference model, against HF fed the same pixels."""
    from reference.image_processing import ImageProcessor

    _, hf, _ = ckpt
    proc = ImageProcessor.from_vision_config(CFG.vision_config, min_pixels=8 * 8 * 4, max_pixels=24 * 24)
    rng = np.random.default_rng(11)
    imgs = [rng.integers(0, 256, (30, 17, 3), dtype=np.uint8), rng.integers(0, 256, (9, 40, 3), dtype=np.uint8)]
    feats = proc.preprocess(imgs)
    grid = feats["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 4], [1, 2, 10]]  # 32x16 and 8x40 pixels after smart_resize (factor 8)
    toks = _prompt([[1, 2], [3], [4, 5]], grid)
    kw = dict(pixel_values=feats["pixel_values"], image_grid_thw=grid)
    with torch.no_grad():
        want = hf(**_hf_kwargs(toks, kw), use_cache=False).logits[0].double().numpy()
    got = ref_model.logits([TextAndVisionContext("j", toks, **kw)])[0]
    assert_close("logits (preprocessed images)", want, got, "f32_logits")


@pytest.mark.parametrize("name", ["two-images", "video"])
def test_optimized_prefill_inputs_match_reference(ckpt, name):
    from optimized.vision import VisionTower
    from optimized.vision import multimodal_prefill_inputs as opt_prefill

    d, _, vw = ckpt
    vis, _ = split_visual_state_dict(load_file(str(d / "model.safetensors")))
    toks, kw = _case(name)
    ref = multimodal_prefill_inputs(TextAndVisionContext("r", toks, **kw), vw, CFG)
    kw_t = {k: torch.from_numpy(np.asarray(v)) if k.startswith("pixel") else v for k, v in kw.items()}
    got = opt_prefill(TextAndVisionContext("r", toks, **kw_t), VisionTower.from_state_dict(vis, CFG.vision_config),
                      CFG)
    assert torch.is_tensor(got.embeddings) and got.embeddings.dtype == torch.float32
    np.testing.assert_array_equal(got.image_rows, ref.image_rows)
    np.testing.assert_array_equal(got.position_ids, ref.position_ids)
    assert got.rope_delta == ref.rope_delta
    assert_close(f"optimized prefill embeddings ({name})", ref.embeddings, got.embeddings, "f32")
    with pytest.raises(ValueError, match="do not match"):
        extra = V if name == "two-images" else VID
        opt_prefill(TextAndVisionContext("r", toks[:-4] + [extra] + toks[-4:], **kw_t), None, CFG)
