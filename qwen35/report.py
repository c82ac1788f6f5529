"""Text renderings of result JSON: the console summary of a CPU bench run and the Markdown tables of the docs.

    from qwen35.report import format_table, markdown_tables, gpu_markdown, accuracy_table, eval_table, batch_table

| function          | reads                                      | used by                                          |
|-------------------|--------------------------------------------|--------------------------------------------------|
| `format_table`    | a `qwen35 bench` result (qwen35/bench.py)  | `qwen35 bench` (printed after the run)           |
| `markdown_tables` | the same JSON                              | docs/benchmarks.md, CPU section                  |
| `gpu_markdown`    | a scripts/gpu_bench.py JSON                | `qwen35 bench --gpu-json FILE`, GPU section      |
| `accuracy_table`  | a `qwen35 accuracy` JSON                   | `qwen35 accuracy`, notebook 06                   |
| `eval_table`      | a `qwen35 eval` JSON (qwen35/evaluation.py) | `qwen35 eval`, docs/training.md                 |
| `batch_table`     | a `qwen35 bench --batch` JSON              | `qwen35 bench --batch`, docs/benchmarks.md       |

Nothing here measures; each function is a pure function of its JSON.  A bench JSON's `machine` block is read in
both vocabularies it has been written in (`host_cpu` / `cpu_count` / `date_utc` from `qwen35.measure.machine_info`,
and `cpu` / `logical_cpus` / `date` in older files such as docs/bench_cpu.json).
"""
from __future__ import annotations


def _machine(res: dict) -> dict:
    """A bench JSON's machine block with the keys this module reads, whichever vocabulary it was written in."""
    m = dict(res.get("machine") or {})
    m.setdefault("host_cpu", m.get("cpu"))
    m.setdefault("cpu_count", m.get("logical_cpus"))
    m.setdefault("date_utc", m.get("date"))
    return m


