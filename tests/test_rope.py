"""reference/rope.py: partial RoPE, interleaved MRoPE, position bookkeeping; get_rope_index (reference/multimodal.py).

Guards docs/pitfalls.md, B18 (partial rotary: frequencies over R, channels >= R untouched, large positions) and B19
(interleaved vs sectioned MRoPE, text-only blind spot, non-contiguous [3, T] rows, chunked prefill / decode delta).
The HF cases (`@pytest.mark.hf`) compare with transformers' qwen3_5 rotary embedding, apply_rotary_pos_emb and
Qwen3_5Model.get_rope_index.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.multimodal import get_rope_index, mm_token_types, vision_position_ids
from reference.rope import (
    apply_partial_rope,
    decode_position_ids,
    inv_freq,
    mrope_angles,
    mrope_axis_of_frequency,
    mrope_cos_sin,
    rope_cos_sin,
    text_position_ids,
)
from tests._tolerance import assert_close

QWEN35_SECTION = (11, 11, 10)  # published geometry: R = 64, R/2 = 32 frequencies
THETA = 1e7


# ---------------------------------------------------------------------------------------------------- inv_freq


@given(half=st.integers(1, 64), theta=st.sampled_from([1e4, 1e6, 1e7]))
def test_inv_freq_runs_over_rotary_dim(half, theta):
    """len == R/2 and inv_freq[j] = θ^(−2j/R) with R the rotary dim, not head_dim (B18)."""
    R = 2 * half
    f = inv_freq(R, theta)
    assert f.shape == (half,)
    expected = np.array([theta ** (-2.0 * j / R) for j in range(half)])
    assert_close("inv_freq", expected, f, 1e-14)
    assert f[0] == 1.0
    # The slowest frequency is θ^(−(R−2)/R) <= θ^(−1/2) (equal at R = 4); a head_dim exponent (R replaced by
    # D_h = 4R) would give θ^(−(R−2)/4R) > θ^(−1/4), well above the bound.
    if half > 1:
        assert f[-1] <= theta ** (-0.5) * (1 + 1e-12)


def test_inv_freq_float32_mirrors_fp32_arithmetic():
    f32 = inv_freq(64, THETA, dtype=np.float32)
    f64 = inv_freq(64, THETA)
    assert f32.dtype == np.float32 and f32.shape == (32,)
    assert np.max(np.abs(f32 / f64 - 1.0)) < 1e-6


def test_inv_freq_rejects_bad_dims():
    for bad in (0, 3, -2):
        with pytest.raises(ValueError, match="rotary_dim"):
            inv_freq(bad, THETA)


# ---------------------------------------------------------------------------------------------------- axis table


def test_axis_table_qwen35_interleaved_and_sectioned():
    """Interleaved: t owns {0,3,…,30}, h {1,4,…,31}, w {2,5,…,29}; the sectioned layout is 11/11/10 blocks."""
    inter = mrope_axis_of_frequency(QWEN35_SECTION, interleaved=True)
    assert set(np.flatnonzero(inter == 0)) == set(range(0, 32, 3))
    assert set(np.flatnonzero(inter == 1)) == set(range(1, 32, 3))
    assert set(np.flatnonzero(inter == 2)) == set(range(2, 30, 3))
    chunk = mrope_axis_of_frequency(QWEN35_SECTION, interleaved=False)
    assert list(chunk) == [0] * 11 + [1] * 11 + [2] * 10
    # The two layouts agree on only 10 of the 32 frequencies (j = 0,3,6,9 | 13,16,19 | 23,26,29).
    assert int(np.sum(inter != chunk)) == 22


def test_axis_table_rejects_unrealisable_interleaving():
    with pytest.raises(ValueError, match="interleaved"):
        mrope_axis_of_frequency((1, 5, 1), interleaved=True)


# ---------------------------------------------------------------------------------------------------- text == 1-D


@given(
    T=st.integers(1, 40),
    start=st.sampled_from([0, 1, 17, 10_000, 123_457, 262_143]),
    half=st.sampled_from([4, 16, 32]),
    interleaved=st.booleans(),
)
def test_text_only_mrope_is_exactly_1d_rope(T, start, half, interleaved):
    """t = h = w: MRoPE (either layout) is bit-identical to 1-D RoPE (B19 text blind spot)."""
    section = {4: (2, 1, 1), 16: (6, 5, 5), 32: QWEN35_SECTION}[half]
    f = inv_freq(2 * half, THETA)
    pos = text_position_ids(T, start)
    assert pos.shape == (3, T) and np.all(pos == pos[0]) and pos[0, 0] == start
    c, s = mrope_cos_sin(pos, f, section, interleaved=interleaved)
    c1, s1 = rope_cos_sin(np.arange(start, start + T), f)
    assert np.array_equal(c, c1) and np.array_equal(s, s1)


# ---------------------------------------------------------------------------------------------------- discriminating


def _independent_interleaved_angles(t, h, w, R, theta):
    """Per-frequency angles from the interleaved layout's explicit sets for (11, 11, 10), with Python floats."""
    out = []
    for j in range(R // 2):
        if j % 3 == 1 and j <= 31:
            p = h
        elif j % 3 == 2 and j <= 29:
            p = w
        else:
            p = t
        out.append(p * theta ** (-2.0 * j / R))
    return out


@given(
    t=st.integers(0, 300_000), dh=st.integers(1, 5000), dw=st.integers(1, 5000),
)
def test_discriminating_mrope_interleaved_matches_independent_formula(t, dh, dw):
    """t ≠ h ≠ w: the interleaved table matches a per-frequency computation; the sectioned one does not (B19)."""
    h, w = t + dh, t + dh + dw
    f = inv_freq(64, THETA)
    pos = np.array([[t], [h], [w]])
    c, s = mrope_cos_sin(pos, f, QWEN35_SECTION, interleaved=True)
    ang = _independent_interleaved_angles(t, h, w, 64, THETA)
    c_ref = np.array([math.cos(a) for a in ang * 2])[None]
    s_ref = np.array([math.sin(a) for a in ang * 2])[None]
    np.testing.assert_allclose(c, c_ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-9)
    # The Qwen2-VL sectioned layout assigns other axes to 22 of the 32 angles: it must differ here.
    theta_int = mrope_angles(pos, f, QWEN35_SECTION, interleaved=True)
    theta_sec = mrope_angles(pos, f, QWEN35_SECTION, interleaved=False)
    assert np.sum(theta_int != theta_sec) >= 10


def test_each_axis_row_drives_its_own_frequencies():
    """Perturb one row of [3, T] at a time: only that axis's frequencies change."""
    f = inv_freq(64, THETA)
    base = np.array([[3, 4, 5], [30, 40, 50], [300, 400, 500]])
    axis = mrope_axis_of_frequency(QWEN35_SECTION)
    a0 = mrope_angles(base, f, QWEN35_SECTION)
    for row in range(3):
        moved = base.copy()
        moved[row] += 7
        changed = np.any(mrope_angles(moved, f, QWEN35_SECTION) != a0, axis=0)
        assert np.array_equal(changed, axis == row)


# ---------------------------------------------------------------------------------------------------- apply


@given(
    T=st.integers(1, 9), heads=st.integers(1, 4), half=st.integers(1, 8), extra=st.integers(0, 24),
    dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31 - 1),
)
def test_partial_rope_passes_other_channels_bit_exactly(T, heads, half, extra, dtype, seed):
    """Channels >= R are copied bit for bit; rotated pairs (i, i + R/2) are 2-D rotations (B18)."""
    R = 2 * half
    D = R + extra
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((T, heads, D)) * 10.0).astype(dtype)
    pos = rng.integers(0, 300_000, size=(3, T))
    c, s = mrope_cos_sin(pos, inv_freq(R, THETA), (half - 2 * (half // 3), half // 3, half // 3))
    y = apply_partial_rope(x, c, s)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert np.array_equal(y[..., R:].view(np.uint8), x[..., R:].view(np.uint8))
    # Independent per-pair rotation, in float64.
    x64, c64, s64 = x.astype(np.float64), c[:, None, :half], s[:, None, :half]
    a, b = x64[..., :half], x64[..., half:R]
    expect = np.concatenate([a * c64 - b * s64, b * c64 + a * s64], axis=-1)
    assert_close("rope pairs", expect, y[..., :R], 1e-6 if dtype == np.float32 else 1e-13)


@given(
    p=st.integers(10_000, 262_144), d=st.integers(0, 2000), seed=st.integers(0, 2**31 - 1),
)
def test_large_positions_keep_relative_property(p, d, seed):
    """At positions 1e4–2.6e5, ⟨RoPE(q, p+d), RoPE(k, p)⟩ == ⟨RoPE(q, d), RoPE(k, 0)⟩ in float64 (B18)."""
    rng = np.random.default_rng(seed)
    D, R = 256, 64
    q, k = rng.standard_normal((1, 1, D)), rng.standard_normal((1, 1, D))
    f = inv_freq(R, THETA)

    def rot(x, pos):
        c, s = mrope_cos_sin(text_position_ids(1, pos), f, QWEN35_SECTION)
        return apply_partial_rope(x, c, s)

    far = float(np.sum(rot(q, p + d) * rot(k, p)))
    near = float(np.sum(rot(q, d) * rot(k, 0)))
    # Angles up to 2.6e5 rad carry ~3e-11 rad of float64 rounding; the dot products agree to ~1e-9.
    assert abs(far - near) <= 1e-8 * (1.0 + abs(near))


def test_large_positions_table_matches_python_math():
    f = inv_freq(64, THETA)
    pos = np.array([10_000, 65_537, 131_071, 262_143])
    c, s = mrope_cos_sin(pos, f, QWEN35_SECTION)
    for i, p in enumerate(pos):
        for j in range(32):
            a = float(p) * THETA ** (-2.0 * j / 64)
            assert abs(c[i, j] - math.cos(a)) < 1e-9 and abs(c[i, j + 32] - math.cos(a)) < 1e-9
            assert abs(s[i, j] - math.sin(a)) < 1e-9


def test_apply_partial_rope_shape_errors():
    c, s = rope_cos_sin(np.arange(3), inv_freq(8, THETA))
    with pytest.raises(ValueError, match="head_dim"):
        apply_partial_rope(np.zeros((3, 2, 6)), c, s)
    with pytest.raises(ValueError, match="rows"):
        apply_partial_rope(np.zeros((4, 2, 16)), c, s)
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_cos_sin(text_position_ids(3), inv_freq(8, THETA), (2, 2, 2))
    with pytest.raises(ValueError, match=r"\[3, T\]"):
        mrope_cos_sin(np.zeros((2, 3), dtype=np.int64), inv_freq(8, THETA), (2, 1, 1))


# ---------------------------------------------------------------------------------------------------- strides


@given(T=st.integers(1, 30), step=st.integers(2, 4), seed=st.integers(0, 2**31 - 1))
def test_non_contiguous_position_rows(T, step, seed):
    """Slices of a larger [3, max_tokens] buffer, transposed [T, 3] storage: same tables as a packed copy (B19)."""
    rng = np.random.default_rng(seed)
    buf = rng.integers(0, 100_000, size=(3, T * step + 5))
    view = buf[:, 3 : 3 + T * step : step]  # non-contiguous rows and columns
    assert not view.flags.c_contiguous
    f = inv_freq(64, THETA)
    ref = mrope_cos_sin(np.ascontiguousarray(view), f, QWEN35_SECTION)
    got = mrope_cos_sin(view, f, QWEN35_SECTION)
    assert np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1])
    tview = np.ascontiguousarray(view.T).T  # Fortran-ordered [3, T]
    got_t = mrope_cos_sin(tview, f, QWEN35_SECTION)
    assert np.array_equal(ref[0], got_t[0])
    # Row 1 and row 2 really are read: replacing them by row 0 changes the table.
    only_t = np.broadcast_to(view[0], view.shape)
    assert not np.array_equal(mrope_cos_sin(only_t, f, QWEN35_SECTION)[0], ref[0]) or np.all(view == view[0])


# ---------------------------------------------------------------------------------------------------- get_rope_index

IMG, VID = 90, 91


def _prompt(parts):
    """parts: list of ("text", n) / ("img", n) / ("vid", n) -> token ids (text tokens count from 1)."""
    ids, nxt = [], 1
    for kind, n in parts:
        if kind == "text":
            ids += list(range(nxt, nxt + n))
            nxt += n
        else:
            ids += [IMG if kind == "img" else VID] * n
    return np.array(ids, dtype=np.int64)


@given(T=st.integers(0, 50))
def test_get_rope_index_text_only_is_arange(T):
    ids = np.arange(1, T + 1)
    pos, delta = get_rope_index(ids, image_token_id=IMG, video_token_id=VID)
    assert pos.shape == (3, T) and delta == 0
    assert np.array_equal(pos, np.broadcast_to(np.arange(T), (3, T)))


def test_get_rope_index_two_images_of_different_grids():
    """[text 3][image 4x6 patches -> 2x3 tokens][text 2][image 2x8 -> 1x4][text 1], hand-computed."""
    ids = _prompt([("text", 3), ("img", 6), ("text", 2), ("img", 4), ("text", 1)])
    grids = np.array([[1, 4, 6], [1, 2, 8]])
    pos, delta = get_rope_index(ids, image_grid_thw=grids, image_token_id=IMG, video_token_id=VID)
    t = [0, 1, 2] + [3] * 6 + [6, 7] + [8] * 4 + [12]
    h = [0, 1, 2] + [3, 3, 3, 4, 4, 4] + [6, 7] + [8, 8, 8, 8] + [12]
    w = [0, 1, 2] + [3, 4, 5, 3, 4, 5] + [6, 7] + [8, 9, 10, 11] + [12]
    assert np.array_equal(pos, np.array([t, h, w]))
    # cur advances by max(gh, gw)/2 = 3 after image 1 and 4 after image 2.
    assert delta == 12 + 1 - len(ids) == -3
    # Same answer from mm_token_type_ids instead of token ids.
    pos2, delta2 = get_rope_index(ids, mm_token_type_ids=mm_token_types(ids, IMG, VID), image_grid_thw=grids)
    assert np.array_equal(pos, pos2) and delta == delta2


def test_get_rope_index_video_is_split_per_frame():
    """A video (gt=2, 4x4) is two frame runs of 4 tokens, separated by timestamp text; each frame has t = cur."""
    ids = _prompt([("text", 2), ("vid", 4), ("text", 3), ("vid", 4), ("text", 1)])
    pos, delta = get_rope_index(ids, video_grid_thw=[[2, 4, 4]], image_token_id=IMG, video_token_id=VID)
    def frame(c):
        return np.array([[c] * 4, [c, c, c + 1, c + 1], [c, c + 1, c, c + 1]])
    expect = np.concatenate(
        [text_position_ids(2, 0), frame(2), text_position_ids(3, 4), frame(7), text_position_ids(1, 9)], axis=1)
    assert np.array_equal(pos, expect)
    assert delta == 10 - len(ids)
    # A video whose frames are not separated by text does not match the per-frame split: clear error.
    bad = _prompt([("text", 1), ("vid", 8), ("text", 1)])
    with pytest.raises(ValueError, match="video frame run"):
        get_rope_index(bad, video_grid_thw=[[2, 4, 4]], video_token_id=VID, image_token_id=IMG)


def test_get_rope_index_reads_config_and_validates():
    from reference.config import Qwen35Config

    cfg = Qwen35Config.tiny(model_type="qwen3_5")  # multimodal tiny: image 90, video 91
    ids = np.array([5, cfg.image_token_id, cfg.image_token_id, cfg.image_token_id, cfg.image_token_id, 6])
    pos, delta = get_rope_index(ids, image_grid_thw=[[1, 4, 4]], config=cfg)
    assert delta == 1 + 2 + 1 - 6 and pos[0, -1] == 3
    with pytest.raises(ValueError, match="grid"):
        get_rope_index(ids, image_grid_thw=[[1, 4, 6]], config=cfg)  # 6 merged tokens, run has 4
    with pytest.raises(ValueError, match="more image runs"):
        get_rope_index(ids, config=cfg)
    with pytest.raises(ValueError, match="more image grids"):
        get_rope_index(ids, image_grid_thw=[[1, 4, 4], [1, 2, 2]], config=cfg)


@given(
    n_text=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    grids=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4)), min_size=1, max_size=3),
    n_new=st.integers(1, 6),
    data=st.data(),
)
def test_chunked_prefill_and_decode_positions(n_text, grids, n_new, data):
    """Chunks of a one-shot get_rope_index are the positions of a chunked prefill; text appended after the
    prompt continues at past_len + i + rope_delta (B19 (d))."""
    parts, thw = [("text", n_text[0])], []
    for i, (gh2, gw2) in enumerate(grids[: len(n_text) - 1]):
        parts += [("img", gh2 * gw2), ("text", n_text[i + 1])]
        thw.append((1, 2 * gh2, 2 * gw2))
    prompt = _prompt(parts)
    pos, delta = get_rope_index(prompt, image_grid_thw=thw, image_token_id=IMG, video_token_id=VID)
    assert delta <= 0
    # Extending the prompt by n_new text tokens and recomputing == continuing with the stored delta.
    ext = np.concatenate([prompt, np.arange(500, 500 + n_new)])
    pos_ext, delta_ext = get_rope_index(ext, image_grid_thw=thw, image_token_id=IMG, video_token_id=VID)
    assert np.array_equal(pos_ext[:, : len(prompt)], pos)
    assert np.array_equal(pos_ext[:, len(prompt):], decode_position_ids(len(prompt), n_new, delta))
    assert delta_ext == delta
    # One decode step at a time gives the same positions.
    steps = np.concatenate([decode_position_ids(len(prompt) + i, 1, delta) for i in range(n_new)], axis=1)
    assert np.array_equal(steps, pos_ext[:, len(prompt):])
    # Chunked prefill: any split of the one-shot positions feeds identical cos/sin rows.
    cut = data.draw(st.integers(0, len(ext)))
    f = inv_freq(8, THETA)
    c_full = mrope_cos_sin(pos_ext, f, (2, 1, 1))[0]
    c_a = mrope_cos_sin(pos_ext[:, :cut], f, (2, 1, 1))[0]
    c_b = mrope_cos_sin(pos_ext[:, cut:], f, (2, 1, 1))[0]
    assert np.array_equal(np.concatenate([c_a, c_b]), c_full)


