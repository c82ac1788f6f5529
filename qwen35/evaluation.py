"""Held-out evaluation of a checkpoint on every engine: loss, perplexity and bits per byte (`qwen35 eval`).

    data = evaluate_checkpoint("checkpoints/train", engines=("reference-f64", "optimized-bf16"), seq_len=256)
    print(qwen35.report.eval_table(data))

**What is scored.**  The held-out split of qwen35.data (the pydoc topics, or `--data`), tokenized with the
checkpoint's own tokenizer (its tokenizer.json; the byte tokenizer without one) into `<eos> doc₀ <eos> doc₁ …`, and
read in non-overlapping windows of `seq_len` tokens (qwen35.data.eval_windows): each window is run from an empty
state and scores the next token of each of its positions.  Every engine reads the same windows.

**Metrics.**  For the scored targets t with model probabilities p(t):

    loss            = Σ −ln p(t) / (number of targets)              nats per token
    perplexity      = exp(loss)
    bits per byte   = Σ −ln p(t) / (B · ln 2)                        B = the UTF-8 bytes the targets stand for

B counts each target's bytes (one per byte token, the bytes of its text for a BPE token, none for the separator),
so over the whole split it is exactly the held-out text's UTF-8 size, and bits per byte compares models with
different tokenizers.  `--max-bytes N` scores whole windows, in order, until their targets cover N bytes.  The
log-softmax is taken in float64 on each engine's logits (as the engine returns them: bf16 logits for the bf16
engine).

**The baseline.**  `unigram_bits_per_byte`: a byte-level unigram model of the training split's byte frequencies
with add-one smoothing, p(b) = (count(b) + 1) / (N + 256), scored on the same bytes:
−Σ log₂ p(b) / B.  Any model that learned something beats it.

**Engines** (`ENGINES`): the NumPy reference in float64 (the oracle) and float32 (reference.model, stateless
`logits`); the optimized PyTorch pipeline engine with float32 weights and with bfloat16 weights and activations (its
recurrent state stays float32: optimized.model has no other state dtype); optimized.Qwen35ForCausalLM, the
differentiable training model (float32); and Hugging Face transformers' Qwen3_5ForCausalLM when installed
(float32).  Each row records its seconds and tokens/s.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data as corpus_data
from .extras import MissingDependencyError, require
from .measure import machine_info

__all__ = ["Score", "target_nats", "score_windows", "score_causal_lm", "unigram_bits_per_byte", "ENGINES",
           "ENGINE_LABELS", "DEFAULT_MAX_BYTES", "DEFAULT_SEQ_LEN", "evaluate_checkpoint", "engine_logits"]

DEFAULT_MAX_BYTES = 16384
DEFAULT_SEQ_LEN = 256
LN2 = math.log(2.0)

ENGINES = ("reference-f64", "reference-f32", "optimized-f32", "optimized-bf16", "causal-lm", "transformers")
ENGINE_LABELS = {
    "reference-f64": ("reference (NumPy)", "float64"),
    "reference-f32": ("reference (NumPy)", "float32"),
    "optimized-f32": ("optimized (PyTorch pipeline)", "float32"),
    "optimized-bf16": ("optimized (PyTorch pipeline)", "bfloat16, fp32 state"),
    "causal-lm": ("Qwen35ForCausalLM (training model)", "float32"),
    "transformers": ("transformers Qwen3_5ForCausalLM", "float32"),
}


# ------------------------------------------------------------------------------------------------ the arithmetic
@dataclass
class Score:
    """Summed negative log-likelihood (nats) over `targets` tokens that stand for `bytes` UTF-8 bytes."""

    nats: float = 0.0
    targets: int = 0
    bytes: int = 0

    def add(self, nats: float, targets: int, nbytes: int) -> None:
        self.nats += float(nats)
        self.targets += int(targets)
        self.bytes += int(nbytes)

    @property
    def loss(self) -> float:
        """Nats per token."""
        return self.nats / self.targets if self.targets else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.targets else math.nan

    @property
    def bits_per_byte(self) -> float:
        """Σ nats / (bytes · ln 2)."""
        return self.nats / (self.bytes * LN2) if self.bytes else math.nan


def target_nats(logits, targets) -> np.ndarray:
    """[L] float64: −log softmax(logits)[i, targets[i]] for logits [L, V] (any float dtype, NumPy or torch)."""
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    m = z.max(axis=-1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=-1))
    return lse - z[np.arange(z.shape[0]), targets]


def _target_bytes(targets, byte_table: Sequence[bytes]) -> int:
    return sum(len(byte_table[int(t)]) for t in targets)


def score_windows(logits_fn: Callable[[list[np.ndarray]], Sequence], windows, byte_table: Sequence[bytes], *,
                  batch_size: int = 8, progress=None) -> Score:
    """Score `windows` ([(inputs [L], targets [L])]) with `logits_fn`, which maps a list of equally long input
    windows to their logits ([L, V] each); windows go `batch_size` at a time (the last, shorter one alone).
    `progress(n)` is called with the number of windows done after each call."""
    score = Score()
    i = 0
    while i < len(windows):
        n = len(windows[i][0])
        j = i
        while j < len(windows) and j - i < batch_size and len(windows[j][0]) == n:
            j += 1
        group = windows[i:j]
        for (_, tgt), logits in zip(group, logits_fn([w for w, _ in group]), strict=True):
            score.add(target_nats(logits, tgt).sum(), len(tgt), _target_bytes(tgt, byte_table))
        if progress is not None:
            progress(j - i)
        i = j
    return score


def _causal_lm_logits(model):
    import torch

    def logits(inputs: list[np.ndarray]):
        with torch.no_grad():
            return model(torch.from_numpy(np.stack(inputs))).logits
    return logits


def score_causal_lm(model, windows, byte_table: Sequence[bytes], *, batch_size: int = 8, progress=None) -> Score:
    """`score_windows` for a torch causal LM called as model(input_ids [B, L]).logits -> [B, L, V]."""
    return score_windows(_causal_lm_logits(model), windows, byte_table, batch_size=batch_size, progress=progress)


def unigram_bits_per_byte(train: bytes, held_out: bytes) -> float:
    """Bits per byte of the add-one-smoothed byte unigram of `train` on `held_out`:
    −Σ_b log₂((count_train(b) + 1) / (N_train + 256)) / len(held_out)."""
    if not held_out:
        return math.nan
    counts = np.bincount(np.frombuffer(train, dtype=np.uint8), minlength=256).astype(np.float64)
    logp = np.log2((counts + 1.0) / (counts.sum() + 256.0))
    return float(-logp[np.frombuffer(held_out, dtype=np.uint8)].sum() / len(held_out))


# ------------------------------------------------------------------------------------------------ the engines
def engine_logits(name: str, path: Path):
    """(logits_fn, note) of engine `name` on the checkpoint at `path`: logits_fn(list of [L] int arrays) -> list of
    [L, V] logits.  MissingDependencyError when the engine's package is not installed."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    if name.startswith("reference"):
        from reference.model import Qwen35Model

        model = Qwen35Model.from_pretrained(path, dtype=np.float64 if name.endswith("f64") else np.float32,
                                            max_batch_size=1)

        def ref(inputs):
            return model.logits([w.tolist() for w in inputs])
        return ref, ""
    torch = require("torch", f"engine {name}")
    if name.startswith("optimized"):
        from optimized.model import Qwen35Model as OptimizedModel

        model = OptimizedModel.from_pretrained(path, dtype=torch.bfloat16 if name.endswith("bf16") else torch.float32,
                                               max_batch_size=1)

        def opt(inputs):
            return model.logits([w.tolist() for w in inputs])
        return opt, f"backend {model.backend}"
    if name == "causal-lm":
        from optimized.causal_lm import Qwen35ForCausalLM

        model = Qwen35ForCausalLM.from_pretrained(path, dtype=torch.float32, device="cpu")
        model.eval()
        return _causal_lm_logits(model), ""
    transformers = require("transformers", "engine transformers")
    import json

    arch = (json.loads((path / "config.json").read_text()).get("architectures") or ["Qwen3_5ForCausalLM"])[0]
    if not hasattr(transformers, arch):
        raise MissingDependencyError("transformers", f"engine transformers (class {arch}, not in "
                                                     f"transformers {transformers.__version__})")
    with _quiet(transformers):
        hf = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()
    inner = _causal_lm_logits(hf)

    def hf_logits(inputs):
        with _quiet(transformers):
            return inner(inputs)
    return hf_logits, f"transformers {transformers.__version__}"


