"""Many requests at once: batched prefill and decode throughput on one CPU thread, against a floor -> JSON.

    from qwen35.bench_batch import run_batch
    res = run_batch(quick=False)            # or: qwen35 bench --batch [--quick] [--out FILE]

The model is the whole-model benchmark's (`qwen35.bench.bench_config`: the 0.8B width, 4 layers L L L F, vocab
32768, random weights written by `qwen35.bench.write_random_checkpoint`).  Per batch size B ∈ {1, 4, 16, 64} a
seeded draw gives B prompts of mixed lengths in 16..512 (`prompt_lengths`), the same for every engine.

**The floor, written before measuring** (`decode_floor`, `prefill_floor`; rates measured in the same run:
`qwen35.bench.stream_bandwidth`, one-thread DRAM read, and `qwen35.bench.sgemm_rate`, one-thread fp32 matmul).
One decode step of B requests, request b at context c_b (the tokens its attention layers read, the new one included):

    bytes  = W + 2 · B · S + Σ_b c_b · KV
             W  = qwen35.measure.decode_weight_bytes(config): every weight a token multiplies through, lm_head
                  included, streamed once per step whatever B is (465,960,960 bytes in fp32 here)
             S  = reference.memory.state_bytes_per_request (conv + recurrent state of every linear layer; fp32
                  recurrent state: 3 × (16·128·128·4 + 6144·3·4) = 3,366,912 bytes here), read and written once
                  (the in-place update is a read-modify-write; at B = 64 the 215 MB do not stay in the caches)
             KV = reference.memory.kv_bytes_per_token (K and V of the full-attention layers: 4,096 bytes here)
    FLOPs  = 2 · B · (P + H·V)  +  L_lin · gdn_decode_flops(B)  +  L_full · Σ_b 4 · c_b · n_h · d_h
             P = qwen35.measure.linear_weights_per_token (82,935,808 here), H·V the lm_head; the gated delta rule's
             decode step (qwen35.measure.gdn_decode_flops); QKᵀ and PV of one query over c_b keys per head
    step   ≥ max(bytes / DRAM rate, FLOPs / sgemm rate);   tokens/s ≤ B / step

At B = 1 the bytes term dominates (~15 ms at ~30 GB/s: ~64 tokens/s); from B ≈ 8 on the FLOP term does (2 · 116.5 M
FLOPs per row: ~2.5 ms per row at ~95 GFLOP/s), so the floor grows from ~64 to ~400 tokens/s.  A prefill of the B
prompts costs Σ_b qwen35.measure.model_prefill_flops(config, T_b) (logits of each prompt's last position) at the
sgemm rate; transformers' padded batch computes B · max_b T_b token rows instead (its "computed" tokens).

**What is timed** (one process, one thread: qwen35.measure.pin_threads and SINGLE_THREAD_ENV; `qwen35 bench`
re-executes itself with them):

* `optimized` — optimized.model.Qwen35Model (float32, torch backend): one ragged prefill of the B prompts
  (`prepare_initial_token_inputs` + `execute`, one packed batch), then decode steps of B rows updating the state
  pool in place;
* `reference` — reference.model.Qwen35Model in float32: the same calls; its state moves by gather / scatter;
* `transformers` — `Qwen3_5ForCausalLM` on the same checkpoint: the prompts left-padded to the longest with an
  attention_mask (position ids counted from each prompt's first real token), one padded forward with its own cache,
  then one token per row per step with that cache and the grown mask (what `generate` runs, without the sampling
  machinery).  Its prefill computes the padding too: "useful tokens/s" (real prompt tokens per second, the fair
  number) and "computed tokens/s" (padded rows per second) are both reported;
* at B ∈ {1, 16} also `optimized_bf16` (dtype=torch.bfloat16: bf16 weights and activations, fp32 recurrent state)
  and `transformers_bf16` (dtype=torch.bfloat16), its peer.

Every engine starts with one untimed prefill of a short mixed batch and two decode steps (warm-up).  Per B the
engines run round-robin (a, b, c, a, b, c, …) so that a change of machine load hits all alike: prefill rounds (3 at
B ≤ 4, 2 at B = 16, 1 at B = 64 — a B = 64 round is minutes of work —, 1 for the bf16 engines), then two untimed
decode steps, then decode rounds of `decode_steps` steps each; medians.  Decode continues each engine's own greedy
tokens (the tokens are recorded: they agree across engines, so the work is the same).  After the timing, the
optimized engine's decode step is profiled (`profile_decode`: where the time goes — each layer's mixer and MLP,
the dense products and their FLOP rate, the lm_head, the per-request loop of the attention layer, and what is left
for Python: packing, checks, bookkeeping).

**bf16** (this CPU has AVX-512 BF16): decode tokens/s of bf16 vs fp32 weights, against the bytes ratio of their
floors (does bf16 halve the weight stream in practice?); the accuracy cost on the random checkpoint (every
position's logits vs the float64 reference oracle: relative RMS and greedy-token agreement, `logits_accuracy`) and
on the bundled trained demo (held-out bits per byte, qwen35.evaluation, fp32 vs bf16).

Goals (`GOALS`): decode ≥ 3× transformers at B = 16 and ≥ 4× at B = 64, batch-1 decode ≥ 70 % of its floor.
The console table and the Markdown of docs/benchmarks.md come from `qwen35.report.batch_table`.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qwen35.bench import SHARED_NOTE, bench_config, sgemm_rate, stream_bandwidth, write_random_checkpoint
from qwen35.measure import (
    SINGLE_THREAD_ENV,
    decode_weight_bytes,
    gdn_decode_flops,
    linear_weights_per_token,
    machine_info,
    model_prefill_flops,
    pin_threads,
)
from reference.memory import kv_bytes_per_token, state_bytes_per_request

__all__ = ["BatchSettings", "GOALS", "prompt_lengths", "make_prompts", "decode_step_flops", "decode_step_bytes",
           "decode_floor", "prefill_floor", "PipelineContender", "TransformersContender", "load_contenders",
           "measure_batch", "profile_decode", "profile_torch_ops", "logits_accuracy", "demo_bits_per_byte",
           "goals_report", "bf16_summary", "run_batch"]

DEMO_DIR = Path(__file__).resolve().parent / "demo"  # the bundled trained checkpoint (qwen35/demo)

GOALS = {
    "decode_speedup_vs_hf_B16": 3.0,
    "decode_speedup_vs_hf_B64": 4.0,
    "decode_B1_fraction_of_floor": 0.7,
}

MAIN = ("optimized", "reference", "transformers")
BF16 = ("optimized_bf16", "transformers_bf16")
CONTENDER_LABELS = {
    "optimized": "optimized (PyTorch, fp32, in-place pool)",
    "reference": "reference (NumPy, fp32, gather / scatter)",
    "transformers": "transformers Qwen3_5ForCausalLM (fp32, left padding)",
    "optimized_bf16": "optimized (PyTorch, bf16 weights, fp32 state)",
    "transformers_bf16": "transformers Qwen3_5ForCausalLM (bf16)",
}


@dataclass(frozen=True)
class BatchSettings:
    """What one run measures.  `prefill_repeats[B]`: prefill rounds at batch size B (the bf16 engines: always
    `bf16_prefill_repeats`); decode: `decode_repeats` rounds of `decode_steps` steps after `decode_warmup` untimed
    steps.  `eval_max_bytes`: held-out bytes of the demo scored per dtype (None: the whole split)."""

    batch_sizes: tuple = (1, 4, 16, 64)
    bf16_batch_sizes: tuple = (1, 16)
    prompt_range: tuple = (16, 512)
    seed: int = 0
    prefill_repeats: dict = field(default_factory=lambda: {1: 3, 4: 3, 16: 2, 64: 1})
    bf16_prefill_repeats: int = 1
    decode_steps: int = 8
    decode_repeats: int = 3
    decode_warmup: int = 2
    profile_steps: int = 3
    accuracy_prompts: int = 4
    eval_max_bytes: int | None = None

    @classmethod
    def quick(cls) -> BatchSettings:
        """A short run: B ∈ {1, 4}, prompts of 16..64 tokens, fewer steps and repeats, 2 KB of the demo."""
        return cls(batch_sizes=(1, 4), bf16_batch_sizes=(1, 4), prompt_range=(16, 64),
                   prefill_repeats={1: 2, 4: 2}, decode_steps=4, decode_repeats=2, decode_warmup=1, profile_steps=2,
                   accuracy_prompts=2, eval_max_bytes=2048)

    def prefill_rounds(self, name: str, B: int) -> int:
        return self.bf16_prefill_repeats if name in BF16 else self.prefill_repeats.get(B, 1)


# ----------------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------------


def prompt_lengths(B: int, prompt_range=(16, 512), seed: int = 0) -> list[int]:
    """B prompt lengths drawn uniformly from prompt_range (both ends included), seeded by (seed, B)."""
    lo, hi = prompt_range
    return [int(n) for n in np.random.default_rng([seed, B]).integers(lo, hi + 1, B)]


def make_prompts(config, B: int, prompt_range=(16, 512), seed: int = 0) -> list[list[int]]:
    """B prompts of `prompt_lengths` tokens, ids uniform in the vocabulary, seeded by (seed, B)."""
    rng = np.random.default_rng([seed, B, 1])
    return [rng.integers(0, config.vocab_size, n).tolist() for n in prompt_lengths(B, prompt_range, seed)]


# ----------------------------------------------------------------------------------------------------------------
# the floor
# ----------------------------------------------------------------------------------------------------------------


def decode_step_flops(config, contexts: Sequence[int]) -> int:
    """FLOPs of one decode step of len(contexts) requests, request b attending over contexts[b] tokens (the new one
    included): 2·B·(P + H·V) + L_lin·gdn_decode_flops(B) + L_full·Σ_b 4·c_b·n_h·d_h (module docstring)."""
    c, B = config, len(contexts)
    dense = 2 * B * (linear_weights_per_token(c) + c.hidden_size * c.vocab_size)
    rule = c.num_linear_layers * gdn_decode_flops(B, c.linear_num_value_heads, c.linear_key_head_dim,
                                                  c.linear_value_head_dim)
    attention = c.num_full_layers * sum(4 * int(n) * c.num_attention_heads * c.head_dim for n in contexts)
    return int(dense + rule + attention)


def decode_step_bytes(config, contexts: Sequence[int], *, weight_bytes: int = 4, conv_dtype="float32",
                      kv_dtype="float32") -> dict:
    """Compulsory bytes of one decode step: {weights, state, kv, total}.  The weights once (`weight_bytes` each),
    every request's Gated DeltaNet state read and written once (fp32 recurrent state, conv state in `conv_dtype`),
    every request's K/V read once (`kv_dtype`)."""
    B = len(contexts)
    w = decode_weight_bytes(config, weight_bytes)
    s = 2 * B * state_bytes_per_request(config, "float32", conv_dtype=conv_dtype)
    kv = int(sum(int(n) for n in contexts)) * kv_bytes_per_token(config, kv_dtype)
    return {"weights": w, "state": s, "kv": kv, "total": w + s + kv}


