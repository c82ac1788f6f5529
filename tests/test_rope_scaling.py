"""RoPE scaling (context extension): default, linear, dynamic (NTK-aware) and yarn, in the reference and the
optimized model, with transformers' semantics (`modeling_rope_utils.py`, `Qwen3_5TextRotaryEmbedding`).

* the frequency functions vs an independent float64 formula written per frequency from the equations (YaRN:
  arXiv:2309.00071; dynamic: the NTK-aware base), and (hf) vs transformers' own rope init functions;
* `default` is bit-identical to the plain inv_freq / mrope_cos_sin path (reference and optimized);
* each bad `rope_parameters` is a ConfigError naming `rope_parameters.<key>`; round trip through config.json;
  the legacy `rope_scaling` key and the `type` alias read as transformers reads them; the max_seq_len rule;
* (hf) logits of the reference (float64) and the optimized model (float32) vs `Qwen3_5ForCausalLM` at positions
  past the original window, relative RMS <= 1e-4, for every type composed with partial rotary; dynamic:
  prefill past the window and decode steps vs transformers' cached forward step by step; one image prompt
  under yarn vs `Qwen3_5ForConditionalGeneration` (interleaved MRoPE with t != h != w).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import optimized.model as OM
import optimized.rope as orope
import reference.model as RM
import reference.rope as rrope
from _tolerance import assert_close
from hf_checkpoints import hf_logits, load_hf_model, make_hf_checkpoint
from qwen35.measure import rel_rms
from reference.config import Qwen35Config
from reference.context import TextContext
from reference.errors import ConfigError
from reference.rope import RopeScaling

torch.set_num_threads(1)
V = 97
R, THETA = 16, 10000.0  # a rotary dim and base with a non-trivial yarn correction range

CASES = {  # rope_parameters of each case; the windows (16) are tiny so that 40 tokens reach far past them
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    "yarn-mscale": dict(rope_type="yarn", factor=3.0, original_max_position_embeddings=16, beta_fast=16.0,
                        beta_slow=2.0, mscale=0.7, mscale_all_dim=0.5, truncate=False),
    "yarn-attention-factor": dict(rope_type="yarn", factor=2.5, original_max_position_embeddings=16,
                                  attention_factor=1.3),
}
MPE = {"dynamic": 16}  # dynamic's original window is max_position_embeddings (transformers); others keep 4096


def _scaling(params, mpe=4096):
    return RopeScaling.from_rope_parameters(params, max_position_embeddings=mpe)


# ------------------------------------------------------------------------------------- independent formulas
def _independent(params, R, theta, mpe, seq_len):
    """float64 (inv_freq [R/2], attention factor), one frequency at a time, from the equations."""
    t = params.get("rope_type", "default")
    s = float(params.get("factor", 1.0))
    plain = [theta ** (-2.0 * j / R) for j in range(R // 2)]
    if t == "default":
        return np.array(plain), 1.0
    if t == "linear":
        return np.array([f / s for f in plain]), 1.0
    if t == "dynamic":
        L = max(seq_len, mpe)
        base = theta * (s * L / mpe - (s - 1.0)) ** (R / (R - 2.0))
        return np.array([base ** (-2.0 * j / R) for j in range(R // 2)]), 1.0
    # yarn: dimension d at which n full rotations of wavelength 2π θ^(2d/R) fit in the window L
    L = params.get("original_max_position_embeddings", mpe)
    fast, slow = params.get("beta_fast", 32.0), params.get("beta_slow", 1.0)
    def d_of(n):
        return R * math.log(L / (2 * math.pi * n)) / (2 * math.log(theta))
    lo, hi = d_of(fast), d_of(slow)
    if params.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, R - 1)
    hi = hi + 0.001 if hi == lo else hi
    out = []
    for j, f in enumerate(plain):
        gamma = min(max((j - lo) / (hi - lo), 0.0), 1.0)  # 0: keep f (extrapolate), 1: f / s (interpolate)
        out.append(gamma * f / s + (1 - gamma) * f)
    def mscale(m):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
    if params.get("attention_factor") is not None:
        a = params["attention_factor"]
    elif params.get("mscale") and params.get("mscale_all_dim"):
        a = mscale(params["mscale"]) / mscale(params["mscale_all_dim"])
    else:
        a = mscale(1.0)
    return np.array(out), a


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seq_len", [None, 8, 16, 17, 40, 1000])
def test_scaled_frequencies_match_the_independent_formula(name, seq_len):
    params, mpe = CASES[name], MPE.get(name, 16)
    sc = _scaling(params, mpe)
    f, a = rrope.scaled_inv_freq(R, THETA, sc, max_position_embeddings=mpe, seq_len=seq_len)
    ref_f, ref_a = _independent(params, R, THETA, mpe, seq_len or 0)
    np.testing.assert_allclose(f, ref_f, rtol=1e-13, atol=0)
    assert a == pytest.approx(ref_a, rel=1e-14)
    f32, a32 = rrope.scaled_inv_freq(R, THETA, sc, max_position_embeddings=mpe, seq_len=seq_len, dtype=np.float32)
    assert f32.dtype == np.float32 and a32 == a
    np.testing.assert_allclose(f32, ref_f, rtol=2e-6)
    t, _ = orope.scaled_inv_freq(R, THETA, sc, max_position_embeddings=mpe, seq_len=seq_len, dtype=torch.float64)
    np.testing.assert_array_equal(t.numpy(), f)  # the torch twin: the same float64 values


def test_scaling_actually_changes_the_frequencies():
    """Guards the formulas against a no-op: every scaled type moves the slow frequencies, keeps inv_freq[0]."""
    plain = rrope.inv_freq(R, THETA)
    for name, params in CASES.items():
        mpe = MPE.get(name, 16)
        f, _ = rrope.scaled_inv_freq(R, THETA, _scaling(params, mpe), max_position_embeddings=mpe, seq_len=40)
        assert abs(f[-1] / plain[-1] - 1) > 0.1, name
        if name != "linear":
            assert f[0] == pytest.approx(plain[0]), name  # fast frequencies are kept (extrapolated)
    # dynamic at or below its window is exactly the plain table
    f, _ = rrope.scaled_inv_freq(R, THETA, _scaling(CASES["dynamic"]), max_position_embeddings=16, seq_len=16)
    np.testing.assert_array_equal(f, plain)


def test_yarn_ramp_and_correction_range():
    lo, hi = rrope.yarn_correction_range(64, 1e7, 32768, 32, 1, truncate=False)
    assert 0 < lo < hi < 63
    assert rrope.yarn_correction_range(64, 1e7, 32768, 32, 1) == (math.floor(lo), math.ceil(hi))
    ramp = rrope.yarn_ramp(2.0, 5.0, 8)
    np.testing.assert_allclose(ramp, [0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1])
    assert rrope.yarn_ramp(3, 3, 6)[3] == 0 and rrope.yarn_ramp(3, 3, 6)[4] == 1  # high = low widened, no 0/0
    assert rrope.yarn_get_mscale(1.0) == 1.0 and rrope.yarn_get_mscale(4.0) == pytest.approx(1 + 0.1 * math.log(4))


# ----------------------------------------------------------------------------------- default is unchanged
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_is_bit_identical_to_the_plain_path(dtype):
    cfg = Qwen35Config.tiny()
    assert cfg.rope_scaling == RopeScaling() and cfg.rope_type == "default"
    pos = np.stack([np.arange(7, 40), np.arange(3, 36) % 9, np.arange(5, 38) % 4]).astype(np.int64)  # t != h != w
    c0, s0 = rrope.mrope_cos_sin(pos, rrope.inv_freq(cfg.rotary_dim, cfg.rope_theta, dtype=dtype), cfg.mrope_section)
    c1, s1 = rrope.rope_tables(pos, cfg, dtype=dtype)
    np.testing.assert_array_equal(c0, c1)
    np.testing.assert_array_equal(s0, s1)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    tp = torch.from_numpy(pos)
    c2, s2 = orope.mrope_cos_sin(tp, orope.inv_freq(cfg.rotary_dim, cfg.rope_theta, dtype=tdt), cfg.mrope_section)
    c3, s3 = orope.packed_rope_tables(tp, [0, 10, 33], cfg, dtype=tdt)
    assert torch.equal(c2, c3) and torch.equal(s2, s3)


def test_dynamic_packed_tables_are_per_request():
    cfg = Qwen35Config.tiny(max_position_embeddings=16, rope_scaling=CASES["dynamic"])
    p = torch.cat([torch.arange(40), torch.arange(10), torch.arange(30, 34)])[None].expand(3, -1)
    c, s = orope.packed_rope_tables(p, [0, 40, 50, 54], cfg, dtype=torch.float64)
    for a, b in [(0, 40), (40, 50), (50, 54)]:
        ca, sa = rrope.rope_tables(p[:, a:b].numpy(), cfg)
        np.testing.assert_allclose(c[a:b].numpy(), ca, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s[a:b].numpy(), sa, rtol=0, atol=1e-12)
    # the 10-token request sits inside the window: plain RoPE; the others are scaled differently
    c_plain, _ = rrope.mrope_cos_sin(p[:, 40:50].numpy(), rrope.inv_freq(cfg.rotary_dim, cfg.rope_theta),
                                     cfg.mrope_section)
    np.testing.assert_array_equal(c[40:50].numpy(), c_plain)


# ------------------------------------------------------------------------------------------ config errors
BAD = [
    (dict(rope_type="longrope", short_factor=[1.0], long_factor=[2.0]), r"rope_parameters\.rope_type 'longrope'"),
    (dict(rope_type="llama3", factor=8.0), r"rope_parameters\.rope_type 'llama3'.*default, linear, dynamic, yarn"),
    (dict(rope_type=3), r"rope_parameters\.rope_type.* 3"),
    (dict(rope_type="yarn"), r"rope_parameters\.factor is required for rope_type 'yarn'"),
    (dict(rope_type="linear"), r"rope_parameters\.factor is required"),
    (dict(rope_type="dynamic", factor=None), r"rope_parameters\.factor is required"),
    (dict(rope_type="linear", factor=0.5), r"rope_parameters\.factor must be a number >= 1, got 0\.5"),
    (dict(rope_type="dynamic", factor="2"), r"rope_parameters\.factor must be a number"),
    (dict(rope_type="yarn", factor=True), r"rope_parameters\.factor must be a number .*True"),
    (dict(rope_type="linear", factor=float("inf")), r"rope_parameters\.factor"),
    (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=0),
     r"rope_parameters\.original_max_position_embeddings must be a positive integer"),
    (dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16.5),
     r"rope_parameters\.original_max_position_embeddings"),
    (dict(rope_type="yarn", factor=2.0, beta_fast="fast"), r"rope_parameters\.beta_fast must be a number > 0"),
    (dict(rope_type="yarn", factor=2.0, beta_slow=0), r"rope_parameters\.beta_slow must be a number > 0"),
    (dict(rope_type="yarn", factor=2.0, beta_fast=1.0, beta_slow=4.0),
     r"rope_parameters\.beta_fast \(1\) must be >= \S*rope_parameters\.beta_slow \(4\)"),
    (dict(rope_type="yarn", factor=2.0, mscale=-1.0), r"rope_parameters\.mscale must be a number >= 0"),
    (dict(rope_type="yarn", factor=2.0, mscale_all_dim=[1]), r"rope_parameters\.mscale_all_dim"),
    (dict(rope_type="yarn", factor=2.0, attention_factor=0.0), r"rope_parameters\.attention_factor .*> 0"),
    (dict(rope_type="yarn", factor=2.0, attention_factor=False), r"rope_parameters\.attention_factor"),
    (dict(rope_type="yarn", factor=2.0, truncate="yes"), r"rope_parameters\.truncate must be true or false"),
]


@pytest.mark.parametrize("params,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_rope_parameters_are_config_errors_naming_the_key(params, match):
    with pytest.raises(ConfigError, match=match):
        _scaling(params)
    # through config.json: text-only (top-level rope_parameters) and multimodal (text_config.rope_parameters)
    for model_type, where in [("qwen3_5_text", ""), ("qwen3_5", "text_config.")]:
        d = Qwen35Config.tiny(model_type=model_type).to_hf_dict()
        text = d["text_config"] if where else d
        text["rope_parameters"] = {**text["rope_parameters"], **params}
        with pytest.raises(ConfigError, match=where.replace(".", r"\.") + match):
            Qwen35Config.from_hf_dict(d)


def test_legacy_rope_scaling_key_is_named_in_errors():
    d = Qwen35Config.tiny().to_hf_dict()
    d["rope_scaling"] = {"type": "yarn", "factor": 0.25}
    with pytest.raises(ConfigError, match=r"rope_scaling\.factor must be a number >= 1"):
        Qwen35Config.from_hf_dict(d)
    with pytest.raises(ConfigError, match="rope_scaling must be a RopeScaling"):
        Qwen35Config.tiny(rope_scaling="yarn")


# ------------------------------------------------------------------------------- parsing and round trips
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_5"])
def test_round_trip_through_config_json(tmp_path, name, model_type):
    c = Qwen35Config.tiny(model_type=model_type, max_position_embeddings=MPE.get(name, 4096),
                          rope_scaling=CASES[name])
    assert c.rope_type == CASES[name]["rope_type"] and hash(c)
    c.save_pretrained(tmp_path)
    back = Qwen35Config.from_pretrained(tmp_path)
    assert back == c and back.rope_scaling == _scaling(CASES[name], MPE.get(name, 4096))


def test_parsing_follows_transformers():
    base = Qwen35Config.tiny(max_position_embeddings=64).to_hf_dict()
    # yarn without original_max_position_embeddings: the window is max_position_embeddings
    d = {**base, "rope_parameters": {**base["rope_parameters"], "rope_type": "yarn", "factor": 2}}
    sc = Qwen35Config.from_hf_dict(d).rope_scaling
    assert (sc.factor, sc.original_max_position_embeddings, sc.beta_fast, sc.beta_slow, sc.truncate) == \
        (2.0, 64, 32.0, 1.0, True)
    # ... and a top-level original_max_position_embeddings wins over the one in rope_parameters
    d["rope_parameters"]["original_max_position_embeddings"] = 32
    assert Qwen35Config.from_hf_dict(d).rope_scaling.original_max_position_embeddings == 32
    d["original_max_position_embeddings"] = 8
    assert Qwen35Config.from_hf_dict(d).rope_scaling.original_max_position_embeddings == 8
    # the legacy `rope_scaling` key, with the `type` alias, replaces rope_parameters
    d = {**base, "rope_scaling": {"type": "linear", "factor": 3}}
    assert Qwen35Config.from_hf_dict(d).rope_scaling == RopeScaling("linear", 3.0)
    # `rope_type` wins over `type`; keys of other types are ignored (transformers only warns)
    sc = _scaling(dict(type="linear", rope_type="dynamic", factor=2.0, beta_fast=8.0))
    assert sc == RopeScaling("dynamic", 2.0)
    assert _scaling(dict(rope_type="default", factor=9.0)) == RopeScaling()


def test_max_seq_len_follows_the_scaling():
    def limit(params, mpe):
        return Qwen35Config.tiny(max_position_embeddings=mpe, rope_scaling=params).resolve_max_seq_len()

    assert limit({"rope_type": "default"}, 64) == 64
    assert limit({"rope_type": "linear", "factor": 2.5}, 64) == 160
    assert limit({"rope_type": "dynamic", "factor": 4}, 16) == 64
    assert limit({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 16}, 32) == 64
    assert limit({"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": 16}, 128) == 128
    c = Qwen35Config.tiny(max_position_embeddings=16, rope_scaling=CASES["dynamic"])
    assert c.resolve_max_seq_len(64) == 64
    with pytest.raises(ConfigError, match=r"max_length \(65\) exceeds the model's context window 64 .*'dynamic'"):
        c.resolve_max_seq_len(65)


# ============================================================================== transformers (the oracle)
def _hf_rotary(hf):
    return next(m for m in hf.modules() if type(m).__name__ == "Qwen3_5TextRotaryEmbedding")


def _reset_dynamic(hf):
    """A fresh rotary state (transformers' dynamic type keeps the longest length seen across calls)."""
    rot = _hf_rotary(hf)
    rot.inv_freq = rot.original_inv_freq.clone()
    rot.max_seq_len_cached = rot.original_max_seq_len
    return hf


@pytest.mark.hf
@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_and_tables_match_transformers(name):
    """fp32 inv_freq, attention factor and (M)RoPE cos/sin tables vs `Qwen3_5TextRotaryEmbedding`."""
    import transformers

    mpe = MPE.get(name, 4096)
    cfg = Qwen35Config.tiny(head_dim=32, partial_rotary_factor=0.5, mrope_section=(3, 3, 2),
                            max_position_embeddings=mpe, rope_scaling=CASES[name])
    d = cfg.to_hf_dict()
    d.pop("model_type"), d.pop("architectures")
    rot = transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5TextRotaryEmbedding(transformers.Qwen3_5TextConfig(**d))
    ours, a = rrope.scaled_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, dtype=np.float32,
                                    max_position_embeddings=mpe)
    assert a == pytest.approx(rot.attention_scaling, rel=1e-12)
    np.testing.assert_allclose(ours, rot.inv_freq.numpy(), rtol=2e-7)
    T = 40
    pos = np.stack([np.arange(T) + 5, (np.arange(T) * 7) % 23, (np.arange(T) * 3) % 11 + 2]).astype(np.int64)
    with torch.no_grad():
        c_hf, s_hf = rot(torch.zeros(1, T, 4), torch.from_numpy(pos)[:, None, :])  # [1, T, R]
    c, s = rrope.rope_tables(pos, cfg)  # float64 oracle; dynamic: L = max(pos) + 1 = 45, as transformers
    assert np.max(np.abs(c - c_hf[0].numpy())) < 2e-5 and np.max(np.abs(s - s_hf[0].numpy())) < 2e-5
    ct, st = orope.rope_tables(torch.from_numpy(pos), cfg, dtype=torch.float32)
    assert torch.max(torch.abs(ct - c_hf[0])) < 2e-5 and torch.max(torch.abs(st - s_hf[0])) < 2e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny dense checkpoint per case (same seed), written by transformers."""
    root = tmp_path_factory.mktemp("rope_scaling")
    return {name: make_hf_checkpoint(root / name, kind="dense", seed=31, max_position_embeddings=MPE.get(name, 4096),
                                     rope_scaling=CASES[name])
            for name in CASES}


def _prompt(seed, n):
    return np.random.default_rng(seed).integers(0, V, n).tolist()


@pytest.mark.hf
@pytest.mark.parametrize("name", list(CASES))
def test_logits_past_the_window_match_transformers(checkpoints, name):
    """Reference (float64) and optimized (float32) logits vs HF at 40 tokens (window 16), and a ragged batch."""
    d = checkpoints[name]
    hf = load_hf_model(d)
    ref = RM.Qwen35Model.from_pretrained(d, max_batch_size=4)
    opt = OM.Qwen35Model.from_pretrained(d, max_batch_size=4, backend="torch")
    assert ref.config.rope_scaling == _scaling(CASES[name], MPE.get(name, 4096))
    assert ref.max_length == opt.max_length == ref.config.rope_scaling.max_seq_len(ref.config.max_position_embeddings)
    prompts = [_prompt(1, 40), _prompt(2, 9), _prompt(3, 27)]
    theirs = [hf_logits(_reset_dynamic(hf), p) for p in prompts]
    # one packed batch each
    for p, r, o, h in zip(prompts, ref.logits(prompts), opt.logits(prompts), theirs, strict=True):
        assert_close(f"{name} reference T={len(p)}", h, r, "f32_logits")
        assert_close(f"{name} optimized T={len(p)}", h, o, "f32_logits")
    # the scaling matters here: plain RoPE on the same weights is far off at 40 tokens
    plain_cfg = ref.config.replace(rope_scaling=RopeScaling(), max_position_embeddings=4096)
    plain = RM.Qwen35Model(dataclasses.replace(ref.weights, config=plain_cfg))
    assert rel_rms(theirs[0], plain.logits([prompts[0]])[0]) > 1e-3


def _hf_steps(hf, chunks, follow):
    """HF logits of the last token of the prompt (fed in `chunks`), then of each follow token, through its cache."""
    with torch.no_grad():
        o = hf(input_ids=torch.tensor([chunks[0]]), use_cache=True)
        for c in chunks[1:]:
            o = hf(input_ids=torch.tensor([c]), cache=o.cache, use_cache=True)
        cache, out = o.cache, [o.logits[0, -1].double().numpy()]
        for t in follow:
            o = hf(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True)
            cache = o.cache
            out.append(o.logits[0, -1].double().numpy())
    return out


@pytest.mark.hf
@pytest.mark.parametrize("split", [None, 5, 20], ids=["one-shot", "chunked-5", "chunked-20"])
@pytest.mark.parametrize("prompt_len", [24, 12], ids=["prefill-past-window", "decode-crosses-window"])
def test_dynamic_prefill_and_decode_match_transformers_step_by_step(checkpoints, prompt_len, split):
    """One request generating: transformers recomputes inv_freq whenever max(position)+1 grows past the cached
    length, which is then exactly the per-call rule (L = max position of the chunk + 1).  Chunked prefill is
    compared with transformers fed the same chunks (earlier chunks' keys keep their own frequencies in both)."""
    d = checkpoints["dynamic"]
    hf = load_hf_model(d)
    prompt, follow = _prompt(4, prompt_len), _prompt(5, 8)
    chunks = [prompt] if split is None or split >= prompt_len else [prompt[:split], prompt[split:]]
    theirs = _hf_steps(hf, chunks, follow)
    for cls, kw in [(RM.Qwen35Model, {}), (OM.Qwen35Model, dict(backend="torch"))]:
        model = cls.from_pretrained(d, max_batch_size=2, **kw)
        for c in chunks[:-1]:
            model.execute(model.prepare_initial_token_inputs([TextContext("a", c)]))
        # the last chunk alongside another request (per-request tables in the packed batch)
        inputs = model.prepare_initial_token_inputs([TextContext("a", chunks[-1]), TextContext("b", _prompt(6, 30))])
        outs = [model.execute(inputs)]
        for t in follow:
            inputs = model.prepare_next_token_inputs([t, 0], inputs)
            outs.append(model.execute(inputs))
        for s, out in enumerate(outs):
            assert_close(f"{cls.__module__} dynamic step {s}", theirs[s], out.logits_for("a")[0], "f32_logits")


@pytest.mark.hf
def test_dynamic_rule_vs_transformers_state(checkpoints):
    """Where the two rules part: after a 40-token call, transformers keeps the 40-token frequencies for a later
    24-token call (24 > the 16-token window), while qwen35 computes each request's own (= a fresh HF model)."""
    d = checkpoints["dynamic"]
    hf, ref = load_hf_model(d), RM.Qwen35Model.from_pretrained(d)
    p24 = _prompt(7, 24)
    fresh = hf_logits(_reset_dynamic(hf), p24)
    hf_logits(hf, _prompt(8, 40))
    stale = hf_logits(hf, p24)
    ours = ref.logits([p24])[0]
    assert_close("dynamic = fresh transformers", fresh, ours, "f32_logits")
    assert rel_rms(stale, ours) > 1e-3


@pytest.mark.hf
def test_image_prompt_under_yarn_matches_transformers(tmp_path):
    """One image (MRoPE t != h != w) in a prompt past the yarn window (8 of 4096 positions, factor 4)."""
    from reference.multimodal import TextAndVisionContext

    params = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8)
    d = make_hf_checkpoint(tmp_path / "mm", kind="multimodal", seed=32, rope_scaling=params)
    hf = load_hf_model(d)
    c = Qwen35Config.from_pretrained(d)
    grid = np.array([[1, 4, 4]])  # 16 patches -> 4 merged tokens
    pixels = np.random.default_rng(5).standard_normal((16, c.vision_config.patch_dim)).astype(np.float32)
    tokens = _prompt(9, 6) + [c.vision_start_token_id] + [c.image_token_id] * 4 + [c.vision_end_token_id] \
        + _prompt(10, 14)
    hf_in = dict(input_ids=torch.tensor([tokens]), pixel_values=torch.from_numpy(pixels),
                 image_grid_thw=torch.from_numpy(grid),
                 mm_token_type_ids=torch.tensor([[int(t == c.image_token_id) for t in tokens]]))
    with torch.no_grad():
        theirs = hf(**hf_in, use_cache=False).logits[0].double().numpy()
    def ctx():
        return TextAndVisionContext("img", tokens, pixel_values=pixels, image_grid_thw=grid)
    assert_close("yarn image prompt, reference", theirs, RM.Qwen35Model.from_pretrained(d).logits([ctx()])[0],
                 "f32_logits")
    opt = OM.Qwen35Model.from_pretrained(d, backend="torch")
    assert_close("yarn image prompt, optimized", theirs, opt.logits([ctx()])[0], "f32_logits")
