"""Packaging: `pip install .` (numpy + safetensors) is the NumPy oracle and the commands that run it; the extras
of pyproject.toml bring the rest, and a command that needs a missing one says which in one line.

The core install is simulated in a subprocess whose import system refuses the optional packages (a sys.meta_path
finder raising ModuleNotFoundError, as for a package that is not installed), so the check runs in the test
environment, where all of them are installed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib
from pathlib import Path

from qwen35.extras import EXTRA_FOR
from reference.config import Qwen35Config

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("torch", "triton", "matplotlib", "tokenizers", "transformers", "tqdm", "hypothesis")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    """'torch>=2.4' -> 'torch'; 'triton>=3.0; platform_system == "Linux"' -> 'triton'."""
    return re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0).lower().replace("_", "-")


def _closure(extras: dict, extra: str) -> set[str]:
    """The distribution names an extra installs, following its references to other extras (`qwen35[a,b]`)."""
    names, todo, seen = set(), [extra], set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        assert e in extras, f"extra {e!r} is referenced but not defined"
        for req in extras[e]:
            m = re.fullmatch(r"qwen35\[([^\]]+)\]", req.strip())
            if m:
                todo.extend(x.strip() for x in m.group(1).split(","))
            else:
                names.add(_name(req))
    return names


def test_core_dependencies_are_numpy_and_safetensors_only():
    project = _project()
    assert sorted(_name(r) for r in project["dependencies"]) == ["numpy", "safetensors"]
    extras = project["optional-dependencies"]
    assert {"torch", "triton", "tokenizers", "plots", "hf", "notebooks", "test", "all"} <= set(extras)
    assert _closure(extras, "torch") == {"torch", "tqdm"}
    assert {"torch", "triton"} <= _closure(extras, "triton")
    assert {"torch", "transformers"} <= _closure(extras, "hf")
    assert {"torch", "matplotlib", "hypothesis", "nbclient", "nbformat", "ipykernel"} <= _closure(extras, "notebooks")
    # `all` is every other extra; `test` is all of it plus the test tools (ruff: the test command lints)
    others = set(extras) - {"all", "test"}
    assert set().union(*(_closure(extras, e) for e in others)) == _closure(extras, "all")
    # (and tomli on Python 3.10, where the standard library has no tomllib for this file's pyproject check)
    assert _closure(extras, "test") == _closure(extras, "all") | {"pytest", "hypothesis", "ruff", "tomli"}
    assert any(_name(r) == "ruff" and ">=0.15" in r for r in extras["test"])


def test_every_optional_module_names_an_extra_that_installs_it():
    """qwen35/extras.py's EXTRA_FOR is what the one-line errors name: each extra exists and brings the module."""
    extras = _project()["optional-dependencies"]
    assert set(EXTRA_FOR) == set(OPTIONAL) - {"hypothesis"}  # hypothesis: only the tests and notebooks use it
    for module, extra in EXTRA_FOR.items():
        assert module in _closure(extras, extra), (module, extra)


