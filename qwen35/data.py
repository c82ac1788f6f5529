"""The training corpus: documents, the fixed held-out split, tokenization, and the windows the model reads.

    corpus = load_corpus()                         # the Python documentation topics that ship with CPython
    corpus = load_corpus("notes/")                 # or a text file / a folder of text files
    corpus.info()                                  # sizes, sha256 and the Python version of each split
    tok = ByteTokenizer()                          # or tokenizer_from_json(train_bpe(corpus.train_texts(), 1024))
    stream = token_stream(corpus.train, tok)       # [N] int64: <eos> doc₀ <eos> doc₁ ...
    batch = WindowSampler(stream, seq_len=256, batch_size=16, seed=0).batch(step)   # [16, 256]
    windows = eval_windows(held_stream, seq_len=256)   # non-overlapping (inputs, targets) pairs

**Documents.**  The default corpus is `pydoc_data.topics.topics` (the text of `help("if")`, `help("for")`, ...;
about 465 KB of English prose and Python in 79 topics on CPython 3.11): one document per topic, in topic-name
order (sorted, so neither dict order nor hashing matters).  `--data FILE` or `--data DIR` (every file under DIR,
recursively, in sorted relative-path order, read as UTF-8) is cut into blocks: each file is split at line ends
into blocks of whole lines, a block closing at the first line end at or after BLOCK_BYTES (4096) UTF-8 bytes; the
last block of a file may be shorter.  A block never spans two files.

**The split.**  Every HELD_OUT_EVERY-th (10th) document in that order, starting with the first (index % 10 == 0),
is held out; the rest is the training split.  The rule uses no hash and no random draw: the same documents give
the same split on every machine.  The topics themselves change between CPython versions, so `Corpus.info()`
records the Python version and the sha256 of each split's bytes (the documents' UTF-8 text concatenated in
order), and every checkpoint and evaluation JSON carries it: a different CPython's topics are detected, not
silently compared.  On CPython 3.11.7 the default corpus is 79 topics; 8 are held out (assert, bitwise,
comparisons, else, identifiers, numbers, slicings, typesmapping: 32,208 bytes), 71 train (433,909 bytes);
docs/training.md lists the sha256.

**Tokens.**  A split's token stream is each document preceded by the separator token (the tokenizer's
`<|endoftext|>`): `<eos> doc₀ <eos> doc₁ … doc_n`, each document tokenized on its own.  The default tokenizer is
qwen35.tokenizer.ByteTokenizer (ids 0..255 are the UTF-8 bytes, 256.. the four special tokens, vocabulary 260: the
bundled demo's, readable without the `tokenizers` package); `train_bpe` trains a small byte-level BPE on the
training split instead (the `tokenizers` extra).

**Windows.**  Training reads random contiguous windows of `seq_len` tokens of the training stream (`WindowSampler`:
the starts of step s are drawn from numpy's default_rng([seed, s]), so a batch is a pure function of the seed and
the step, and a resumed run reads the very batches it would have read).  Evaluation reads the held-out stream in
non-overlapping windows (`eval_windows`): window i feeds tokens [iL, iL + L) and scores their next tokens
[iL + 1, iL + L + 1), so every token after the first is scored exactly once and, since the stream opens with the
separator, the scored targets cover every byte of the held-out text.
"""
from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reference.errors import Qwen35Error

from .extras import require
from .tokenizer import BYTE_SPECIAL_TOKENS, ByteTokenizer, byte_tokenizer_json, bytes_to_unicode

__all__ = ["DataError", "Document", "Corpus", "load_corpus", "split_documents", "HELD_OUT_EVERY", "BLOCK_BYTES",
           "SPLIT_RULE", "token_stream", "token_bytes", "separator_id", "WindowSampler", "eval_windows",
           "train_bpe", "tokenizer_from_json", "tokenizer_files", "tokenizer_spec", "EOS_TOKEN", "PAD_TOKEN"]

HELD_OUT_EVERY = 10
BLOCK_BYTES = 4096
SPLIT_RULE = (f"documents in order (topics sorted by name; files by sorted path, cut into blocks of whole lines of "
              f">= {BLOCK_BYTES} bytes); every {HELD_OUT_EVERY}th starting with the first (index % "
              f"{HELD_OUT_EVERY} == 0) is held out")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_SOURCE = "pydoc_data.topics"


class DataError(Qwen35Error, ValueError):
    """A corpus, a tokenizer or a window request cannot be used as given; the message names the path or value."""


