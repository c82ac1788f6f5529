"""The repository stands on its own: no tracked text file cites reading material that is not part of it.

Facts are sourced from public material (transformers' modeling files, papers, MAX's Qwen3.5 pipeline docs) or from
the project's own docs/ pages; pitfalls are cited as "docs/pitfalls.md, Bn".  What is refused:

* citations of documents outside the repository: a "SPEC" section or file, the upper-case "PITFALLS" list or file
  (unless the same phrase points at docs/pitfalls.md), "ARCHITECTURE.md", "STYLE.md" or its numbered rules, the MAX
  reference dump;
* machine paths (the absolute work directory, a relative path into a sibling "shared" directory);
* text that describes the circumstances of its writing ("this session", "other engineers", the project's own issue
  numbers; public bug reports are cited as `owner/repo#N` or `repo #N`).

Every tracked file is read (`git ls-files`); binary files (a NUL byte or not UTF-8) are skipped.  A failure lists
every offending `file:line: text`, so one run shows all of them.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()

# (name, compiled pattern).  Patterns are built from pieces so that this file does not match itself when read as
# source (it is skipped anyway, but the pieces keep a grep over the repository quiet too).
_UP = "SP" + "EC"
_PIT = "PIT" + "FALLS"
RULES: list[tuple[str, re.Pattern]] = [
    ("outside spec section", re.compile(rf"\b{_UP}(?:\.md)?\s*(?:§|\d)")),
    ("outside spec file", re.compile(rf"\b{_UP}\.md\b")),
    ("outside pitfall list", re.compile(rf"\b{_PIT}\b")),
    ("outside architecture notes", re.compile(r"\bARCHI" + r"TECTURE\.md\b")),
    ("outside style guide", re.compile(r"\bSTY" + r"LE(?:\.md\b| rule)")),
    ("outside MAX reference dump", re.compile(r"MAX_QWEN3_5_" + r"REFERENCE")),
    ("machine path", re.compile(r"/wo" + r"rk/")),
    ("path into a sibling shared dir", re.compile(r"\.\./sha" + r"red\b")),
    ("history of the writing", re.compile(r"\bthis ses" + r"sion\b", re.IGNORECASE)),
    ("history of the writing", re.compile(r"\bother engin" + r"eers\b", re.IGNORECASE)),
    ("history of the writing", re.compile(r"\bfounding ses" + r"sion\b", re.IGNORECASE)),
    ("project issue number", re.compile(r"\biss" + r"ues? \d+\b", re.IGNORECASE)),
]
PITFALLS_PAGE = "docs/pitfalls.md"
PAGE_WINDOW = 40  # an upper-case pitfall mention is fine when docs/pitfalls.md comes at most this far before it


def offences(line: str) -> list[str]:
    """Names of the rules `line` breaks (empty when it is clean)."""
    found = []
    for name, pat in RULES:
        for m in pat.finditer(line):
            if name == "outside pitfall list" and PITFALLS_PAGE in line[max(0, m.start() - PAGE_WINDOW):m.start()]:
                continue
            found.append(name)
            break
    return found


def tracked_text_files() -> list[tuple[str, str]]:
    """[(path relative to the repository, text)] of every tracked UTF-8 text file except this one."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked-file list is unavailable")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    out = []
    for rel in names.decode().split("\0"):
        if not rel or rel == THIS:
            continue
        path = REPO / rel
        if not path.is_file():  # deleted in the work tree but still in the index
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            out.append((rel, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return out


@pytest.mark.parametrize(
    "line",
    [
        "Source: " + _UP + " §8.2 step 3.",
        "(" + _UP + ".md §9)",
        '"_source": "' + _UP + ' 2.8: a model card"',
        "keep the state in fp32 (" + _PIT + " B8)",
        "The " + _PIT + " list (B1…B24)",
        "the shared signature (ARCHI" + "TECTURE.md)",
        "formula next to the timing (STY" + "LE rule 13)",
        "see MAX_QWEN3_5_" + "REFERENCE.txt",
        "read /wo" + "rk/shared/notes",
        "as in ../sha" + "red/notes",
        "measured during this ses" + "sion",
        "jobs of other engin" + "eers",
        "written in the founding ses" + "sion",
        "Cases (iss" + "ue 8; pitfall B21)",
    ],
)
def test_each_rule_catches_its_pattern(line):
    assert offences(line), line


@pytest.mark.parametrize(
    "line",
    [
        "keep the state in fp32 (docs/pitfalls.md, B8)",
        "docs/pitfalls.md " + _PIT + " B8 is cited with the page in front",
        "from qwen35.tokenizer import BYTE_" + _UP + "IAL_TOKENS",
        "Qwen3_5GatedDeltaNet in transformers/models/qwen3_5/modeling_qwen3_5.py",
        "def test_b18_attention_gate_is_per_head():",
        "KV heads are shared (GQA); the shared expert",
        "a 2-core machine, shared and noisy: medians of round-robin runs",
        "the delta correction uses the decayed state (fla#885, transformers #45513)",
    ],
)
def test_clean_lines_pass(line):
    assert offences(line) == [], line


def test_no_tracked_file_cites_outside_material():
    files = tracked_text_files()
    assert len(files) > 20, f"only {len(files)} tracked text files found: is this the repository?"
    bad = []
    for rel, text in files:
        for no, line in enumerate(text.splitlines(), 1):
            names = offences(line)
            if names:
                bad.append(f"{rel}:{no}: [{', '.join(names)}] {line.strip()[:160]}")
    assert not bad, f"{len(bad)} lines cite material outside the repository or its history:\n" + "\n".join(bad)
