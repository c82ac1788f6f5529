"""Tokenizers for `qwen35 generate`: a built-in byte-level one, and a checkpoint's own `tokenizer.json`.

    tok = load_tokenizer(directory)       # tokenizer.json via `tokenizers` when present, else ByteTokenizer
    ids = tok.encode("Hello")             # list[int]
    text = tok.decode(ids)
    tok.eos_token_ids                     # ids that end generation

`ByteTokenizer`: token id b (0..255) is the byte b of the UTF-8 text; ids 256.. are special tokens
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|pad|>`).  The bundled demo model uses it, and its directory
also carries an equivalent `tokenizer.json` (a byte-level BPE without merges, written by `byte_tokenizer_json`)
so that the `tokenizers` path gives the very same ids.

`tokenizers` is optional (the `tokenizers` extra).  Without it, a `tokenizer.json` that is exactly the one
`byte_tokenizer_json` writes (the demo's) is read as the ByteTokenizer it describes; any other one raises a
MissingDependencyError (a Qwen35Error) naming the file and the extra.
"""
from __future__ import annotations

import json
from pathlib import Path

from reference.errors import CheckpointError

from .extras import MissingDependencyError, require

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "byte_tokenizer_json", "BYTE_SPECIAL_TOKENS",
           "bytes_to_unicode"]

BYTE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte maps to a printable unicode character (so BPE vocabularies can
    hold every byte as a string).  Printable Latin-1 bytes map to themselves; the others to U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, special tokens from 256 (see the module docstring)."""

    def __init__(self, special_tokens=BYTE_SPECIAL_TOKENS, eos_token: str | None = "<|endoftext|>"):
        self.special_tokens = tuple(special_tokens)
        self._special_ids = {t: 256 + i for i, t in enumerate(self.special_tokens)}
        self.eos_token = eos_token

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    @property
    def eos_token_ids(self) -> list[int]:
        return [self._special_ids[self.eos_token]] if self.eos_token in self._special_ids else []

    def token_to_id(self, token: str) -> int | None:
        return self._special_ids.get(token)

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text`; special-token strings inside it become their ids."""
        ids: list[int] = []
        i = 0
        while i < len(text):
            for tok, tid in self._special_ids.items():
                if text.startswith(tok, i):
                    ids.append(tid)
                    i += len(tok)
                    break
            else:
                j = i
                while j < len(text) and not any(text.startswith(t, j) for t in self._special_ids):
                    j += 1
                ids.extend(text[i:j].encode("utf-8"))
                i = j
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, pending = [], bytearray()
        names = {v: k for k, v in self._special_ids.items()}
        for t in ids:
            t = int(t)
            if 0 <= t < 256:
                pending.append(t)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if t in names and not skip_special_tokens:
                out.append(names[t])
            elif t not in names:
                out.append("\ufffd")  # an id this tokenizer does not know
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A checkpoint's `tokenizer.json`, through the `tokenizers` library (no transformers needed).  A file that
    cannot be read, is not JSON, or that `tokenizers` rejects raises CheckpointError naming the file; so does a
    `tokenizer_config.json` that is not a JSON object or whose eos_token is neither a string nor {"content": ...}.
    Without `tokenizers` installed: MissingDependencyError naming the file and the extra."""

    def __init__(self, directory):
        directory = Path(directory)
        path = directory / "tokenizer.json"
        spec = _read_json(path)
        Tokenizer = require("tokenizers", f"reading {path}").Tokenizer
        try:
            self._tok = Tokenizer.from_str(spec)
        except Exception as e:  # the tokenizers library raises a bare Exception for a spec it rejects
            raise CheckpointError(f"{path}: not a tokenizer.json the tokenizers library accepts ({e})") from None
        self.eos_token = eos = _eos_token(directory)
        self._eos_ids = []
        if eos is not None and self._tok.token_to_id(eos) is not None:
            self._eos_ids.append(self._tok.token_to_id(eos))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_ids)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> str:
    """The text of a JSON file, checked to parse; CheckpointError naming the file if it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return text


def _eos_token(directory: Path) -> str | None:
    """The eos_token of `directory`'s tokenizer_config.json (None without one); CheckpointError naming the file if
    it is not a JSON object or its eos_token is neither a string nor {"content": string}."""
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(_read_json(cfg_path)) if cfg_path.exists() else {}
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got a {type(cfg).__name__}")
    eos = cfg.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if eos is not None and not isinstance(eos, str):
        raise CheckpointError(f"{cfg_path}: eos_token must be a string or {{\"content\": string}}, got {eos!r}")
    return eos


def _tokenizers_installed() -> bool:
    try:
        require("tokenizers", "tokenizer.json")
    except MissingDependencyError:
        return False
    return True


def load_tokenizer(directory=None):
    """`tokenizer.json` of `directory` through `tokenizers` when it exists, else the built-in ByteTokenizer.
    Without `tokenizers` installed, the byte-level tokenizer.json of `byte_tokenizer_json` becomes the
    ByteTokenizer it describes (with tokenizer_config.json's eos_token, as HFTokenizer would have it); any other
    tokenizer.json raises MissingDependencyError naming the file and the `tokenizers` extra."""
    if directory is None or not (Path(directory) / "tokenizer.json").exists():
        return ByteTokenizer()
    directory = Path(directory)
    if not _tokenizers_installed():
        spec = json.loads(_read_json(directory / "tokenizer.json"))
        if spec == json.loads(byte_tokenizer_json()):
            return ByteTokenizer(eos_token=_eos_token(directory))
    return HFTokenizer(directory)


def byte_tokenizer_json(special_tokens=BYTE_SPECIAL_TOKENS) -> str:
    """A `tokenizer.json` (the `tokenizers` format) equivalent to ByteTokenizer: byte-level BPE, no merges,
    byte b -> id b, special tokens from 256."""
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    added = [{"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(special_tokens)]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                          "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    return json.dumps(spec, ensure_ascii=False, indent=1) + "\n"