@dataclass(frozen=True)
class Document:
    """One unit of the split: a pydoc topic, or a block of lines of a file (`name` says which)."""

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Documents split into training and held-out parts by `split_documents`; `source` names where they came from."""

    source: str
    train: tuple[Document, ...]
    held_out: tuple[Document, ...]

    def split(self, which: str) -> tuple[Document, ...]:
        if which not in ("train", "held_out"):
            raise DataError(f"split must be 'train' or 'held_out', got {which!r}")
        return self.train if which == "train" else self.held_out

    def split_bytes(self, which: str) -> bytes:
        """The split's bytes: its documents' UTF-8 text, concatenated in order (what sha256 and bits/byte count)."""
        return b"".join(d.text.encode("utf-8") for d in self.split(which))

    def train_texts(self) -> list[str]:
        return [d.text for d in self.train]

    def info(self) -> dict:
        """What a checkpoint or an evaluation records about its data: the source, the Python version (the default
        corpus depends on it), the rule, and per split the number of documents, bytes and the sha256 of the bytes."""
        out = {"source": self.source, "python": platform.python_version(), "rule": SPLIT_RULE}
        for which in ("train", "held_out"):
            blob = self.split_bytes(which)
            out[which] = {"documents": len(self.split(which)), "bytes": len(blob),
                          "sha256": hashlib.sha256(blob).hexdigest()}
        out["held_out_names"] = [d.name for d in self.held_out][:50]
        return out


def split_documents(docs: Sequence[Document]) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    """(train, held_out): document i is held out iff i % HELD_OUT_EVERY == 0 (the first, the 11th, ...)."""
    docs = tuple(docs)
    held = tuple(d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == 0)
    train = tuple(d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != 0)
    return train, held


def _topic_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(name, topics[name]) for name in sorted(topics)]


def _blocks(name: str, text: str) -> list[Document]:
    """`text` cut at line ends into blocks of >= BLOCK_BYTES UTF-8 bytes (the last may be shorter)."""
    out, lines, size = [], [], 0
    for line in text.splitlines(keepends=True):
        lines.append(line)
        size += len(line.encode("utf-8"))
        if size >= BLOCK_BYTES:
            out.append(Document(f"{name}#{len(out)}", "".join(lines)))
            lines, size = [], 0
    if lines:
        out.append(Document(f"{name}#{len(out)}", "".join(lines)))
    return out


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{flag} {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None


def load_corpus(path=None, *, flag: str = "--data") -> Corpus:
    """The corpus: the pydoc topics (path None), or the text file / folder of text files at `path`, split by
    `split_documents` (see the module docstring for the rules).  DataError names `flag` and the path when it is
    missing, unreadable, not UTF-8, or too small to give both splits a document."""
    if path is None:
        docs, source = _topic_documents(), DEFAULT_SOURCE
    else:
        p = Path(path)
        if p.is_dir():
            files = sorted((f for f in p.rglob("*") if f.is_file()), key=lambda f: f.relative_to(p).as_posix())
            if not files:
                raise DataError(f"{flag} {p}: the folder holds no files")
            docs = [b for f in files for b in _blocks(f.relative_to(p).as_posix(), _read_text(f, flag))]
        elif p.is_file():
            docs = _blocks(p.name, _read_text(p, flag))
        else:
            raise DataError(f"{flag} {p}: no such file or directory (expected a text file or a folder of them)")
        source = str(p)
    docs = [d for d in docs if d.text]
    train, held = split_documents(docs)
    if not train or not held:
        raise DataError(f"{flag} {source}: {len(docs)} document(s) of up to {BLOCK_BYTES} bytes is too little text; "
                        f"the held-out rule needs at least 2 (one held out, one to train on)")
    return Corpus(source, train, held)


# ------------------------------------------------------------------------------------------------ tokenizers
def train_bpe(texts: Sequence[str], vocab_size: int) -> str:
    """A byte-level BPE trained on `texts` (the `tokenizers` extra), as tokenizer.json text.  `vocab_size` counts
    everything: the 256 byte symbols, the merges, and the four special tokens of qwen35.tokenizer (added last, so
    `<|endoftext|>` is id vocab_size - 4).  Deterministic for the same texts."""
    need = 256 + len(BYTE_SPECIAL_TOKENS)
    if vocab_size < need:
        raise DataError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least {need} (256 bytes and "
                        f"{len(BYTE_SPECIAL_TOKENS)} special tokens)")
    tk = require("tokenizers", "--tokenizer bpe")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_SPECIAL_TOKENS), show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(texts), trainer)
    tok.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    return tok.to_str(pretty=False)


class _JsonTokenizer:
    """A tokenizer.json through `tokenizers` (encode / decode / vocab_size / eos_token_ids / token_to_id)."""

    def __init__(self, spec: str):
        tk = require("tokenizers", "a BPE tokenizer")
        self.spec = spec
        self._tok = tk.Tokenizer.from_str(spec)
        eos = self._tok.token_to_id(EOS_TOKEN)
        self.eos_token_ids = [] if eos is None else [eos]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def tokenizer_from_json(spec: str):
    """The tokenizer a tokenizer.json text describes: the ByteTokenizer for `byte_tokenizer_json()` (no package
    needed), else a `tokenizers` tokenizer."""
    if json.loads(spec) == json.loads(byte_tokenizer_json()):
        return ByteTokenizer()
    return _JsonTokenizer(spec)


def tokenizer_spec(tokenizer) -> str:
    """The tokenizer.json text of a tokenizer made here (ByteTokenizer or `tokenizer_from_json`'s)."""
    return tokenizer.spec if isinstance(tokenizer, _JsonTokenizer) else byte_tokenizer_json()


def tokenizer_files(tokenizer, model_max_length: int) -> dict[str, str]:
    """{file name: text} of tokenizer.json and tokenizer_config.json, as the bundled demo carries them."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
           "model_max_length": int(model_max_length), "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tokenizer_spec(tokenizer), "tokenizer_config.json": json.dumps(cfg, indent=2) + "\n"}


def separator_id(tokenizer, config=None) -> int:
    """The id that opens every document of a stream: the tokenizer's end-of-text token, else the config's
    eos_token_id (the first of a list).  DataError when neither has one."""
    ids = list(getattr(tokenizer, "eos_token_ids", []) or [])
    if not ids and config is not None and config.eos_token_id is not None:
        eos = config.eos_token_id
        ids = list(eos) if isinstance(eos, tuple) else [eos]
    if not ids:
        raise DataError("the tokenizer has no end-of-text token and the config no eos_token_id: documents cannot "
                        "be separated")
    return int(ids[0])


def token_bytes(tokenizer_json: str | None, vocab_size: int) -> list[bytes]:
    """The UTF-8 bytes each token id stands for (b"" for special tokens), from a byte-level tokenizer.json (None:
    the ByteTokenizer).  A target's share of "bytes" in bits per byte is the length of its entry.  DataError for a
    tokenizer.json that is not byte-level (its tokens are not in the GPT-2 byte alphabet)."""
    if tokenizer_json is None:
        table = [bytes([i]) for i in range(256)]
        return table + [b""] * max(0, vocab_size - 256)
    spec = json.loads(tokenizer_json)
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    table = [b""] * vocab_size
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special", True)}
    vocab = (spec.get("model") or {}).get("vocab")
    if not isinstance(vocab, dict):
        raise DataError("tokenizer.json: bits per byte needs a byte-level BPE (model.vocab maps tokens to ids)")
    for text, i in vocab.items():
        if not 0 <= i < vocab_size or i in special:
            continue
        try:
            table[i] = bytes(inverse[c] for c in text)
        except KeyError:
            raise DataError(f"tokenizer.json: token {text!r} is not in the byte-level alphabet; bits per byte needs "
                            "a byte-level BPE tokenizer") from None
    for t in spec.get("added_tokens", []):
        if not t.get("special", True) and 0 <= t["id"] < vocab_size:
            table[t["id"]] = t["content"].encode("utf-8")
    return table


def token_stream(docs: Sequence[Document], tokenizer, sep: int | None = None) -> np.ndarray:
    """[N] int64: each document tokenized on its own and preceded by the separator (default
    `separator_id(tokenizer)`)."""
    sep = separator_id(tokenizer) if sep is None else int(sep)
    parts = []
    for d in docs:
        parts.append([sep])
        parts.append(tokenizer.encode(d.text))
    return np.asarray([t for p in parts for t in p], dtype=np.int64)


# ------------------------------------------------------------------------------------------------ windows
class WindowSampler:
    """Random contiguous windows of `seq_len` tokens of `stream`, `batch_size` per step, seeded per step.

    `batch(step)` draws the starts from numpy.random.default_rng([seed, step]): uniform in [0, N - seq_len], so the
    batch of a step depends on (stream, seq_len, batch_size, seed, step) only, and no sampler state needs saving for
    a run to resume bit for bit."""

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.stream = np.asarray(stream, dtype=np.int64)
        if self.stream.ndim != 1 or self.stream.size < seq_len + 1:
            raise DataError(f"the training split has {self.stream.size} tokens; --seq-len {seq_len} needs at least "
                            f"{seq_len + 1}")
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)

    def starts(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(step)])
        return rng.integers(0, self.stream.size - self.seq_len + 1, size=self.batch_size)

    def batch(self, step: int) -> np.ndarray:
        """[batch_size, seq_len] int64: the windows of `step`."""
        idx = self.starts(step)[:, None] + np.arange(self.seq_len)[None, :]
        return self.stream[idx]


def eval_windows(stream: np.ndarray, seq_len: int, *, max_bytes: int | None = None,
                 byte_table: Sequence[bytes] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping (inputs [L_i], targets [L_i]) windows of `stream`: window i reads tokens [iL, iL + L) and
    scores tokens [iL + 1, iL + L + 1) (the last window is shorter when the stream runs out).  With `max_bytes`
    (and the token -> bytes `byte_table`), windows are taken in order until the bytes their targets cover reach
    max_bytes (whole windows; at least one)."""
    stream = np.asarray(stream, dtype=np.int64)
    if stream.size < 2:
        raise DataError(f"the held-out stream has {stream.size} token(s); scoring needs at least 2")
    out, covered = [], 0
    for s in range(0, stream.size - 1, seq_len):
        e = min(s + seq_len, stream.size - 1)
        out.append((stream[s:e], stream[s + 1:e + 1]))
        if max_bytes is not None:
            if byte_table is None:
                raise DataError("eval_windows: max_bytes needs the token -> bytes table")
            covered += sum(len(byte_table[int(t)]) for t in out[-1][1])
            if covered >= max_bytes:
                break
    return out
