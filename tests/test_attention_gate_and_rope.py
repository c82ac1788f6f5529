"""reference/attention.py: gated full attention with partial MRoPE and a KV cache.

Guards pitfall B2 (per-head [q | gate] split, gate after attention), GQA head mapping, causal masking,
prefill + decode == one shot (B11 for the attention half), ragged batch == per-sequence loop bitwise (B12/B13),
q/k norm before RoPE.  The HF case compares with transformers' Qwen3_5Attention (eager, fp32).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.attention import (
    AttentionWeights,
    causal_attention,
    gated_attention,
    split_q_gate,
)
from reference.config import Qwen35Config
from reference.norms import rms_norm
from reference.rope import apply_partial_rope, inv_freq, mrope_cos_sin, text_position_ids
from tests._tolerance import assert_close


def tiny(**kw):
    """nh = 4, nkv = 2, hd = 16, H = 32, R = 8, mrope (2, 1, 1)."""
    return Qwen35Config.tiny(**kw)


def rand_x(seed, T, H):
    return np.random.default_rng(seed).standard_normal((T, H))


def rand_pos(seed, T, start=0):
    """MRoPE-like positions with t ≠ h ≠ w."""
    rng = np.random.default_rng(seed)
    base = start + np.arange(T)
    return np.stack([base, base + rng.integers(0, 5, T), base + rng.integers(0, 9, T)])


def naive_attention(q, k, v, scale, q_offset):
    """Loop form: query i (absolute q_offset + i), head h reads KV head h // (nh / nkv)."""
    T, nh, hd = q.shape
    S, nkv, _ = k.shape
    g = nh // nkv
    out = np.zeros_like(q)
    for i in range(T):
        for h in range(nh):
            kv = h // g
            n = q_offset + i + 1
            s = np.array([scale * float(np.dot(q[i, h], k[j, kv])) for j in range(n)])
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, h] = sum(p[j] * v[j, kv] for j in range(n))
    return out


# ---------------------------------------------------------------------------------------------------- q / gate split


def test_split_routes_every_value_per_head():
    """A q_proj whose rows encode (head, half, channel): each value must land in its own q/gate slot (B2)."""
    nh, hd, H = 3, 5, 4
    codes = np.array([1000 * h + 100 * half + c for h in range(nh) for half in range(2) for c in range(hd)], float)
    Wq = np.zeros((2 * nh * hd, H))
    Wq[:, 0] = codes  # x = e_0 picks out column 0 -> P = codes
    x = np.zeros((2, H))
    x[:, 0] = 1.0
    q, gate = split_q_gate(x @ Wq.T, nh, hd)
    for h in range(nh):
        for c in range(hd):
            assert q[1, h, c] == 1000 * h + c
            assert gate[1, h, c] == 1000 * h + 100 + c
    # The block split ([all q | all gates]) would put head 1's gate rows into q: guard against it.
    block_q = (x @ Wq.T)[:, : nh * hd].reshape(2, nh, hd)
    assert not np.array_equal(block_q, q)


def _gate_weights(cfg, seed, gate_logit_per_head):
    """Random weights, but the gate rows of q_proj read only x[:, 0] (== 1): gate logits are per-head constants."""
    w = AttentionWeights.random(cfg, seed)
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    Wq = w.q_proj.reshape(nh, 2, hd, cfg.hidden_size).copy()  # [nh, (q, gate), hd, H]
    Wq[:, 1] = 0.0
    Wq[:, 1, :, 0] = np.asarray(gate_logit_per_head, float)[:, None]
    Wq[:, 0, :, 0] = 0.0  # q does not read the constant channel
    w.q_proj = Wq.reshape(2 * nh * hd, cfg.hidden_size)
    return w


def _x_with_constant(seed, T, H):
    x = rand_x(seed, T, H)
    x[:, 0] = 1.0
    return x


