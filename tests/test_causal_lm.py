"""optimized.Qwen35ForCausalLM: names, init, forward and loss, checkpoints in and out, and its refusals.

* parameter names and shapes are the checkpoint's (`reference.checkpoint.checkpoint_names`) and transformers'
  (`Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM`), tied and untied;
* the init is reproducible and follows the documented rules (transformers' `_init_weights` for Qwen3.5);
* logits and loss equal transformers' on the same checkpoint (fp32, relative RMS <= 1e-4; loss to 1e-5) and the
  loss is the shifted mean cross entropy with -100 ignored;
* what `save_pretrained` writes loads in transformers, optimized.Qwen35Model and reference.model.Qwen35Model with
  the same logits (float32 and bfloat16 files);
* strict loading (missing / unexpected tensors, multimodal configs) and the input checks raise Qwen35Errors;
* a few AdamW steps on a repeated sequence lower the loss.
Gradients are checked in tests/test_gradients.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import optimized.model as OM
import reference.model as RM
from _tolerance import assert_close
from hf_checkpoints import load_hf_model, make_hf_checkpoint, tiny_config
from optimized import Qwen35ForCausalLM
from optimized.causal_lm import IGNORE_INDEX, INITIALIZER_RANGE
from reference.checkpoint import checkpoint_names, write_checkpoint
from reference.errors import ConfigError, Qwen35Error, RequestError, WeightLoadError
from reference.safetensors_io import load_state_dict, read_safetensors

torch.set_num_threads(1)


def _ids(config, B, T, seed=0):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["dense", "moe", "tied"])
def hf_pair(request, tmp_path_factory):
    """(checkpoint dir, our model loaded from it, transformers' model loaded from it)."""
    kind = "moe" if request.param == "moe" else "dense"
    over = {"tie_word_embeddings": True} if request.param == "tied" else {}
    d = make_hf_checkpoint(tmp_path_factory.mktemp("lm") / request.param, kind=kind, seed=3, **over)
    return d, Qwen35ForCausalLM.from_pretrained(d), load_hf_model(d)


# ----------------------------------------------------------------------------------------------------------------
# names and init
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,over", [("dense", {}), ("moe", {}), ("dense", {"tie_word_embeddings": True}),
                                       ("moe", {"tie_word_embeddings": True})])
def test_parameter_names_are_checkpoint_names(kind, over):
    cfg = tiny_config(kind, **over)
    m = Qwen35ForCausalLM(cfg, seed=0)
    expected = checkpoint_names(cfg)
    sd = m.state_dict()
    assert set(sd) == set(expected)
    assert set(dict(m.named_parameters())) == set(expected)  # no buffers, no duplicates
    assert ("lm_head.weight" in sd) == (not cfg.tie_word_embeddings)
    for name, shape in expected.items():
        got = tuple(sd[name].shape)
        if name.endswith("conv1d.weight"):
            assert got == (shape[0], 1, shape[1]), name  # PyTorch's depthwise layout, as transformers holds it
        else:
            assert got == tuple(shape), name


def test_names_match_transformers(hf_pair):
    _, ours, hf = hf_pair
    theirs = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == theirs


def test_init_is_reproducible_and_follows_the_rules():
    cfg = tiny_config("moe", pad_token_id=5)
    a, b, c = (Qwen35ForCausalLM(cfg, seed=s) for s in (7, 7, 8))
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    sd = a.state_dict()
    for n, p in sd.items():
        if n.endswith("linear_attn.A_log"):
            assert p.dtype == torch.float32 and bool(((p.exp() >= 0.01) & (p.exp() <= 16)).all()), n
        elif n.endswith(("linear_attn.dt_bias", "linear_attn.norm.weight")):
            assert torch.equal(p, torch.ones_like(p)), n
        elif n.endswith("norm.weight"):
            assert torch.equal(p, torch.zeros_like(p)), n  # zero-centred: x̂ · (1 + w)
        else:
            assert not torch.equal(p, c.state_dict()[n]), n  # the seed matters
            if p.numel() >= 2000:
                assert abs(float(p.std()) - INITIALIZER_RANGE) < 0.1 * INITIALIZER_RANGE, n
    assert torch.equal(sd["model.embed_tokens.weight"][5], torch.zeros(cfg.hidden_size))  # padding_idx row
    # the same values in float64 (drawn in float32, then cast)
    d = Qwen35ForCausalLM(cfg, seed=7, dtype=torch.float64)
    for (n, pa), pd in zip(a.named_parameters(), d.parameters(), strict=True):
        assert torch.equal(pa.double(), pd), n