def decode_floor(config, contexts: Sequence[int], *, read_gbps: float, sgemm_gflops: float,
                 weight_bytes: int = 4) -> dict:
    """The decode floor of B = len(contexts) requests: bytes at the DRAM read rate, FLOPs at the sgemm rate, the
    larger of the two per step, and the tokens/s it allows (B per step)."""
    low = "float32" if weight_bytes == 4 else "bfloat16"  # conv state and K/V in the model dtype
    by = decode_step_bytes(config, contexts, weight_bytes=weight_bytes, conv_dtype=low, kv_dtype=low)
    flops = decode_step_flops(config, contexts)
    t_bytes = by["total"] / (read_gbps * 1e9)
    t_flops = flops / (sgemm_gflops * 1e9)
    step = max(t_bytes, t_flops)
    return {"B": len(contexts), "bytes": by, "flops": flops, "bytes_s": t_bytes, "flops_s": t_flops, "step_s": step,
            "bound": "bytes" if t_bytes >= t_flops else "flops", "tok_per_s": len(contexts) / step}


def prefill_floor(config, lengths: Sequence[int], *, sgemm_gflops: float) -> dict:
    """Prefill floor of one ragged batch: Σ_b model_prefill_flops(T_b) at the sgemm rate; and the FLOPs of the same
    prompts left-padded to the longest (B · model_prefill_flops(max T), what a padded batch computes)."""
    flops = sum(model_prefill_flops(config, int(n)) for n in lengths)
    padded = len(lengths) * model_prefill_flops(config, max(int(n) for n in lengths))
    seconds = flops / (sgemm_gflops * 1e9)
    return {"flops": int(flops), "padded_flops": int(padded), "seconds": seconds,
            "tok_per_s": sum(int(n) for n in lengths) / seconds}


