"""Text generation on top of the pipeline API, with timing (what `qwen35 generate` runs).

    result = generate_tokens(model, prompt_ids, max_new_tokens=32, temperature=0.0, seed=0)
    result.new_ids, result.prefill_tokens_per_s, result.decode_tokens_per_s

It drives any model with the pipeline interface (docs/pipeline_api.md: reference.model.Qwen35Model, or
optimized's twin): one prefill (`prepare_initial_token_inputs` + `execute`), then decode steps
(`prepare_next_token_inputs` + `execute`) until max_new_tokens, a stop token or max_length, then `release`.
Prefill and decode are timed separately, because they are different workloads (one pass over the prompt vs one
token per step).  Parameters, prompt and max_length follow the rules of the models' own `generate`
(`reference.model.check_generation_params`, `check_prompt_room`), so both stop at the same total and refuse the
same input with the same message.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from reference.context import PromptId, TextContext, as_token_array, request_name
from reference.errors import RequestError
from reference.model import check_generation_params, check_prompt_room, host_logits, sample_next_token

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


def generate_tokens(model, prompt_ids, *, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
                    stop_token_ids=(), request_id=None) -> GenerationResult:
    """Generate from one prompt through the pipeline API, timing prefill and decode.

    Stops after max_new_tokens, at a stop token (included), or when prompt + new tokens reach the model's
    max_length.  `request_id` None (the default) uses a private id (`PromptId(0)`, errors name "prompt 0", as
    `model.generate([prompt_ids])` does); a given id must not be live (its request would be continued, then
    released).  Holds the model's lock (if it has one) for the whole run, so concurrent callers cannot interleave.
    """
    rid = PromptId(0) if request_id is None else request_id
    stop = check_generation_params(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids)
    with getattr(model, "lock", contextlib.nullcontext()):
        if request_id is not None and request_id in model.active_requests:
            raise RequestError(f"generate_tokens: {request_name(rid)} is live; pass a new request_id (or None for a "
                               "private one): generating under it would continue that request and then release it")
        prompt = as_token_array(prompt_ids, request_id=rid, vocab_size=model.config.vocab_size)
        max_len = getattr(model, "max_length", None)
        if max_len is not None:
            check_prompt_room(rid, prompt.size, max_len)
        result = GenerationResult(prompt_ids=prompt.tolist())
        if max_new_tokens == 0:
            return result
        rng = np.random.default_rng(seed)
        try:
            t0 = time.perf_counter()
            inputs = model.prepare_initial_token_inputs([TextContext(rid, prompt)])
            token = _sample(model.execute(inputs), rid, temperature, top_k, top_p, rng)
            result.prefill_seconds = time.perf_counter() - t0
            result.new_ids.append(token)
            t0 = time.perf_counter()
            while True:
                if token in stop:
                    result.stopped_by = "stop token"
                    break
                if len(result.new_ids) >= max_new_tokens:
                    break
                if max_len is not None and prompt.size + len(result.new_ids) >= max_len:
                    result.stopped_by = "max length"  # prompt + new tokens <= max_length, as model.generate
                    break
                inputs = model.prepare_next_token_inputs(np.array([token]), inputs)
                token = _sample(model.execute(inputs), rid, temperature, top_k, top_p, rng)
                result.new_ids.append(token)
            result.decode_seconds = time.perf_counter() - t0
        finally:
            model.release(rid)
    return result


def _sample(out, request_id, temperature, top_k, top_p, rng) -> int:
    """The next token from a step's last logit row (a NumPy array or a torch tensor)."""
    return sample_next_token(host_logits(out.logits)[-1], temperature=temperature, top_k=top_k, top_p=top_p,
                             rng=rng, who=request_name(request_id))