def test_fp32_kept_parameters():
    m = Qwen35ForCausalLM(tiny_config("dense"), seed=0, dtype=torch.bfloat16)
    for n, p in m.named_parameters():
        kept = n.endswith(("linear_attn.A_log", "linear_attn.dt_bias", "linear_attn.norm.weight"))
        assert p.dtype == (torch.float32 if kept else torch.bfloat16), n
    out = m(_ids(m.config, 1, 70), labels=_ids(m.config, 1, 70))
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()  # bf16 training: every gradient in its parameter's dtype, finite
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and bool(torch.isfinite(p.grad.float()).all()), n


# ----------------------------------------------------------------------------------------------------------------
# forward and loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.hf
def test_logits_and_loss_equal_transformers(hf_pair):
    _, ours, hf = hf_pair
    ids = _ids(ours.config, 2, 70, seed=1)  # two sequences of two chunks (one partial)
    with torch.no_grad():
        out = ours(ids, labels=ids)
        ref = hf(input_ids=ids, labels=ids, use_cache=False)
    assert out.logits.shape == (2, 70, ours.config.vocab_size)
    assert_close("logits vs transformers", ref.logits, out.logits, "f32_logits")
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5 * abs(float(ref.loss))


def test_loss_is_shifted_mean_cross_entropy():
    m = Qwen35ForCausalLM(tiny_config("dense"), seed=1, dtype=torch.float64)
    ids = _ids(m.config, 2, 11, seed=2)
    labels = ids.clone()
    labels[0, 4] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    out = m(ids, labels=labels)
    logp = torch.log_softmax(out.logits, -1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(10) if labels[b, t + 1] != IGNORE_INDEX]
    assert len(terms) == 20 - 1 - 2
    assert torch.allclose(out.loss, torch.stack(terms).mean(), rtol=1e-12, atol=0)
    assert m(ids).loss is None


def test_batch_rows_are_independent():
    m = Qwen35ForCausalLM(tiny_config("moe"), seed=2, dtype=torch.float64)
    ids = _ids(m.config, 3, 20, seed=3)
    with torch.no_grad():
        both = m(ids).logits
        for b in range(3):
            assert torch.allclose(both[b], m(ids[b:b + 1]).logits[0], rtol=0, atol=1e-12)


def test_all_ones_mask_is_no_mask_and_padding_is_refused():
    m = Qwen35ForCausalLM(tiny_config("dense"), seed=0)
    ids = _ids(m.config, 2, 6)
    with torch.no_grad():
        assert torch.equal(m(ids, attention_mask=torch.ones(2, 6, dtype=torch.long)).logits, m(ids).logits)
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, :2] = 0
        with pytest.raises(RequestError, match="padding"):
            m(ids, attention_mask=mask)
        with pytest.raises(RequestError, match="attention_mask"):
            m(ids, attention_mask=torch.ones(2, 5))


@pytest.mark.parametrize("bad,match", [
    (lambda ids: ids.float(), "integer"),
    (lambda ids: ids[0], r"\[B, T\]"),
    (lambda ids: ids[:, :0], r"\[B, T\]"),
    (lambda ids: torch.where(ids == ids[0, 0], 97, ids), r"outside 0\.\.96"),
    (lambda ids: ids.tolist(), "integer torch tensor"),
])
def test_bad_input_ids_are_request_errors(bad, match):
    m = Qwen35ForCausalLM(tiny_config("dense"), seed=0)
    ids = _ids(m.config, 2, 6)
    with pytest.raises(RequestError, match=match):
        m(bad(ids))


