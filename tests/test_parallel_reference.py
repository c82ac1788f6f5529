"""reference.parallel: the tensor-parallel plan and its oracle, `TensorParallelSimulation` (docs/parallel.md).

Everything is compared with the simplest formulation, the unsharded float64 reference Qwen35Model:

* the simulation's logits equal the unsharded model's (relative error <= 1e-12) for tp = 1, 2, 4 on dense, MoE
  and multimodal tiny models, tied and untied, with a vocabulary (97) that neither 2 nor 4 divides;
* chunked prefill + decode through the pipeline API, image prompts in chunks, snapshot / restore and greedy
  generation give the unsharded model's logits, states and tokens;
* the shards partition the weights (concatenated in rank order they are the whole tensors; replicated tensors are
  equal) and have the local geometry; each rank's cut of the state is 1/tp of it;
* the MoE block over a partition of the experts sums to the whole block;
* wrong shardings built by hand (q_proj as [all q | all gate] halves, the conv channels as one contiguous block,
  the value heads of the wrong key heads) give different logits: the comparison can fail;
* check_tensor_parallel names the sizes; assign_replicas and data_parallel_splits keep their promises.
"""
from __future__ import annotations

import dataclasses
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.checkpoint import random_state_dict
from reference.config import LINEAR, Qwen35Config
from reference.context import TextContext
from reference.errors import ConfigError
from reference.memory import conv_state_shape, recurrent_state_shape
from reference.mlp import MoEWeights, sparse_moe_block
from reference.model import Qwen35Model
from reference.multimodal import TextAndVisionContext
from reference.parallel import (
    TensorParallelSimulation,
    assign_replicas,
    block,
    check_data_parallel,
    check_tensor_parallel,
    conv_state_channels,
    data_parallel_splits,
    kv_head_range,
    layer_tensor_names,
    local_config,
    shard_index,
    shard_weights,
    vocab_range,
)
from reference.weights import ModelWeights, expected_lm_shapes, weights_from_state_dict
from tests._mm_cases import inside_placeholder_runs, prompt_case

V = 97  # prime: no tp > 1 divides it, so the vocabulary blocks are uneven
HEADS = dict(num_key_value_heads=4, num_attention_heads=8, linear_num_key_heads=4, linear_num_value_heads=8,
             intermediate_size=64)
KINDS = {"dense": "qwen3_5_text", "moe": "qwen3_5_moe_text", "multimodal": "qwen3_5"}
TPS = (1, 2, 4)
EXACT = 1e-12  # relative error budget: the same float64 sums, added in another order


def _config(kind: str, tied: bool = False) -> Qwen35Config:
    """A tiny geometry (L L L F) whose head counts, MLP and experts every tp in TPS divides."""
    return Qwen35Config.tiny(model_type=KINDS[kind], tie_word_embeddings=tied, **HEADS)


_WEIGHTS: dict = {}


def _weights(kind: str, tied: bool = False) -> ModelWeights:
    """Seeded random float64 weights of `_config(kind, tied)`, made once per session."""
    key = (kind, tied)
    if key not in _WEIGHTS:
        c = _config(kind, tied)
        _WEIGHTS[key] = weights_from_state_dict(random_state_dict(c, seed=7 + len(_WEIGHTS)), c)
    return _WEIGHTS[key]


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 90, n).tolist()  # below the vision token ids


def _rel_err(ref, got) -> float:
    ref, got = np.asarray(ref), np.asarray(got)
    assert ref.shape == got.shape, f"shape {got.shape} != reference {ref.shape}"
    return float(np.max(np.abs(ref - got)) / np.max(np.abs(ref)))


def _assert_same(what: str, ref, got, budget: float = EXACT) -> None:
    err = _rel_err(ref, got)
    assert err <= budget, f"{what}: relative error {err:.3e} > {budget:.0e}"