# ----------------------------------------------------------------------------------------------------------------
# the engines, behind one interface
# ----------------------------------------------------------------------------------------------------------------


class PipelineContender:
    """reference.model / optimized.model Qwen35Model through the pipeline calls: `prefill(prompts)` starts a new
    batch (releasing the previous one) with one ragged prefill, `decode(n)` runs n steps of one token per request,
    each request continuing its own greedy token.  `tokens[b]`: the greedy tokens of request b so far."""

    def __init__(self, model):
        self.model = model
        self.ids: list = []
        self.tokens: list[list[int]] = []
        self._inputs = None
        self._next = None
        self._counter = itertools.count()

    def prefill(self, prompts) -> None:
        from reference.context import TextContext

        self.release()
        n = next(self._counter)
        self.ids = [("bench", n, b) for b in range(len(prompts))]
        self._inputs = self.model.prepare_initial_token_inputs(
            [TextContext(rid, p) for rid, p in zip(self.ids, prompts, strict=True)])
        self._take(self.model.execute(self._inputs).logits)
        self.tokens = [[t] for t in self._next.tolist()]

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self._inputs = self.model.prepare_next_token_inputs(self._next, self._inputs)
            self._take(self.model.execute(self._inputs).logits)
            for row, t in zip(self.tokens, self._next.tolist(), strict=True):
                row.append(t)

    def _take(self, logits) -> None:
        """The greedy next token of every request (one logit row each), as an int64 array on the host."""
        nxt = logits.argmax(-1)
        self._next = nxt.cpu().numpy() if hasattr(nxt, "cpu") else np.asarray(nxt)

    def release(self) -> None:
        for rid in self.ids:
            self.model.release(rid)
        self.ids = []