def format_table(res: dict) -> str:
    """The console summary of a `qwen35.bench.run_all` result."""
    L = []
    sg = res["sgemm"]["gflops"]
    L.append(f"sgemm (1 thread, fp32, n={res['sgemm']['n']}): {sg:.1f} GFLOP/s at start, "
             f"{res.get('sgemm_end', {}).get('gflops', float('nan')):.1f} at end")
    if "stream" in res:
        L.append(f"DRAM read bandwidth (1 thread): {res['stream']['read_gbps']:.1f} GB/s")
    if "gdn_prefill" in res:
        L.append("")
        L.append("(a) gated delta rule prefill core, H_v=16, D=128, fp32, 1 thread  [ms; GF/s on chunked FLOPs; % of "
                 "the sgemm rate measured round-robin with it]")
        L.append(f"{'T':>6} {'GFLOP':>7} | {'optimized':>22} | {'HF torch fallback':>22} | {'ref NumPy chunked':>22} |"
                 f" {'ref NumPy per-token':>22}")
        for r in res["gdn_prefill"]:
            cells = []
            for name in ("optimized", "hf_torch_fallback", "reference_chunked_f32", "reference_per_token_f32"):
                if name in r:
                    x = r[name]
                    cells.append(f"{x['median_s'] * 1e3:8.1f} {x['gflops_on_chunked_flops']:5.1f} "
                                 f"{100 * x.get('fraction_of_paired_sgemm', x.get('fraction_of_sgemm', 0)):5.1f}%")
                else:
                    cells.append(f"{'-':>22}")
            L.append(f"{r['T']:>6} {r['flops_chunked'] / 1e9:7.2f} | " + " | ".join(cells))
    if "decode" in res:
        d = res["decode"]
        L.append("")
        L.append("(b) decode step (B=1), H_v=16, D=128, fp32, 1 thread  [µs per step]")
        L.append(f"  rule (in-place pool update): optimized {d['kernel_optimized']['median_s'] * 1e6:.1f}  reference "
                 f"{d['kernel_reference_f32']['median_s'] * 1e6:.1f}  -> {d['kernel_speedup']:.1f}x   (floor: "
                 f"{d['kernel_bytes_floor'] / 1e6:.1f} MB moved, almost all of it the state read + written)")
        L.append(f"  whole GDN layer (hidden {d['layer_hidden']}): optimized "
                 f"{d['layer_optimized']['median_s'] * 1e6:.1f}  reference "
                 f"{d['layer_reference_f32']['median_s'] * 1e6:.1f}  -> {d['layer_speedup']:.1f}x")
    if "model" in res:
        m = res["model"]
        L.append("")
        L.append(f"(c) whole model: {m['geometry']}")
        for r in m.get("prefill_by_T", []):
            o = r["optimized"]
            line = (f"  prefill T={r['T']} ({r['flops'] / 1e9:.1f} GFLOP): optimized {o['tok_per_s']:.0f} tok/s "
                    f"({o['gflops']:.1f} GF/s, {100 * o.get('fraction_of_paired_sgemm', 0):.0f}% of the paired "
                    f"sgemm {r.get('sgemm_paired', {}).get('gflops', 0):.0f} GF/s)")
            if "hf" in r:
                line += (f"; transformers {r['hf']['tok_per_s']:.0f} tok/s ({r['hf']['gflops']:.1f} GF/s) -> "
                         f"{r['speedup_vs_hf']:.2f}x")
            L.append(line)
        if "decode_floor_tok_per_s" in m:
            L.append(f"  decode floor: {m['decode_bytes_per_token'] / 1e6:.0f} MB of fp32 weights per token at "
                     f"{res['stream']['read_gbps']:.1f} GB/s -> at most {m['decode_floor_tok_per_s']:.1f} tok/s")
        L.append(f"  decode (context {m['decode_context']}, {m['decode_steps']} steps, B=1): optimized "
                 f"{m['optimized_decode']['tok_per_s']:.1f} tok/s" + (
                     f"; transformers {m['hf_decode']['tok_per_s']:.1f} tok/s -> {m['decode_speedup_vs_hf']:.2f}x"
                     if "hf_decode" in m else ""))
    if res.get("goals"):
        L.append("")
        L.append("goals:")
        for k, g in res["goals"].items():
            L.append(f"  {k:38s} target {g['target']:>5}  measured {g['measured']:.2f}  "
                     f"{'MET' if g['met'] else 'missed'}")
    note = (res.get("machine") or {}).get("note")
    if note:
        L.append("")
        L.append("note: " + note)
    return "\n".join(L)


