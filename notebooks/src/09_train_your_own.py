# Notebook source (jupytext py:percent). Edit this file, then run `python notebooks/build.py` to regenerate the .ipynb.

# %% [markdown]
# # 09 · Train your own Qwen3.5 on Python's documentation
#
# `qwen35 train` trains a Qwen3.5 from scratch on CPU.  This notebook runs its training loop, in small, on its
# default corpus, then measures, saves, reloads and samples the result — the whole life of a model in one page.
# The default run (FULL = False) trains a model of the demo's geometry for a few hundred updates in well under a
# minute on one CPU core; FULL = True is the real run (the `small` shape, 600 updates: about 8 minutes on 2
# cores).
#
# **You will learn**
# 1. the **corpus** (CPython's `pydoc_data.topics`), its fixed **held-out split** and how training windows are drawn;
# 2. how a **model shape** becomes a `Qwen35Config`, and the **schedule** (AdamW, warm-up, cosine decay);
# 3. to run `qwen35.training.train` — the function behind `qwen35 train` — and read its **loss curve**, train and
#    held out, against a **unigram baseline**;
# 4. to **evaluate** the checkpoint with `qwen35.evaluation` on several engines (NumPy reference float64, the
#    optimized PyTorch engine, the training model), which must agree, in **bits per byte**;
# 5. to **reload** the checkpoint in the pipeline engine and **generate** from it.
#
# Narrative: motivation → naive (what the numbers are before training) → optimized (the trained model) → check →
# discussion.

# %%
FULL = False  # True: the real run (the "small" shape, 600 updates of 16 x 256 tokens; ~8 min on 2 cores)

import shutil
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from optimized.model import Qwen35Model as OptimizedModel
from qwen35.data import WindowSampler, load_corpus, separator_id, token_stream
from qwen35.evaluation import evaluate_checkpoint, unigram_bits_per_byte
from qwen35.measure import rel_rms
from qwen35.report import eval_table
from qwen35.tokenizer import ByteTokenizer, load_tokenizer
from qwen35.training import SHAPES, TrainSettings, lr_at, train
from reference.memory import parameter_counts
from reference.model import Qwen35Model

REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OUT = REPO / "checkpoints" / "notebook09" if FULL else Path(tempfile.mkdtemp(prefix="qwen35_nb09_"))
checks = {}  # name -> (value, bound); every entry is asserted in the last cell

# %% [markdown]
# ## 1. The corpus and its split
#
# `qwen35.data.load_corpus()` reads the help topics that ship with CPython (the text of `help("if")`,
# `help("for")`, ...), one document per topic, sorted by name.  Every 10th document, starting with the first, is
# **held out**: no hash, no random draw, so the split is the same on every machine — and `info()` records the Python
# version and a sha256 of each split, because another CPython ships other text.

# %%
corpus = load_corpus()
info = corpus.info()
print(f"source {info['source']} (Python {info['python']}): {info['train']['documents']} training documents, "
      f"{info['train']['bytes']:,} bytes;  {info['held_out']['documents']} held out, {info['held_out']['bytes']:,} "
      "bytes")
print("held out:", ", ".join(d.name for d in corpus.held_out))
print("train sha256:", info["train"]["sha256"][:16], "…  held-out sha256:", info["held_out"]["sha256"][:16], "…")
checks["no document in both splits"] = (len({d.name for d in corpus.train} & {d.name for d in corpus.held_out}), 0)

# %% [markdown]
# The tokens are bytes (`ByteTokenizer`: id $b < 256$ is byte $b$, then four special tokens; the demo's vocabulary
# of 260).  Each split becomes one stream, `<eos> doc₀ <eos> doc₁ …`, and a training batch is a set of random
# contiguous windows of it.  The windows of update $s$ come from `default_rng([seed, s])`: a batch is a function of
# the seed and the step only, which is what lets a resumed run read the batches it would have read.