def test_gate_selects_heads_through_the_whole_layer():
    """Gate logits +60 on heads {0, 2} and −60 on {1, 3}: only heads 0 and 2 reach o_proj (o_proj = I)."""
    cfg = tiny(hidden_size=64)  # nh·hd = 64 = H so o_proj can be the identity
    w = _gate_weights(cfg, 1, [60.0, -60.0, 60.0, -60.0])
    w.o_proj = np.eye(64)
    x = _x_with_constant(2, 6, 64)
    y, _ = gated_attention(x, w, cfg)
    y_plain, _ = gated_attention(x, w.without_gate(cfg), cfg.replace(attn_output_gate=False))
    hd = cfg.head_dim
    for h in range(4):
        blk = slice(h * hd, (h + 1) * hd)
        if h % 2 == 0:
            assert_close(f"head {h} open", y_plain[:, blk], y[:, blk], 1e-12)
        else:
            assert np.max(np.abs(y[:, blk])) < 1e-20
    # A block split would gate with q rows (which are ~N(0, 1) here), not with ±60: the pattern would break.


def test_huge_gate_equals_ungated_attention():
    """σ(gate) = 1 exactly: the gated layer equals the ungated one (and an independent loop form)."""
    cfg = tiny()
    w = _gate_weights(cfg, 3, [1e3] * 4)
    x = _x_with_constant(4, 7, cfg.hidden_size)
    y, kv = gated_attention(x, w, cfg)
    y_plain, _ = gated_attention(x, w.without_gate(cfg), cfg.replace(attn_output_gate=False))
    assert np.array_equal(y, y_plain)
    # Independent assembly from the parts: projections, norm, rope, loop attention, o_proj.
    nh, nkv, hd = 4, 2, 16
    q = (x @ w.q_proj.T).reshape(7, nh, 2 * hd)[..., :hd]
    k = (x @ w.k_proj.T).reshape(7, nkv, hd)
    v = (x @ w.v_proj.T).reshape(7, nkv, hd)
    c, s = mrope_cos_sin(text_position_ids(7), inv_freq(cfg.rotary_dim, cfg.rope_theta), cfg.mrope_section)
    q = apply_partial_rope(rms_norm(q, w.q_norm, cfg.rms_norm_eps), c, s)
    k = apply_partial_rope(rms_norm(k, w.k_norm, cfg.rms_norm_eps), c, s)
    o = naive_attention(q, k, v, hd**-0.5, 0).reshape(7, nh * hd)
    assert_close("gated_attention vs loop", o @ w.o_proj.T, y, "f64_exact")
    assert_close("cached k", k, kv[0][0], "f64_exact")


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 8))
def test_gate_is_applied_after_attention(seed, T):
    """With o_proj = I: y = o_ungated ⊙ σ(gate_t) token by token (a gate applied to v before attention would mix
    σ(gate_s) over keys s)."""
    cfg = tiny(hidden_size=64)
    w = AttentionWeights.random(cfg, seed)
    w.o_proj = np.eye(64)
    x = rand_x(seed + 1, T, 64)
    y, _ = gated_attention(x, w, cfg)
    y_plain, _ = gated_attention(x, w.without_gate(cfg), cfg.replace(attn_output_gate=False))
    _, gate = split_q_gate(x @ w.q_proj.T, 4, 16)
    sig = 1.0 / (1.0 + np.exp(-gate.reshape(T, 64)))
    assert_close("o ⊙ σ(gate)", y_plain * sig, y, "f64_exact")


def test_block_split_would_be_wrong():
    """The interleaved split and a block split give different outputs (regression guard)."""
    cfg = tiny()
    w = AttentionWeights.random(cfg, 5)
    x = rand_x(6, 5, cfg.hidden_size)
    y, _ = gated_attention(x, w, cfg)
    nh, hd, H = 4, 16, cfg.hidden_size
    # Re-order q_proj rows so that a *correct* per-head split of the new matrix equals a block split of the old.
    blocks = w.q_proj.reshape(2, nh, hd, H)  # what a block split believes: [q heads | gate heads]
    w_block = AttentionWeights(**{**w.__dict__, "q_proj": blocks.transpose(1, 0, 2, 3).reshape(2 * nh * hd, H)})
    y_block, _ = gated_attention(x, w_block, cfg)
    assert np.max(np.abs(y - y_block)) > 1e-3