def markdown_tables(res: dict) -> str:
    """docs/benchmarks.md's result tables, generated from a `qwen35 bench` JSON (so the doc never drifts from the
    data)."""
    L = []
    sg = res["sgemm"]["gflops"]
    m = _machine(res)
    L.append(f"Run of {m.get('date_utc') or '?'}: {m.get('host_cpu')} ({m.get('cpu_count')} logical CPUs), "
             f"torch {m.get('torch')} ({m.get('blas')}), NumPy {m.get('numpy')}, "
             f"transformers {m.get('transformers')}, 1 thread, float32; "
             f"load average at start {tuple(round(x, 2) for x in m.get('load_avg_at_start', ()))}.")
    medians = [round(x, 1) for x in res["sgemm"].get("gflops_medians", [sg])]
    L.append(f"sgemm {sg:.1f} GFLOP/s (best of the medians {medians}"
             f"; {res.get('sgemm_end', {}).get('gflops', float('nan')):.1f} at the end of the run)" + (
                 f"; DRAM read {res['stream']['read_gbps']:.1f} GB/s." if "stream" in res else "."))
    if "gdn_prefill" in res:
        L.append("")
        L.append("| T | chunked GFLOP | paired sgemm · floor (FLOP / sgemm) | optimized | transformers fallback | "
                 "reference chunked | reference per-token | optimized vs transformers |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in res["gdn_prefill"]:
            cells = []
            for name in ("optimized", "hf_torch_fallback", "reference_chunked_f32", "reference_per_token_f32"):
                x = r.get(name)
                cells.append(f"{x['median_s'] * 1e3:.1f} ms · {x['gflops_on_chunked_flops']:.1f} GF/s · "
                             f"{100 * x.get('fraction_of_paired_sgemm', x.get('fraction_of_sgemm', 0)):.0f} %"
                             if x else "—")
            psg = r.get("sgemm_paired", {}).get("gflops", sg)
            L.append(f"| {r['T']} | {r['flops_chunked'] / 1e9:.2f} | "
                     f"{psg:.0f} GF/s · {r['flops_chunked'] / psg / 1e6:.0f} ms | "
                     + " | ".join(cells) + f" | {r.get('speedup_vs_hf', float('nan')):.2f}× |")
    if "decode" in res:
        d = res["decode"]
        L.append("")
        L.append("| decode step, B = 1 | optimized | reference (NumPy, fp32) | speed-up |")
        L.append("|---|---:|---:|---:|")
        L.append(f"| gated delta rule only (H_v 16, D 128; in-place pool) | "
                 f"{d['kernel_optimized']['median_s'] * 1e6:.0f} µs | "
                 f"{d['kernel_reference_f32']['median_s'] * 1e6:.0f} µs | {d['kernel_speedup']:.2f}× |")
        L.append(f"| whole GDN layer (hidden {d['layer_hidden']}) | {d['layer_optimized']['median_s'] * 1e6:.0f} µs | "
                 f"{d['layer_reference_f32']['median_s'] * 1e6:.0f} µs | {d['layer_speedup']:.2f}× |")
    if "model" in res:
        mm = res["model"]
        L.append("")
        L.append(f"Model: {mm['geometry']}.")
        L.append("")
        L.append("| phase | FLOP or bytes | floor | optimized | transformers | optimized vs transformers |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for r in mm.get("prefill_by_T", []):
            o, h = r["optimized"], r.get("hf")
            psg = r.get("sgemm_paired", {}).get("gflops", sg)
            L.append(f"| prefill T = {r['T']} | {r['flops'] / 1e9:.1f} GFLOP | "
                     f"{r['T'] / (r['flops'] / psg / 1e9):.0f} tok/s (sgemm {psg:.0f} GF/s) | "
                     f"{o['tok_per_s']:.0f} tok/s ({100 * o.get('fraction_of_paired_sgemm', 0):.0f} % sgemm) | "
                     + (f"{h['tok_per_s']:.0f} tok/s ({100 * h.get('fraction_of_paired_sgemm', 0):.0f} % sgemm) | "
                        f"{r['speedup_vs_hf']:.2f}× |" if h else "— | — |"))
        if "decode_floor_tok_per_s" in mm:
            L.append(f"| decode, context {mm['decode_context']} | "
                     f"{mm['decode_bytes_per_token'] / 1e6:.0f} MB / token | "
                     f"{mm['decode_floor_tok_per_s']:.1f} tok/s | {mm['optimized_decode']['tok_per_s']:.1f} tok/s | "
                     + (f"{mm['hf_decode']['tok_per_s']:.1f} tok/s | {mm['decode_speedup_vs_hf']:.2f}× |"
                        if "hf_decode" in mm else "— | — |"))
    if res.get("goals"):
        L.append("")
        L.append("| goal | target | measured | |")
        L.append("|---|---:|---:|---|")
        for k, g in res["goals"].items():
            L.append(f"| {k} | {g['target']} | {g['measured']:.2f} | {'met' if g['met'] else 'missed'} |")
    return "\n".join(L)


def gpu_markdown(data: dict) -> str:
    """docs/benchmarks.md's GPU rows from the JSON of scripts/gpu_bench.py (schema qwen35.gpu_bench/1)."""
    if data.get("kind") != "gpu_bench":
        raise ValueError("not a scripts/gpu_bench.py JSON (kind != 'gpu_bench')")
    m, pk = data.get("meta", {}), data.get("peaks", {})

    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    when = m.get("time_utc") or m.get("date_utc") or "?"
    L = [f"Run of {when}: {m.get('gpu', m.get('device', '?'))} (SMs {m.get('sm_count', '?')}), "
         f"torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}, fla {m.get('fla')}, commit "
         f"{str(m.get('git_commit'))[:10]}; peaks: bf16 matmul {f(pk.get('bf16_matmul_tflops'), '.0f')} TFLOP/s, "
         f"copy {f(pk.get('copy_gbps'), '.0f')} GB/s.", "",
         "| case | impl | shape | ms | TFLOP/s (% peak) | GB/s (% copy) | rel. RMS vs torch | vs fla |",
         "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in data.get("records", []):
        sh = r.get("shape")
        sh = ", ".join(f"{k}={v}" for k, v in sh.items()) if isinstance(sh, dict) else str(sh)
        pt = r.get("frac_peak_tflops")
        pg = r.get("frac_peak_gbps")
        L.append(f"| {r.get('case')} | {r.get('impl')} | {sh} | {f(r.get('ms'), '.4f')} | "
                 f"{f(r.get('tflops'), '.2f')} ({f(pt and 100 * pt, '.0f')} %) | "
                 f"{f(r.get('gbps'), '.0f')} ({f(pg and 100 * pg, '.0f')} %) | "
                 f"{f(r.get('rel_rms_vs_torch'), '.1e')} | {f(r.get('rel_rms_vs_fla'), '.1e')} |")
    for n in data.get("notes", []):
        L.append(f"\nnote: {n}")
    return "\n".join(L)


def accuracy_table(data: dict, tensor: str = "o") -> str:
    """A Markdown table of the by-length rows for one tensor ("o" or "final_state")."""
    rows = [r for r in data["by_length"] if r["tensor"] == tensor]
    lines = ["| T | implementation | form | dtype | rel. RMS error | max abs error | NMSE (dB) |",
             "|---:|---|---|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["T"], r["impl"] != "reference", r["form"], r["dtype"])):
        lines.append(f"| {r['T']} | {r['impl']} | {r['form']} | {r['dtype']} | {r['rel_rms']:.2e} | "
                     f"{r['max_abs']:.2e} | {r['nmse_db']:.1f} |")
    return "\n".join(lines)


def eval_table(data: dict) -> str:
    """What was scored (split, bytes, windows, bound) and a Markdown table: one row per engine (loss in nats/token,
    perplexity, bits per byte, the loss's relative difference from the float64 reference, time) and the byte-unigram
    baseline; then the skipped engines and a note when the split is not the one the checkpoint was trained against."""
    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    d = data.get("data") or {}
    held = d.get("held_out") or {}
    scored = (f"{data['bytes']:,} of {data['held_out_bytes']:,} held-out bytes scored in {data['windows']} windows of "
              f"up to {data['seq_len']} tokens")
    if data.get("bounded"):
        scored += f" (bounded by --max-bytes {data.get('max_bytes')}; --max-bytes 0 scores the whole split)"
    trained = f", trained {data['trained_steps']} steps" if data.get("trained_steps") is not None else ""
    L = [f"checkpoint: {data.get('checkpoint')}{trained}",
         f"held-out split of {d.get('source')} (Python {d.get('python')}, {held.get('documents')} documents, sha256 "
         f"{str(held.get('sha256'))[:16]}…): {scored}", "",
         "| engine | dtype | loss (nats/token) | perplexity | bits/byte | rel. diff. of the loss vs float64 | "
         "seconds | tokens/s |",
         "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in data.get("rows", []):
        L.append(f"| {r['engine']}: {r['label']} | {r['dtype']} | {r['loss']:.6f} | {r['perplexity']:.4f} | "
                 f"{r['bits_per_byte']:.4f} | {f(r.get('rel_diff_vs_reference_f64'), '.1e')} | {r['seconds']:.2f} | "
                 f"{f(r.get('tokens_per_s'), ',.0f')} |")
    b = data.get("baseline") or {}
    if b:
        L.append(f"| baseline: {b.get('name')} | — | — | — | {b['bits_per_byte']:.4f} | — | — | — |")
    skipped = [f"skipped {name}: {why}" for name, why in (data.get("skipped") or {}).items()]
    if skipped:
        L += [""] + skipped
    if data.get("same_split_as_training") is False:
        t = data.get("training_data") or {}
        L.append(f"\nnote: this held-out split (sha256 {str(held.get('sha256'))[:12]}…, Python {d.get('python')}) is "
                 f"not the one the checkpoint was trained against ({str(t.get('held_out', {}).get('sha256'))[:12]}…, "
                 f"{t.get('source')}, Python {t.get('python')}): its text may have been trained on")
    return "\n".join(L)


def batch_table(res: dict) -> str:
    """Markdown tables of a `qwen35 bench --batch` result (qwen35/bench_batch.py): decode and prefill tokens/s per
    batch size against the floor, the bf16 rows and their accuracy cost, where the optimized decode step's time
    goes, and the goals.  Printed by `qwen35 bench --batch`; the tables of docs/benchmarks.md's batched section."""
    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    m = _machine(res)
    load = (m.get("load_avg_at_start"), m.get("load_avg_at_end"))
    L = [f"Run of {m.get('date_utc') or '?'}: {m.get('host_cpu')} ({m.get('cpu_count')} logical CPUs), torch "
         f"{m.get('torch')}, transformers {m.get('transformers')}, 1 thread; load average at start {load[0]}, at "
         f"end {load[1]}.  sgemm {res['sgemm']['gflops']:.1f} GFLOP/s (best of the medians "
         f"{[round(x, 1) for x in res['sgemm'].get('gflops_medians', [])]}; "
         f"{res.get('sgemm_end', {}).get('gflops', float('nan')):.1f} at the end), DRAM read "
         f"{res['stream']['read_gbps']:.1f} GB/s."]
    s = res.get("settings", {})
    lo, hi = s.get("prompt_range", ("?", "?"))
    L.append(f"Prompts: mixed lengths drawn from {lo}..{hi} (seed {s.get('seed')}); decode: "
             f"{s.get('decode_repeats')} rounds of {s.get('decode_steps')} steps after {s.get('decode_warmup')} "
             f"untimed; prefill rounds per B {s.get('prefill_repeats')}.")
    rows = res.get("by_batch", [])
    L += ["", "Decode, tokens/s (all rows of the batch together):", "",
          "| B | prompt tokens | floor (bound) | optimized | % of floor | reference | transformers | "
          "optimized vs transformers | optimized vs reference |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d, fl = r["decode"], r["floor"]["decode"]
        L.append(f"| {r['B']} | {r['prompt_tokens']} | {fl['tok_per_s']:.1f} ({fl['bound']}) | "
                 f"{d['optimized']['tok_per_s']:.1f} | {100 * r['decode_fraction_of_floor']:.0f} % | "
                 f"{f(d.get('reference', {}).get('tok_per_s'), '.1f')} | "
                 f"{f(d.get('transformers', {}).get('tok_per_s'), '.1f')} | "
                 f"{f(r.get('decode_speedup_vs_hf'), '.2f')}× | {f(r.get('decode_speedup_vs_ref'), '.2f')}× |")
    L += ["", "Prefill of the B prompts, tokens/s (real prompt tokens; transformers' padded rows in brackets):", "",
          "| B | floor (sgemm) | optimized | % of floor | reference | transformers useful (computed) | "
          "optimized vs transformers |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["prefill"]
        hf = p.get("transformers")
        L.append(f"| {r['B']} | {r['floor']['prefill']['tok_per_s']:.0f} | {p['optimized']['tok_per_s']:.0f} | "
                 f"{100 * r['prefill_fraction_of_floor']:.0f} % | "
                 f"{f(p.get('reference', {}).get('tok_per_s'), '.0f')} | "
                 + (f"{hf['useful_tok_per_s']:.0f} ({hf['computed_tok_per_s']:.0f}) | " if hf else "— | ")
                 + f"{f(r.get('prefill_speedup_vs_hf'), '.2f')}× |")
    b16 = res.get("bf16") or {}
    if b16.get("decode"):
        L += ["", "bf16 weights, decode tokens/s:", "",
              "| B | optimized fp32 | optimized bf16 | transformers bf16 | time fp32 / bf16 (measured) | "
              "bytes fp32 / bf16 (floor) | optimized bf16 vs transformers bf16 |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in b16["decode"]:
            L.append(f"| {r['B']} | {r['optimized']:.1f} | {r['optimized_bf16']:.1f} | "
                     f"{f(r.get('transformers_bf16'), '.1f')} | {r['time_ratio_f32_over_bf16']:.2f} | "
                     f"{r['bytes_ratio_f32_over_bf16']:.2f} | {f(r.get('bf16_speedup_vs_hf_bf16'), '.2f')}× |")
    acc = b16.get("logits_accuracy")
    if acc:
        L += ["", f"Logits vs the float64 reference ({acc['prompts']} prompts, {acc['positions']} positions, random "
                  "checkpoint):", "", "| engine | rel. RMS | greedy token = oracle's |", "|---|---:|---:|"]
        for k, v in acc["engines"].items():
            L.append(f"| {k} | {v['rel_rms_vs_f64']:.2e} | {100 * v['greedy_agreement']:.1f} % |")
    ev = b16.get("demo_eval")
    if ev:
        bpb = ev["bits_per_byte"]
        L.append(f"\nDemo held-out bits/byte ({ev['bytes']:,} of {ev['held_out_bytes']:,} bytes): "
                 + ", ".join(f"{k} {v:.4f}" for k, v in bpb.items())
                 + f"; bf16 − fp32 = {ev['bf16_minus_f32_bits_per_byte']:+.5f}.")
    if res.get("profile"):
        L += ["", "Where an optimized decode step's time goes (ms per step; the dense products: all projections and "
                  "the lm_head together):", "",
              "| B | dtype | step | GDN mixers (rule update) | attention (per-request loop) | MLPs | lm_head | "
              "rest of execute | outside execute | dense products: ms · GFLOP/s · weight GB/s |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in res["profile"]:
            pm, dp = p["parts_ms"], p["dense_products"]
            loop = (pm.get("attention mixer: per-request attention", 0.0)
                    + pm.get("attention mixer: per-request KV append", 0.0))
            L.append(f"| {p['B']} | {p['dtype']} | {p['step_ms']:.1f} | {pm.get('GDN mixers', 0):.1f} "
                     f"({pm.get('GDN mixers: rule update', 0):.1f}) | {pm.get('attention mixer', 0):.1f} "
                     f"({loop:.1f}) | {pm.get('MLPs', 0):.1f} | {pm.get('lm_head', 0):.1f} | "
                     f"{p['execute_rest_ms']:.1f} | {p['outside_execute_ms']:.1f} | {dp['ms']:.1f} · "
                     f"{dp['gflops']:.0f} · {dp['weight_gbps']:.1f} |")
    if res.get("profile_transformers"):
        L += ["", "transformers' decode step under torch.profiler (ms per step; products: aten::mm / addmm / bmm / "
                  "baddbmm self time):", "", "| B | step (profiled) | products | share | top ops |",
              "|---:|---:|---:|---:|---|"]
        for p in res["profile_transformers"]:
            tops = ", ".join(f"{k} {v:.1f}" for k, v in list(p["top_ops_ms"].items())[:4])
            L.append(f"| {p['B']} | {p['step_ms']:.1f} | {p['products_ms']:.1f} | "
                     f"{100 * p['products_ms'] / p['step_ms']:.0f} % | {tops} |")
    if res.get("goals"):
        L += ["", "| goal | target | measured | |", "|---|---:|---:|---|"]
        for k, g in res["goals"].items():
            L.append(f"| {k} | {g['target']} | {g['measured']:.2f} | {'met' if g['met'] else 'missed'} |")
    for n in res.get("notes", []):
        L.append(f"\nnote: {n}")
    return "\n".join(L)