@contextlib.contextmanager
def _quiet(transformers):
    """transformers without its loading bar and its notes (its CPU fallback kernels say so on the first call)."""
    log = transformers.utils.logging
    verbosity, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bar:
            log.enable_progress_bar()


def _training_record(path: Path) -> dict | None:
    """The `data` block of the checkpoint's train_log.json (what it was trained against), if it has one."""
    import json

    f = path / "train_log.json"
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def evaluate_checkpoint(path, *, engines: Sequence[str] = ENGINES, seq_len: int = DEFAULT_SEQ_LEN,
                        max_bytes: int | None = DEFAULT_MAX_BYTES, data=None, batch_size: int = 8,
                        progress: bool = False, skip_missing: bool = False, echo=None) -> dict:
    """Score the held-out split on each of `engines` (see the module docstring) -> the eval JSON (kind "eval").

    max_bytes: score whole windows until they cover this many bytes (None: the whole split).  skip_missing: an
    engine whose package is not installed is recorded under "skipped" instead of raising
    MissingDependencyError."""
    from qwen35.tokenizer import ByteTokenizer, load_tokenizer
    from reference.config import Qwen35Config

    path = Path(path)
    config = Qwen35Config.from_pretrained(path)
    tok = load_tokenizer(path)
    if isinstance(tok, ByteTokenizer):
        table = corpus_data.token_bytes(None, config.vocab_size)
    else:
        table = corpus_data.token_bytes((path / "tokenizer.json").read_text(encoding="utf-8"), config.vocab_size)
    corpus = corpus_data.load_corpus(data)
    stream = corpus_data.token_stream(corpus.held_out, tok, corpus_data.separator_id(tok, config))
    if int(stream.max()) >= config.vocab_size:
        raise corpus_data.DataError(f"{path}: its tokenizer gives id {int(stream.max())}, outside the model's "
                                    f"vocabulary 0..{config.vocab_size - 1}")
    windows = corpus_data.eval_windows(stream, seq_len, max_bytes=max_bytes, byte_table=table)
    targets = [t for _, w in windows for t in w.tolist()]
    covered = b"".join(table[t] for t in targets)
    held_bytes = len(corpus.split_bytes("held_out"))
    info = corpus.info()
    trained = _training_record(path)
    trained_data = (trained or {}).get("data")
    out = {
        "kind": "eval", "meta": machine_info("cpu"), "checkpoint": str(path), "data": info,
        "training_data": trained_data,
        "same_split_as_training": (None if not trained_data else
                                   trained_data.get("held_out", {}).get("sha256") == info["held_out"]["sha256"]),
        "trained_steps": (trained or {}).get("step"),
        "seq_len": seq_len, "windows": len(windows), "targets": len(targets), "bytes": len(covered),
        "held_out_bytes": held_bytes, "max_bytes": max_bytes, "bounded": len(covered) < held_bytes,
        "baseline": {"name": "byte unigram of the training split (add-one)",
                     "bits_per_byte": unigram_bits_per_byte(corpus.split_bytes("train"), covered)},
        "rows": [], "skipped": {},
    }
    for name in engines:
        try:
            fn, note = engine_logits(name, path)
        except MissingDependencyError as e:
            if not skip_missing:
                raise
            out["skipped"][name] = str(e)
            continue
        bar = None
        if progress:
            tqdm = require("tqdm", "the progress bar of qwen35 eval").tqdm
            bar = tqdm(total=len(windows), desc=name, unit="window", leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        score = score_windows(fn, windows, table, batch_size=batch_size, progress=bar.update if bar else None)
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        label, dtype = ENGINE_LABELS[name]
        out["rows"].append({"engine": name, "label": label, "dtype": dtype, "note": note, "nats": score.nats,
                            "targets": score.targets, "bytes": score.bytes, "loss": score.loss,
                            "perplexity": score.perplexity, "bits_per_byte": score.bits_per_byte,
                            "seconds": seconds, "tokens_per_s": score.targets / seconds if seconds > 0 else None})
        if echo is not None:
            echo(f"{name}: {score.loss:.6f} nats/token, {score.bits_per_byte:.4f} bits/byte ({seconds:.1f} s)")
    ref = next((r for r in out["rows"] if r["engine"] == "reference-f64"), None)
    for r in out["rows"]:
        r["rel_diff_vs_reference_f64"] = (abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
                                          if ref is not None and ref["loss"] else None)
    return out