class TransformersContender:
    """transformers' Qwen3_5ForCausalLM on a left-padded batch: `prefill(prompts)` runs one forward over the
    prompts padded to the longest (attention_mask 0 on the padding, position ids counted from each prompt's first
    real token, logits of the last position only) and keeps the model's own cache; `decode(n)` feeds one token per
    row per step with that cache, the mask grown by one column and each row's next position."""

    def __init__(self, model, pad_id: int = 0):
        import inspect

        self.model, self.pad_id = model, pad_id
        self.tokens: list[list[int]] = []
        self.padded_tokens = 0
        params = inspect.signature(model.forward).parameters  # transformers renamed past_key_values to cache
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._state = None

    def prefill(self, prompts) -> None:
        import torch

        self._state = None
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, T - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        self.padded_tokens = B * T
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1)
        self._state = (self._cache_of(out), mask, mask.sum(-1), nxt)
        self.tokens = [[t] for t in nxt.tolist()]

    def decode(self, steps: int) -> None:
        import torch

        cache, mask, pos, nxt = self._state
        ones = torch.ones(mask.shape[0], 1, dtype=mask.dtype)
        with torch.no_grad():
            for _ in range(steps):
                mask = torch.cat([mask, ones], 1)
                out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                                 use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
                cache, pos, nxt = self._cache_of(out), pos + 1, out.logits[:, -1].argmax(-1)
                for row, t in zip(self.tokens, nxt.tolist(), strict=True):
                    row.append(t)
        self._state = (cache, mask, pos, nxt)

    @staticmethod
    def _cache_of(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def release(self) -> None:
        self._state = None


def load_contenders(path, names: Sequence[str], max_batch_size: int) -> tuple[dict, dict]:
    """The engines `names` on the checkpoint at `path` -> ({name: contender}, {name: why it is missing}).  A
    transformers without Qwen3.5 (or none at all) is recorded, not raised."""
    import torch

    import optimized.model as OM
    import reference.model as RM

    out, missing = {}, {}
    for name in names:
        if name == "optimized":
            out[name] = PipelineContender(OM.Qwen35Model.from_pretrained(path, max_batch_size=max_batch_size,
                                                                         backend="torch"))
        elif name == "optimized_bf16":
            out[name] = PipelineContender(OM.Qwen35Model.from_pretrained(
                path, max_batch_size=max_batch_size, backend="torch", dtype=torch.bfloat16))
        elif name == "reference":
            out[name] = PipelineContender(RM.Qwen35Model.from_pretrained(path, max_batch_size=max_batch_size,
                                                                         dtype=np.float32))
        elif name in ("transformers", "transformers_bf16"):
            try:
                import transformers

                from qwen35.evaluation import _quiet

                dt = torch.bfloat16 if name.endswith("bf16") else torch.float32
                with _quiet(transformers):
                    hf = transformers.Qwen3_5ForCausalLM.from_pretrained(path, dtype=dt).eval()
                out[name] = TransformersContender(hf)
            except Exception as exc:  # transformers missing or without Qwen3.5
                missing[name] = f"{type(exc).__name__}: {exc}"
        else:
            raise ValueError(f"unknown contender {name!r}; known: {', '.join(MAIN + BF16)}")
    return out, missing


# ----------------------------------------------------------------------------------------------------------------
# one batch size
# ----------------------------------------------------------------------------------------------------------------


def _median_row(times: list[float], work: float) -> dict:
    m = statistics.median(times)
    return {"median_s": m, "min_s": min(times), "repeats": len(times), "tok_per_s": work / m}


def measure_batch(contenders: dict, prompts, settings: BatchSettings, *, log=print) -> dict:
    """Prefill rounds, then decode rounds, every engine round-robin (module docstring); returns the row of one B:
    per engine the prefill and decode timings and the greedy tokens of the last prefill + decode."""
    B = len(prompts)
    lens = [len(p) for p in prompts]
    useful = sum(lens)
    pf = {k: [] for k in contenders}
    for r in range(max(settings.prefill_rounds(k, B) for k in contenders)):
        for k, c in contenders.items():
            if r < settings.prefill_rounds(k, B):
                t0 = time.perf_counter()
                c.prefill(prompts)
                pf[k].append(time.perf_counter() - t0)
    for c in contenders.values():
        c.decode(settings.decode_warmup)
    dec = {k: [] for k in contenders}
    for _ in range(settings.decode_repeats):
        for k, c in contenders.items():
            t0 = time.perf_counter()
            c.decode(settings.decode_steps)
            dec[k].append(time.perf_counter() - t0)
    row = {"B": B, "prompt_lengths": lens, "prompt_tokens": useful, "prefill": {}, "decode": {}, "tokens": {}}
    for k, c in contenders.items():
        p = _median_row(pf[k], useful)
        if isinstance(c, TransformersContender):
            p["useful_tok_per_s"] = p["tok_per_s"]
            p["padded_tokens"] = c.padded_tokens
            p["computed_tok_per_s"] = c.padded_tokens / p["median_s"]
        row["prefill"][k] = p
        d = _median_row(dec[k], B * settings.decode_steps)
        d["ms_per_step"] = 1e3 * d["median_s"] / settings.decode_steps
        row["decode"][k] = d
        row["tokens"][k] = [list(t) for t in c.tokens]
    first = row["tokens"].get("optimized")
    if first is not None:  # the same greedy tokens = the same work (random weights: near-ties may differ)
        row["greedy_agreement_vs_optimized"] = {
            k: float(np.mean([a == b for ta, tb in zip(first, t, strict=True) for a, b in zip(ta, tb, strict=True)]))
            for k, t in row["tokens"].items() if k != "optimized"}
    log(f"  B={B} ({useful} prompt tokens): decode " + ", ".join(
        f"{k} {row['decode'][k]['tok_per_s']:.1f}" for k in contenders) + " tok/s; prefill " + ", ".join(
        f"{k} {row['prefill'][k]['tok_per_s']:.0f}" for k in contenders) + " tok/s")
    return row


# ----------------------------------------------------------------------------------------------------------------
# where the decode time goes
# ----------------------------------------------------------------------------------------------------------------


def _linear_flops(x, w, *args, **kwargs) -> int:
    return 2 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]


