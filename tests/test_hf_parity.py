"""Parity of the NumPy reference (float64) with Hugging Face transformers (float32, eager) — the outside oracle.

Tiny random checkpoints written by transformers' own save_pretrained (tests/hf_checkpoints.py):

* logits of ragged batches (lengths 1 .. 70) within fp32 rounding: relative RMS <= 1e-4 (pitfall B24; fp32
  rounding alone reaches a few 1e-5 on these models);
* greedy generation of 32 tokens identical, except after a step where HF's own top-2 logit gap is below fp32
  rounding (then the tie-break is noise, not a bug; `check_greedy_agreement` verifies that);
* prefill + N decode steps of the pipeline == HF's cached forward, step by step (pitfall B10, B11);
* dense text-only, a multimodal checkpoint's text path (and one image prompt), MoE.
"""
from __future__ import annotations

import numpy as np
import pytest

from _tolerance import BUDGETS, assert_close
from hf_checkpoints import hf_logits, load_hf_model, make_hf_checkpoint
from qwen35.measure import rel_rms
from reference.model import Qwen35Model, TextContext

pytestmark = pytest.mark.hf
FP32_EPS = float(np.finfo(np.float32).eps)
LENGTHS = [1, 5, 23, 70]  # ragged: a single token, shorter than the conv window, one chunk, two chunks


@pytest.fixture(scope="module")
def pair(request, tmp_path_factory):
    kind = request.param
    d = make_hf_checkpoint(tmp_path_factory.mktemp("parity") / kind, kind=kind, seed=21)
    return kind, Qwen35Model.from_pretrained(d, max_batch_size=4), load_hf_model(d)


KINDS = ["dense", "multimodal", "moe", "multimodal_moe"]


def _prompts(seed):
    """Random text prompts; the tiny multimodal configs' image / video placeholder ids (90, 91) become 0, since
    a placeholder without pixels is refused."""
    rng = np.random.default_rng(seed)
    return [np.where(np.isin(p, (90, 91)), 0, p).tolist() for p in (rng.integers(0, 97, n) for n in LENGTHS)]


