"""The teaching layer: notebooks execute top to bottom, stay in sync with their sources, follow the house structure;
`qwen35 accuracy --quick` and `qwen35 plot` write real files with real numbers; committed results are current.

Each notebook runs in a fresh python3 kernel of this interpreter (nbclient), with the environment conftest.py sets
(TRITON_INTERPRET=1, one BLAS thread).  The committed .ipynb is what runs, not a rebuild, so what a reader opens is
what was tested.
"""
from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NB_DIR = REPO / "notebooks"
_spec = importlib.util.spec_from_file_location("qwen35_notebooks_build", NB_DIR / "build.py")
build = importlib.util.module_from_spec(_spec)  # notebooks/build.py, loaded by path (no clash with PyPI `build`)
_spec.loader.exec_module(build)

SOURCES = build.sources()
CELL_TIMEOUT_S = 180  # one cell; generous because the 2 CI cores are shared with other test files
NOTEBOOK_BUDGET_S = 120  # a whole notebook at FULL = False (they take well under 60 s on an idle machine)


def _ids(paths):
    return [p.stem for p in paths]


def test_every_notebook_has_a_source_and_is_in_sync():
    assert SOURCES, "no notebook sources in notebooks/src"
    assert build.out_of_sync() == [], "run: python notebooks/build.py"
    ipynbs = sorted(p.stem for p in NB_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert ipynbs == sorted(p.stem for p in SOURCES), "an .ipynb without a source (or the reverse)"


def test_parser_round_trip_of_the_percent_format():
    text = "preamble\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\n# %%\n# a comment\ny = 2\n"
    assert build.parse_percent(text) == [("markdown", "# Title\n\ntext"), ("code", "x = 1"),
                                         ("code", "# a comment\ny = 2")]


@pytest.mark.parametrize("src", SOURCES, ids=_ids(SOURCES))
def test_notebook_follows_the_house_structure(src):
    """FULL = False at the top, 'you will learn', imports from the packages, no model code, asserts at the end."""
    nb = build.build_notebook(src)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    md = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert re.search(r"^FULL = False\b", code[0], re.M), "the first code cell sets FULL = False"
    assert "you will learn" in md[0].lower(), "the first cell says what the reader will learn"
    assert re.search(r"^from (reference|optimized|qwen35)[.\w]* import ", "\n".join(code), re.M)
    assert not re.search(r"^class \w+.*(nn\.Module|Model|Layer)", "\n".join(code), re.M), \
        "notebooks import model code; they do not define it"
    assert "what was checked" in md[-1].lower(), "the last markdown cell is 'What was checked'"
    assert "assert " in code[-1], "the last code cell asserts what was checked"


@pytest.mark.parametrize("src", SOURCES, ids=_ids(SOURCES))
def test_notebook_executes(src):
    from nbclient import NotebookClient

    nb = nbformat.read(build.target(src), as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(NB_DIR)}}).execute()
    seconds = time.perf_counter() - t0
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert seconds < NOTEBOOK_BUDGET_S, f"{src.stem} took {seconds:.0f} s (budget {NOTEBOOK_BUDGET_S} s)"


