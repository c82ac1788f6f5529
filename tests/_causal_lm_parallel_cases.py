"""What each rank runs in tests/test_causal_lm_parallel.py: Qwen35ForCausalLM split over the ranks of a local
gloo world (`optimized.parallel.run_local_world`) against the whole model built in the same rank.

Every comparison is with the single-process float64 model on the same checkpoint and the same batch: its logits
and loss, its gradient cut to this rank's shard by the plan (`reference.parallel.shard_index`; replicated
parameters whole), its parameters after one AdamW step, its seeded init.  The functions return plain numbers,
flags and arrays (picklable) for the test to assert on.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from optimized.causal_lm import IGNORE_INDEX, Qwen35ForCausalLM
from reference.config import Qwen35Config
from reference.errors import ConfigError
from reference.parallel import shard_index
from tests._parallel_cases import _rel

F64 = torch.float64
INIT_SEED = 5


def _batch(config, B: int = 2, T: int = 70, seed: int = 0):
    """input_ids and labels [B, T] (T > the chunk of 64: two chunks), with the pad token among the inputs and a
    few ignored labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=gen)
    if config.pad_token_id is not None:
        ids[0, 3] = ids[1, 10] = config.pad_token_id
    labels = ids.clone()
    labels[1, 20:26] = IGNORE_INDEX
    return ids, labels


def _cut(model, name: str, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole-model tensor `name`, by the plan (the whole tensor when replicated)."""
    lm = name[len("model."):] if name.startswith("model.") else name
    spec = shard_index(model.config, lm, dist.get_world_size(), dist.get_rank())
    return whole if spec is None else whole.index_select(spec[0], torch.from_numpy(spec[1]))


def _shard_errors(par, whole: dict, what) -> dict:
    """{name: relative error of par's `what(p)` against the cut of the whole model's `whole[name]`}."""
    return {n: _rel(what(p), _cut(par, n, whole[n])) for n, p in par.named_parameters()}


def _grads(model, ids, labels):
    out = model(ids, labels=labels)
    out.loss.backward()
    return out


def check_case(directory: str, save_dir: str) -> dict:
    """One checkpoint: loading, logits and loss, gradients, one AdamW step, save_pretrained, the seeded init, and
    the same gradients without q_norm's gradient sum (the rule the test must be able to catch)."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    single = Qwen35ForCausalLM.from_pretrained(directory, dtype=F64)
    try:
        par = Qwen35ForCausalLM.from_pretrained(directory, dtype=F64, tensor_parallel=tp)
    except ConfigError as e:  # a plan that cannot split this checkpoint: the test checks it is the plan's error
        return {"refused": str(e)}
    c = single.config
    whole = {n: p.detach() for n, p in single.named_parameters()}  # (updated in place by the step below)
    r = {"refused": None, "names_equal": [n for n, _ in par.named_parameters()] == list(whole),
         "held_fraction": sum(p.numel() for p in par.parameters()) / sum(p.numel() for p in single.parameters()),
         "loaded_rel": max(_shard_errors(par, whole, lambda p: p.detach()).values()),
         "hooked": sorted(par._grad_hooks)}

    ids, labels = _batch(c)
    want, got = _grads(single, ids, labels), _grads(par, ids, labels)
    r["logits_rel"] = _rel(got.logits.detach(), want.logits.detach())
    r["loss_rel"] = abs(float(got.loss) - float(want.loss)) / abs(float(want.loss))
    grads = {n: p.grad for n, p in single.named_parameters()}
    r["grad_rel"] = _shard_errors(par, grads, lambda p: p.grad)
    r["grad_missing"] = [n for n, p in par.named_parameters() if p.grad is None]

    # save_pretrained before the step: rank 0 writes the whole checkpoint, and the single model's beside it
    par.save_pretrained(f"{save_dir}/loaded-rank{rank}")
    if rank == 0:
        single.save_pretrained(f"{save_dir}/loaded-single")

    before = {n: p.detach().clone() for n, p in par.named_parameters()}
    for m in (single, par):
        torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1).step()
    r["step_rel"] = max(_shard_errors(par, whole, lambda p: p.detach()).values())
    r["step_moved"] = min(_rel(p.detach(), before[n]) for n, p in par.named_parameters())  # every tensor moved

    # the fresh init: every rank draws the whole model and keeps its shard
    fresh, fresh_par = (Qwen35ForCausalLM(c, seed=INIT_SEED, dtype=F64, tensor_parallel=n) for n in (1, tp))
    init = dict(fresh.named_parameters())
    r["init_equal"] = all(torch.equal(p, _cut(fresh_par, n, init[n])) for n, p in fresh_par.named_parameters())
    fresh_par.save_pretrained(f"{save_dir}/init-rank{rank}")

    # without the gradient sum of the replicated q_norm (inside the attention region), q_norm's gradient is this
    # rank's heads' share only: wrong, while every other gradient stays right
    broken = Qwen35ForCausalLM.from_pretrained(directory, dtype=F64, tensor_parallel=tp)
    removed = [n for n in broken._grad_hooks if n.endswith("self_attn.q_norm.weight")]
    for n in removed:
        broken._grad_hooks.pop(n).remove()
    _grads(broken, ids, labels)
    errors = _shard_errors(broken, grads, lambda p: p.grad)
    r["unsummed"] = {"removed": removed, "q_norm_rel": min(errors[n] for n in removed) if removed else None,
                     "others_rel": max(e for n, e in errors.items() if n not in removed),
                     "partial": {n: dict(broken.named_parameters())[n].grad.numpy() for n in removed},
                     "whole": {n: grads[n].numpy() for n in removed}}
    return r


def refusals(directory: str) -> dict:
    """A tensor_parallel the plan cannot split: the plan's ConfigError, on every rank, for a fresh model and for
    from_pretrained."""
    config = Qwen35Config.from_pretrained(directory)
    out = {}
    for what, make in (("init", lambda: Qwen35ForCausalLM(config, tensor_parallel=dist.get_world_size())),
                       ("load", lambda: Qwen35ForCausalLM.from_pretrained(directory,
                                                                          tensor_parallel=dist.get_world_size()))):
        try:
            make()
            out[what] = None
        except ConfigError as e:
            out[what] = str(e)
    return out


def session(cases, odd: str, save_root: str) -> dict:
    """check_case for each checkpoint directory (saving under save_root/<i>) and the refusals, in one world."""
    return {"cases": [check_case(d, f"{save_root}/{i}") for i, d in enumerate(cases)], "refusals": refusals(odd)}
