"""What each rank runs in the multi-process tests of tests/test_parallel_distributed.py.

Each function runs inside a rank of a local gloo world (`optimized.parallel.run_local_world`) and returns plain
numbers and flags (picklable) for the test to assert on.  Every comparison is against the single-process model
built in the same rank from the same checkpoint: the optimized engine in float32 (the parallel run must equal
it to fp32 rounding), and the float64 reference simulation of the plan (reference.parallel).
"""
from __future__ import annotations

import numpy as np
import torch

from optimized.model import Qwen35Model
from qwen35.resident import resident_bytes
from reference.context import TextContext
from reference.errors import Qwen35Error, RequestError


def _rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ (the relative RMS error of qwen35.measure.rel_rms), in float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def _prompts(config, seed=0, lengths=(5, 40, 1, 70)):
    top = config.image_token_id if config.image_token_id is not None else config.vocab_size  # no placeholders
    rng = np.random.default_rng(seed)
    return [rng.integers(0, top, n).tolist() for n in lengths]


def _pipeline_trace(model, config) -> list:
    """Logits of a fixed sequence of pipeline calls: a chunked prefill of three requests, decode steps, a release,
    a new request in the freed slot, more decode steps.  The same calls on any engine give comparable lists."""
    p = _prompts(config, seed=1, lengths=(30, 7, 50, 12))
    trace = []
    inp = model.prepare_initial_token_inputs([TextContext("a", p[0][:20]), TextContext("b", p[1]),
                                              TextContext("c", p[2][:33])], return_n_logits=1)
    trace.append(model.execute(inp).logits)
    inp = model.prepare_initial_token_inputs([TextContext("a", p[0][20:]), TextContext("c", p[2][33:])])
    out = model.execute(inp)
    trace.append(out.logits)
    inp = model.prepare_next_token_inputs([3, 4], inp)
    for _ in range(3):
        out = model.execute(inp)
        trace.append(out.logits)
        inp = model.prepare_next_token_inputs(out.logits.argmax(-1).tolist(), inp)
    model.release("b")
    inp = model.prepare_initial_token_inputs([TextContext("d", p[3]), TextContext("a", [5, 6])])  # "d" reuses a slot
    trace.append(model.execute(inp).logits)
    inp = model.prepare_initial_token_inputs([TextContext("c", [9]), TextContext("a", [1]), TextContext("d", [2])])
    for _ in range(3):
        out = model.execute(inp)
        trace.append(out.logits)
        inp = model.prepare_next_token_inputs(out.logits.argmax(-1).tolist(), inp)
    out = model.execute(inp)
    trace.append(out.logits)
    inp = model.prepare_next_token_inputs([7, 8], inp, request_ids=["d", "a"])  # a subset continues, reordered
    trace.append(model.execute(inp).logits)
    for rid in ("a", "c", "d"):
        model.release(rid)
    return trace


def check_checkpoint(directory, tp: int, dp: int, *, multimodal: bool = False, slots: int = 3) -> dict:
    """The distributed model against the single-process one on one checkpoint: stateless logits, the pipeline
    trace, greedy generation, the reference simulation, the memory model; numbers for the test to assert."""
    from reference.memory import kv_bytes_per_token, state_bytes_per_request, weight_bytes
    from reference.parallel import TensorParallelSimulation

    model = Qwen35Model.from_pretrained(directory, tensor_parallel=tp, data_parallel=dp, max_batch_size=slots)
    single = Qwen35Model.from_pretrained(directory, max_batch_size=slots * dp)
    c = single.config
    r = {"layout": (tp, dp)}
    seqs = _prompts(c)
    got, want = model.logits(seqs), single.logits(seqs)
    r["logits_rel"] = max(_rel(a, b) for a, b in zip(got, want, strict=True))
    sim = TensorParallelSimulation.from_pretrained(directory, tensor_parallel=tp).logits(seqs)
    r["simulation_rel"] = max(_rel(a, b) for a, b in zip(got, sim, strict=True))
    if multimodal:
        from reference.multimodal import TextAndVisionContext
        from tests._mm_cases import prompt_case

        ctxs = [TextAndVisionContext(request_id=f"m{i}", tokens=t, **kw)
                for i, (t, kw) in enumerate(prompt_case(n) for n in ("one-image", "two-images", "video"))]
        got, want = model.logits(ctxs), single.logits(ctxs)
        r["image_logits_rel"] = max(_rel(a, b) for a, b in zip(got, want, strict=True))
        r["image_generate_equal"] = model.generate(ctxs, max_new_tokens=4) == single.generate(ctxs, max_new_tokens=4)
    a, b = _pipeline_trace(model, c), _pipeline_trace(single, c)
    r["pipeline_rel"] = max(_rel(x, y) for x, y in zip(a, b, strict=True))
    r["pipeline_steps"] = len(a)
    gen = _prompts(c, seed=2, lengths=(9, 3, 25, 14, 6, 2, 31)[: 2 * slots * dp + 1])  # more prompts than slots
    r["generate_equal"] = model.generate(gen, max_new_tokens=5) == single.generate(gen, max_new_tokens=5)
    r["active_after"] = model.active_requests
    # memory: what this rank holds against reference.memory's per-rank prediction
    rep = model.replica
    r["weight_bytes"] = resident_bytes(rep)["weights"]  # distinct storages: views (fused projections) once
    r["weight_bytes_predicted"] = weight_bytes(c, "float32", include_vision=False, tensor_parallel=tp,
                                               rank=rep.shard.rank)
    r["pool_bytes"] = sum(p.numel() * p.element_size() for p in rep.conv_pools + rep.state_pools)
    r["pool_bytes_predicted"] = rep.max_batch_size * state_bytes_per_request(c, "float32", tensor_parallel=tp)
    kv = rep._new_kv()
    r["kv_bytes_per_token"] = sum(2 * x.k[0].numel() * x.k.element_size() for x in kv)
    r["kv_bytes_per_token_predicted"] = kv_bytes_per_token(c, "float32", tensor_parallel=tp)
    r["comm_seconds"] = model.comm_seconds
    r["comm_calls"] = rep.tensor_parallel.calls
    return r


