"""docs/index.md's "Map of the house" matches the code: every module is listed, every listed file exists, and the
import rules it states hold (checked on the module-level imports, read with ast)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INDEX = ROOT / "docs" / "index.md"


def _map_section() -> str:
    text = INDEX.read_text(encoding="utf-8")
    start = text.index("## Map of the house")
    return text[start:text.index("\n## ", start + 1)]


def _tables(section: str) -> list[list[list[str]]]:
    """The section's Markdown tables, each a list of rows of cells (header and rule rows dropped)."""
    tables, rows = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            tables.append(rows[2:])
            rows = []
    return tables


def _files(cell: str) -> list[str]:
    return re.findall(r"`([\w/<>]+\.py)`", cell)


def _listed() -> set[str]:
    model, front = _tables(_map_section())
    listed = set()
    for _, ref, opt in model:
        listed |= {f"reference/{f}" for f in _files(ref)} | {f"optimized/{f}" for f in _files(opt)}
    for files, owns in front:
        listed |= {f"qwen35/{f}" for f in _files(files) + _files(owns)}
    return listed


def _modules() -> set[str]:
    found = set()
    for pkg in ("reference", "optimized", "qwen35"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if path.name == "__init__.py":
                continue
            if rel.startswith("qwen35/commands/") and not path.name.startswith("_"):
                rel = "qwen35/commands/<name>.py"  # one row stands for every subcommand module
            found.add(rel)
    return found


def test_the_map_lists_every_module_and_only_existing_ones():
    listed, modules = _listed(), _modules()
    assert modules - listed == set(), f"modules missing from the map in docs/index.md: {sorted(modules - listed)}"
    ghosts = sorted(listed - modules)
    assert not ghosts, f"the map in docs/index.md names files that do not exist: {ghosts}"


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (not inside a function or class body)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, ast.Import):
                names |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.module and not sub.level:
                names.add(sub.module)
    return names


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _all_imports(path: Path) -> set[str]:
    """Every import of the file, inside functions too, except those under `if TYPE_CHECKING:` (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _root(name: str) -> str:
    return name.split(".")[0]


def test_the_import_rules_the_map_states():
    for path in (ROOT / "reference").rglob("*.py"):
        bad = {n for n in _all_imports(path) if _root(n) in ("torch", "triton", "optimized", "qwen35")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: reference/ is the NumPy oracle"
    for path in (ROOT / "optimized").rglob("*.py"):
        bad = {n for n in _top_level_imports(path) if _root(n) == "qwen35"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} at import time"
    for path in (ROOT / "qwen35").rglob("*.py"):
        if "commands" in path.relative_to(ROOT).parts or path.name == "cli.py":
            continue
        bad = {n for n in _all_imports(path) if n.startswith("qwen35.commands")}
        assert not bad, f"{path.relative_to(ROOT)} imports the command layer ({sorted(bad)})"


def test_no_private_names_cross_a_package():
    """optimized/ and qwen35/ use the reference's public names only (a `_name` is a module's own business)."""
    for pkg in ("optimized", "qwen35"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and _root(node.module) != pkg:
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"
