"""Gradient oracles in NumPy float64: the whole model's training loss and central finite differences.

    loss = causal_lm_loss(tensors, config, input_ids, labels)          # float64 next-token cross entropy
    d = random_direction(shapes, seed)                                 # a unit direction in parameter space
    fd = directional_derivative(f, theta, d, eps)                      # (f(θ + εd) − f(θ − εd)) / 2ε

What an autograd implementation must reproduce: for any scalar function f of named arrays θ and any direction d,
⟨∇f(θ), d⟩ = lim (f(θ + εd) − f(θ − εd)) / 2ε.  The central difference has error ε²·|f'''|/6 (truncation) plus
~ulp(f)/ε (rounding); in float64 with ε ≈ 1e-5 relative to the inputs' scale both are ~1e-10 of the derivative,
far below what a wrong backward pass gives.  The functions differentiated are the reference's own forward passes
(`reference.model`, `reference.gated_delta`, ...), so the check ties the torch gradient to the NumPy oracle, not
to torch.

`causal_lm_loss` is what `optimized.Qwen35ForCausalLM(input_ids, labels=labels).loss` computes (transformers'
convention): logits of every position from `reference.model.Qwen35Model.logits` (float64, zero initial state,
each row of the batch its own sequence), position t scored against labels[:, t + 1], IGNORE_INDEX (−100) not
scored, the mean over the scored positions.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from reference.config import Qwen35Config
from reference.weights import weights_from_state_dict

__all__ = ["IGNORE_INDEX", "cross_entropy", "shifted", "causal_lm_loss", "probe_loss", "random_direction",
           "directional_derivative"]

IGNORE_INDEX = -100  # a label that is not scored (transformers' convention; optimized.causal_lm uses this one)


def cross_entropy(logits, targets, ignore_index: int = IGNORE_INDEX) -> float:
    """Mean of −log softmax(logits)[target] over the rows whose target is not `ignore_index` (NaN if none).

    logits [N, V], targets [N] int."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets).reshape(-1)
    keep = targets != ignore_index
    z = logits[keep]
    m = z.max(axis=-1, keepdims=True)
    logz = (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[:, 0]  # [n]  log Σ exp
    picked = z[np.arange(z.shape[0]), targets[keep]]
    return float(np.mean(logz - picked)) if z.shape[0] else float("nan")


def shifted(labels) -> np.ndarray:
    """labels [B, T] -> targets [B, T]: position t is scored against labels[:, t + 1]; the last is ignored."""
    labels = np.asarray(labels)
    return np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)], axis=1)


def causal_lm_loss(tensors: Mapping[str, np.ndarray], config: Qwen35Config, input_ids, labels=None) -> float:
    """The float64 next-token loss of a text-only model given as checkpoint tensors (names as stored).

    Args:
        tensors: checkpoint name -> array (what `Qwen35ForCausalLM.state_dict()` holds, any float dtype).
        config: the model's config.
        input_ids: [B, T] ints; each row is one sequence.
        labels: [B, T] ints or IGNORE_INDEX; default input_ids.
    """
    from reference.model import Qwen35Model  # the pipeline model's stateless forward

    ids = np.asarray(input_ids, dtype=np.int64)
    labels = ids if labels is None else np.asarray(labels, dtype=np.int64)
    weights = weights_from_state_dict(dict(tensors), config, np.float64, where="gradcheck tensors")
    model = Qwen35Model(weights, max_batch_size=max(1, ids.shape[0]), dtype=np.float64)
    logits = np.concatenate(model.logits([row.tolist() for row in ids]))  # [B·T, V]
    return cross_entropy(logits, shifted(labels).reshape(-1))


def probe_loss(outputs, probes) -> float:
    """Σ_i ⟨outputs_i, probes_i⟩: a scalar whose gradient is the probes (to check any op with several outputs)."""
    return float(sum(np.sum(np.asarray(o, dtype=np.float64) * p) for o, p in zip(outputs, probes, strict=True)))


def random_direction(shapes: Mapping[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal arrays of the given shapes (sorted-name order from `default_rng(seed)`), scaled so the whole
    direction has unit L2 norm."""
    rng = np.random.default_rng(seed)
    d = {name: rng.standard_normal(tuple(shapes[name])) for name in sorted(shapes)}
    norm = np.sqrt(sum(float(np.sum(a * a)) for a in d.values()))
    return {name: a / norm for name, a in d.items()}


def directional_derivative(f: Callable[[dict], float], theta: Mapping[str, np.ndarray],
                           direction: Mapping[str, np.ndarray], eps: float = 1e-5) -> float:
    """(f(θ + εd) − f(θ − εd)) / 2ε in float64.  `direction` may name a subset of θ (the rest stays fixed)."""
    def at(sign: float) -> float:
        moved = dict(theta)
        for name, d in direction.items():
            moved[name] = np.asarray(theta[name], dtype=np.float64) + sign * eps * d
        return float(f(moved))

    return (at(1.0) - at(-1.0)) / (2.0 * eps)