def test_vision_position_ids_row_major():
    p = vision_position_ids(10, (2, 4, 6), 2)  # Lt=2, Lh=2, Lw=3
    assert p.shape == (3, 12)
    assert list(p[0]) == [10] * 6 + [11] * 6
    assert list(p[1]) == [10, 10, 10, 11, 11, 11] * 2
    assert list(p[2]) == [10, 11, 12] * 4


# ---------------------------------------------------------------------------------------------------- HF oracle


def _hf_text_config(**kw):
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=256, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=THETA, partial_rotary_factor=0.25,
                             mrope_section=list(QWEN35_SECTION), mrope_interleaved=True),
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    )
    base.update(kw)
    return Qwen3_5TextConfig(**base)


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["text", "mrope", "large"])
def test_hf_rotary_embedding_tables(kind):
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    rng = np.random.default_rng(0)
    T = 24
    if kind == "text":
        pos = text_position_ids(T, 5)
    elif kind == "mrope":
        pos = np.stack([np.full(T, 7), rng.integers(7, 40, T), rng.integers(7, 40, T)])
    else:
        pos = rng.integers(10_000, 262_144, size=(3, T))
    emb = Qwen3_5TextRotaryEmbedding(_hf_text_config())
    x = torch.zeros(1, dtype=torch.float32)
    cos_hf, sin_hf = emb(x, torch.from_numpy(pos)[:, None, :])  # [1, T, R]
    cos_hf, sin_hf = cos_hf[0].numpy(), sin_hf[0].numpy()
    # float32 path mirrors HF's fp32 arithmetic; numpy's and torch's fp32 pow differ by 1 ulp on a few inv_freq
    # entries, which moves an angle by at most ~1 ulp of the angle (measured 7.7e-3 at 2.6e5, 1.9e-6 below 40).
    c32, s32 = mrope_cos_sin(pos, inv_freq(64, THETA, dtype=np.float32), QWEN35_SECTION)
    angle_ulp = np.spacing(np.float32(pos.max() * 1.0))
    err32 = max(np.abs(c32 - cos_hf).max(), np.abs(s32 - sin_hf).max())
    assert err32 <= 4 * angle_ulp + 1e-6, err32
    # float64 oracle vs HF fp32: HF's error is the fp32 rounding of the angle pos·inv_freq (≈ pos · 2^-24 rad, so
    # ~1e-2 at 2.6e5: B18's reason to test far positions), plus rounding of inv_freq itself.
    c64, s64 = mrope_cos_sin(pos, inv_freq(64, THETA), QWEN35_SECTION)
    err64 = max(np.abs(c64 - cos_hf).max(), np.abs(s64 - sin_hf).max())
    budget = 4.0 * max(int(pos.max()), 1) * 2.0**-24 + 2e-7
    assert err64 <= budget, (err64, budget)