def _profile_targets():
    """(object, attribute, label, FLOP count or None) of every optimized-engine function a decode step calls that
    the profile times.  The wrappers replace module attributes for the profiled steps only."""
    import optimized.attention as oat
    import optimized.backend as obk
    import optimized.deltanet as odn
    import optimized.mlp as omlp
    import optimized.model as om

    return [
        (om.Qwen35Model, "prepare_next_token_inputs", "prepare inputs (checks, packing)", None),
        (om.Qwen35Model, "execute", "execute", None),
        (om, "gated_deltanet_decode", "GDN mixers", None),
        (odn, "linear", "GDN mixers: projections", _linear_flops),
        (obk, "causal_conv1d_update", "GDN mixers: conv update", None),
        (obk, "fused_recurrent_gated_delta_rule_update", "GDN mixers: rule update", None),
        (om, "gated_attention", "attention mixer", None),
        (oat, "linear", "attention mixer: projections", _linear_flops),
        (oat, "_attend", "attention mixer: per-request attention", None),
        (oat.KVCache, "append", "attention mixer: per-request KV append", None),
        (om, "swiglu_mlp", "MLPs", None),
        (omlp, "linear", "MLPs: projections", _linear_flops),
        (om, "linear", "lm_head", _linear_flops),
        (om, "rms_norm", "norms", None),
    ]


@contextlib.contextmanager
def _timed(targets, seconds: dict, calls: dict, flops: dict):
    """Replace each target by a wrapper that adds its wall time (and FLOPs) to the dicts; restored on exit."""
    saved = []

    def wrap(label, fn, count):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - t0
                calls[label] += 1
                if count is not None:
                    flops[label] += count(*args, **kwargs)
        return timed

    try:
        for obj, attr, label, count in targets:
            fn = getattr(obj, attr, None)
            if fn is not None:
                saved.append((obj, attr, vars(obj).get(attr)))  # None: inherited, so deleted again on exit
                setattr(obj, attr, wrap(label, fn, count))
        yield
    finally:
        for obj, attr, own in reversed(saved):
            if own is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, own)