# ---------------------------------------------------------------------------------------------------- GQA, causal


def test_gqa_kv_head_serves_consecutive_query_heads():
    """nh = 4, nkv = 2: zero the V of KV head 1 -> query heads 2 and 3 output zero, heads 0 and 1 do not."""
    cfg = tiny(hidden_size=64)
    w = AttentionWeights.random(cfg, 7)
    w.v_proj[16:32] = 0.0  # KV head 1
    w.o_proj = np.eye(64)
    x = rand_x(8, 5, 64)
    y, _ = gated_attention(x, w, cfg)
    assert np.all(y[:, 32:] == 0.0)
    assert np.all(np.abs(y[:, :32]).max(axis=0) > 0)  # heads 0, 1 (h // 2 == 0) see KV head 0


@given(
    seed=st.integers(0, 2**31 - 1), T=st.integers(1, 6), nkv=st.sampled_from([1, 2]), g=st.sampled_from([1, 2, 3]),
    q_offset=st.integers(0, 4),
)
def test_causal_attention_matches_loop(seed, T, nkv, g, q_offset):
    rng = np.random.default_rng(seed)
    nh, hd = nkv * g, 6
    q = rng.standard_normal((T, nh, hd))
    k = rng.standard_normal((q_offset + T, nkv, hd))
    v = rng.standard_normal((q_offset + T, nkv, hd))
    got = causal_attention(q, k, v, scale=0.3, q_offset=q_offset)
    assert_close("causal_attention", naive_attention(q, k, v, 0.3, q_offset), got, "f64_exact")


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(2, 10), data=st.data())
def test_future_tokens_do_not_leak(seed, T, data):
    """Changing tokens after position t leaves outputs 0..t unchanged (bitwise: masked weights are exactly 0)."""
    cfg = tiny()
    w = AttentionWeights.random(cfg, seed)
    x = rand_x(seed + 1, T, cfg.hidden_size)
    t = data.draw(st.integers(0, T - 2))
    x2 = x.copy()
    x2[t + 1:] = rand_x(seed + 2, T - t - 1, cfg.hidden_size) * 5.0
    y, _ = gated_attention(x, w, cfg)
    y2, _ = gated_attention(x2, w, cfg)
    assert np.array_equal(y[: t + 1], y2[: t + 1])
    assert not np.array_equal(y[t + 1:], y2[t + 1:])


# ---------------------------------------------------------------------------------------------------- KV cache


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(2, 12), data=st.data())
def test_prefill_then_decode_equals_one_shot(seed, T, data):
    """Chunked prefill + token-by-token decode with past_kv == one shot (outputs and final cache), MRoPE positions."""
    cfg = tiny()
    w = AttentionWeights.random(cfg, seed)
    x = rand_x(seed + 1, T, cfg.hidden_size)
    pos = rand_pos(seed + 2, T, start=0)
    y_full, kv_full = gated_attention(x, w, cfg, position_ids=pos)
    cut = data.draw(st.integers(1, T - 1))
    ys, kv = [], None
    y0, kv = gated_attention(x[:cut], w, cfg, position_ids=pos[:, :cut])
    ys.append(y0)
    for t in range(cut, T):  # decode one token at a time
        yt, kv = gated_attention(x[t:t + 1], w, cfg, position_ids=pos[:, t:t + 1], past_kv=kv)
        ys.append(yt)
    assert_close("prefill+decode y", y_full, np.concatenate(ys), "f64_exact")
    assert_close("cache k", kv_full[0][0], kv[0][0], "f64_exact")
    assert_close("cache v", kv_full[0][1], kv[0][1], "f64_exact")
    assert kv[0][0].shape == (T, cfg.num_key_value_heads, cfg.head_dim)


