"""Text generation on top of the pipeline API, with timing (what `qwen35 generate` runs).

    result = generate_tokens(model, prompt_ids, max_new_tokens=32, temperature=0.0, seed=0)
    result.new_ids, result.prefill_tokens_per_s, result.decode_tokens_per_s

It drives any model with the ARCHITECTURE.md interface (reference.model.Qwen35Model, or optimized's twin):
one prefill (`prepare_initial_token_inputs` + `execute`), then decode steps (`prepare_next_token_inputs` +
`execute`) until max_new_tokens or a stop token, then `release`.  Prefill and decode are timed separately,
because they are different workloads (one pass over the prompt vs one token per step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from reference.context import TextContext
from reference.model import sample_next_token

__all__ = ["GenerationResult", "generate_tokens"]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_by: str = "max_new_tokens"  # or "stop token" / "max length"

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first (each needs one decode step) per second of decode time."""
        n = max(len(self.new_ids) - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second, end to end (prefill included)."""
        return len(self.new_ids) / self.total_seconds if self.total_seconds > 0 else float("inf")


def _logits_row(out) -> np.ndarray:
    logits = out.logits
    if hasattr(logits, "detach"):  # a torch tensor from the optimized model
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits)[-1]


def generate_tokens(model, prompt_ids, *, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
                    stop_token_ids=(), request_id: str = "qwen35-generate") -> GenerationResult:
    """Generate from one prompt through the pipeline API, timing prefill and decode."""
    prompt_ids = [int(t) for t in prompt_ids]
    result = GenerationResult(prompt_ids=prompt_ids)
    if max_new_tokens <= 0:
        return result
    stop = {int(t) for t in stop_token_ids}
    rng = np.random.default_rng(seed)
    max_len = getattr(model, "max_length", None)
    try:
        t0 = time.perf_counter()
        inputs = model.prepare_initial_token_inputs([TextContext(request_id, prompt_ids)])
        out = model.execute(inputs)
        token = sample_next_token(_logits_row(out), temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
        result.prefill_seconds = time.perf_counter() - t0
        result.new_ids.append(token)
        t0 = time.perf_counter()
        while True:
            if token in stop:
                result.stopped_by = "stop token"
                break
            if len(result.new_ids) >= max_new_tokens:
                break
            if max_len is not None and len(prompt_ids) + len(result.new_ids) >= max_len:
                result.stopped_by = "max length"
                break
            inputs = model.prepare_next_token_inputs(np.array([token]), inputs)
            out = model.execute(inputs)
            token = sample_next_token(_logits_row(out), temperature=temperature, top_k=top_k, top_p=top_p,
                                      rng=rng)
            result.new_ids.append(token)
        result.decode_seconds = time.perf_counter() - t0
    finally:
        model.release(request_id)
    return result
