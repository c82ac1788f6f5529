"""Qwen35ForCausalLM under tensor parallelism (torch.distributed, gloo on this CPU): at TP=2 it equals the
single-process float64 model — logits and loss, every gradient (this rank's shard; replicated parameters whole),
one AdamW step, the seeded init — and save_pretrained writes one whole checkpoint.

One world of 2 processes (`optimized.parallel.run_local_world`) runs every case (tests/_causal_lm_parallel_cases.py)
once, for the whole module: tiny dense and MoE models, tied and untied, a vocabulary of 97 (uneven blocks of 48
and 49 rows), a pad token in either block, and a model with one KV head (which the plan copies to both ranks, or
refuses).  Tolerances: float64, relative to the norm of the single-process tensor: 1e-12 for logits and loss,
1e-10 for gradients and stepped parameters.  The same gradients without q_norm's sum over the ranks must differ.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from optimized.causal_lm import Qwen35ForCausalLM  # noqa: E402
from optimized.parallel import run_local_world  # noqa: E402
from reference.checkpoint import write_checkpoint  # noqa: E402
from reference.config import Qwen35Config  # noqa: E402
from reference.errors import ConfigError  # noqa: E402
from reference.parallel import check_tensor_parallel  # noqa: E402
from reference.safetensors_io import read_safetensors  # noqa: E402
from tests import _causal_lm_parallel_cases as cases  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TP = 2
LOGITS, GRADS = 1e-12, 1e-10
MOE = "qwen3_5_moe_text"
CASES = {  # name -> Qwen35Config.tiny overrides (heads 4, KV heads 2, GDN key heads 2 / value heads 4, 4 experts)
    "dense": dict(pad_token_id=60),  # the pad row is in rank 1's block [48, 97)
    "dense-tied": dict(tie_word_embeddings=True, pad_token_id=10),  # ... in rank 0's block [0, 48)
    "moe": dict(model_type=MOE),
    "moe-tied": dict(model_type=MOE, tie_word_embeddings=True),
    "kv-copied": dict(num_key_value_heads=1),  # one KV head for two ranks
}
ODD = dict(num_attention_heads=6, num_key_value_heads=3)  # TP=2 divides neither the KV heads nor ...
IN_REGION = ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "linear_attn.norm.weight")
IN_MOE_REGION = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(per-rank results of cases.session, {case: checkpoint dir}, save root, {case: config})."""
    root = tmp_path_factory.mktemp("tp_lm")
    configs = {name: Qwen35Config.tiny(**over) for name, over in CASES.items()}
    dirs = {name: str(write_checkpoint(root / name, cfg, seed=i + 1)) for i, (name, cfg) in
            enumerate(configs.items())}
    odd = str(write_checkpoint(root / "odd", Qwen35Config.tiny(**ODD)))
    results = run_local_world(cases.session, TP, list(dirs.values()), odd, str(root / "saved"), timeout_s=150)
    return results, dirs, root / "saved", configs


def _split(config) -> bool:
    """Whether the plan splits `config` over TP ranks (else it refuses it)."""
    try:
        check_tensor_parallel(config, TP)
        return True
    except ConfigError:
        return False


def _each(world):
    """(case name, config, rank, that rank's result) for every case the plan splits, on every rank."""
    results, _, _, configs = world
    for rank, rank_results in enumerate(results):
        for name, r in zip(CASES, rank_results["cases"], strict=True):
            if _split(configs[name]):
                yield name, configs[name], rank, r


def test_logits_and_loss_equal_the_single_process_model(world):
    seen = set()
    for name, _, rank, r in _each(world):
        seen.add(name)
        assert r["refused"] is None and r["names_equal"], (name, rank, r["refused"])
        assert r["loaded_rel"] == 0.0, (name, rank)  # each rank loaded exactly its shard of the checkpoint
        assert r["held_fraction"] < 0.75, (name, rank, r["held_fraction"])  # about half: only its shard
        assert r["logits_rel"] <= LOGITS and r["loss_rel"] <= LOGITS, (name, rank, r["logits_rel"], r["loss_rel"])
    assert {"dense", "dense-tied", "moe", "moe-tied"} <= seen


def test_gradients_are_the_shards_of_the_single_process_gradient(world):
    for name, config, rank, r in _each(world):
        assert r["grad_missing"] == [], (name, rank)
        worst = max(r["grad_rel"].items(), key=lambda kv: kv[1])
        assert worst[1] <= GRADS, (name, rank, worst)
        # the hooked parameters: the replicated ones inside a region, and rows two ranks hold (a copied KV head)
        hooked = {n.split(".", 3)[-1] for n in r["hooked"]}
        expected = {p for p in IN_REGION if any(f".{p}" in n for n in r["grad_rel"])}
        if config.is_moe:
            expected |= set(IN_MOE_REGION)
        if config.num_key_value_heads < TP:
            expected |= {"self_attn.k_proj.weight", "self_attn.v_proj.weight"}
        assert hooked == expected, (name, sorted(hooked))


