"""Tensor and data parallelism on torch.distributed: reference.parallel's plan, run by N × M processes.

    torchrun --nproc-per-node 4 my_script.py           # or any launcher that sets up the default process group
    model = Qwen35Model.from_pretrained(path, tensor_parallel=2, data_parallel=2)   # a ParallelQwen35Model
    out = model.execute(model.prepare_initial_token_inputs(contexts))               # the same calls on every rank

Every rank runs the same program with the same arguments (SPMD).  The world of tp × dp ranks is cut into dp
replicas of tp consecutive ranks (global rank = replica · tp + tensor rank):

* Tensor parallelism, inside a replica: each rank loads only its shard of the checkpoint
  (`reference.weights.load_weights(..., shard=TensorShard)`), holds only its heads' state (conv channels, value
  heads, KV heads), and the replica's `Qwen35Model` sums the partial outputs with one all-reduce after every
  token mixer, every MLP and the embedding, and gathers the vocabulary blocks of the logits
  (`TensorParallelGroup`).  The plan and its oracle are reference.parallel (docs/parallel.md).
* Data parallelism, across replicas: a new request is given to the replica with the most free state slots
  (`reference.parallel.assign_replicas`) and stays there; a step's ragged batch is split by replica
  (`data_parallel_splits`), each replica runs its rows with its own state pool, and the logits are gathered so
  that every rank returns them in request order.

Errors, the same on every rank: a pipeline call first runs its local part (the checks, the claims, the forward
pass) on every rank, then the ranks exchange their outcomes and a fingerprint of the call's arguments; if any
rank failed, or the ranks were called with different ids or tokens, every rank undoes its local part and raises —
the failing rank its own exception, the others the same error class (qwen35's errors) or a RankError naming the
failing rank.  `execute` commits a step only after that exchange, so a prefill that failed on one replica is
undone on all of them.  What the exchange cannot cover: a rank that fails *inside* the forward pass, between two
of its replica's all-reduces (a device error, running out of memory), leaves its tensor-parallel peers waiting in
the next collective until the process group's timeout (`init_process_group(timeout=...)`; `qwen35 generate` sets
QWEN35_DIST_TIMEOUT, default 300 s; `run_local_world` half its time limit), which they then raise.

Communication time is accumulated in `TensorParallelGroup.comm_seconds` (and `ParallelQwen35Model.comm_seconds`
adds the data-parallel gathers), so benchmarks report it separately.
"""
from __future__ import annotations

import hashlib
import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from reference import errors as _errors
from reference import pipeline
from reference.context import TextContext
from reference.errors import ConfigError, PoolFullError, Qwen35Error, RequestError
from reference.parallel import (
    TensorShard,
    assign_replicas,
    block,
    check_data_parallel,
    check_tensor_parallel,
    data_parallel_splits,
)
from reference.pipeline import ModelOutputs, serialized

__all__ = ["Layout", "TensorParallelGroup", "ParallelQwen35Model", "ParallelInputs", "RankError", "make_layout",
           "from_pretrained", "agree", "run_local_world", "free_port"]


class RankError(Qwen35Error, RuntimeError):
    """Another rank failed in a pipeline call with an error that is not one of qwen35's classes; the message
    names the rank and its exception."""