def session(cases, tp: int, dp: int) -> list:
    """check_checkpoint for each (directory, multimodal) case, in one process group."""
    return [check_checkpoint(d, tp, dp, multimodal=mm) for d, mm in cases]


def one_rank_fails(directory, what: str) -> dict:
    """One rank alone fails (or is called differently); every rank must raise (the same class) and none may hang.

    load:     rank 1's directory has no config.json
    args:     rank 1 is given other tokens than rank 0 (SPMD code gone wrong)
    prepare:  rank 1's replica fails to prepare (an injected error, as a device failure would be)
    execute:  the last rank's replica fails in the forward pass of a prefill (data parallel 2: the other replica
              succeeded and must not commit either); afterwards the same step runs and equals the single model
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {"rank": rank}
    batch = [TextContext("x", [4, 5]), TextContext("y", [1, 2, 3])]
    try:
        if what == "load":
            path = directory if rank == 0 else directory + "-missing"
            Qwen35Model.from_pretrained(path, tensor_parallel=world)
        elif what == "execute":
            model = Qwen35Model.from_pretrained(directory, data_parallel=world, max_batch_size=2)
            inputs = model.prepare_initial_token_inputs(batch)
            if rank == world - 1:
                model.replica._forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected failure"))
            model.execute(inputs)
        else:
            model = Qwen35Model.from_pretrained(directory, tensor_parallel=world, max_batch_size=2)
            if what == "args":
                batch[1] = TextContext("y", [1, 2, 3] if rank == 0 else [1, 7, 3])
            elif rank == 1:
                def fail(*args, **kwargs):
                    raise RequestError("injected failure")

                model.replica.prepare_initial_token_inputs = fail
            model.prepare_initial_token_inputs(batch)
        out["raised"] = None
    except Qwen35Error as e:
        out["raised"], out["message"] = type(e).__name__, str(e)
    except RuntimeError as e:
        out["raised"], out["message"] = "RuntimeError", str(e)
    if what in ("args", "prepare"):  # nothing was claimed: the same ids work afterwards, on every rank
        model.replica.__dict__.pop("prepare_initial_token_inputs", None)
        model.prepare_initial_token_inputs([TextContext("x", [4, 5]), TextContext("y", [1, 2])])
        out["after"] = sorted(model.active_requests)
    if what == "execute":  # nothing was committed on any replica: the step runs again from the same state
        model.replica.__dict__.pop("_forward", None)
        out["lengths"] = [model.seq_len("x"), model.seq_len("y"), model.replica.seq_len("x"),
                          model.replica.seq_len("y")]
        got = model.execute(model.prepare_initial_token_inputs(batch)).logits
        single = Qwen35Model.from_pretrained(directory, max_batch_size=2)
        want = single.execute(single.prepare_initial_token_inputs(batch)).logits
        out["rerun_rel"] = _rel(got, want)
    return out


def sample_without_seed(directory) -> list:
    """Sampling with temperature and no seed: every rank must sample the same tokens."""
    import torch.distributed as dist

    model = Qwen35Model.from_pretrained(directory, tensor_parallel=dist.get_world_size(), max_batch_size=2)
    return model.generate([[1, 2, 3], [4, 5]], max_new_tokens=8, temperature=1.0, top_k=20)


def hang_on_rank_1(seconds: float) -> int:
    """Rank 1 never reaches the collective: run_local_world's time limit must end the run."""
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(seconds)
    dist.barrier()
    return dist.get_rank()
