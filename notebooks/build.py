"""Build the notebooks from their py:percent sources: notebooks/src/NN_name.py -> notebooks/NN_name.ipynb.

The sources are the truth (they diff well); the .ipynb files are generated and committed so GitHub and Jupyter
show them.  The format is the jupytext "py:percent" one, read here with a few lines of code so that no jupytext
dependency is needed:

    # %% [markdown]        a markdown cell; every line drops its leading "# " (or a lone "#")
    # %%                   a code cell; lines are kept as they are
    # %% tags=["x"]        anything after "# %%" other than "[markdown]" is ignored

Text before the first "# %%" marker (a module docstring, say) is not part of the notebook.

    python notebooks/build.py                 # convert every source (outputs are not kept)
    python notebooks/build.py --execute       # convert and execute (FULL = False sizes), keeping the outputs
    python notebooks/build.py --check         # exit 1 if any .ipynb is out of sync with its source
    python notebooks/build.py 02_gated_deltanet --execute      # only the named notebook(s)

"In sync" means: the same cells, of the same types, with the same sources.  Outputs and execution counts are not
compared, so an executed notebook stays in sync.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
KERNEL = {"display_name": "Python 3 (qwen35 .venv)", "language": "python", "name": "python3"}


def parse_percent(text: str) -> list[tuple[str, str]]:
    """py:percent text -> [(cell_type, source)], cell_type "markdown" or "code"."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            kind = "markdown" if line[4:].strip().startswith("[markdown]") else "code"
            cells.append((kind, []))
            continue
        if not cells:  # preamble before the first cell marker
            continue
        kind, lines = cells[-1]
        if kind == "markdown":
            if line.startswith("# "):
                line = line[2:]
            elif line.strip() == "#":
                line = ""
        lines.append(line)
    out = []
    for kind, lines in cells:
        while lines and not lines[-1].strip():  # trailing blank lines separate cells; they are not content
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if lines:
            out.append((kind, "\n".join(lines)))
    return out


def build_notebook(src: Path) -> nbformat.NotebookNode:
    """The notebook for one source, with deterministic cell ids (so rebuilding gives identical files)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNEL)
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["qwen35"] = {"source": f"src/{src.name}", "generated_by": "notebooks/build.py"}
    for i, (kind, source) in enumerate(parse_percent(src.read_text())):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(source)
        cell["id"] = f"{src.stem[:2]}-{i:03d}"
        nb.cells.append(cell)
    return nb


def cell_signature(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def sources(names=None) -> list[Path]:
    paths = sorted(SRC.glob("[0-9][0-9]_*.py"))
    if names:
        wanted = {n.removesuffix(".py").removesuffix(".ipynb") for n in names}
        paths = [p for p in paths if p.stem in wanted or p.stem[:2] in wanted]
        if not paths:
            raise SystemExit(f"no notebook source matches {sorted(wanted)} in {SRC}")
    return paths


def target(src: Path) -> Path:
    return HERE / f"{src.stem}.ipynb"


def out_of_sync(names=None) -> list[str]:
    """Names of notebooks whose .ipynb is missing or differs from its source."""
    bad = []
    for src in sources(names):
        path = target(src)
        if not path.exists():
            bad.append(f"{path.name} (missing)")
            continue
        if cell_signature(nbformat.read(path, as_version=4)) != cell_signature(build_notebook(src)):
            bad.append(path.name)
    return bad


def execute(nb, timeout: int = 300) -> None:
    """Run a notebook in place with nbclient (kernel python3 = this interpreter), cwd = notebooks/."""
    from nbclient import NotebookClient

    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels on CPU unless told otherwise
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # as tests/conftest.py: one thread
        os.environ.setdefault(var, "1")  # (several threads on a shared 2-core box slow tiny torch ops 50x)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="notebooks to build (e.g. 02 or 02_gated_deltanet); default all")
    ap.add_argument("--execute", action="store_true", help="execute after converting and keep the outputs")
    ap.add_argument("--check", action="store_true", help="only check that every .ipynb is in sync")
    args = ap.parse_args(argv)
    if args.check:
        bad = out_of_sync(args.names)
        for name in bad:
            print(f"out of sync: {name}  (run: python notebooks/build.py)")
        return 1 if bad else 0
    for src in sources(args.names):
        nb = build_notebook(src)
        if args.execute:
            import time

            t0 = time.perf_counter()
            execute(nb)
            print(f"executed {src.stem} in {time.perf_counter() - t0:.1f} s")
        nbformat.write(nb, target(src))
        print(f"wrote {target(src).relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