@pytest.mark.hf
def test_hf_apply_rotary_pos_emb():
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

    rng = np.random.default_rng(1)
    T, nh, nkv, D = 9, 4, 2, 256
    q = rng.standard_normal((T, nh, D)).astype(np.float32)
    k = rng.standard_normal((T, nkv, D)).astype(np.float32)
    pos = np.stack([np.arange(T) + 3, rng.integers(0, 50, T), rng.integers(0, 50, T)])
    c, s = mrope_cos_sin(pos, inv_freq(64, THETA, dtype=np.float32), QWEN35_SECTION)
    tq = torch.from_numpy(q).permute(1, 0, 2)[None]  # [1, nh, T, D]
    tk = torch.from_numpy(k).permute(1, 0, 2)[None]
    q_hf, k_hf = apply_rotary_pos_emb(tq, tk, torch.from_numpy(c)[None], torch.from_numpy(s)[None])
    q_hf = q_hf[0].permute(1, 0, 2).numpy()
    k_hf = k_hf[0].permute(1, 0, 2).numpy()
    assert_close("q rope vs HF", q_hf, apply_partial_rope(q, c, s), "f32")
    assert_close("k rope vs HF", k_hf, apply_partial_rope(k, c, s), "f32")
    # float64 oracle on the same fp32 inputs
    c64, s64 = mrope_cos_sin(pos, inv_freq(64, THETA), QWEN35_SECTION)
    assert_close("q rope f64 vs HF", apply_partial_rope(q.astype(np.float64), c64, s64), q_hf, "f32")