def check_greedy_agreement(prompt, ours, theirs, model, hf) -> int | None:
    """Assert two greedy continuations agree, or first differ where HF's top-2 gap is within fp32 rounding.

    The rounding bound at that step is max(2 x the observed max |reference - HF| logit error there,
    8 x eps_fp32 x max|logit|).  Returns the first differing step (None if identical).
    """
    assert len(ours) == len(theirs)
    diff = [j for j, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    if not diff:
        return None
    j = diff[0]
    seq = list(prompt) + list(theirs[:j])
    l_hf = hf_logits(hf, seq)[-1]
    l_ref = model.logits([seq])[0][-1]
    top = np.sort(l_hf)[-2:]
    gap = float(top[1] - top[0])
    bound = max(2.0 * float(np.max(np.abs(l_hf - l_ref))), 8 * FP32_EPS * float(np.max(np.abs(l_hf))))
    assert gap <= bound, (f"greedy tokens differ at step {j} (reference {ours[j]}, HF {theirs[j]}) although HF's "
                          f"top-2 gap {gap:.3e} exceeds fp32 rounding {bound:.3e}")
    return j


@pytest.mark.parametrize("pair", KINDS, indirect=True)
def test_logits_of_a_ragged_batch(pair):
    kind, model, hf = pair
    prompts = _prompts(1)
    ours = model.logits(prompts)  # stateless, one packed batch
    model_pipe = model.execute(model.prepare_initial_token_inputs(
        [TextContext(i, p) for i, p in enumerate(prompts)], return_n_logits=1))
    for i, p in enumerate(prompts):
        ref = hf_logits(hf, p)  # HF one sequence at a time: no padding involved (pitfall B12)
        r = assert_close(f"{kind} logits T={len(p)}", ref, ours[i], "f32_logits")
        assert r <= BUDGETS["f32_logits"]
        assert_close(f"{kind} pipeline last logits T={len(p)}", ref[-1:], model_pipe.logits_for(i), "f32_logits")
    for i in range(len(prompts)):
        model.release(i)


@pytest.mark.parametrize("pair", KINDS, indirect=True)
def test_greedy_32_tokens(pair):
    import torch

    kind, model, hf = pair
    prompts = _prompts(2)[1:3]
    ours = model.generate(prompts, max_new_tokens=32)
    for p, o in zip(prompts, ours, strict=True):
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        theirs = g[0, len(p):].tolist()
        check_greedy_agreement(p, o, theirs, model, hf)


@pytest.mark.parametrize("pair", ["dense", "moe"], indirect=True)
def test_prefill_then_decode_equals_hf_cache_step_by_step(pair):
    """Two requests of different lengths share the pipeline; each step's logits equal HF's cached forward."""
    import torch

    kind, model, hf = pair
    prompts = [_prompts(3)[2], _prompts(3)[1]]  # 23 and 5 tokens
    steps = 8
    follow = np.random.default_rng(4).integers(0, 97, (2, steps)).tolist()
    # ours: prefill both in one ragged batch (the first in two chunks), then decode together
    model.execute(model.prepare_initial_token_inputs([TextContext("a", prompts[0][:10])]))
    inputs = model.prepare_initial_token_inputs([TextContext("a", prompts[0][10:]), TextContext("b", prompts[1])])
    outs = [model.execute(inputs)]
    for s in range(steps):
        inputs = model.prepare_next_token_inputs([follow[0][s], follow[1][s]], inputs)
        outs.append(model.execute(inputs))
    for b, rid in enumerate(["a", "b"]):
        with torch.no_grad():
            o = hf(input_ids=torch.tensor([prompts[b]]), use_cache=True)
            cache = o.cache  # transformers 5.x: `cache` (formerly `past_key_values`)
            hf_steps = [o.logits[0, -1].double().numpy()]
            for s in range(steps):
                o = hf(input_ids=torch.tensor([[follow[b][s]]]), cache=cache, use_cache=True)
                cache = o.cache
                hf_steps.append(o.logits[0, -1].double().numpy())
        for s, out in enumerate(outs):
            assert_close(f"{kind} request {rid} step {s}", hf_steps[s], out.logits_for(rid)[0], "f32_logits")
        model.release(rid)


@pytest.mark.parametrize("pair", ["multimodal"], indirect=True)
def test_image_prompt_through_the_vision_hook(pair):
    """A prompt with one image: vision embeddings replace the placeholders, MRoPE positions and rope_delta
    drive prefill and decode (the model/vision contract of docs/pipeline_api.md)."""
    import torch

    from reference.multimodal import TextAndVisionContext

    kind, model, hf = pair
    c = model.config
    grid = np.array([[1, 4, 4]])  # 16 patches -> 4 merged tokens
    pixels = np.random.default_rng(5).standard_normal((16, c.vision_config.patch_dim)).astype(np.float32)
    tokens = [5, 6, 7, c.vision_start_token_id] + [c.image_token_id] * 4 + [c.vision_end_token_id, 8, 9, 10]
    ctx = TextAndVisionContext("img", tokens, pixel_values=pixels, image_grid_thw=grid)
    hf_in = dict(input_ids=torch.tensor([tokens]), pixel_values=torch.from_numpy(pixels),
                 image_grid_thw=torch.from_numpy(grid),
                 mm_token_type_ids=torch.tensor([[int(t == c.image_token_id) for t in tokens]]))
    with torch.no_grad():
        ref = hf(**hf_in, use_cache=False).logits[0].double().numpy()
        g = hf.generate(**hf_in, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert_close("image prompt logits", ref, model.logits([ctx])[0], "f32_logits")
    ours = model.generate([ctx], max_new_tokens=12)[0]
    theirs = g[0, len(tokens):].tolist()
    j = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    assert j is None, f"image prompt: greedy tokens differ at step {j}: {ours} vs {theirs}"


def test_fp32_rounding_is_the_floor():
    """The budget is meaningful: the float32 reference itself sits at a few 1e-6..1e-5 from float64, and a
    one-ulp-per-weight perturbation of the checkpoint moves logits by a similar amount."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = make_hf_checkpoint(d, kind="dense", seed=22)
        prompt = _prompts(6)[3]
        f64 = Qwen35Model.from_pretrained(path).logits([prompt])[0]
        f32 = Qwen35Model.from_pretrained(path, dtype=np.float32).logits([prompt])[0]
    r = rel_rms(f64, f32)
    assert 1e-8 < r < BUDGETS["f32_logits"], r


@pytest.mark.parametrize("pair", ["dense"], indirect=True)
def test_greedy_check_rejects_a_real_divergence(pair):
    """check_greedy_agreement is not a rubber stamp: a wrong token where HF has a clear winner fails it."""
    kind, model, hf = pair
    prompt = _prompts(7)[2]
    good = model.generate([prompt], max_new_tokens=4)[0]
    bad = list(good)
    bad[2] = (bad[2] + 1) % 97
    assert check_greedy_agreement(prompt, good, good, model, hf) is None
    with pytest.raises(AssertionError, match="step 2"):
        check_greedy_agreement(prompt, bad, good, model, hf)


# ------------------------------------------------------------------------------------------ divergence report
@pytest.mark.parametrize("pair", ["moe"], indirect=True)
def test_divergence_report_within_tolerance_and_finds_an_injected_bug(pair, tmp_path):
    from qwen35.compare import hf_trace
    from reference.divergence import compare_traces, reference_trace, trace_names

    kind, model, hf = pair
    tokens = _prompts(8)[2]
    names = trace_names(model.config)
    theirs = hf_trace(hf, tokens, names)
    report = compare_traces(reference_trace(model, tokens), theirs)
    assert report.ok and report.first_divergent is None, report.format()
    assert [r.name for r in report.rows] == names and report.rows[0].max_abs == 0.0  # embedding lookup is exact
    # A 1 % error in layer 2's token mixer: layers 0 and 1 stay within tolerance, layer 2 is reported first.
    broken = Qwen35Model(model.weights, max_batch_size=1)
    saved = broken.weights.layers[2].mixer.out_proj
    try:
        broken.weights.layers[2].mixer.out_proj = saved * 1.01
        bad = compare_traces(reference_trace(broken, tokens), theirs)
    finally:
        broken.weights.layers[2].mixer.out_proj = saved
    assert bad.first_divergent == "layer 2 (linear)", bad.format()
    assert [r.ok for r in bad.rows[:3]] == [True, True, True] and "[DIFF]" in bad.format()


def test_diverge_command_on_the_demo(capsys):
    import json

    from qwen35.cli import main

    assert main(["diverge", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["first_divergent"] is None and len(d["rows"]) == 4 + 3
    assert max(r["rel_rms"] for r in d["rows"]) < 1e-4


@pytest.mark.parametrize("variant", [dict(tie_word_embeddings=True), dict(dtype="bfloat16"),
                                     dict(num_hidden_layers=8, linear_num_value_heads=8)],
                         ids=["tied", "bf16", "8-layers-Hv8"])
def test_checkpoint_variants(tmp_path, variant):
    """Tied embeddings, a bf16 file, and a deeper model with H_v = 4 H_k: still within fp32 rounding of HF."""
    d = make_hf_checkpoint(tmp_path / "v", kind="dense", seed=23, **variant)
    model, hf = Qwen35Model.from_pretrained(d), load_hf_model(d)
    for p in _prompts(9)[1:]:
        assert_close(f"{variant} T={len(p)}", hf_logits(hf, p), model.logits([p])[0], "f32_logits")


@pytest.mark.hf
def test_the_trained_demo_loads_in_transformers_with_our_logits():
    """The bundled demo is a trained checkpoint: transformers' Qwen3_5ForCausalLM reads it and gives the oracle's
    logits on a passage of its corpus (trained weights: larger activations and saturated gates than random ones)."""
    from pathlib import Path
    from pydoc_data.topics import topics

    from qwen35.tokenizer import ByteTokenizer

    demo = Path(__file__).resolve().parent.parent / "qwen35" / "demo"
    ids = ByteTokenizer().encode(topics["comparisons"][:200])
    ours = Qwen35Model.from_pretrained(demo).logits([ids])[0]  # float64 [T, V]
    theirs = hf_logits(load_hf_model(demo), ids)
    assert_close("trained demo logits vs transformers", ours, theirs, BUDGETS["f32_logits"])
    assert np.mean(np.argmax(ours, -1) == np.argmax(theirs, -1)) > 0.99