# ---------------------------------------------------------------------------------------------- the groups
class TensorParallelGroup:
    """The tp ranks of one replica: the two collectives of the plan, timed.

    all_reduce(x):       x summed over the ranks, in place (the partial block outputs, the embedding)
    gather_vocab(y):     [n, V_r] vocabulary blocks -> [n, V] (the logits), blocks in rank order
    """

    def __init__(self, size: int, rank: int, group=None, ranks: list[int] | None = None):
        self.size, self.rank, self.group = size, rank, group
        self.ranks = list(range(size)) if ranks is None else list(ranks)
        self.comm_seconds = 0.0
        self.calls = 0

    # Up to this many bytes, a sum is an all-gather followed by a local sum in rank order: for the small buffers of
    # a decode step it is latency that counts, and gloo's all-gather of a 4 KB tensor takes about a third of its
    # all-reduce on this CPU (0.35 vs 1.07 ms, scripts/bench_parallel.py); every rank adds the same parts in the
    # same order, so every rank holds the same sum.  Larger buffers (prefill) use the bandwidth-optimal all-reduce.
    GATHER_SUM_BYTES = 1 << 18

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        t0 = time.perf_counter()
        if x.numel() * x.element_size() <= self.GATHER_SUM_BYTES:
            parts = torch.empty((self.size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            dist.all_gather_single(parts, x.contiguous(), group=self.group)  # the ranks' x, one after another
            x.copy_(parts.view((self.size,) + tuple(x.shape)).sum(0))
        else:
            dist.all_reduce(x, group=self.group)
        self.comm_seconds += time.perf_counter() - t0
        self.calls += 1
        return x

    def gather_vocab(self, y: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[n, V_r] (this rank's block of `block(V, tp, r)`) -> [n, V].  The blocks may differ by one row; they
        are padded to the largest for the gather and trimmed after."""
        if self.size == 1:
            return y
        t0 = time.perf_counter()
        sizes = [b - a for a, b in (block(vocab_size, self.size, r) for r in range(self.size))]
        width = max(sizes)
        if y.shape[1] < width:
            y = torch.nn.functional.pad(y, (0, width - y.shape[1]))
        parts = [torch.empty_like(y) for _ in range(self.size)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        out = torch.cat([p[:, :n] for p, n in zip(parts, sizes, strict=True)], dim=1)
        self.comm_seconds += time.perf_counter() - t0
        self.calls += 1
        return out


@dataclass
class Layout:
    """Where this process sits in a tp × dp world (global rank = replica · tp + tensor rank)."""

    tensor_parallel: int
    data_parallel: int
    rank: int
    tp_group: TensorParallelGroup
    dp_group: object = None  # the ranks with this tensor rank, one per replica (the data-parallel gathers)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.data_parallel

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def replica(self) -> int:
        return self.rank // self.tensor_parallel


def make_layout(tensor_parallel: int = 1, data_parallel: int = 1) -> Layout:
    """This process's Layout in the default process group, which must be initialised with world size
    tensor_parallel × data_parallel (torchrun, or `dist.init_process_group`).  Creates the tensor-parallel and
    data-parallel subgroups (every rank creates all of them, in the same order, as torch.distributed requires)."""
    tp = tensor_parallel
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"tensor_parallel must be a positive int, got {tp!r}")
    dp = check_data_parallel(data_parallel)
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(f"tensor_parallel={tp}, data_parallel={dp} needs torch.distributed: launch with "
                          f"`torchrun --nproc-per-node {tp * dp} ...` (or call torch.distributed.init_process_group "
                          "first); no default process group is initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tp * dp:
        raise ConfigError(f"tensor_parallel={tp} × data_parallel={dp} = {tp * dp} ranks, but the process group has "
                          f"world size {world}; launch {tp * dp} processes (torchrun --nproc-per-node {tp * dp})")
    tp_groups = [list(range(d * tp, (d + 1) * tp)) for d in range(dp)]
    dp_groups = [list(range(t, tp * dp, tp)) for t in range(tp)]
    made_tp = [dist.new_group(r) if tp > 1 else None for r in tp_groups]
    made_dp = [dist.new_group(r) if dp > 1 else None for r in dp_groups]
    replica, tp_rank = rank // tp, rank % tp
    group = TensorParallelGroup(tp, tp_rank, made_tp[replica], tp_groups[replica])
    return Layout(tp, dp, rank, group, made_dp[tp_rank])


# ---------------------------------------------------------------------------------------------- agreement
def _outcome(fn):
    """(ok, value or exception) of fn()."""
    try:
        return True, fn()
    except Exception as exc:  # every failure is exchanged, then re-raised
        return False, exc


def _remote_error(rank: int, name: str, message: str) -> Exception:
    cls = getattr(_errors, name, None)
    text = f"rank {rank}: {message}"
    if isinstance(cls, type) and issubclass(cls, Qwen35Error):
        try:
            return cls(text)
        except TypeError:
            pass
    return RankError(f"rank {rank} raised {name}: {message}")


def digest(*args) -> str:
    """A short fingerprint of a call's arguments (ids, token arrays, counts), to check that every rank was given the
    same ones: SPMD code that feeds the ranks different tokens or ids would otherwise compute garbage silently."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, (list, tuple)):
            h.update(b"[%d" % len(x))
            for y in x:
                feed(y)
            h.update(b"]")
        elif isinstance(x, (np.ndarray, torch.Tensor)):
            a = np.ascontiguousarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes() if a.size <= 1 << 16 else a.reshape(-1)[:: max(a.size >> 12, 1)].tobytes())
        else:
            h.update(repr(x).encode())

    feed(list(args))
    return h.hexdigest()[:15]  # 60 bits: an int64 for the tensor exchange of `agree`


def _exchange_device() -> torch.device:
    """Where the agreement's tensors live: the current GPU under NCCL (it moves only CUDA tensors), else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(outcome, payload=None, undo=None, args_digest: str | None = None):
    """Exchange every rank's outcome of a local step: (ok, value) from `_outcome`.  If every rank succeeded (and,
    with `args_digest`, every rank was called with the same arguments), returns the list of every rank's
    `payload` (by global rank).  Otherwise `undo()` runs where the step succeeded, and every rank raises: its own
    exception where it failed, else the first failing rank's error (its class when it is one of qwen35's, else
    RankError), naming that rank; different arguments are a RequestError on every rank."""
    ok, value = outcome
    world = dist.get_world_size()
    if payload is None:
        # The common case first, in one small tensor collective: every rank's (ok, digest).  Only when a rank
        # failed or the digests differ do the ranks exchange the error messages (all of them see it, so all of
        # them enter that second exchange).
        flags = torch.tensor([int(ok), int(args_digest or "0", 16)], dtype=torch.int64, device=_exchange_device())
        table = torch.empty(world * 2, dtype=torch.int64, device=flags.device)
        dist.all_gather_single(table, flags)
        table = table.view(world, 2).cpu()
        if bool(table[:, 0].all()) and bool((table[:, 1] == table[0, 1]).all()):
            return [None] * world
    mine = (True, payload, args_digest) if ok else (False, (type(value).__name__, str(value)), args_digest)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    failed = [(r, info) for r, (good, info, _) in enumerate(everyone) if not good]
    digests = {d for _, _, d in everyone}
    if not failed and len(digests) == 1:
        return [info for _, info, _ in everyone]
    if ok and undo is not None:
        undo()
    if len(digests) > 1:
        ranks = [r for r, (_, _, d) in enumerate(everyone) if d != everyone[0][2]]
        raise RequestError(f"the ranks were called with different arguments (rank(s) {ranks} differ from rank 0): "
                           "every rank must make the same pipeline calls with the same requests and tokens")
    if not ok:
        raise value
    r, (name, message) = failed[0]
    raise _remote_error(r, name, message)


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class ParallelInputs:
    """One step's inputs on one rank: the batch's request ids in order, the split (`data_parallel_splits`: per
    replica, its rows), each row's return count and tokens run, and this replica's `ModelInputs` for its rows
    (None when it has none this step)."""

    request_ids: list
    splits: list[list[int]]
    return_n_logits: list[int]
    seq_lens: list[int] = field(default_factory=list)
    local: object = None
    model_tag: object = None
    executed: bool = False
    is_decode: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.request_ids)


class ParallelQwen35Model:
    """The pipeline API of `optimized.model.Qwen35Model` over a tp × dp world (module docstring).

    `replica` is this rank's tensor-parallel `Qwen35Model` (its shard of the weights, its state pool).  Every
    rank must make the same calls with the same arguments (checked: a fingerprint of each call's ids and tokens
    is exchanged with the outcomes, and a mismatch is a RequestError on every rank).  `logits`, `generate` and the
    four pipeline calls are supported; `snapshot` / `restore` are single-process calls of `Qwen35Model`.
    """

    def __init__(self, replica, layout: Layout):
        self.replica, self.layout = replica, layout
        self.config = replica.config
        self.max_length = replica.max_length
        self.slots_per_replica = replica.max_batch_size
        self.lock = threading.RLock()
        self._owner: dict = {}  # request id -> replica, in claim order (the same table on every rank)
        self._lengths: dict = {}  # request id -> tokens consumed (every rank knows every request's)
        self._tag = object()
        self.dp_comm_seconds = 0.0

    # -------------------------------------------------------------- queries
    @property
    def max_batch_size(self) -> int:
        return self.slots_per_replica * self.layout.data_parallel

    @property
    def return_logits(self) -> str:
        return self.replica.return_logits

    @return_logits.setter
    def return_logits(self, mode: str) -> None:
        self.replica.return_logits = mode

    @property
    def active_requests(self) -> list:
        return list(self._owner)

    @property
    def comm_seconds(self) -> float:
        """Seconds spent in collectives by this rank: the tensor-parallel sums and gathers plus the
        data-parallel logits gathers."""
        return self.replica.tensor_parallel.comm_seconds + self.dp_comm_seconds

    def seq_len(self, request_id) -> int:
        """Tokens the request has consumed so far (0 for an unknown id), the same on every rank."""
        return self._lengths.get(request_id, 0) if request_id in self._owner else 0

    def check_tokens(self, request_id, tokens):
        return self.replica.check_tokens(request_id, tokens)

    def check_contexts(self, contexts):
        return self.replica.check_contexts(contexts)

    def _free(self) -> list[int]:
        used = [0] * self.layout.data_parallel
        for d in self._owner.values():
            used[d] += 1
        return [self.slots_per_replica - u for u in used]

    def _replica_payloads(self, everyone) -> list:
        """The payload of each replica's first rank (the ranks of a replica agree)."""
        return [everyone[d * self.layout.tensor_parallel] for d in range(self.layout.data_parallel)]

    def _per_row(self, splits, per_replica, n: int) -> list:
        """Per-replica lists of row values -> one list in batch order."""
        out = [0] * n
        for rows, values in zip(splits, per_replica, strict=True):
            for b, v in zip(rows, values, strict=True):
                out[b] = int(v)
        return out

    # -------------------------------------------------------------- the pipeline calls
    @serialized
    def prepare_initial_token_inputs(self, contexts, return_n_logits=1) -> ParallelInputs:
        """Prefill inputs: new requests are assigned to replicas (most free slots first), every replica prepares
        its rows (checks, claims); on any rank's error every rank releases what it claimed and raises."""
        if isinstance(contexts, TextContext):
            contexts = [contexts]
        contexts = list(contexts)
        ids = [getattr(c, "request_id", None) for c in contexts]
        new = [r for r in dict.fromkeys(ids) if r not in self._owner]
        claimed: list = []
        plan: dict = {}

        def local():
            if not contexts:
                raise RequestError("prepare_initial_token_inputs: empty batch (no contexts)")
            free = self._free()
            if len(new) > sum(free):
                raise PoolFullError(f"{len(new)} new request(s) {new[:8]!r} do not fit: {len(self._owner)} of "
                                    f"{self.max_batch_size} slots ({self.layout.data_parallel} replicas × "
                                    f"{self.slots_per_replica}) are live; release finished requests first")
            given = dict(zip(new, assign_replicas(free, len(new)), strict=True))
            splits = data_parallel_splits([self._owner.get(r, given.get(r)) for r in ids], self.layout.data_parallel)
            mine = splits[self.layout.replica]
            counts = return_n_logits
            if not isinstance(return_n_logits, int) and hasattr(return_n_logits, "__len__"):
                if len(return_n_logits) != len(contexts):
                    raise RequestError(f"return_n_logits has {len(return_n_logits)} entries for {len(contexts)} "
                                       "contexts")
                counts = [return_n_logits[b] for b in mine]
            plan.update(given=given, splits=splits)
            if not mine:
                return None
            inputs = self.replica.prepare_initial_token_inputs([contexts[b] for b in mine], return_n_logits=counts)
            claimed.extend(r for r in new if given[r] == self.layout.replica)
            return inputs

        outcome = _outcome(local)
        ok, inputs = outcome
        payload = ((list(inputs.return_n_logits), [int(n) for n in inputs.seq_lens]) if ok and inputs is not None
                   else ([], []))
        counts = return_n_logits if isinstance(return_n_logits, int) else list(return_n_logits)
        everyone = agree(outcome, payload, undo=lambda: [self.replica.release(r) for r in claimed],
                         args_digest=digest(ids, [getattr(c, "tokens", None) for c in contexts], counts))
        for r in new:
            self._owner[r] = plan["given"][r]
            self._lengths[r] = 0
        per_replica = self._replica_payloads(everyone)
        splits = plan["splits"]
        return ParallelInputs(ids, splits, self._per_row(splits, [p[0] for p in per_replica], len(ids)),
                              self._per_row(splits, [p[1] for p in per_replica], len(ids)), local=inputs,
                              model_tag=self._tag)

    @serialized
    def prepare_next_token_inputs(self, next_tokens, prev: ParallelInputs, request_ids=None) -> ParallelInputs:
        """Decode inputs: token b continues request prev.request_ids[b] (or request_ids[b] for a subset); each
        replica prepares its rows."""
        if isinstance(next_tokens, torch.Tensor):
            next_tokens = next_tokens.detach().cpu().tolist()
        plan: dict = {}

        def local():
            if not isinstance(prev, ParallelInputs) or prev.model_tag is not self._tag:
                raise RequestError("prepare_next_token_inputs: prev must be inputs this model prepared")
            ids = list(prev.request_ids) if request_ids is None else request_ids
            if not isinstance(ids, (list, tuple)) or not ids:
                raise RequestError(f"request_ids must be a non-empty list or tuple of the previous step's "
                                   f"requests, got {request_ids!r}")
            ids = list(ids)
            tokens = list(next_tokens) if hasattr(next_tokens, "__len__") else None
            if tokens is None or len(tokens) != len(ids):
                raise RequestError(f"prepare_next_token_inputs: {len(ids)} requests continue but "
                                   f"{'a scalar' if tokens is None else len(tokens)} next tokens were given")
            unknown = [r for r in ids if r not in self._owner or r not in prev.request_ids]
            if unknown:
                raise RequestError(f"request {unknown[0]!r} is not one of the previous step's live requests")
            splits = data_parallel_splits([self._owner[r] for r in ids], self.layout.data_parallel)
            plan.update(ids=ids, splits=splits)
            mine = splits[self.layout.replica]
            if not mine:
                return None
            return self.replica.prepare_next_token_inputs([tokens[b] for b in mine], prev.local,
                                                          request_ids=[ids[b] for b in mine])

        outcome = _outcome(local)
        agree(outcome, args_digest=digest(getattr(prev, "request_ids", None), request_ids, next_tokens))
        ids = plan["ids"]
        return ParallelInputs(ids, plan["splits"], [1] * len(ids), [1] * len(ids), local=outcome[1],
                              model_tag=self._tag, is_decode=True)

    @serialized
    @torch.inference_mode()
    def execute(self, inputs: ParallelInputs) -> ModelOutputs:
        """Run one step: every replica runs its rows (tensor-parallel inside) without committing; only when every
        rank's step succeeded are the steps committed (else abandoned everywhere: a prefill leaves every request
        as it was, a decode step marks its requests broken), and the logits of all replicas are gathered into
        request order on every rank."""
        if not isinstance(inputs, ParallelInputs) or inputs.model_tag is not self._tag:
            raise RequestError("execute: the inputs were not prepared by this model")
        if inputs.executed:
            raise RequestError("execute: these inputs were already executed; prepare the next step's inputs")
        local = inputs.local
        # run_step checks the inputs before its forward pass.  The checks read only the replica's own inputs and
        # requests, which are the same on its tensor-parallel ranks (their calls were checked to agree when the
        # inputs were prepared), so a replica's ranks pass or fail them together: no rank is left alone in one of
        # the forward pass's collectives.  One exchange after the step then covers checks and forward pass alike.
        outcome = _outcome(lambda: None if local is None else self.replica.run_step(local))
        step = outcome[1] if outcome[0] else None
        try:
            agree(outcome)
        except Exception as exc:
            if step is not None:
                step.abandon(f"another rank failed: {exc}")
            raise
        if step is not None:
            step.commit()
        logits = self._gather_logits(inputs, None if step is None else step.outputs.logits)
        inputs.executed = True
        for rid, n in zip(inputs.request_ids, inputs.seq_lens, strict=True):
            self._lengths[rid] = self._lengths.get(rid, 0) + n
        return ModelOutputs(logits=logits, logit_offsets=[0] + list(itertools.accumulate(inputs.return_n_logits)),
                            request_ids=list(inputs.request_ids))

    def _gather_logits(self, inputs: ParallelInputs, mine):
        """This replica's logits [n_d, V] -> every replica's, put back in request order [Σ counts, V]."""
        counts = inputs.return_n_logits
        per_replica = [sum(counts[b] for b in rows) for rows in inputs.splits]
        V = self.config.vocab_size
        dev, dt = self.replica.device, self.replica.dtype
        if mine is None:
            mine = torch.empty(0, V, device=dev, dtype=dt)
        if self.layout.data_parallel == 1:
            return mine
        t0 = time.perf_counter()
        width = max(per_replica)
        padded = torch.zeros(width, V, device=dev, dtype=mine.dtype)
        padded[: mine.shape[0]] = mine
        parts = [torch.empty_like(padded) for _ in range(self.layout.data_parallel)]
        dist.all_gather(parts, padded, group=self.layout.dp_group)
        self.dp_comm_seconds += time.perf_counter() - t0
        starts = list(itertools.accumulate(counts, initial=0))
        out = torch.empty(starts[-1], V, device=dev, dtype=mine.dtype)
        for d, rows in enumerate(inputs.splits):
            at = 0
            for b in rows:
                out[starts[b]:starts[b + 1]] = parts[d][at:at + counts[b]]
                at += counts[b]
        return out

    @serialized
    def release(self, request_id) -> bool:
        """Free the request's slot on its replica; unknown ids are a no-op (returns False)."""
        d = self._owner.pop(request_id, None)
        self._lengths.pop(request_id, None)
        if d is None:
            return False
        if d == self.layout.replica:
            self.replica.release(request_id)
        return True

    @serialized
    @torch.inference_mode()
    def logits(self, batch) -> list[torch.Tensor]:
        """Stateless all-position logits per sequence (as Qwen35Model.logits): the sequences are split into
        contiguous blocks, one per replica, and gathered back in order on every rank."""
        batch = [batch] if isinstance(batch, TextContext) else list(batch)
        lo, hi = block(len(batch), self.layout.data_parallel, self.layout.replica)

        def local():
            if not batch:
                raise RequestError("logits: empty batch")
            return self.replica.logits(batch[lo:hi]) if hi > lo else []

        outcome = _outcome(local)
        payload = [t.cpu() for t in outcome[1]] if outcome[0] and self.layout.data_parallel > 1 else None
        t0 = time.perf_counter()
        everyone = agree(outcome, payload, args_digest=digest([getattr(b, "tokens", b) for b in batch]))
        self.dp_comm_seconds += time.perf_counter() - t0
        if self.layout.data_parallel == 1:
            return outcome[1]
        out = []
        for d in range(self.layout.data_parallel):
            out += [t.to(self.replica.device) for t in everyone[d * self.layout.tensor_parallel]]
        return out

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_token_ids=None) -> list[list[int]]:
        """Generate on every rank (reference.pipeline.generate over this model's pipeline calls): every rank
        returns the same tokens.  Sampling without a seed draws one on rank 0 and gives it to every rank, so the
        ranks sample the same tokens (each rank's logits are the same)."""
        if seed is None and temperature:
            box = [int(np.random.SeedSequence().generate_state(1)[0]) if self.layout.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            seed = box[0]
        return pipeline.generate(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop_token_ids=stop_token_ids)


def from_pretrained(path, *, tensor_parallel: int = 1, data_parallel: int = 1, **kwargs) -> ParallelQwen35Model:
    """Load this rank's shard of a checkpoint into its replica (`Qwen35Model` with a TensorParallelGroup) inside
    the initialised default process group; the arguments of Qwen35Model.from_pretrained otherwise.  Errors of
    any rank (a bad checkpoint, a size the plan cannot split) are raised on every rank."""
    from optimized.model import Qwen35Model  # the replica's engine (it imports this module lazily too)

    layout = make_layout(tensor_parallel, data_parallel)

    def load():
        config = kwargs.pop("config", None)
        if config is None:
            from reference.config import Qwen35Config

            config = Qwen35Config.from_pretrained(path)
        check_tensor_parallel(config, tensor_parallel)
        shard = TensorShard(config, tensor_parallel, layout.tp_rank)
        return Qwen35Model.from_pretrained(path, config=config, shard=shard, tensor_parallel_group=layout.tp_group,
                                           **kwargs)

    outcome = _outcome(load)
    if not outcome[0] and not isinstance(outcome[1], Qwen35Error):
        traceback.print_exception(outcome[1])
    agree(outcome)
    replica = outcome[1]
    # Every replica gets the same number of slots: the smallest any rank's free memory allows.
    slots = [None] * layout.world_size
    dist.all_gather_object(slots, replica.max_batch_size)
    if min(slots) != replica.max_batch_size:
        replica.make_pools(min(slots))
    return ParallelQwen35Model(replica, layout)


# ---------------------------------------------------------------------------------------------- local worlds
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world_main(rank, world_size, port, timeout_s, fn, args, queue, threads):
    import datetime
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            queue.put((rank, True, fn(*args)))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported to the parent, which raises
        queue.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_local_world(fn, world_size: int, *args, timeout_s: float = 120.0, threads: int = 1) -> list:
    """Run `fn(*args)` in `world_size` fresh processes joined in one gloo process group on a free local port (what
    torchrun does, in-process for tests and benchmarks); returns each rank's result, by rank.

    `fn` must be importable (a module-level function) and its result picklable.  Every collective times out
    after `timeout_s` / 2 seconds, the whole run after `timeout_s`: the processes are then killed and a
    RuntimeError raised.  A rank that raises makes this raise with its traceback (after all ranks ended)."""
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_world_main, args=(r, world_size, port, max(timeout_s / 2, 1.0), fn, args, q,
                                                   threads), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"run_local_world: {world_size - len(results)} of {world_size} ranks did not "
                                   f"finish within {timeout_s:.0f} s (ranks done: {sorted(results)})")
            try:
                rank, ok, value = q.get(timeout=min(left, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead and q.empty():
                    time.sleep(0.5)
                    if q.empty():
                        raise RuntimeError(f"run_local_world: rank(s) {dead} exited without a result") from None
                continue
            results[rank] = (ok, value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    failed = [(r, v) for r, (ok, v) in sorted(results.items()) if not ok]
    if failed:
        raise RuntimeError("run_local_world: " + "\n".join(f"rank {r} failed: {v}" for r, v in failed))
    return [results[r][1] for r in range(world_size)]