def test_default_positions_continue_after_the_cache():
    """position_ids=None means text positions T_past + arange(T): same as passing them explicitly."""
    cfg = tiny()
    w = AttentionWeights.random(cfg, 11)
    x = rand_x(12, 9, cfg.hidden_size)
    _, kv = gated_attention(x[:5], w, cfg)
    y_default, _ = gated_attention(x[5:], w, cfg, past_kv=kv)
    y_explicit, _ = gated_attention(x[5:], w, cfg, past_kv=kv, position_ids=text_position_ids(4, 5))
    assert np.array_equal(y_default, y_explicit)


@given(
    lens=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    past=st.lists(st.integers(0, 4), min_size=4, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_ragged_batch_equals_per_sequence_loop_bitwise(lens, past, seed):
    cfg = tiny()
    w = AttentionWeights.random(cfg, seed)
    N = len(lens)
    H, nkv, hd = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((sum(lens), H))
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    past_kv = [(rng.standard_normal((past[n], nkv, hd)), rng.standard_normal((past[n], nkv, hd))) for n in range(N)]
    pos = np.concatenate([rand_pos(seed + n, lens[n], start=past[n]) for n in range(N)], axis=1)
    y, new_kv = gated_attention(x, w, cfg, position_ids=pos, cu_seqlens=cu, past_kv=past_kv)
    for n in range(N):
        s, e = cu[n], cu[n + 1]
        y_n, kv_n = gated_attention(x[s:e], w, cfg, position_ids=pos[:, s:e], past_kv=[past_kv[n]])
        assert np.array_equal(y[s:e], y_n)
        assert np.array_equal(new_kv[n][0], kv_n[0][0]) and np.array_equal(new_kv[n][1], kv_n[0][1])
        assert new_kv[n][0].shape[0] == past[n] + lens[n]


# ---------------------------------------------------------------------------------------------------- norm / rope order


def test_qk_norm_before_rope_and_rope_only_on_first_R_channels():
    """The cached k equals RoPE(rms_norm(k)); its channels >= R equal rms_norm(k) exactly (B18)."""
    cfg = tiny()
    w = AttentionWeights.random(cfg, 13)
    x = rand_x(14, 4, cfg.hidden_size)
    pos = rand_pos(15, 4, start=100)
    _, kv = gated_attention(x, w, cfg, position_ids=pos)
    k_normed = rms_norm((x @ w.k_proj.T).reshape(4, 2, 16), w.k_norm, cfg.rms_norm_eps)
    R = cfg.rotary_dim
    assert np.array_equal(kv[0][0][..., R:], k_normed[..., R:])
    c, s = mrope_cos_sin(pos, inv_freq(R, cfg.rope_theta), cfg.mrope_section)
    assert_close("k = rope(norm(k))", apply_partial_rope(k_normed, c, s), kv[0][0], "f64_exact")
    # RoPE then norm differs: the RMS is rotation-invariant, but the per-channel (1 + w) weight does not commute
    # with the rotation.  Guard the order.
    k_wrong = rms_norm(apply_partial_rope((x @ w.k_proj.T).reshape(4, 2, 16), c, s), w.k_norm, cfg.rms_norm_eps)
    assert np.max(np.abs(k_wrong - kv[0][0])) > 1e-6


def test_float32_path_tracks_float64():
    cfg = tiny()
    w = AttentionWeights.random(cfg, 16)
    x = rand_x(17, 11, cfg.hidden_size)
    pos = rand_pos(18, 11, start=50)
    y64, _ = gated_attention(x, w, cfg, position_ids=pos)
    y32, kv32 = gated_attention(x.astype(np.float32), w, cfg, position_ids=pos)
    assert y32.dtype == np.float32 and kv32[0][0].dtype == np.float32
    assert_close("attention f32", y64, y32, "f32")
    # dtype= requests the compute dtype explicitly, whatever x's dtype
    y_req, _ = gated_attention(x, w, cfg, position_ids=pos, dtype=np.float32)
    assert y_req.dtype == np.float32 and np.array_equal(y_req, y32)
    with pytest.raises(ValueError, match="dtype"):
        gated_attention(x, w, cfg, dtype=np.float16)


# ---------------------------------------------------------------------------------------------------- validation


def test_shape_errors_are_clear():
    cfg = tiny()
    w = AttentionWeights.random(cfg, 0)
    x = rand_x(0, 4, cfg.hidden_size)
    bad = AttentionWeights(**{**w.__dict__, "q_proj": w.q_proj[: 4 * 16]})  # q only, no gate rows
    with pytest.raises(ValueError, match="q_proj.*gate"):
        gated_attention(x, bad, cfg)
    with pytest.raises(ValueError, match="T_total, H"):
        gated_attention(x[:, :5], w, cfg)
    with pytest.raises(ValueError, match="position_ids"):
        gated_attention(x, w, cfg, position_ids=np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="cu_seqlens"):
        gated_attention(x, w, cfg, cu_seqlens=np.array([0, 2, 5]))
    with pytest.raises(ValueError, match="past_kv has"):
        gated_attention(x, w, cfg, cu_seqlens=np.array([0, 2, 4]), past_kv=[None])
    with pytest.raises(ValueError, match=r"past_kv\[0\]"):
        gated_attention(x, w, cfg, past_kv=[(np.zeros((2, 4, 16)), np.zeros((2, 4, 16)))])


# ---------------------------------------------------------------------------------------------------- HF oracle


@pytest.mark.hf
@pytest.mark.parametrize("positions", ["text", "mrope"])
def test_hf_attention_module(positions):
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Attention, Qwen3_5TextRotaryEmbedding

    H, nh, nkv, hd, T = 48, 4, 2, 32, 13
    section = (3, 3, 2)  # R = 16 of hd = 32 (partial_rotary_factor 0.5)
    hf_cfg = Qwen3_5TextConfig(
        vocab_size=64, hidden_size=H, intermediate_size=64, num_hidden_layers=4, num_attention_heads=nh,
        num_key_value_heads=nkv, head_dim=hd, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5,
                             mrope_section=list(section), mrope_interleaved=True),
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    )
    hf_cfg._attn_implementation = "eager"
    cfg = tiny(hidden_size=H, num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd, rope_theta=1e6,
               partial_rotary_factor=0.5, mrope_section=section)
    w = AttentionWeights.random(cfg, 21)
    attn = Qwen3_5Attention(hf_cfg, layer_idx=3).eval()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(attn, name).weight.copy_(torch.from_numpy(getattr(w, name)).float())
        attn.q_norm.weight.copy_(torch.from_numpy(w.q_norm).float())
        attn.k_norm.weight.copy_(torch.from_numpy(w.k_norm).float())
    x = rand_x(22, T, H)
    pos = text_position_ids(T, 3) if positions == "text" else rand_pos(23, T, start=3)
    rot = Qwen3_5TextRotaryEmbedding(hf_cfg)
    xt = torch.from_numpy(x).float()[None]  # [1, T, H]
    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)[None, None]  # [1, 1, T, T]
    with torch.no_grad():
        cos, sin = rot(xt, torch.from_numpy(pos)[:, None, :])
        y_hf, _ = attn(xt, position_embeddings=(cos, sin), attention_mask=mask)
    y_hf = y_hf[0].numpy()
    y64, _ = gated_attention(x, w, cfg, position_ids=pos)
    y32, _ = gated_attention(x.astype(np.float32), w, cfg, position_ids=pos)
    assert_close("HF attention vs f64 oracle", y64, y_hf, "f32")
    assert_close("HF attention vs f32 reference", y_hf, y32, "f32")