# %%
SEQ_LEN, BATCH = (256, 16) if FULL else (128, 8)
tok = ByteTokenizer()
train_stream = token_stream(corpus.train, tok, separator_id(tok))
sampler = WindowSampler(train_stream, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
batch = sampler.batch(1)  # [BATCH, SEQ_LEN] int64
print(f"training stream: {train_stream.size:,} tokens; one batch: {batch.shape}")
print("the first window of update 1:", repr(tok.decode(batch[0][:100])), "…")
checks["a batch is a function of (seed, step)"] = (int(np.abs(sampler.batch(1) - batch).max()), 0)

# %% [markdown]
# ## 2. The model and the schedule
#
# A `ModelShape` names the geometry; `shape.config(...)` turns it into the `Qwen35Config` every engine reads,
# with the 3:1 layer map (three Gated DeltaNet layers per gated full-attention layer).  The default run uses the
# `demo` shape (the geometry of the original random demo), FULL the `small` one.

# %%
shape = SHAPES["small"] if FULL else SHAPES["demo"]
config = shape.config(tok.vocab_size, separator_id(tok), tok.token_to_id("<|pad|>"))
n_params = sum(parameter_counts(config).values())
print(f"layers {' '.join('F' if t == 'full_attention' else 'L' for t in config.layer_types)}, hidden "
      f"{config.hidden_size}, DeltaNet heads {config.linear_num_value_heads} x {config.linear_key_head_dim}, "
      f"attention heads {config.num_attention_heads} x {config.head_dim}: {n_params:,} parameters "
      f"({4 * n_params / 1e6:.1f} MB in float32)")

settings = (TrainSettings(seed=0) if FULL else
            TrainSettings(steps=120, seq_len=SEQ_LEN, batch_size=BATCH, lr=4e-3, warmup=10, eval_every=20,
                          eval_bytes=4096, save_every=120, seed=0))
print(settings)

# %% [markdown]
# AdamW updates the weights; the learning rate ramps up linearly for `warmup` updates, then follows a cosine down
# to `min_lr_ratio` of its peak.  Weight decay applies to the matrices only, not to norm weights nor to the
# DeltaNet's decay parameters `A_log` and `dt_bias` (docs/training.md explains why).

# %%
steps = np.arange(1, settings.steps + 1)
fig, ax = plt.subplots(figsize=(7, 2.6))
ax.plot(steps, [lr_at(int(s), settings) for s in steps])
ax.set_xlabel("update")
ax.set_ylabel("learning rate")
ax.set_title("warm-up, then cosine decay to the floor")
ax.grid(alpha=.3)
plt.show()
checks["lr peaks at the end of the warm-up"] = (abs(lr_at(settings.warmup, settings) - settings.lr), 1e-15)

# %% [markdown]
# ## 3. Naive: what an untrained model scores
#
# Before training, a model that knows nothing spreads its probability evenly: $\log_2 260 \approx 8.02$ bits per
# byte.  A **unigram** model — the byte frequencies of the training split, add-one smoothed — knows which bytes
# are common but nothing about their order; it is the bar a language model has to clear.

# %%
unigram = unigram_bits_per_byte(corpus.split_bytes("train"), corpus.split_bytes("held_out"))
print(f"uniform: {np.log2(tok.vocab_size):.3f} bits per byte;  unigram of the training split: {unigram:.3f}")

# %% [markdown]
# ## 4. Optimized: train
#
# `train(settings, shape, out_dir)` is what `qwen35 train` runs: the differentiable model
# (`optimized.Qwen35ForCausalLM`, float32), AdamW with the schedule above, gradient clipping, a held-out evaluation
# every `eval_every` updates, and a Hugging Face checkpoint (config.json, model.safetensors, the tokenizer files,
# the training state and `train_log.json`) in `out_dir` at the end.

# %%
t0 = time.perf_counter()
result = train(settings, shape, OUT, progress=FULL, echo=print)
seconds = time.perf_counter() - t0
log = result.log
print(f"{result.step} updates, {result.step * settings.batch_size * settings.seq_len:,} tokens in {seconds:.1f} s; "
      f"checkpoint in {OUT}:")
print("  ", ", ".join(sorted(p.name for p in OUT.iterdir())))

# %% [markdown]
# The loss curve, in bits (a byte-level model's loss per token divided by $\ln 2$ is its loss per byte): the
# training loss of every update (each on a fresh batch, hence noisy) and the held-out bits per byte at each
# evaluation, against the two baselines.  Where the held-out curve crosses the unigram line the model has started
# to use the order of the bytes, not just their frequencies; a gap opening between the training and the held-out
# curves would be overfitting.

# %%
tr_tokens = np.array([r["tokens"] for r in log["train"]])
tr_bits = np.array([r["loss"] for r in log["train"]]) / np.log(2)
ev_tokens = np.array([r["tokens"] for r in log["eval"]])
ev_bpb = np.array([r["bits_per_byte"] for r in log["eval"]])
fig, ax = plt.subplots(figsize=(8, 3.6))
ax.plot(tr_tokens, tr_bits, lw=0.8, alpha=0.7, label="training loss (bits per token)")
ax.plot(ev_tokens, ev_bpb, "o-", label="held out (bits per byte)")
ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram baseline ({unigram:.2f})")
ax.axhline(np.log2(tok.vocab_size), color="gray", ls=":", lw=1, label="uniform")
ax.set_xlabel("training tokens")
ax.set_ylabel("bits")
ax.legend(fontsize=8)
ax.grid(alpha=.3)
ax.set_title(f"{n_params:,}-parameter Qwen3.5, {result.step} updates")
plt.show()
print(f"held-out bits per byte: {ev_bpb[0]:.3f} before training -> {ev_bpb[-1]:.3f} after "
      f"(unigram {unigram:.3f}: the model is {'below' if ev_bpb[-1] < unigram else 'still above'} it)")
checks["the training loss went down"] = (float(tr_bits[-5:].mean() >= tr_bits[:5].mean()), 0.0)
checks["the held-out bits per byte went down"] = (float(ev_bpb[-1] >= ev_bpb[0]), 0.0)

# %% [markdown]
# ## 5. Check: evaluate the checkpoint on several engines
#
# `evaluate_checkpoint` scores the held-out split from the saved files, on any of the project's engines, over the
# same non-overlapping windows.  Here: the NumPy reference in float64 (the oracle), the optimized PyTorch pipeline
# engine in float32, and the training model itself.  They compute the same function, so their losses must agree
# to float32 rounding; and the training model's score must be the one the training run logged at its last
# evaluation (same windows, same weights, read back from disk).

# %%
engines = ("reference-f64", "optimized-f32", "causal-lm")
ev = evaluate_checkpoint(OUT, engines=engines, seq_len=settings.seq_len, max_bytes=settings.eval_bytes)
display(Markdown(eval_table(ev)))  # the table `qwen35 eval` prints
rows = {r["engine"]: r for r in ev["rows"]}
for name in engines[1:]:
    checks[f"{name} loss == reference-f64 loss"] = (rows[name]["rel_diff_vs_reference_f64"], 1e-4)
checks["the saved model scores what training logged"] = (
    abs(rows["causal-lm"]["bits_per_byte"] - log["eval"][-1]["bits_per_byte"]) / log["eval"][-1]["bits_per_byte"],
    1e-5)

# %% [markdown]
# ## 6. Reload and generate
#
# The checkpoint is a plain Hugging Face directory, so the serving engines load it like any other.  Below, the
# optimized pipeline engine (PyTorch, float32) continues a prompt greedily and then with sampling (temperature 0.8),
# and the NumPy reference gives the same next-byte distribution for the prompt.  After a short run, expect
# fragments of words and the documentation's punctuation rather than sentences; the FULL run gets much further.

# %%
tok_out = load_tokenizer(OUT)  # the tokenizer files saved with the checkpoint
engine = OptimizedModel.from_pretrained(OUT, max_batch_size=2)
prompt = tok_out.encode('The "while" statement is used for')
n_new = 200 if FULL else 80
(greedy,) = engine.generate([prompt], max_new_tokens=n_new, stop_token_ids=tok_out.eos_token_ids)
print("prompt: ", repr(tok_out.decode(prompt)))
print("greedy: ", repr(tok_out.decode(greedy)))
(sampled,) = engine.generate([prompt], max_new_tokens=n_new, temperature=0.8, seed=0,
                             stop_token_ids=tok_out.eos_token_ids)
print("sampled:", repr(tok_out.decode(sampled)))

reference = Qwen35Model.from_pretrained(OUT, max_batch_size=1)
ref_logits = reference.logits([prompt])[0]  # [T, V] float64
opt_logits = engine.logits([prompt])[0].double().numpy()  # [T, V] from float32
checks["optimized logits == reference logits (fp32 rounding)"] = (rel_rms(ref_logits, opt_logits), 1e-4)
checks["tokenizer saved with the checkpoint == the training one"] = (
    float(tok_out.encode("héllo <|endoftext|>") != tok.encode("héllo <|endoftext|>")), 0.0)

# %% [markdown]
# To look inside your model the way notebook 08 looks inside the demo, point its `DEMO` at the checkpoint: with
# FULL = True it stays in `checkpoints/notebook09`; the default run's temporary directory is removed at the end
# of this notebook.

# %% [markdown]
# ## 7. The same from the command line
#
# ```bash
# qwen35 train --out checkpoints/mine --steps 600 --seed 0       # the loop above, with a progress bar
# qwen35 train --resume checkpoints/mine                          # continue an interrupted run, bit for bit
# qwen35 eval --model checkpoints/mine                            # the table of section 5, every engine
# qwen35 generate --model checkpoints/mine --prompt 'The "if" statement'
# qwen35 plot                                                     # the loss curve and bits per byte as figures
# ```
#
# `qwen35 train --help` lists the shape flags (`--shape`, `--hidden-size`, `--layers`, ...) and the schedule;
# docs/training.md describes the checkpoint layout and the metrics.

# %% [markdown]
# ## 8. Discussion
#
# * **Bits per byte** is the loss that compares across tokenizers: total nats over the held-out text's UTF-8 bytes,
#   divided by $\ln 2$.  For this byte-level model it is the loss per token in bits, except that the document
#   separators count as targets but not as bytes.
# * **What limits a short run** is the number of tokens seen: the default run reads
#   `steps x batch x seq_len` tokens, a fraction of one pass over the training split: see whether the held-out
#   curve is still falling when it stops.  Longer runs, a larger shape and a longer context (`seq_len`) cost
#   CPU-minutes each; the FULL run reads about 8 M tokens.
# * **Engines agree** because they are the same model: the training model (autograd through the chunked gated delta
#   rule), the pipeline engine with its state pool, and the float64 oracle.  Their agreement on a trained checkpoint
#   is a stronger test than on random weights, whose logits are small and flat.
# * **Reproducibility.**  The seed fixes the initial weights, the batches and torch's generator; `--resume`
#   restores the optimizer and the RNG state, so a resumed run equals an uninterrupted one on the same machine.

# %% [markdown]
# ## What was checked

# %%
for name, (value, bound) in checks.items():
    print(f"{'ok ' if value <= bound else 'FAIL'}  {name}: {value:.1e} <= {bound:.0e}")
for name, (value, bound) in checks.items():
    assert value <= bound, f"{name}: {value} > {bound}"
assert len(checks) >= 8
if not FULL:
    shutil.rmtree(OUT)  # the default run's checkpoint was temporary