# ------------------------------------------------------------------------------ the simulation is the unsharded model
@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_simulation_logits_equal_the_unsharded_model(kind, tied, tp):
    w = _weights(kind, tied)
    batch = [_prompt(1, 37), _prompt(2, 5), _prompt(3, 1)]
    want = Qwen35Model(w).logits(batch)
    got = TensorParallelSimulation(w, tensor_parallel=tp).logits(batch)
    for b, (x, y) in enumerate(zip(want, got, strict=True)):
        _assert_same(f"{kind} tied={tied} tp={tp} prompt {b}", x, y)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("case", ["one-image", "video"])
def test_multimodal_logits_equal_the_unsharded_model(case, tp):
    """The vision tower is replicated; its rows replace the embedding's after the vocabulary-parallel sum."""
    w = _weights("multimodal")
    toks, kw = prompt_case(case)
    batch = [TextAndVisionContext("img", toks, **kw), _prompt(4, 6)]
    want = Qwen35Model(w).logits(batch)
    got = TensorParallelSimulation(w, tensor_parallel=tp).logits(batch)
    for b, (x, y) in enumerate(zip(want, got, strict=True)):
        _assert_same(f"{case} tp={tp} prompt {b}", x, y)


def _pools(m: Qwen35Model):
    return ([p.copy() for p in m.state_cache.conv_pools], [p.copy() for p in m.state_cache.recurrent_pools],
            {r: m.kv_cache._kv[r] for r in m.kv_cache.active_requests})


def _assert_same_states(what, ref: Qwen35Model, sim: Qwen35Model):
    (rc, rr, rkv), (sc, sr, skv) = _pools(ref), _pools(sim)
    for i, (a, b) in enumerate(zip(rc + rr, sc + sr, strict=True)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12, err_msg=f"{what}: state pool {i}")
    assert rkv.keys() == skv.keys()
    for r in rkv:
        for (ka, va), (kb, vb) in zip(rkv[r], skv[r], strict=True):
            np.testing.assert_allclose(kb, ka, rtol=0, atol=1e-12, err_msg=f"{what}: K of {r!r}")
            np.testing.assert_allclose(vb, va, rtol=0, atol=1e-12, err_msg=f"{what}: V of {r!r}")