def test_one_adamw_step_keeps_the_shards_equal(world):
    for name, _, rank, r in _each(world):
        assert r["step_rel"] <= GRADS and r["step_moved"] > 1e-6, (name, rank, r["step_rel"], r["step_moved"])


def test_the_fresh_init_is_the_shards_of_the_single_init(world):
    for name, _, rank, r in _each(world):
        assert r["init_equal"], (name, rank)


def _tensors(directory):
    tensors, dtypes = read_safetensors(directory / "model.safetensors")
    return {k: np.array(v) for k, v in tensors.items()}, dtypes


def test_save_pretrained_writes_one_whole_checkpoint(world):
    _, dirs, saved, configs = world
    for i, name in enumerate(CASES):
        if not _split(configs[name]):
            continue
        d = saved / str(i)
        assert not (d / "loaded-rank1").exists() and not (d / "init-rank1").exists(), name  # rank 1 wrote nothing
        got, got_dtypes = _tensors(d / "loaded-rank0")
        want, want_dtypes = _tensors(d / "loaded-single")
        assert got_dtypes == want_dtypes and set(got) == set(want), name
        for k in want:
            assert np.array_equal(got[k], want[k]), (name, k)
        back, source = (Qwen35ForCausalLM.from_pretrained(p, dtype=torch.float64) for p in (d / "loaded-rank0",
                                                                                            dirs[name]))
        for (n, p), q in zip(back.named_parameters(), source.parameters(), strict=True):
            assert torch.equal(p, q), (name, n)
        init = Qwen35ForCausalLM(configs[name], seed=cases.INIT_SEED, dtype=torch.float64)
        got, _ = _tensors(d / "init-rank0")
        want, _ = _tensors(init.save_pretrained(d / "init-single"))
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want), name


def test_a_copied_kv_head_is_split_or_refused_by_the_plan(world):
    results, _, _, configs = world
    config = configs["kv-copied"]
    i = list(CASES).index("kv-copied")
    for rank_results in results:
        r = rank_results["cases"][i]
        if _split(config):  # both ranks hold the one KV head: k_proj / v_proj gradients summed over them
            assert r["refused"] is None and max(r["grad_rel"].values()) <= GRADS, r["refused"]
        else:
            assert r["refused"] is not None and "does not divide" in r["refused"], r["refused"]


def test_without_the_q_norm_gradient_sum_the_gradients_differ(world):
    """The test can fail: with q_norm's hook removed, its gradient is this rank's heads' share (far from the
    whole), the two ranks' shares add up to the whole, and every other gradient is still right."""
    results, _, _, _ = world
    for name, _, rank, r in _each(world):
        u = r["unsummed"]
        assert u["removed"], name  # the model has a full-attention layer with a q_norm
        assert u["q_norm_rel"] > 1e-3 and u["others_rel"] <= GRADS, (name, rank, u["q_norm_rel"], u["others_rel"])
    for i, name in enumerate(CASES):
        if not _split(Qwen35Config.tiny(**CASES[name])):
            continue
        parts = [rank_results["cases"][i]["unsummed"] for rank_results in results]
        for n in parts[0]["removed"]:
            total = sum(p["partial"][n] for p in parts)
            assert np.allclose(total, parts[0]["whole"][n], rtol=0, atol=LOGITS * np.abs(total).max()), (name, n)


def test_a_split_that_does_not_divide_is_the_plans_error(world):
    results, _, _, _ = world
    with pytest.raises(ConfigError) as plan:
        check_tensor_parallel(Qwen35Config.tiny(**ODD), TP)
    for rank_results in results:
        assert rank_results["refusals"] == {"init": str(plan.value), "load": str(plan.value)}, rank_results


def test_tensor_parallel_needs_a_process_group_and_a_positive_int(tmp_path):
    config = Qwen35Config.tiny()
    with pytest.raises(ConfigError, match="needs torch.distributed"):
        Qwen35ForCausalLM(config, tensor_parallel=2)
    with pytest.raises(ConfigError, match="needs torch.distributed"):
        Qwen35ForCausalLM.from_pretrained(write_checkpoint(tmp_path / "c", config), tensor_parallel=2)
    with pytest.raises(ConfigError, match="tensor_parallel must be a positive int"):
        Qwen35ForCausalLM(config, tensor_parallel=0)
    one, plain = Qwen35ForCausalLM(config, seed=3, tensor_parallel=1), Qwen35ForCausalLM(config, seed=3)
    assert one.tensor_parallel == 1 and one.shard is None and one._grad_hooks == {}
    for (n, p), q in zip(one.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), n