def test_bad_labels_are_request_errors():
    m = Qwen35ForCausalLM(tiny_config("dense"), seed=0)
    ids = _ids(m.config, 2, 6)
    with pytest.raises(RequestError, match="shape of input_ids"):
        m(ids, labels=ids[:, :5])
    with pytest.raises(RequestError, match=r"labels\[0, 1\] = -1 is outside 0\.\.96 or -100"):
        m(ids, labels=torch.where(torch.arange(6) == 1, -1, ids))


def test_multimodal_and_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'qwen3_5'"):
        Qwen35ForCausalLM(tiny_config("multimodal"))
    with pytest.raises(ConfigError, match="dtype"):
        Qwen35ForCausalLM(tiny_config("dense"), dtype=torch.int64)
    with pytest.raises(ConfigError, match="seed"):
        Qwen35ForCausalLM(tiny_config("dense"), seed=-1)
    with pytest.raises(ConfigError, match="not a torch device"):
        Qwen35ForCausalLM(tiny_config("dense"), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Qwen35ForCausalLM(tiny_config("dense"), device="cuda")
    with pytest.raises(ConfigError, match="save_pretrained: dtype"):
        Qwen35ForCausalLM(tiny_config("dense")).save_pretrained(tmp_path / "x", dtype="float16")
    d = write_checkpoint(tmp_path / "mm", tiny_config("multimodal"))
    with pytest.raises(ConfigError, match="'qwen3_5'"):
        Qwen35ForCausalLM.from_pretrained(d)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.hf
@pytest.mark.parametrize("kind,over", [("dense", {}), ("moe", {"tie_word_embeddings": True})])
def test_save_pretrained_loads_everywhere(tmp_path, kind, over):
    m = Qwen35ForCausalLM(tiny_config(kind, **over), seed=4)
    with torch.no_grad():  # trained-looking weights, so the logits are well spread
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    d = m.save_pretrained(tmp_path / "ckpt")
    assert json.loads((d / "config.json").read_text())["model_type"] == m.config.model_type
    seq = _ids(m.config, 1, 40, seed=5)
    with torch.no_grad():
        ours = m(seq).logits[0]
        hf = load_hf_model(d)
        assert_close("transformers", ours, hf(input_ids=seq, use_cache=False).logits[0], "f32_logits")
    engine = OM.Qwen35Model.from_pretrained(d, backend="torch", max_batch_size=2)
    assert_close("optimized.Qwen35Model", ours, engine.logits([seq[0].tolist()])[0], "f32_logits")
    ref = RM.Qwen35Model.from_pretrained(d, max_batch_size=2)
    assert_close("reference.model", ref.logits([seq[0].tolist()])[0], ours, "f32_logits")
    back = Qwen35ForCausalLM.from_pretrained(d)
    for (n, p), q in zip(m.named_parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_save_bfloat16_keeps_the_fp32_tensors(tmp_path):
    m = Qwen35ForCausalLM(tiny_config("dense"), seed=4)
    d = m.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    _, dtypes = read_safetensors(d / "model.safetensors")
    for n, dt in dtypes.items():
        kept = n.endswith(("linear_attn.A_log", "linear_attn.dt_bias", "linear_attn.norm.weight"))
        assert dt == ("F32" if kept else "BF16"), n
    back = Qwen35ForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    for (n, p), q in zip(m.named_parameters(), back.parameters(), strict=True):
        assert torch.equal(p.to(q.dtype), q), n


def test_from_pretrained_is_strict(tmp_path):
    cfg = tiny_config("dense")
    m = Qwen35ForCausalLM(cfg, seed=0)
    d = m.save_pretrained(tmp_path / "ok")
    tensors, _ = load_state_dict(d)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    missing = dict(tensors)
    del missing["model.layers.0.linear_attn.A_log"]
    write_checkpoint(tmp_path / "missing", cfg, tensors=missing)
    with pytest.raises(WeightLoadError, match="missing.*layers.0.linear_attn.A_log"):
        Qwen35ForCausalLM.from_pretrained(tmp_path / "missing")
    write_checkpoint(tmp_path / "extra", cfg, tensors={**tensors, "model.layers.0.extra.weight": np.zeros(3)})
    with pytest.raises(WeightLoadError, match="unexpected.*extra.weight"):
        Qwen35ForCausalLM.from_pretrained(tmp_path / "extra")
    with pytest.raises(Qwen35Error, match="does not exist"):
        Qwen35ForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_per_expert_checkpoints_load(tmp_path):
    cfg = tiny_config("moe")
    m = Qwen35ForCausalLM(cfg, seed=6)
    fused = m.save_pretrained(tmp_path / "fused")
    tensors, _ = load_state_dict(fused)
    write_checkpoint(tmp_path / "per_expert", cfg, tensors={k: np.array(v) for k, v in tensors.items()},
                     moe_layout="per_expert")
    back = Qwen35ForCausalLM.from_pretrained(tmp_path / "per_expert")
    for (n, p), q in zip(m.named_parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------


def test_a_few_adamw_steps_lower_the_loss():
    m = Qwen35ForCausalLM(tiny_config("moe"), seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = _ids(m.config, 2, 24, seed=9)
    losses = []
    for _ in range(8):
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_a_training_step_costs_three_forward_products(kind):
    """qwen35.bench.training_step_flops counts 3 × the forward's matrix products: exact for the projections, the
    MLP / experts and the lm_head (every aten.mm of forward + backward, counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from qwen35.bench import training_step_flops
    from qwen35.measure import gdn_chunk_flops, linear_weights_per_token

    cfg = tiny_config(kind)
    m = Qwen35ForCausalLM(cfg, seed=0)
    B, T = 2, 20
    ids = _ids(cfg, B, T)
    counter = FlopCounterMode(display=False)
    with counter:
        m(ids, labels=ids).loss.backward()
    mm = sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op).startswith("aten.mm"))
    linear = 3 * 2 * B * T * (linear_weights_per_token(cfg) + cfg.hidden_size * cfg.vocab_size)
    assert mm == linear
    rule = cfg.num_linear_layers * gdn_chunk_flops(T, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                                   cfg.linear_value_head_dim)
    attn = cfg.num_full_layers * 2 * T * T * cfg.num_attention_heads * cfg.head_dim
    assert training_step_flops(cfg, B, T) == linear + 3 * B * (rule + attn)


def test_bench_training_runs_and_reports():
    from qwen35 import bench

    lines = []
    res = bench.bench_training(quick=True, threads=(1,), log=lines.append,
                               cases={"tiny": (lambda: tiny_config("dense", tie_word_embeddings=True), 2, 16, 8)})
    (case,) = res["cases"]
    assert case["T"] == 8 and case["tokens_per_step"] == 16 and case["params"] > 0
    (r,) = case["by_threads"]
    assert r["threads"] == 1 and r["optimized"]["tok_per_s"] > 0 and r["floor_s"] > 0
    if "hf" in r:
        assert r["speedup_vs_hf"] == pytest.approx(r["hf"]["median_s"] / r["optimized"]["median_s"])
        assert bench.goals_report({"train": res})["train_speedup_vs_hf"]["measured"] == r["speedup_vs_hf"]
    assert len(lines) == 1 and "tok/s" in lines[0]
    assert torch.get_num_threads() == 1


def test_bench_parts_accept_train():
    import argparse

    from qwen35.commands import bench as cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    assert parser.parse_args([]).parts == cmd.DEFAULT_PARTS
    assert parser.parse_args(["--parts", "train"]).parts == ("train",)
    with pytest.raises(SystemExit):
        parser.parse_args(["--parts", "training"])