def profile_decode(contender: PipelineContender, steps: int, *, sgemm_gflops: float | None = None) -> dict:
    """Time `steps` decode steps of the optimized engine's live batch with every part of the step timed
    (`_profile_targets`): ms per step of each part (inclusive: "GDN mixers" contains its projections), the dense
    products together (FLOP rate, weight-stream rate) and what is left outside the timed parts."""
    seconds, calls, flops = defaultdict(float), defaultdict(int), defaultdict(int)
    with _timed(_profile_targets(), seconds, calls, flops):
        t0 = time.perf_counter()
        contender.decode(steps)
        total = time.perf_counter() - t0
    per = {k: 1e3 * v / steps for k, v in seconds.items()}
    B = len(contender.ids)
    products = [k for k in flops if flops[k]]
    prod_s = sum(seconds[k] for k in products)
    prod_flops = sum(flops[k] for k in products)
    model = contender.model
    weight_bytes = decode_weight_bytes(model.config, 2 if str(model.dtype) == "torch.bfloat16" else 4)
    out = {
        "B": B, "steps": steps, "dtype": str(model.dtype).replace("torch.", ""), "step_ms": 1e3 * total / steps,
        "parts_ms": per, "calls_per_step": {k: v / steps for k, v in calls.items()},
        "dense_products": {"ms": 1e3 * prod_s / steps, "share": prod_s / total if total else 0.0,
                           "gflops": prod_flops / prod_s / 1e9 if prod_s else 0.0,
                           "weight_gbps": weight_bytes * steps / prod_s / 1e9 if prod_s else 0.0},
        "execute_rest_ms": per.get("execute", 0.0) - sum(per.get(k, 0.0) for k in (
            "GDN mixers", "attention mixer", "MLPs", "lm_head", "norms")),
        "outside_execute_ms": 1e3 * total / steps - per.get("execute", 0.0),
        "attention_rest_ms": per.get("attention mixer", 0.0) - sum(per.get(k, 0.0) for k in (
            "attention mixer: projections", "attention mixer: per-request attention",
            "attention mixer: per-request KV append")),
        "gdn_rest_ms": per.get("GDN mixers", 0.0) - sum(per.get(k, 0.0) for k in (
            "GDN mixers: projections", "GDN mixers: conv update", "GDN mixers: rule update")),
    }
    if sgemm_gflops:
        out["dense_products"]["fraction_of_sgemm"] = out["dense_products"]["gflops"] / sgemm_gflops
    return out


PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # where a torch CPU matrix product runs


def profile_torch_ops(contender, steps: int, *, top: int = 8) -> dict:
    """`steps` decode steps under torch.profiler (CPU): the self time of the matrix-product kernels
    (`PRODUCT_OPS`: MKL's sgemm behind nn.Linear, and batched products) per step, and the `top` ops by self time.
    Used for transformers, whose step has no named parts to wrap; the profiler adds a few µs per op, so
    `step_ms` here is a little above the unprofiled one."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        contender.decode(steps)
        total = time.perf_counter() - t0
    ops = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}  # µs -> ms per step
    products = sum(v for k, v in ops.items() if k in PRODUCT_OPS)
    return {"B": len(contender.tokens), "steps": steps, "step_ms": 1e3 * total / steps, "products_ms": products,
            "top_ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:top])}


# ----------------------------------------------------------------------------------------------------------------
# bf16: the accuracy cost
# ----------------------------------------------------------------------------------------------------------------


def logits_accuracy(path, prompts, *, engines=("optimized", "optimized_bf16", "transformers",
                                               "transformers_bf16")) -> dict:
    """Every position's logits of `prompts` on each engine vs the float64 reference oracle (stateless calls, one
    prompt at a time for transformers): relative RMS over all positions together, and the fraction of positions
    whose greedy token equals the oracle's."""
    import torch

    import optimized.model as OM
    import reference.model as RM

    oracle = RM.Qwen35Model.from_pretrained(path, max_batch_size=1, dtype=np.float64)
    ref = [np.asarray(z) for z in oracle.logits(prompts)]
    del oracle
    out = {"prompts": len(prompts), "positions": sum(len(p) for p in prompts), "engines": {}}
    for name in engines:
        if name.startswith("optimized"):
            m = OM.Qwen35Model.from_pretrained(path, max_batch_size=1, backend="torch",
                                               dtype=torch.bfloat16 if name.endswith("bf16") else torch.float32)
            got = [z.float().numpy() for z in m.logits(prompts)]
        else:
            try:
                import transformers

                from qwen35.evaluation import _quiet

                dt = torch.bfloat16 if name.endswith("bf16") else torch.float32
                with _quiet(transformers):
                    hf = transformers.Qwen3_5ForCausalLM.from_pretrained(path, dtype=dt).eval()
                with torch.no_grad():
                    got = [hf(input_ids=torch.tensor([p])).logits[0].float().numpy() for p in prompts]
            except Exception as exc:  # transformers missing or without Qwen3.5
                out.setdefault("missing", {})[name] = f"{type(exc).__name__}: {exc}"
                continue
        num = sum(float(np.sum((r - g.astype(np.float64)) ** 2)) for r, g in zip(ref, got, strict=True))
        den = sum(float(np.sum(r * r)) for r in ref)
        same = np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got, strict=True)])
        out["engines"][name] = {"rel_rms_vs_f64": float(np.sqrt(num / den)), "greedy_agreement": float(same.mean())}
    return out


