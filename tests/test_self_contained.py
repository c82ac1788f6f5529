"""The repository stands on its own: no tracked text file cites reading material that is not part of it.

Facts are sourced from public material (transformers' modeling files, papers, MAX's Qwen3.5 pipeline docs) or from
the project's own docs/ pages; pitfalls are cited as "docs/pitfalls.md, Bn".  What is refused:

* citations of documents outside the repository: a "SPEC" section or file, the upper-case "PITFALLS" list or file
  (unless the same phrase points at docs/pitfalls.md), "ARCHITECTURE.md", "STYLE.md" or its numbered rules, the MAX
  reference dump;
* machine paths (the absolute work directory, a relative path into a sibling "shared" directory);
* text that describes the circumstances of its writing rather than the software (the work period it was written
  in, who else was working on the machine, the project's own issue numbers; public bug reports are cited as
  `owner/repo#N` or `repo #N`).  `RULES` below holds the exact patterns.

The files read are the tracked ones (`git ls-files`) in a git checkout, and otherwise every file under the
repository outside `.git`, virtual environments, caches and build output (an unpacked source archive is checked
too).  Binary files (a NUL byte or not UTF-8) are passed over.  A failure lists every offending `file:line: text`,
so one run shows all of them.
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


SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist",
                ".ipynb_checkpoints", ".mypy_cache", ".ruff_cache"}


def repository_files() -> list[str]:
    """Paths (relative, posix) of the repository's files: `git ls-files` in a git checkout, else a walk of the tree
    that leaves out SKIPPED_DIRS and `*.egg-info`."""
    if shutil.which("git") is not None and (REPO / ".git").exists():
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        return [n for n in names.decode().split("\0") if n]
    out = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if path.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def tracked_text_files() -> list[tuple[str, str]]:
    """[(path relative to the repository, text)] of every UTF-8 text file of the repository except this one."""
    out = []
    for rel in repository_files():
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


def test_without_git_the_tree_walk_covers_the_tracked_sources(monkeypatch):
    """Outside a git checkout (no git command) the walk still reads every tracked source of reference/ and
    optimized/, and nothing from the virtual environment."""
    tracked = set(repository_files())
    monkeypatch.setattr(shutil, "which", lambda name: None)
    walked = set(repository_files())
    sources = {rel for rel in tracked if rel.startswith(("reference/", "optimized/")) and (REPO / rel).is_file()}
    assert sources and sources <= walked
    assert not any(rel.startswith(".venv/") or "/__pycache__/" in rel for rel in walked)


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