# ---------------------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def quick_accuracy(tmp_path_factory):
    from qwen35.cli import main

    out = tmp_path_factory.mktemp("acc") / "accuracy.json"
    assert main(["accuracy", "--quick", "--steps", "96", "--no-progress", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_accuracy_quick_measures_the_expected_precision(quick_accuracy):
    """Float32 implementations sit near fp32 rounding, bf16 near bf16 rounding, the float64 chunked form at ~1e-15;
    a bf16-rounded state drifts more than an fp32 one (pitfall B8)."""
    d = quick_accuracy
    for key in ("host_cpu", "device_name", "python", "numpy", "torch", "date_utc"):
        assert d["meta"].get(key), key
    rows = [r for r in d["by_length"] if r["tensor"] == "o"]
    assert {(r["impl"], r["form"], r["dtype"]) for r in rows} == {
        ("reference", "chunk", "float64"), ("optimized-torch", "chunk", "float32"),
        ("optimized-torch", "recurrent", "float32"), ("optimized-torch", "chunk", "bfloat16"),
        ("optimized-torch", "recurrent", "bfloat16")}
    bound = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2}
    for r in d["by_length"]:
        assert r["finite"]
        assert r["rel_rms"] <= bound[r["dtype"]], r
        assert r["nmse_db"] == pytest.approx(20 * __import__("math").log10(r["rel_rms"]))
    assert min(r["rel_rms"] for r in rows if r["dtype"] == "bfloat16") > 1e-4, "bf16 cannot be that exact"
    s = d["drift"]["summary"]
    assert len(d["drift"]["rel_rms"]["float32"]) == 96
    assert s["float32"]["last_64_mean"] < 1e-2
    assert s["bfloat16"]["last_64_mean"] > 1.5 * s["float32"]["last_64_mean"]


def test_plot_renders_every_kind_with_its_footer(tmp_path, quick_accuracy):
    from qwen35.cli import main

    res, out = tmp_path / "results", tmp_path / "plots"
    res.mkdir()
    (res / "accuracy.json").write_text(json.dumps(quick_accuracy))
    # The format `qwen35 bench` writes (qwen35/bench.py): machine block + gdn_prefill rows of per-impl timings.
    bench = {"machine": {"cpu": "test machine", "torch_threads": 1, "torch": "x", "date": "2026-01-01"},
             "sgemm": {"gflops": 50.0},
             "gdn_prefill": [{"T": T, "H_v": 16, "D": 128, "optimized": {"median_s": T * 2e-6},
                              "reference_chunked_f32": {"median_s": T * 5e-5}} for T in (512, 2048)],
             "model": {"geometry": "tiny (hidden 64), 4 layers", "decode_context": 128,
                       "prefill_by_T": [{"T": T, "optimized": {"tok_per_s": 900.0}, "hf": {"tok_per_s": 300.0}}
                                        for T in (256, 1024)],
                       "optimized_decode": {"tok_per_s": 50.0}, "hf_decode": {"tok_per_s": 20.0}}}
    (res / "bench.json").write_text(json.dumps(bench))
    assert main(["plot", "--results", str(res), "--out", str(out)]) == 0
    for stem in ("memory", "accuracy", "drift", "speed"):
        for ext in ("png", "svg"):
            p = out / f"{stem}.{ext}"
            assert p.exists() and p.stat().st_size > 5000, p
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (out / "accuracy.svg").read_text()
    assert quick_accuracy["meta"]["torch"] in svg and "float64" in svg  # footer: versions; legend: dtypes
    assert "test machine" in (out / "speed.svg").read_text()
    speed = (out / "speed.svg").read_text()
    assert "reference NumPy, chunked" in speed and "transformers, decode (20.0 tok/s" in speed
    mem = json.loads((res / "memory.json").read_text())
    assert mem["kind"] == "memory" and "27b" in mem["presets"]


def test_memory_sweep_agrees_with_the_memory_model():
    from qwen35.plot import GIB, memory_sweep
    from reference.config import Qwen35Config
    from reference.memory import infer_optimal_batch_size, weight_bytes

    d = memory_sweep(["27b", "0.8b"], budgets_gib=(16, 80, 141))
    for name in ("27b", "0.8b"):
        cfg = Qwen35Config.preset(name)
        for i, m in enumerate((16, 80, 141)):
            free = m * GIB - weight_bytes(cfg)
            for rule in ("gather_scatter", "in_place"):
                want = infer_optimal_batch_size(cfg, free, rule) if free > 0 else 0
                assert d["presets"][name][rule]["state_max_batch"][i] == want
    e = d["presets"]["27b"]
    assert e["state_bytes_per_request"] == 78_446_592  # 27B in bf16: 74.8 MiB, MAX's figure
    assert e["in_place"]["state_max_batch"][1] >= 3 * e["gather_scatter"]["state_max_batch"][1]


def test_committed_memory_results_are_current():
    """results/memory.json (what docs/plots/memory.* were drawn from) matches today's memory model."""
    from qwen35.plot import memory_sweep

    path = REPO / "results" / "memory.json"
    if not path.exists():
        pytest.fail("results/memory.json is missing: run `qwen35 plot`")
    committed = json.loads(path.read_text())
    fresh = memory_sweep(budgets_gib=committed["budgets_gib"])
    assert committed["presets"] == json.loads(json.dumps(fresh["presets"])), "run `qwen35 plot` and commit"
    for stem in ("memory", "accuracy", "drift"):
        assert (REPO / "docs" / "plots" / f"{stem}.png").exists(), f"docs/plots/{stem}.png: run `qwen35 plot`"


def test_crossover_sweep_times_every_form_and_plots(tmp_path):
    from qwen35.bench import crossover_sweep
    from qwen35.plot import crossover_point, plot_crossover

    d = crossover_sweep((1, 8, 64), H_v=2, D=16, repeats=1, progress=False)
    impls = {r["impl"] for r in d["rows"]}
    assert {"optimized torch chunked", "optimized torch recurrent", "reference NumPy chunked",
            "reference NumPy per-token"} <= impls
    assert all(r["seconds"] > 0 for r in d["rows"]) and len(d["rows"]) == 3 * len(impls)
    # crossover_point on a constructed case: recurrent linear in T, chunked flat
    fake = {"rows": [{"impl": "optimized torch chunked", "T": T, "seconds": 1.0} for T in (1, 8, 64)]
            + [{"impl": "optimized torch recurrent", "T": T, "seconds": T / 10} for T in (1, 8, 64)]}
    assert crossover_point(fake) == 64
    paths = plot_crossover(d, tmp_path, ("svg",))
    assert "one thread" in paths[0].read_text()


# ---------------------------------------------------------------------------------------------------- compare
def test_compare_on_the_demo_matches_and_localizes_an_injected_bug(monkeypatch, tmp_path):
    """`qwen35 compare`: the optimized model matches the reference on the demo; a bug injected into the optimized
    full-attention layer is reported at that layer, not before it."""
    import optimized.model as om
    from qwen35.commands._common import DEMO_DIR
    from qwen35.compare import compare_checkpoint

    tokens = list(range(40, 64))
    good = compare_checkpoint(DEMO_DIR, tokens, dtypes=("float32",), with_hf=False)
    (label, rep), = good.reports.items()
    assert good.ok and rep.first_divergent is None
    assert [r.name for r in rep.rows][0] == "embedding" and rep.rows[-1].name == "logits"
    assert max(r.rel_rms for r in rep.rows) < 1e-4 and rep.rows[-1].rel_rms > 0  # fp32 vs fp64: small, not zero
    assert good.agreement[label].argmax_agree == 1.0
    from qwen35.plot import plot_compare

    d = json.loads(json.dumps(good.as_dict()))  # what `qwen35 compare --out` writes
    assert d["kind"] == "compare" and d["meta"]["torch"]
    svg = plot_compare(d, tmp_path, ("svg",))[0].read_text()
    assert "layer 3 (full)" in svg and "optimized (float32" in svg

    real = om.gated_attention
    monkeypatch.setattr(om, "gated_attention", lambda *a, **k: (lambda y, kv: (1.01 * y, kv))(*real(*a, **k)))
    bad = compare_checkpoint(DEMO_DIR, tokens, dtypes=("float32",), with_hf=False)
    rep = next(iter(bad.reports.values()))
    assert not bad.ok
    assert rep.first_divergent == "layer 3 (full)"
    assert all(r.ok for r in rep.rows[:4])  # embedding and the three linear layers are still fine
    text = bad.format()
    assert "<== first divergence" in text and "layer 3 (full)" in text.split("<== first divergence")[0].splitlines()[-1]


@pytest.mark.hf
def test_compare_command_includes_transformers(capsys):
    pytest.importorskip("transformers")
    from qwen35.cli import main

    assert main(["compare", "--prompt-ids", "1,2,3,4,5,6,7,8", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "optimized (float32" in out and out.count("all points within tolerance") == 2


# ---------------------------------------------------------------------------------------------------- docs
def _links(md: Path) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)#\s]+)", md.read_text()) if "://" not in t]


def test_docs_index_links_every_page_notebook_and_plot():
    index = REPO / "docs" / "index.md"
    links = _links(index)
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md") if p.name != "index.md")
    unlinked = [p for p in pages if p not in links]
    assert not unlinked, f"docs pages missing from docs/index.md: {unlinked}"
    for nb in SOURCES:
        assert f"../notebooks/{nb.stem}.ipynb" in links, nb.stem
    # every link to something other than a sibling page must resolve (pages of other owners may still be pending)
    for md in (index, REPO / "docs" / "how_to_add_a_kernel.md"):
        for link in _links(md):
            if link.endswith(".md") and "/" not in link:
                continue
            assert (md.parent / link).resolve().exists(), f"{md.name}: broken link {link}"


def test_gpu_bench_json_renders(tmp_path):
    """The record format of scripts/gpu_bench.py (kind gpu_bench) becomes gpu_kernels.png/svg with its footer."""
    from qwen35.plot import render_all

    def rec(case, impl, how, ms, **shape):
        return {"case": case, "impl": impl, "how": how, "ms": ms, "shape": {"dtype": "bfloat16", **shape},
                "tflops": None, "gbps": 100.0, "frac_peak_tflops": None, "frac_peak_gbps": 0.5, "timing": "cuda events"}

    data = {"kind": "gpu_bench", "meta": {"gpu": "NVIDIA H200", "torch": "2.x", "triton": "3.x", "cuda": "12.x",
                                          "time_utc": "2026-01-01T00:00:00Z"},
            "records": [rec("gdn_chunk_prefill", "triton", "", 1.5, T=8192), rec("gdn_chunk_prefill", "torch", "", 9.0,
                                                                                  T=8192)]
            + [rec("gdn_decode_step", "triton", how, 0.01 * B ** 0.5, B=B) for B in (1, 32, 256)
               for how in ("cuda graph", "eager")],
            "notes": []}
    (tmp_path / "gpu_bench.json").write_text(json.dumps(data))
    written = render_all(tmp_path, tmp_path / "plots", ("svg",), log=lambda *a: None)
    svg = (tmp_path / "plots" / "gpu_kernels.svg").read_text()
    assert "NVIDIA H200" in svg and "triton (cuda graph)" in svg and "bfloat16" in svg
    assert {p.name for p in written} == {"memory.svg", "gpu_kernels.svg"}


@pytest.mark.triton
def test_accuracy_runs_the_triton_kernels_through_the_interpreter():
    """`qwen35 accuracy --backend triton`: the Triton twins measured against the oracle (interpreter on CPU)."""
    from qwen35.accuracy import accuracy_by_length, decode_drift

    rows = accuracy_by_length((17,), shape=dict(B=1, H_k=1, H_v=2, D_k=16, D_v=16), backend="triton", chunk_size=16,
                              progress=False)
    tri = [r for r in rows if r["impl"] == "optimized-triton"]
    assert {(r["form"], r["dtype"]) for r in tri} == {("chunk", "float32"), ("recurrent", "float32"),
                                                     ("chunk", "bfloat16"), ("recurrent", "bfloat16")}
    for r in tri:
        assert r["rel_rms"] <= (1e-5 if r["dtype"] == "float32" else 1e-2), r
    d = decode_drift(4, shape=dict(B=1, H_k=1, H_v=2, D_k=16, D_v=16), backend="triton", progress=False)
    assert d["impl"] == "optimized-triton" and max(d["rel_rms"]["float32"]) < 1e-5