@pytest.mark.hf
def test_hf_get_rope_index():
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5Config
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model

    cfg = Qwen3_5Config(
        text_config=_hf_text_config(head_dim=16, num_attention_heads=2, num_key_value_heads=1, hidden_size=16,
                                    intermediate_size=16,
                                    rope_parameters=dict(rope_type="default", rope_theta=THETA,
                                                         partial_rotary_factor=0.5, mrope_section=[2, 1, 1])),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           patch_size=4, num_position_embeddings=16),
        image_token_id=IMG, video_token_id=VID,
    )
    model = Qwen3_5Model(cfg).eval()
    ids = _prompt([("text", 3), ("img", 6), ("text", 2), ("vid", 4), ("text", 2), ("vid", 4), ("text", 1),
                   ("img", 4), ("text", 2)])
    types = mm_token_types(ids, IMG, VID)
    img_g = np.array([[1, 4, 6], [1, 4, 4]])
    vid_g = np.array([[2, 4, 4]])
    with torch.no_grad():
        pos_hf, delta_hf = model.get_rope_index(
            torch.from_numpy(ids)[None], mm_token_type_ids=torch.from_numpy(types)[None].int(),
            image_grid_thw=torch.from_numpy(img_g), video_grid_thw=torch.from_numpy(vid_g))
    pos, delta = get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=img_g, video_grid_thw=vid_g)
    assert np.array_equal(pos, pos_hf[:, 0].numpy())
    assert delta == int(delta_hf[0, 0])
