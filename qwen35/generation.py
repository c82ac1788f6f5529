"""Text generation from one prompt, with timing (what `qwen35 generate` runs).

    result = generate_tokens(model, prompt_ids, max_new_tokens=32, temperature=0.0, seed=0)
    result.new_ids, result.stopped_by, result.prefill_tokens_per_s, result.decode_tokens_per_s

It runs `reference.pipeline.generate`, the generation loop of both engines' `model.generate`, on either engine
(docs/pipeline_api.md: reference.model.Qwen35Model or optimized's twin; `generate` uses their shared
`RequestChecks` and lock, so a bare object with only the four pipeline calls is not enough): one prefill, then
decode steps until max_new_tokens, a stop token or max_length, then `release`.  So parameters, prompt checks and
the max_length rule are the models' own, and both refuse the same input with the same message.  The loop's
per-step reports give the timing: prefill and decode separately, because they are different workloads (one pass
over the prompt vs one token per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from reference.context import PromptId, as_token_array, request_name
from reference.errors import RequestError
from reference.pipeline import StepReport, check_generation_params, generate

__all__ = ["GenerationResult", "generate_tokens"]


@dataclass
class GenerationResult:
    """One prompt's generation: its ids, the new ids, the wall seconds of prefill and of decode, why it stopped."""

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
        if n == 0:
            return 0.0  # no decode step ran
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
    max_length.  `request_id` None (the default) uses a private id (errors name "prompt 0", as
    `model.generate([prompt_ids])` does); a given id must not be live (its request would be continued, then
    released).  Holds the model's lock for the whole run, so concurrent callers cannot interleave.
    """
    # The checks `generate` makes too, in the order of a single-prompt call: parameters, the id, then the prompt
    # (a bare token id, a context or a nested list is refused here, before any step, as "prompt 0: ...").
    check_generation_params(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids)
    steps: list[StepReport] = []
    with model.lock:
        if request_id is not None and request_id in model.active_requests:
            raise RequestError(f"generate_tokens: {request_name(request_id)} is live; pass a new request_id (or None "
                               "for a private one): generating under it would continue that request and then "
                               "release it")
        rid = PromptId(0) if request_id is None else request_id
        prompt = as_token_array(prompt_ids, request_id=rid, vocab_size=model.config.vocab_size)
        (new_ids,) = generate(model, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids,
                              request_ids=None if request_id is None else [request_id], on_step=steps.append)
    result = GenerationResult(prompt_ids=prompt.tolist(), new_ids=new_ids)
    for step in steps:
        if step.phase == "prefill":
            result.prefill_seconds += step.seconds
        else:
            result.decode_seconds += step.seconds
        result.stopped_by = step.stopped.get(0, result.stopped_by)
    return result