def demo_bits_per_byte(max_bytes: int | None) -> dict:
    """Held-out bits per byte of the bundled trained demo with float32 and bfloat16 weights (qwen35.evaluation:
    what `qwen35 eval` scores), and the float64 reference's."""
    from qwen35.evaluation import evaluate_checkpoint

    ev = evaluate_checkpoint(DEMO_DIR, engines=("reference-f64", "optimized-f32", "optimized-bf16"),
                             max_bytes=max_bytes)
    rows = {r["engine"]: r for r in ev["rows"]}
    out = {"checkpoint": "qwen35/demo", "bytes": ev["bytes"], "held_out_bytes": ev["held_out_bytes"],
           "windows": ev["windows"], "seq_len": ev["seq_len"],
           "bits_per_byte": {k: r["bits_per_byte"] for k, r in rows.items()},
           "rel_diff_of_loss_vs_f64": {k: r["rel_diff_vs_reference_f64"] for k, r in rows.items()}}
    out["bf16_minus_f32_bits_per_byte"] = (out["bits_per_byte"]["optimized-bf16"]
                                           - out["bits_per_byte"]["optimized-f32"])
    return out


# ----------------------------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------------------------


def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def goals_report(res: dict) -> dict:
    """Each goal of the module docstring: target, measured, met."""
    rep = {}
    for row in res["by_batch"]:
        B = row["B"]
        if "decode_speedup_vs_hf" in row and f"decode_speedup_vs_hf_B{B}" in GOALS:
            rep[f"decode_speedup_vs_hf_B{B}"] = row["decode_speedup_vs_hf"]
        if B == 1 and "decode_fraction_of_floor" in row:
            rep["decode_B1_fraction_of_floor"] = row["decode_fraction_of_floor"]
    return {k: {"target": GOALS[k], "measured": v, "met": v >= GOALS[k]} for k, v in rep.items()}


def bf16_summary(res: dict) -> list[dict]:
    """Per bf16 batch size: decode tokens/s of the fp32 and bf16 engines, the measured time ratio fp32 / bf16 of
    the optimized engine and the ratio its floors' bytes predict (2 would be a halved stream)."""
    out = []
    for row in res["by_batch"]:
        d = row["decode"]
        if "optimized_bf16" not in d:
            continue
        fl32, fl16 = row["floor"]["decode"], row["floor"]["decode_bf16"]
        r = {"B": row["B"], **{k: d[k]["tok_per_s"] for k in MAIN + BF16 if k in d},
             "time_ratio_f32_over_bf16": d["optimized"]["median_s"] / d["optimized_bf16"]["median_s"],
             "bytes_ratio_f32_over_bf16": fl32["bytes"]["total"] / fl16["bytes"]["total"],
             "weight_bytes_f32": fl32["bytes"]["weights"], "weight_bytes_bf16": fl16["bytes"]["weights"]}
        if "transformers_bf16" in d:
            r["bf16_speedup_vs_hf_bf16"] = d["transformers_bf16"]["median_s"] / d["optimized_bf16"]["median_s"]
        out.append(r)
    return out


