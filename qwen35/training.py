"""Training a small Qwen3.5 from scratch on CPU: the loop behind `qwen35 train` (docs/training.md).

    shape = SHAPES["small"]                                     # or ModelShape(hidden_size=..., ...)
    result = train(TrainSettings(steps=600), shape, out_dir="checkpoints/train")
    result = train(None, None, out_dir="checkpoints/train", resume="checkpoints/train")   # continue it

**Model.**  `optimized.Qwen35ForCausalLM` (the differentiable PyTorch model, float32) built from a
`reference.config.Qwen35Config` that `ModelShape.config` makes: text-only, layers L L L F repeated (three Gated
DeltaNet layers per gated full-attention layer, `full_attention_interval` 4), dense SwiGLU or, with `moe`, sparse
MoE blocks; the vocabulary is the tokenizer's (qwen35.data).

**Optimizer and schedule.**  torch.optim.AdamW (β = (0.9, 0.95), ε = 1e-8).  Weight decay applies to the matrices
(projections, embeddings, lm_head, the depthwise conv kernels: every parameter with two or more dimensions) and not
to the vectors: the RMSNorm / gated-norm weights, biases, and the Gated DeltaNet's A_log and dt_bias (the decay
parameters: decaying them towards 0 would change the forgetting rate the model learns, not shrink a weight).  The
learning rate of update s (1-based) is `lr_at(s)`: linear warm-up lr·s/warmup over the first `warmup` updates, then a
cosine from lr down to the floor lr·min_lr_ratio at the last update.  Gradients are clipped to a global L2 norm of
`grad_clip` (0 = no clipping) before each update; the pre-clip norm is logged.

**Reproducibility.**  The seed fixes the initial weights (`Qwen35ForCausalLM(config, seed=seed)`), torch's and
NumPy's global generators, and the batches (qwen35.data.WindowSampler draws the windows of step s from
default_rng([seed, s])).  A run resumed from a checkpoint (`resume=DIR`) reloads the float32 weights, the AdamW
moments, torch's RNG state and the step, and reads the very batches the uninterrupted run would have: on the same
machine and thread count it continues bit for bit (tests/test_training.py checks 3 + resume + 3 == 6 steps).

**Output directory** (a Hugging Face checkpoint at every save; loads in reference.model, optimized.model and
transformers): config.json, model.safetensors (float32), tokenizer.json + tokenizer_config.json,
training_state.pt (step, settings, shape, AdamW state, RNG state, the log so far; not needed for inference) and
train_log.json (the loss curve; `kind` "train_log", drawn by `qwen35 plot`).  Saved every `save_every` updates, at
the end, at `stop_after`, and when interrupted (Ctrl-C saves the last finished update first).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from reference.config import Qwen35Config
from reference.errors import CheckpointError, ConfigError

from . import data as corpus_data
from .evaluation import Score, score_causal_lm, unigram_bits_per_byte
from .extras import require
from .measure import machine_info, write_json

__all__ = ["ModelShape", "SHAPES", "TrainSettings", "TrainResult", "train", "lr_at", "param_groups",
           "STATE_FILE", "LOG_FILE", "load_training_state"]

STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.json"
BETAS = (0.9, 0.95)
EPS = 1e-8
MAX_POSITIONS = 4096  # max_position_embeddings of the trained config (the demo's)


# ------------------------------------------------------------------------------------------------ the model's shape
@dataclass(frozen=True)
class ModelShape:
    """The geometry of the model to train; `config()` makes the Qwen35Config (text-only, L L L F layers)."""

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4  # full-attention query heads
    kv_heads: int = 2  # full-attention key / value heads (GQA)
    head_dim: int = 32  # full-attention head size; a quarter of it (at least 8 channels) rotates (partial RoPE)
    linear_key_heads: int = 2  # Gated DeltaNet key heads
    linear_value_heads: int = 4  # Gated DeltaNet value heads (a multiple of the key heads)
    linear_head_dim: int = 32  # Gated DeltaNet key and value head size
    intermediate_size: int = 384  # SwiGLU width (dense)
    moe: bool = False
    experts: int = 4
    experts_per_token: int = 2
    moe_intermediate_size: int = 128
    shared_expert_intermediate_size: int = 128
    tie_embeddings: bool = False

    def config(self, vocab_size: int, eos_token_id: int, pad_token_id: int | None = None) -> Qwen35Config:
        """The Qwen35Config of this shape for a vocabulary of `vocab_size` (ConfigError for an impossible one)."""
        kw = dict(
            model_type="qwen3_5_moe_text" if self.moe else "qwen3_5_text", vocab_size=vocab_size,
            hidden_size=self.hidden_size, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, head_dim=self.head_dim, max_position_embeddings=MAX_POSITIONS,
            rope_theta=10000.0, partial_rotary_factor=self.rotary_dim / self.head_dim,
            linear_conv_kernel_dim=4, linear_key_head_dim=self.linear_head_dim,
            linear_value_head_dim=self.linear_head_dim, linear_num_key_heads=self.linear_key_heads,
            linear_num_value_heads=self.linear_value_heads, full_attention_interval=4,
            tie_word_embeddings=self.tie_embeddings, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if self.moe:
            kw.update(num_experts=self.experts, num_experts_per_tok=self.experts_per_token,
                      moe_intermediate_size=self.moe_intermediate_size,
                      shared_expert_intermediate_size=self.shared_expert_intermediate_size)
        else:
            kw["intermediate_size"] = self.intermediate_size
        return Qwen35Config(**kw)

    @property
    def rotary_dim(self) -> int:
        """Channels of a full-attention head that RoPE rotates: a quarter of head_dim as in the published models
        (64 of 256), but at least 8 (the bundled demo's 8 of 16), even, and at most head_dim."""
        r = max(self.head_dim // 4, min(8, self.head_dim))
        return r - r % 2

    def replace(self, **changes) -> ModelShape:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# Named shapes (`qwen35 train --shape NAME`); parameter counts for the byte vocabulary (260), untied embeddings.
SHAPES = {
    # 4 layers, hidden 32: the tests' size (64 k parameters; an update in milliseconds)
    "tiny": ModelShape(hidden_size=32, layers=4, heads=4, kv_heads=2, head_dim=16, linear_key_heads=2,
                       linear_value_heads=4, linear_head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16),
    # 4 layers, hidden 64: the bundled demo's geometry (0.20 M parameters)
    "demo": ModelShape(hidden_size=64, layers=4, heads=4, kv_heads=2, head_dim=16, linear_key_heads=2,
                       linear_value_heads=4, linear_head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32),
    # 4 layers, hidden 128 (0.93 M parameters, 3.7 MB in float32): the default; 600 updates in ~8 min on 2 cores
    "small": ModelShape(),
    # 8 layers, hidden 192 (3.6 M parameters, 14.6 MB in float32): a longer run
    "base": ModelShape(hidden_size=192, layers=8, heads=6, kv_heads=2, head_dim=32, linear_key_heads=3,
                       linear_value_heads=6, linear_head_dim=32, intermediate_size=512, moe_intermediate_size=128,
                       shared_expert_intermediate_size=128),
}


# ------------------------------------------------------------------------------------------------ the run's settings
@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a run's numbers (saved with every checkpoint; a resumed run keeps them)."""

    steps: int = 600  # optimizer updates (more over-fits the 434 KB corpus: docs/training.md)
    seq_len: int = 256  # tokens per training window
    batch_size: int = 16  # windows per update
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine's floor, as a fraction of lr
    warmup: int = 100  # linear warm-up updates
    weight_decay: float = 0.1  # AdamW decay of the matrices (see param_groups)
    grad_clip: float = 1.0  # global L2 norm; 0 = no clipping
    eval_every: int = 200  # held-out evaluation every this many updates (and at the end)
    eval_bytes: int = 65536  # held-out bytes each evaluation scores (whole windows); 0 = the whole split
    save_every: int = 500  # checkpoint every this many updates (and at the end)
    seed: int = 0
    tokenizer: str = "byte"  # "byte" (qwen35.tokenizer.ByteTokenizer) or "bpe" (trained on the training split)
    vocab_size: int | None = None  # the BPE's vocabulary (tokenizer "bpe" only)
    data: str | None = None  # None: the pydoc topics; else a text file or a folder (qwen35.data.load_corpus)

    def __post_init__(self):
        for name in ("steps", "seq_len", "batch_size", "eval_every", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a window scores its next tokens), got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.eval_bytes < 0 or self.seed < 0:
            raise ConfigError("warmup, weight_decay, grad_clip, eval_bytes and seed must be >= 0")
        if self.tokenizer not in ("byte", "bpe"):
            raise ConfigError(f"tokenizer must be 'byte' or 'bpe', got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and self.vocab_size is None:
            raise ConfigError("tokenizer 'bpe' needs a vocab_size")


def lr_at(step: int, s: TrainSettings) -> float:
    """The learning rate of update `step` (1-based): linear warm-up to s.lr over s.warmup updates, then a cosine
    to s.lr · s.min_lr_ratio at update s.steps."""
    floor = s.lr * s.min_lr_ratio
    if step <= s.warmup:
        return s.lr * step / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return floor + (s.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


NO_DECAY_SUFFIXES = ("A_log", "dt_bias", "bias")


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW's two groups: the matrices (ndim >= 2) with `weight_decay`, the vectors (norm weights, biases, A_log,
    dt_bias) without it.  Parameters keep the model's order, so an optimizer state_dict maps back onto a reloaded
    model."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES)
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class TrainResult:
    """What `train` returns: where the checkpoint is, the last step, and the log (as written to train_log.json)."""

    out_dir: Path
    step: int
    log: dict
    finished: bool  # the schedule ran to settings.steps (False: stopped at stop_after or interrupted)

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.log["train"]]


def load_training_state(directory) -> dict:
    """A checkpoint's training_state.pt (CheckpointError naming the file when it is missing or unreadable)."""
    import torch

    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {STATE_FILE} (not a checkpoint written by qwen35 train, or its "
                              "training state was removed); it cannot be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for a damaged file
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _plain(obj):
    """`obj` as plain JSON values (torch.load(weights_only=True) refuses str subclasses such as TorchVersion)."""
    return json.loads(json.dumps(obj, default=str))


def _round(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


class _Data:
    """The corpus, its tokenizer, the training sampler and the held-out evaluation windows of one run."""

    def __init__(self, settings: TrainSettings, tokenizer_json: str | None):
        self.corpus = corpus_data.load_corpus(settings.data)
        if tokenizer_json is not None:
            self.tokenizer = corpus_data.tokenizer_from_json(tokenizer_json)
        elif settings.tokenizer == "bpe":
            self.tokenizer = corpus_data.tokenizer_from_json(
                corpus_data.train_bpe(self.corpus.train_texts(), settings.vocab_size))
        else:
            self.tokenizer = corpus_data.ByteTokenizer()
        self.spec = corpus_data.tokenizer_spec(self.tokenizer)
        self.sep = corpus_data.separator_id(self.tokenizer)
        self.pad = self.tokenizer.token_to_id(corpus_data.PAD_TOKEN)
        self.byte_table = corpus_data.token_bytes(None if isinstance(self.tokenizer, corpus_data.ByteTokenizer)
                                                  else self.spec, self.tokenizer.vocab_size)
        train_stream = corpus_data.token_stream(self.corpus.train, self.tokenizer, self.sep)
        self.sampler = corpus_data.WindowSampler(train_stream, settings.seq_len, settings.batch_size, settings.seed)
        held = corpus_data.token_stream(self.corpus.held_out, self.tokenizer, self.sep)
        self.windows = corpus_data.eval_windows(held, settings.seq_len, max_bytes=settings.eval_bytes or None,
                                                byte_table=self.byte_table)
        self.info = self.corpus.info()
        self.info.update(train_tokens=int(train_stream.size), held_out_tokens=int(held.size),
                         tokenizer=settings.tokenizer, vocab_size=self.tokenizer.vocab_size,
                         unigram_bits_per_byte=unigram_bits_per_byte(
                             self.corpus.split_bytes("train"), self.corpus.split_bytes("held_out")))


def _evaluate(model, d: _Data, batch_size: int) -> Score:
    was_training = model.training
    model.eval()
    try:
        return score_causal_lm(model, d.windows, d.byte_table, batch_size=batch_size)
    finally:
        model.train(was_training)


def _save(model, out_dir: Path, d: _Data, state: dict, log: dict) -> None:
    """Write the checkpoint into `out_dir`: first into out_dir/.saving, then each file moved into place (an
    interrupted save leaves the previous checkpoint's files whole)."""
    import torch

    tmp = out_dir / ".saving"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, dtype="float32")
    for name, text in corpus_data.tokenizer_files(d.tokenizer, MAX_POSITIONS).items():
        (tmp / name).write_text(text, encoding="utf-8")
    torch.save(state, tmp / STATE_FILE)
    write_json(log, tmp / LOG_FILE)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out_dir / f.name)
    tmp.rmdir()


def train(settings: TrainSettings | None, shape: ModelShape | None, out_dir, *, resume=None,
          threads: int | None = None, stop_after: int | None = None, eval_every: int | None = None,
          save_every: int | None = None, progress: bool = True, log_path=None,
          echo: Callable[[str], None] | None = print) -> TrainResult:
    """Train (or, with `resume=DIR`, continue) a model; see the module docstring.

    settings / shape: the run's settings and the model's shape (both None when resuming: they come from the
    checkpoint).  out_dir: where checkpoints go (may be the resumed directory).  threads: torch.set_num_threads.
    stop_after: stop (and save) after this update, to be resumed later.  eval_every / save_every: override the
    saved cadence when resuming (they do not change the numbers).  log_path: also write the log JSON there.
    echo: where the one-line messages go (evaluations, saves); None = nowhere."""
    import torch

    from optimized.causal_lm import Qwen35ForCausalLM

    say = echo or (lambda _msg: None)
    out_dir = Path(out_dir)
    if threads is not None:
        torch.set_num_threads(int(threads))
    saved = None
    if resume is not None:
        saved = load_training_state(resume)
        settings = TrainSettings(**saved["settings"])
        shape = ModelShape(**saved["shape"])
        try:
            tokenizer_json = (Path(resume) / "tokenizer.json").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{resume}: its tokenizer.json cannot be read ({type(e).__name__}: {e}); a run "
                                  "is resumed with the tokenizer it was trained with") from None
    else:
        if settings is None or shape is None:
            raise ConfigError("train: settings and shape are needed unless resuming")
        tokenizer_json = None
    if eval_every is not None or save_every is not None:
        settings = replace(settings, eval_every=eval_every or settings.eval_every,
                           save_every=save_every or settings.save_every)
    _seed_everything(settings.seed)
    d = _Data(settings, tokenizer_json)
    config = shape.config(d.tokenizer.vocab_size, d.sep, d.pad)
    if saved is not None:
        if saved["data"]["train"]["sha256"] != d.info["train"]["sha256"]:
            raise CheckpointError(
                f"--resume {resume}: its training split (sha256 {saved['data']['train']['sha256'][:12]}…, "
                f"{saved['data']['source']}, Python {saved['data']['python']}) differs from this one "
                f"({d.info['train']['sha256'][:12]}…, Python {d.info['python']}); the run cannot continue bit for "
                "bit on other data")
        model = Qwen35ForCausalLM.from_pretrained(resume, dtype=torch.float32, device="cpu")
        torch.set_rng_state(saved["torch_rng"])
        start, log = int(saved["step"]), saved["log"]
    else:
        model = Qwen35ForCausalLM(config, seed=settings.seed)
        start, log = 0, _new_log(settings, shape, config, d)
    log["meta"] = machine_info("cpu")
    model.train()
    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=BETAS, eps=EPS)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
    params = [p for g in opt.param_groups for p in g["params"]]
    tokens_per_step = settings.batch_size * settings.seq_len
    elapsed = float(log["seconds"])
    last = settings.steps if stop_after is None else min(settings.steps, int(stop_after))

    def state(step):
        return {"step": step, "settings": asdict(settings), "shape": asdict(shape), "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(), "log": _plain(log), "data": _plain(d.info)}

    def save(step):
        log["step"], log["seconds"] = step, _round(elapsed, 8)
        _save(model, out_dir, d, state(step), log)
        if log_path is not None:
            write_json(log, log_path)

    bar = None
    if progress and start < last:
        tqdm = require("tqdm", "the progress bar of qwen35 train").tqdm
        bar = tqdm(total=settings.steps, initial=start, unit="step", dynamic_ncols=True, leave=True)
    if start == 0:
        _eval_and_log(model, d, settings, log, 0, elapsed, bar, say)
    step = saved_step = start
    try:
        with _DeferredInterrupt() as interrupt:
            for step in range(start + 1, last + 1):
                t0 = time.perf_counter()
                lr = lr_at(step, settings)
                for g in opt.param_groups:
                    g["lr"] = lr
                x = torch.from_numpy(d.sampler.batch(step))
                loss = model(x, labels=x).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                clip = settings.grad_clip if settings.grad_clip > 0 else math.inf
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                dt = time.perf_counter() - t0
                elapsed += dt
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ConfigError(f"the training loss became {value} at update {step} (lr {lr:.3g}); lower "
                                      "--lr or raise --warmup")
                log["train"].append({"step": step, "tokens": step * tokens_per_step, "seconds": _round(elapsed),
                                     "loss": value, "lr": _round(lr), "grad_norm": _round(float(norm))})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
                if step % settings.eval_every == 0 or step == settings.steps:
                    _eval_and_log(model, d, settings, log, step, elapsed, bar, say)
                if step % settings.save_every == 0 or step == last or interrupt.requested:
                    save(step)
                    saved_step = step
                    (bar.write if bar else say)(f"step {step}: checkpoint written to {out_dir}")
                if interrupt.requested:
                    say(f"interrupted: the checkpoint of step {step} is in {out_dir} (continue with "
                        f"--resume {out_dir})")
                    raise KeyboardInterrupt
    finally:
        if bar is not None:
            bar.close()
    if saved_step != step or start >= last:
        save(step)
    return TrainResult(out_dir, step, log, finished=step >= settings.steps)


class _DeferredInterrupt:
    """Within the training loop, Ctrl-C (SIGINT) is deferred to the end of the update it arrives in, so that an
    update is never half applied and the checkpoint saved on the way out is that of a finished step; a second
    Ctrl-C stops at once.  Outside the main thread (where no signal handler can be set) nothing changes."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _new_log(settings: TrainSettings, shape: ModelShape, config: Qwen35Config, d: _Data) -> dict:
    n_params = _count_parameters(config)
    return {"kind": "train_log", "settings": asdict(settings), "shape": asdict(shape),
            "config": config.to_hf_dict(), "parameters": n_params, "data": d.info,
            "tokens_per_step": settings.batch_size * settings.seq_len, "train": [], "eval": [], "step": 0,
            "seconds": 0.0}


def _count_parameters(config: Qwen35Config) -> int:
    from reference.checkpoint import checkpoint_names

    return int(sum(np.prod(s) for s in checkpoint_names(config).values()))


def _eval_and_log(model, d: _Data, settings: TrainSettings, log: dict, step: int, elapsed: float, bar, say) -> None:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        score = _evaluate(model, d, settings.batch_size)
    row = {"step": step, "tokens": step * settings.batch_size * settings.seq_len, "seconds": _round(elapsed),
           "loss": _round(score.loss), "perplexity": _round(score.perplexity),
           "bits_per_byte": _round(score.bits_per_byte), "targets": score.targets, "bytes": score.bytes,
           "eval_seconds": _round(time.perf_counter() - t0, 4)}
    log["eval"].append(row)
    (bar.write if bar else say)(f"step {step}: held-out loss {score.loss:.4f} nats/token, perplexity "
                                f"{score.perplexity:.3f}, {score.bits_per_byte:.4f} bits/byte ({score.bytes:,} "
                                "bytes)")


def settings_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainSettings))