@settings(max_examples=12)
@given(kind=st.sampled_from(["dense", "moe"]), tp=st.sampled_from([2, 4]), n=st.integers(3, 40),
       cuts=st.lists(st.integers(1, 38), max_size=3), decode=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_chunked_prefill_and_decode_through_the_pipeline_equal_the_unsharded_model(kind, tp, n, cuts, decode, seed):
    """The same calls on both models: chunked prefill of a request beside a second one, then decode steps of both;
    every returned logit row and every stored state (conv, recurrent, K/V, in the whole layout) agree."""
    w = _weights(kind)
    ref = Qwen35Model(w, max_batch_size=3, return_logits="variable")
    sim = TensorParallelSimulation(w, tensor_parallel=tp, max_batch_size=3, return_logits="variable")
    a, other = _prompt(seed, n + decode), _prompt(seed + 1, 4)
    bounds = sorted({c for c in cuts if c < n} | {0, n})
    for j, (s, e) in enumerate(pairwise(bounds)):
        ctxs = [TextContext("a", a[s:e])] + ([TextContext("b", other)] if j == 0 else [])
        counts = [e - s] + ([1] if j == 0 else [])
        outs = [m.execute(m.prepare_initial_token_inputs(ctxs, return_n_logits=counts)) for m in (ref, sim)]
        _assert_same(f"prefill chunk [{s}, {e})", outs[0].logits, outs[1].logits)
        _assert_same_states(f"after chunk [{s}, {e})", ref, sim)
    prev = {}
    for m in (ref, sim):
        prev[m] = m.prepare_initial_token_inputs([TextContext("a", [a[n]]), TextContext("b", [other[0]])])
    for step in range(decode):
        outs = [m.execute(prev[m]) for m in (ref, sim)]
        _assert_same(f"decode step {step}", outs[0].logits, outs[1].logits)
        nxt = [a[min(n + step + 1, len(a) - 1)], int(np.argmax(outs[0].logits[1]))]
        prev = {m: m.prepare_next_token_inputs(nxt, prev[m]) for m in (ref, sim)}
    _assert_same_states("after decode", ref, sim)


@pytest.mark.parametrize("tp", [2, 4])
def test_image_prompt_in_chunks_then_decode_equals_the_unsharded_model(tp):
    """An image prompt prefilled in two chunks (the cut inside the image's placeholder run) and decoded."""
    w = _weights("multimodal")
    toks, kw = prompt_case("one-image")
    cut = inside_placeholder_runs(toks)[3]
    logits = []
    for m in (Qwen35Model(w), TensorParallelSimulation(w, tensor_parallel=tp)):
        first = m.execute(m.prepare_initial_token_inputs([TextAndVisionContext("i", toks, chunk_end=cut, **kw)]))
        inputs = m.prepare_initial_token_inputs([TextContext("i", toks[cut:])])
        second = m.execute(inputs)
        third = m.execute(m.prepare_next_token_inputs([int(np.argmax(second.logits[0]))], inputs))
        logits.append([first.logits, second.logits, third.logits])
    for what, x, y in zip(["first chunk", "second chunk", "decode"], *logits, strict=True):
        _assert_same(f"tp={tp} {what}", x, y)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_generate_is_identical(kind):
    w = _weights(kind, tied=kind == "moe")
    prompts = [_prompt(20, 9), _prompt(21, 3), _prompt(22, 14)]
    want = Qwen35Model(w, max_batch_size=2).generate(prompts, max_new_tokens=10)
    for tp in (2, 4):
        assert TensorParallelSimulation(w, tensor_parallel=tp, max_batch_size=2).generate(
            prompts, max_new_tokens=10) == want, f"tp={tp}"


def test_snapshot_and_restore_work_on_the_whole_layout():
    """A snapshot taken from the simulation restores into the unsharded model (and back): same layout."""
    w = _weights("dense")
    sim, ref = TensorParallelSimulation(w, tensor_parallel=2), Qwen35Model(w)
    p = _prompt(30, 12)
    sim.execute(sim.prepare_initial_token_inputs([TextContext("s", p)]))
    ref.restore("s", sim.snapshot("s"))
    outs = [m.execute(m.prepare_initial_token_inputs([TextContext("s", [5])])) for m in (ref, sim)]
    _assert_same("decode after restore", outs[0].logits, outs[1].logits)
    _assert_same("and the one-shot logits", Qwen35Model(w).logits([p + [5]])[0][-1:], outs[1].logits)


# ------------------------------------------------------------------------------ the shards partition the weights
def _named_tensors(w: ModelWeights) -> dict[str, np.ndarray]:
    """Checkpoint name (LM prefix stripped) -> array of every language-model tensor of `w`."""
    out = {"embed_tokens.weight": w.embed_tokens, "norm.weight": w.norm, "lm_head.weight": w.lm_head}
    for i, lw in enumerate(w.layers):
        mixer_names, mlp_names = layer_tensor_names(w.config, lw.layer_type)
        p = f"layers.{i}."
        out[p + "input_layernorm.weight"] = lw.input_layernorm
        out[p + "post_attention_layernorm.weight"] = lw.post_attention_layernorm
        out.update({p + n: np.asarray(getattr(lw.mixer, f)) for f, n in mixer_names.items()})
        out.update({p + n: np.asarray(getattr(lw.mlp, f)) for f, n in mlp_names.items()})
    return out


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind,tied", [("dense", False), ("moe", True), ("multimodal", False)])
def test_shards_partition_the_weights(kind, tied, tp):
    w = _weights(kind, tied)
    c = w.config
    whole = _named_tensors(w)
    ranks = [_named_tensors(shard_weights(w, tp, r)) for r in range(tp)]
    local = expected_lm_shapes(local_config(c, tp))
    for name, a in whole.items():
        spec = shard_index(c, name, tp, 0)
        if spec is None:  # replicated: every rank holds the same tensor
            for r in range(tp):
                np.testing.assert_array_equal(ranks[r][name], a, err_msg=f"replicated {name} on rank {r}")
            continue
        axis = spec[0]
        index = np.concatenate([shard_index(c, name, tp, r)[1] for r in range(tp)])
        assert np.array_equal(np.sort(index), np.arange(a.shape[axis])), f"{name}: the ranks' indices are no partition"
        back = np.empty_like(a)
        np.moveaxis(back, axis, 0)[index] = np.concatenate([np.moveaxis(ranks[r][name], axis, 0) for r in range(tp)])
        np.testing.assert_array_equal(back, a, err_msg=f"{name}: the shards put back in place")
        if name in local and ".experts." not in name and name not in ("embed_tokens.weight", "lm_head.weight"):
            # every tensor but the vocabulary blocks and the experts has the local geometry's shape
            assert ranks[0][name].shape == local[name], f"{name}: {ranks[0][name].shape} != local {local[name]}"
        if ".experts." in name:
            assert ranks[0][name].shape[0] == c.num_experts // tp
    for r in range(tp):  # the vocabulary blocks: contiguous, in rank order, sizes differ by at most one
        assert ranks[r]["embed_tokens.weight"].shape[0] in (V // tp, V // tp + 1)
    shard = shard_weights(w, tp, 1)
    assert (shard.lm_head is shard.embed_tokens) == tied and shard.shard.rank == 1
    assert shard.visual.keys() == w.visual.keys()


@pytest.mark.parametrize("tp", TPS)
def test_local_config_is_one_tp_th_of_the_geometry(tp):
    for kind in ("dense", "moe"):
        c = _config(kind)
        lc = local_config(c, tp)
        assert lc.conv_dim * tp == c.conv_dim and lc.key_dim * tp == c.key_dim and lc.value_dim * tp == c.value_dim
        assert lc.q_proj_rows * tp == c.q_proj_rows
        assert (lc.num_attention_heads * tp, lc.num_key_value_heads * tp) == (c.num_attention_heads,
                                                                              c.num_key_value_heads)
        assert lc.value_heads_per_key_head == c.value_heads_per_key_head  # value head j still reads key head j // r
        assert (lc.vocab_size, lc.hidden_size, lc.head_dim, lc.num_experts) == (c.vocab_size, c.hidden_size,
                                                                                c.head_dim, c.num_experts)
        if c.is_moe:
            assert lc.shared_expert_intermediate_size * tp == c.shared_expert_intermediate_size
            assert lc.moe_intermediate_size == c.moe_intermediate_size  # whole experts
        else:
            assert lc.intermediate_size * tp == c.intermediate_size
        channels = np.concatenate([conv_state_channels(c, tp, r) for r in range(tp)])
        assert np.array_equal(np.sort(channels), np.arange(c.conv_dim))


@given(n=st.integers(0, 300), tp=st.integers(1, 9))
def test_blocks_tile_an_axis(n, tp):
    blocks = [block(n, tp, r) for r in range(tp)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in pairwise(blocks))
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_holds_one_tp_th_of_the_state(tp):
    """rank_states cuts the whole-layout state into the local geometry's shapes, and the cuts tile the state."""
    w = _weights("dense")
    c, lc = w.config, local_config(w.config, tp)
    sim = TensorParallelSimulation(w, tensor_parallel=tp)
    sim.execute(sim.prepare_initial_token_inputs([TextContext("a", _prompt(40, 11)), TextContext("b", [3])]))
    conv, rec = sim.state_cache.get_states(["a", "b"])
    kv = {i: sim.kv_cache.get(["a", "b"], i) for i in c.full_layer_indices}
    cuts = [sim.rank_states(r, conv, rec, kv) for r in range(tp)]
    for conv_r, rec_r, kv_r in cuts:
        assert all(s.shape == (2,) + conv_state_shape(lc) for s in conv_r)
        assert all(s.shape == (2,) + recurrent_state_shape(lc) for s in rec_r)
        assert all(k.shape[1:] == (lc.num_key_value_heads, c.head_dim) for e in kv_r.values() for k, _ in e)
    for li in range(c.num_linear_layers):
        back = np.empty_like(conv[li])
        for r in range(tp):
            back[:, conv_state_channels(c, tp, r)] = cuts[r][0][li]
        np.testing.assert_array_equal(back, conv[li])
        np.testing.assert_array_equal(np.concatenate([cut[1][li] for cut in cuts], axis=1), rec[li])
    for i in c.full_layer_indices:
        for n in range(2):
            np.testing.assert_array_equal(np.concatenate([cut[2][i][n][0] for cut in cuts], axis=1), kv[i][n][0])


# ------------------------------------------------------------------------------ the MoE block over blocks of experts
@settings(max_examples=20)
@given(cuts=st.lists(st.integers(0, 8), max_size=3), seed=st.integers(0, 10**6))
def test_moe_blocks_of_experts_sum_to_the_whole_block(cuts, seed):
    """Any partition of the experts into blocks (empty ones too): the blocks' outputs add up to the whole block's,
    the router is the same for every block.  The shared expert rides with the first block (zeros elsewhere)."""
    c = Qwen35Config.tiny(model_type="qwen3_5_moe_text", num_experts=8, num_experts_per_tok=3)
    w = MoEWeights.random(c, seed)
    x = np.random.default_rng(seed).standard_normal((13, c.hidden_size))
    want, *router = sparse_moe_block(x, w, c, return_router=True)
    bounds = sorted(set(cuts) | {0, c.num_experts})
    total = np.zeros_like(want)
    for j, (s, e) in enumerate(pairwise(bounds)):
        part = dataclasses.replace(w, gate_up_proj=w.gate_up_proj[s:e], down_proj=w.down_proj[s:e],
                                   shared_down_proj=w.shared_down_proj * (j == 0))
        y, *r = sparse_moe_block(x, part, c, return_router=True, experts=(s, e))
        for a, b in zip(router, r, strict=True):
            np.testing.assert_array_equal(a, b)
        total += y
    _assert_same("sum over expert blocks", want, total)


def test_moe_expert_block_errors_name_the_block():
    c = Qwen35Config.tiny(model_type="qwen3_5_moe_text")
    w = MoEWeights.random(c, 0)
    x = np.zeros((2, c.hidden_size))
    with pytest.raises(ValueError, match=r"gate_up_proj has shape \(4, 32, 32\), expected \(2, 32, 32\)"):
        sparse_moe_block(x, w, c, experts=(0, 2))  # all 4 experts given, the block says 2
    with pytest.raises(ValueError, match=r"experts=\(3, 6\) is not a block of the 4 experts"):
        sparse_moe_block(x, w, c, experts=(3, 6))
    part = dataclasses.replace(w, gate_up_proj=w.gate_up_proj[2:], down_proj=w.down_proj[2:])
    part.validate(c, experts=(2, 4))
    with pytest.raises(ValueError, match="down_proj"):
        dataclasses.replace(part, down_proj=w.down_proj).validate(c, experts=(2, 4))


# ------------------------------------------------------------------------------ wrong shardings are caught
def _hand_sharded(w: ModelWeights, tp: int, field: str, index) -> TensorParallelSimulation:
    """A simulation whose rank r holds rows index(r) of mixer field `field` (instead of the plan's)."""
    sim = TensorParallelSimulation(w, tensor_parallel=tp)
    for r, rw in enumerate(sim.rank_weights):
        for i, (lw, whole) in enumerate(zip(rw.layers, w.layers, strict=True)):
            if hasattr(lw.mixer, field):
                rows = np.take(np.asarray(getattr(whole.mixer, field)), index(r, i), axis=0)
                rw.layers[i] = dataclasses.replace(lw, mixer=dataclasses.replace(lw.mixer, **{field: rows}))
    return sim


def _contiguous(n: int, tp: int, r: int) -> np.ndarray:
    return np.arange(*block(n, tp, r))


WRONG = {
    # q_proj read as [all q | all gate] halves: rank r takes its heads' rows of each half
    "q_proj as [all q | all gate]": ("q_proj", lambda c, tp, r: np.concatenate(
        [_contiguous(c.num_attention_heads * c.head_dim, tp, r),
         c.num_attention_heads * c.head_dim + _contiguous(c.num_attention_heads * c.head_dim, tp, r)])),
    # the conv channels (and in_proj_qkv rows) as one contiguous block instead of the [Q | K | V] pieces
    "conv1d as one block": ("conv1d", lambda c, tp, r: _contiguous(c.conv_dim, tp, r)),
    "in_proj_qkv as one block": ("in_proj_qkv", lambda c, tp, r: _contiguous(c.conv_dim, tp, r)),
    # the value heads of the next rank's key heads: in_proj_z rows shifted by one rank
    "in_proj_z of the wrong value heads": ("in_proj_z", lambda c, tp, r: _contiguous(c.value_dim, tp, (r + 1) % tp)),
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_a_wrong_sharding_gives_different_logits(wrong):
    w = _weights("dense")
    c, tp = w.config, 2
    field, rows = WRONG[wrong]
    batch = [_prompt(50, 20)]
    want = Qwen35Model(w).logits(batch)[0]
    err = _rel_err(want, _hand_sharded(w, tp, field, lambda r, i: rows(c, tp, r)).logits(batch)[0])
    assert err > 1e-3, f"{wrong}: logits within {err:.1e} of the unsharded model: the test could not fail"
    # the same hand-made sharding with the plan's rows reproduces the model: it is the rows that are wrong
    prefix = "self_attn." if field == "q_proj" else "linear_attn."
    plan = _hand_sharded(w, tp, field, lambda r, i: shard_index(c, f"layers.{i}.{prefix}{field}.weight", tp, r)[1])
    _assert_same(f"{field} with the plan's rows", want, plan.logits(batch)[0])


# ------------------------------------------------------------------------------ refusals
def test_check_tensor_parallel_names_the_sizes():
    c = _config("dense")
    with pytest.raises(ConfigError) as e:
        check_tensor_parallel(c, 3)
    msg = str(e.value)
    for part in ("tensor_parallel=3", "num_key_value_heads=4", "linear_num_key_heads=4", "intermediate_size=64"):
        assert part in msg, f"{part!r} not in {msg!r}"
    moe = _config("moe")
    with pytest.raises(ConfigError, match="num_experts=4"):
        check_tensor_parallel(moe, 8)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ConfigError, match="tensor_parallel must be a positive int"):
            check_tensor_parallel(c, bad)
    with pytest.raises(ConfigError, match="num_key_value_heads=4"):
        TensorParallelSimulation(_weights("dense"), tensor_parallel=3)
    with pytest.raises(ConfigError, match="rank 2 is out of range 0..1"):
        vocab_range(c, 2, 2)


def test_the_simulation_refuses_a_shard():
    w = _weights("dense")
    with pytest.raises(ConfigError, match="needs a whole model's weights, got the weights of rank 1"):
        TensorParallelSimulation(shard_weights(w, 2, 1), tensor_parallel=2)


def test_the_simulation_loads_a_checkpoint(tmp_path):
    from reference.checkpoint import write_checkpoint

    c = _config("dense")
    write_checkpoint(tmp_path, c, seed=3)
    sim = TensorParallelSimulation.from_pretrained(tmp_path, tensor_parallel=2, max_batch_size=2)
    assert sim.max_batch_size == 2 and len(sim.rank_weights) == 2
    _assert_same("from_pretrained", Qwen35Model.from_pretrained(tmp_path).logits([[1, 2, 3]])[0],
                 sim.logits([[1, 2, 3]])[0])


# ------------------------------------------------------------------------------ data parallelism
@given(free=st.lists(st.integers(0, 6), min_size=1, max_size=5), data=st.data())
def test_assign_replicas_balances_and_respects_free_slots(free, data):
    n = data.draw(st.integers(0, sum(free)))
    got = assign_replicas(free, n)
    assert len(got) == n and all(0 <= d < len(free) for d in got)
    left = [f - got.count(d) for d, f in enumerate(free)]
    assert min(left) >= 0, f"a replica got more requests than its free slots: {free} -> {got}"
    for d in set(got):  # each pick took a replica with the most free slots, so none ends up 2 behind
        assert left[d] >= max(left) - 1, f"unbalanced: {free} -> {got}"
    assert assign_replicas(free, n) == got  # deterministic


def test_assign_replicas_ties_go_to_the_lowest_index():
    assert assign_replicas([2, 2, 2], 4) == [0, 1, 2, 0]
    assert assign_replicas([1, 3], 3) == [1, 1, 0]  # 3 > 1, then 2 > 1, then the tie 1 = 1 goes to 0


@given(dp=st.integers(1, 4), data=st.data())
def test_data_parallel_splits_cover_the_rows(dp, data):
    rows = data.draw(st.lists(st.integers(0, dp - 1), max_size=12))
    splits = data_parallel_splits(rows, dp)
    assert len(splits) == dp
    assert sorted(b for s in splits for b in s) == list(range(len(rows)))
    for d, s in enumerate(splits):
        assert s == sorted(s) and all(rows[b] == d for b in s)
    assert check_data_parallel(dp) == dp


def test_check_data_parallel_refuses_non_positive():
    for bad in (0, -1, True, "2"):
        with pytest.raises(ConfigError, match="data_parallel must be a positive int"):
            check_data_parallel(bad)


def test_linear_layers_of_the_tiny_model():
    """The tiny geometry has both layer kinds, so every test above runs both mixers."""
    c = _config("dense")
    assert LINEAR in c.layer_types and "full_attention" in c.layer_types


# ------------------------------------------------------------------------------ more ranks than KV heads
@pytest.mark.parametrize("nkv, tp", [(1, 2), (1, 4), (2, 4)])
def test_kv_heads_copied_when_tp_exceeds_them(nkv, tp):
    """tp a multiple of num_key_value_heads: every rank holds nh/tp query heads and a copy of the KV head they
    read (tp/nkv ranks per head); the simulation still equals the unsharded model, through decode too."""
    c = Qwen35Config.tiny(**{**HEADS, "num_key_value_heads": nkv})
    w = weights_from_state_dict(random_state_dict(c, seed=3), c)
    ranges = [kv_head_range(c, tp, r) for r in range(tp)]
    group = c.num_attention_heads // nkv  # query heads per KV head
    for r, (g0, g1) in enumerate(ranges):
        q0, q1 = block(c.num_attention_heads, tp, r)
        assert g1 - g0 == 1 and all(q // group == g0 for q in range(q0, q1))  # its query heads read its KV head
    assert sorted({g for g, _ in ranges}) == list(range(nkv))  # every KV head is held, by tp/nkv ranks each
    assert local_config(c, tp).num_key_value_heads == 1
    batch = [_prompt(4, 23), _prompt(5, 2)]
    ref, sim = Qwen35Model(w, max_batch_size=2), TensorParallelSimulation(w, tensor_parallel=tp, max_batch_size=2)
    for x, y in zip(ref.logits(batch), sim.logits(batch), strict=True):
        _assert_same(f"nkv={nkv} tp={tp}", x, y)
    assert ref.generate(batch, max_new_tokens=4) == sim.generate(batch, max_new_tokens=4)


def test_a_tp_neither_dividing_nor_a_multiple_of_the_kv_heads_is_refused():
    c = Qwen35Config.tiny(**{**HEADS, "num_key_value_heads": 4, "num_attention_heads": 24,
                             "linear_num_key_heads": 6, "linear_num_value_heads": 12, "intermediate_size": 72})
    check_tensor_parallel(c, 2)
    with pytest.raises(ConfigError, match=r"tensor_parallel=6 does not divide num_key_value_heads=4"):
        check_tensor_parallel(c, 6)  # 6 neither divides 4 nor is a multiple of it