def run_batch(*, quick: bool = False, settings: BatchSettings | None = None, config=None, log=print) -> dict:
    """The whole batched benchmark in one process, one thread -> a JSON-ready dict (kind "bench_batch").
    `settings` default to BatchSettings() (quick: BatchSettings.quick()); `config` to qwen35.bench.bench_config()."""
    torch = pin_threads()
    settings = settings or (BatchSettings.quick() if quick else BatchSettings())
    cfg = config or bench_config()
    machine = machine_info("cpu")
    machine.update(blas="MKL" if torch.backends.mkl.is_available() else "?", note=SHARED_NOTE,
                   avx512_bf16="avx512_bf16" in _cpu_flags(), load_avg_at_start=_loadavg(),
                   env={k: os.environ.get(k) for k in SINGLE_THREAD_ENV})
    res = {"kind": "bench_batch", "schema": 1, "machine": machine, "quick": quick,
           "settings": {**asdict(settings), "prefill_repeats": {str(k): v for k, v in
                                                                settings.prefill_repeats.items()}},
           "config": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "layer_types": list(cfg.layer_types),
                      "vocab": cfg.vocab_size, "intermediate": cfg.intermediate_size,
                      "weights_per_token": linear_weights_per_token(cfg),
                      "state_bytes_per_request": state_bytes_per_request(cfg, "float32", conv_dtype="float32"),
                      "kv_bytes_per_token": kv_bytes_per_token(cfg, "float32")},
           "notes": []}
    if config is None:
        res["config"]["geometry"] = ("0.8B width (hidden 1024, I 3584, nh 8, nkv 2, hd 256, GDN 16x128 / 16x128), "
                                     "4 layers (L L L F), vocab 32768 (random weights), tied lm_head")
    log(f"machine: {machine['host_cpu']}, torch {machine['torch']}, 1 thread, load {machine['load_avg_at_start']}")
    n = 1024 if quick else 2048
    medians = [sgemm_rate(n, repeats=3 if quick else 5)["gflops"] for _ in range(3)]
    res["sgemm"] = {"n": n, "gflops": max(medians), "gflops_medians": medians}
    res["stream"] = stream_bandwidth(128 if quick else 512)
    sg, bw = res["sgemm"]["gflops"], res["stream"]["read_gbps"]
    log(f"  sgemm {sg:.1f} GFLOP/s (best of {len(medians)} medians), DRAM read {bw:.1f} GB/s")

    res["by_batch"], res["profile"], res["profile_transformers"] = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / "ckpt", cfg)
        wanted = MAIN + (BF16 if settings.bf16_batch_sizes else ())
        contenders, missing = load_contenders(path, wanted, max(settings.batch_sizes))
        res["missing"] = missing
        lo, hi = settings.prompt_range
        warm = make_prompts(cfg, 2, (lo, min(hi, 96)), settings.seed + 1)
        for c in contenders.values():  # warm-up: one short mixed prefill and two steps each, untimed
            c.prefill(warm)
            c.decode(2)
        for B in settings.batch_sizes:
            prompts = make_prompts(cfg, B, settings.prompt_range, settings.seed)
            here = {k: c for k, c in contenders.items() if k in MAIN or B in settings.bf16_batch_sizes}
            row = measure_batch(here, prompts, settings, log=log)
            # the floor at the contexts of the timed steps (their mean: prompt + warm-up + half the timed steps)
            mid = settings.decode_warmup + (settings.decode_repeats * settings.decode_steps + 1) / 2
            ctx = [n + mid for n in row["prompt_lengths"]]
            row["floor"] = {"contexts_mean": float(np.mean(ctx)),
                            "decode": decode_floor(cfg, ctx, read_gbps=bw, sgemm_gflops=sg),
                            "decode_bf16": decode_floor(cfg, ctx, read_gbps=bw, sgemm_gflops=sg, weight_bytes=2),
                            "prefill": prefill_floor(cfg, row["prompt_lengths"], sgemm_gflops=sg)}
            opt = row["decode"]["optimized"]
            row["decode_fraction_of_floor"] = opt["tok_per_s"] / row["floor"]["decode"]["tok_per_s"]
            row["prefill_fraction_of_floor"] = (row["prefill"]["optimized"]["tok_per_s"]
                                                / row["floor"]["prefill"]["tok_per_s"])
            for k in ("reference", "transformers"):
                if k in row["decode"]:
                    row[f"decode_speedup_vs_{'hf' if k == 'transformers' else 'ref'}"] = (
                        row["decode"][k]["median_s"] / opt["median_s"])
                    row[f"prefill_speedup_vs_{'hf' if k == 'transformers' else 'ref'}"] = (
                        row["prefill"][k]["median_s"] / row["prefill"]["optimized"]["median_s"])
            for k in ("optimized", "optimized_bf16"):
                if k in here:
                    res["profile"].append(profile_decode(here[k], settings.profile_steps, sgemm_gflops=sg))
            if "transformers" in here:
                res["profile_transformers"].append(profile_torch_ops(here["transformers"], settings.profile_steps))
            for c in here.values():
                c.release()
            res["by_batch"].append(row)
        del contenders, here
        res["bf16"] = {"decode": bf16_summary(res)}
        if settings.bf16_batch_sizes:
            acc_prompts = make_prompts(cfg, settings.accuracy_prompts, settings.prompt_range, settings.seed + 2)
            res["bf16"]["logits_accuracy"] = logits_accuracy(path, acc_prompts)
            log("  bf16 logits vs float64: " + ", ".join(
                f"{k} {v['rel_rms_vs_f64']:.2e}" for k, v in res["bf16"]["logits_accuracy"]["engines"].items()))
    if settings.bf16_batch_sizes and (DEMO_DIR / "config.json").exists():
        res["bf16"]["demo_eval"] = demo_bits_per_byte(settings.eval_max_bytes)
        log("  demo held-out bits/byte: " + ", ".join(
            f"{k} {v:.4f}" for k, v in res["bf16"]["demo_eval"]["bits_per_byte"].items()))
    res["sgemm_end"] = sgemm_rate(n, repeats=3)
    res["machine"]["load_avg_at_end"] = _loadavg()
    res["goals"] = goals_report(res)
    if any(r["B"] in settings.prefill_repeats and settings.prefill_repeats[r["B"]] == 1 for r in res["by_batch"]):
        res["notes"].append("prefill timed once at the batch sizes whose prefill_repeats is 1 (a round of all "
                            "engines takes minutes there); decode is the median of decode_repeats rounds everywhere")
    res["notes"].append("transformers' prefill computes the padded rows too: its tok_per_s and useful_tok_per_s count "
                        "the real prompt tokens (the fair number), computed_tok_per_s the padded rows")
    return res