# The subprocess: block the optional packages, then exercise the core install.  It prints one JSON object.
_SCRIPT = textwrap.dedent('''
    import contextlib, importlib, importlib.abc, io, json, pkgutil, sys, tempfile
    from pathlib import Path

    BLOCKED = set(sys.argv[1].split(","))
    already = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    attempts = []

    class Blocker(importlib.abc.MetaPathFinder):
        """Every optional package is 'not installed': ModuleNotFoundError, as for a real absence."""
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in BLOCKED:
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {top!r}", name=top)
            return None

    sys.meta_path.insert(0, Blocker())
    out = {"already_imported": already}

    import numpy as np
    import reference
    modules = sorted(m.name for m in pkgutil.walk_packages(reference.__path__, "reference."))
    for name in modules:
        importlib.import_module(name)
    out["reference_modules"] = modules

    from reference import Qwen35Config, Qwen35Model, TextContext
    from reference.checkpoint import write_checkpoint
    from qwen35.tokenizer import byte_tokenizer_json

    tmp = Path(tempfile.mkdtemp())
    ckpt = write_checkpoint(tmp / "tiny", Qwen35Config.tiny(), seed=0)
    model = Qwen35Model.from_pretrained(ckpt, dtype=np.float32, max_batch_size=2)
    inputs = model.prepare_initial_token_inputs([TextContext(request_id="a", tokens=[1, 2, 3, 4]),
                                                 TextContext(request_id="b", tokens=[5, 6])])
    logits = model.execute(inputs).logits
    out["logits_shape"], out["logits_finite"] = list(logits.shape), bool(np.isfinite(logits).all())
    for rid in ("a", "b"):
        model.release(rid)
    out["generated"] = model.generate([[1, 2, 3]], max_new_tokens=3)[0]
    out["attempts_reference"] = list(attempts)

    from qwen35.cli import main

    def cli(*argv):
        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = main(list(argv))
        return {"rc": rc, "out": o.getvalue(), "err": e.getvalue()}

    runs = {
        "info": cli("info"),
        "memory": cli("memory", "--preset", "27b", "--memory", "80GiB"),
        "generate_demo": cli("generate", "--max-new-tokens", "3"),
        "generate_tiny": cli("generate", "--model", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                             "--json"),
    }
    out["attempts_core_commands"] = list(attempts)
    # a tokenizer.json other than the byte-level one of the demo needs the tokenizers library
    (ckpt / "tokenizer.json").write_text(byte_tokenizer_json(special_tokens=("<|end|>",)))
    runs["generate_own_tokenizer"] = cli("generate", "--model", str(ckpt), "--max-new-tokens", "2")
    runs["generate_optimized"] = cli("generate", "--engine", "optimized", "--max-new-tokens", "2")
    runs["generate_cuda"] = cli("generate", "--engine", "optimized", "--device", "cuda")
    runs["compare"] = cli("compare", "--no-hf")
    runs["plot"] = cli("plot", "--out", str(tmp / "plots"), "--results", str(tmp / "results"))
    out["runs"] = runs
    print(json.dumps(out))
''')


def test_core_install_runs_without_the_optional_packages():
    env = {k: v for k, v in os.environ.items() if k != "QWEN35_DEBUG"}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, ",".join(OPTIONAL)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["already_imported"] == []

    # every module of reference/ imports, and the NumPy model runs prefill and generation, without trying any
    # optional package
    expected = sorted(f"reference.{p.stem}" for p in (ROOT / "reference").glob("*.py") if p.stem != "__init__")
    assert set(expected) <= set(out["reference_modules"])
    assert out["logits_shape"] == [2, Qwen35Config.tiny().vocab_size] and out["logits_finite"]
    assert len(out["generated"]) == 3
    assert out["attempts_reference"] == []

    # info, memory and the reference generate path (the demo's byte-level tokenizer.json, and --prompt-ids)
    runs = out["runs"]
    for name in ("info", "memory", "generate_demo", "generate_tiny"):
        assert runs[name]["rc"] == 0 and runs[name]["err"] == "", (name, runs[name])
    assert "layer" in runs["info"]["out"]
    assert "state per request" in runs["memory"]["out"]
    assert "tokens/s" in runs["generate_demo"]["out"]
    assert len(json.loads(runs["generate_tiny"]["out"])["new_ids"]) == 2
    # load_tokenizer looks for tokenizers (and reads the demo's byte-level tokenizer.json without it); nothing else
    # optional is even attempted by the core commands (building the parser of every subcommand included)
    assert {m.split(".")[0] for m in out["attempts_core_commands"]} <= {"tokenizers"}

    # what needs an extra: one line on stderr naming it, exit status 2
    wants = {"generate_own_tokenizer": ("generate", "tokenizers", "tokenizer.json"),
             "generate_optimized": ("generate", "torch", "--engine optimized"),
             "generate_cuda": ("generate", "torch", "--device"),
             "compare": ("compare", "torch", "torch"),
             "plot": ("plot", "plots", "matplotlib")}
    for name, (command, extra, mention) in wants.items():
        run = runs[name]
        lines = run["err"].splitlines()
        assert run["rc"] == 2 and len(lines) == 1, (name, run)
        assert lines[0].startswith(f"qwen35 {command}: error: "), (name, lines[0])
        assert f"pip install 'qwen35[{extra}]'" in lines[0] and mention in lines[0], (name, lines[0])
        assert "Traceback" not in run["err"]
