#!/usr/bin/env bash
# scripts/gpu_check.sh — the Triton kernels on a CUDA machine, in one command:
#   1. environment report (Python, torch, triton, CUDA, GPU; what is missing),
#   2. the Triton kernel tests compiled on the GPU (fp32 vs the float64 oracle, plus the CUDA-only bf16 cases),
#   3. the optimized-path (torch) tests,
#   4. with two or more GPUs, the NCCL tensor-parallel path on a random 0.8B-width checkpoint: `torchrun
#      --nproc-per-node 2 -m qwen35 generate --tensor-parallel 2 --device cuda --json` against one GPU's tokens, and
#      the TP=2 logits against one GPU's and the float64 oracle's (scripts/bench_parallel.py --check-logits)
#      -> results/gpu_check_parallel.json; with one GPU it records "one GPU: the NCCL tensor-parallel path was not
#      run" there instead,
#   5. the GPU benchmarks (scripts/gpu_bench.py): chunked prefill 1×8192 at the 27B layer shape, decode at batch
#      1/32/256 on a 512-slot pool, conv and norm; Triton vs torch vs flash-linear-attention (when importable),
#      TFLOP/s and GB/s against the peaks measured in the same run -> JSON + a printed table.
#
# Usage:   bash scripts/gpu_check.sh [OUT_JSON]          (default results/gpu_bench.json)
# Needs:   a CUDA GPU and a Python with torch + triton (any recent versions).  Installs nothing, needs no network.
#          pytest and hypothesis are optional: without pytest the per-kernel self-checks run instead
#          (`python -m optimized.triton.<file>`: fp32 + bf16 vs the float64 oracle), and gpu_bench.py cross-checks
#          every Triton result against the torch path; without hypothesis only the explicit test tables run.
# Knobs:   PYTHON=/path/to/python   GPU_CHECK_BUDGET=540 (s, whole script)   GPU_CHECK_TEST_TIMEOUT=240
#          GPU_CHECK_OPT_TEST_TIMEOUT=120   GPU_CHECK_BENCH_TIMEOUT=(what is left of the budget, >= 120)
#          GPU_CHECK_PARALLEL_TIMEOUT=240 (the tensor-parallel step, its three launches together)
#          GPU_CHECK_SKIP_TESTS=1   GPU_CHECK_SKIP_PARALLEL=1   GPU_CHECK_SKIP_BENCH=1
#          GPU_CHECK_BENCH_ARGS="--skip-fla"
# Expected runtime on an H100/H200: ~3-6 min (mostly Triton compiles; re-runs hit the Triton cache); capped at
# GPU_CHECK_BUDGET (9 min) by per-step timeouts.
# Exit status: 0 when every step that ran passed; 2 without CUDA; 1 otherwise.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# --dry-run: the same flow on a CPU box (Triton interpreter, tiny benchmark shapes, optimized tests only collected,
# the tensor-parallel step with gloo on a tiny checkpoint), to check this script's plumbing without a GPU.
# GPU_CHECK_PRETEND_NO_HYPOTHESIS=1 exercises the no-hypothesis path.
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-results/gpu_bench.json}"
mkdir -p "$(dirname "$OUT")" results

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.12 python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch, triton" >/dev/null 2>&1; then PY="$c"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no Python with torch and triton found (set PYTHON=/path/to/python)" >&2
  exit 2
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ $DRY -eq 1 ]; then
  export TRITON_INTERPRET=1; unset QWEN35_TRITON_GPU
  echo "gpu_check: DRY RUN on CPU (Triton interpreter); no GPU result is produced"
else
  export QWEN35_TRITON_GPU=1        # tests/conftest.py then keeps the real compiler (no TRITON_INTERPRET)
  unset TRITON_INTERPRET
fi
export GPU_CHECK_DRY=$DRY
export CI=true                      # bounded hypothesis profile (10 examples per property) when hypothesis exists
export QWEN35_RUN_SLOW=1            # the @slow cases are cheap once compiled
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export PYTHONDONTWRITEBYTECODE=1
# Time budget: the whole script stays under GPU_CHECK_BUDGET seconds (default 540 = 9 min); each step gets its own
# cap, and the benchmarks get whatever is left (at least 120 s; they write partial JSON after every case anyway).
BUDGET="${GPU_CHECK_BUDGET:-540}"
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-240}"
OPT_TEST_TIMEOUT="${GPU_CHECK_OPT_TEST_TIMEOUT:-120}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-}"
PAR_TIMEOUT="${GPU_CHECK_PARALLEL_TIMEOUT:-240}"
PAR_OUT="${GPU_CHECK_PARALLEL_OUT:-results/gpu_check_parallel.json}"
TO=""
if command -v timeout >/dev/null 2>&1; then TO="timeout"; fi
with_timeout() { local s="$1"; shift; if [ -n "$TO" ]; then timeout --kill-after=20 "$s" "$@"; else "$@"; fi; }

T0=$(date +%s)
echo "== gpu_check: environment"
"$PY" - <<'EOF'
import importlib, platform, sys
import torch, triton
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
import os
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_DRY") == "1":
    print("no CUDA device (dry run: continuing on CPU)")
elif not torch.cuda.is_available():
    print("NO CUDA DEVICE visible to torch: nothing to check here (on CPU run the interpreter tests instead:")
    print("  CI=true python -m pytest tests/test_triton_kernels.py)")
    sys.exit(2)
else:
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
for mod in ("pytest", "hypothesis", "numpy", "fla"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod}: {getattr(m, '__version__', 'present')}")
    except Exception as exc:
        print(f"{mod}: MISSING ({type(exc).__name__})" + ("  -> fla rows skipped" if mod == "fla" else ""))
EOF
rc=$?
if [ $rc -ne 0 ]; then exit 2; fi

HAVE_PYTEST=0; "$PY" -c "import pytest" >/dev/null 2>&1 && HAVE_PYTEST=1
HAVE_HYP=0; "$PY" -c "import hypothesis" >/dev/null 2>&1 && HAVE_HYP=1
if [ "${GPU_CHECK_PRETEND_NO_HYPOTHESIS:-0}" = "1" ]; then HAVE_HYP=0; fi

rc_triton=0; rc_opt=0; rc_par=0; par_ran=0; par_status="not run"; rc_bench=0
if [ "${GPU_CHECK_SKIP_TESTS:-0}" = "1" ]; then
  echo "== tests skipped (GPU_CHECK_SKIP_TESTS=1)"
elif [ $HAVE_PYTEST -eq 0 ]; then
  echo "== pytest is not installed: running the kernel self-checks instead (oracle comparison, fp32 + bf16)"
  for m in gated_delta conv norm; do
    with_timeout "$TEST_TIMEOUT" "$PY" -m "optimized.triton.$m" || rc_triton=1
  done
else
  PYTEST_ARGS=(-q -rs -p no:cacheprovider -m "not hf")
  if [ $HAVE_HYP -eq 0 ]; then
    # tests/conftest.py imports hypothesis; without it, skip the conftest (we set its environment above) and run
    # only the test files that do not need hypothesis at import time.
    echo "note: hypothesis missing -> --noconftest, explicit test tables only"
    PYTEST_ARGS+=(--noconftest)
  fi
  pick() {  # existing files among the patterns, minus those that import hypothesis at top level when it is missing
    local f
    for f in "$@"; do
      [ -f "$f" ] || continue
      if [ $HAVE_HYP -eq 0 ] && grep -qE '^(from|import) hypothesis' "$f"; then
        echo "note: skipping $f (imports hypothesis at top level)" >&2; continue
      fi
      echo "$f"
    done
  }
  mapfile -t TRITON_FILES < <(pick tests/test_triton_*.py)
  mapfile -t OPT_FILES < <(pick tests/test_optimized_*.py)

  echo "== Triton kernel tests on the GPU: ${TRITON_FILES[*]:-none}"
  if [ ${#TRITON_FILES[@]} -gt 0 ]; then
    with_timeout "$TEST_TIMEOUT" "$PY" -m pytest "${PYTEST_ARGS[@]}" --junitxml=results/gpu_check_triton.xml \
      "${TRITON_FILES[@]}"
    rc_triton=$?
  fi
  echo "== optimized-path tests: ${OPT_FILES[*]:-none}"
  if [ ${#OPT_FILES[@]} -gt 0 ] && [ $DRY -eq 1 ]; then
    with_timeout "$TEST_TIMEOUT" "$PY" -m pytest "${PYTEST_ARGS[@]}" --collect-only "${OPT_FILES[@]}" | tail -n 1
    rc_opt=$?
  elif [ ${#OPT_FILES[@]} -gt 0 ]; then
    with_timeout "$OPT_TEST_TIMEOUT" "$PY" -m pytest "${PYTEST_ARGS[@]}" --junitxml=results/gpu_check_optimized.xml \
      "${OPT_FILES[@]}"
    rc_opt=$?
  fi
fi

# ---- the NCCL tensor-parallel path (two GPUs; gloo on a tiny checkpoint in a dry run)
if [ "${GPU_CHECK_SKIP_PARALLEL:-0}" = "1" ]; then
  echo "== tensor-parallel step skipped (GPU_CHECK_SKIP_PARALLEL=1)"; par_status="skipped"
else
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  NSMI=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' )
  echo "== tensor-parallel step: torch sees $NGPU GPU(s), nvidia-smi -L lists $NSMI"
  if [ $DRY -eq 0 ] && [ "$NGPU" -lt 2 ]; then
    PAR_NOTE="one GPU: the NCCL tensor-parallel path was not run"
    echo "$PAR_NOTE"
    "$PY" - "$PAR_OUT" "$PAR_NOTE" "$NGPU" "$NSMI" <<'EOF'
import sys
from qwen35.measure import machine_info, write_json
out, note, n_torch, n_smi = sys.argv[1:]
write_json({"ran": False, "note": note, "gpus_torch": int(n_torch), "gpus_nvidia_smi": int(n_smi),
            "machine": machine_info("cuda" if int(n_torch) else "cpu")}, out)
EOF
    par_status="$PAR_NOTE; recorded in $PAR_OUT"
  else
    PAR_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_tp.XXXXXX")"
    PAR_DEV="cuda"; QUICK_ARG=""
    if [ $DRY -eq 1 ]; then PAR_DEV="cpu"; QUICK_ARG="--quick"; fi  # gloo on a tiny model: the plumbing only
    PROMPT_IDS="5,17,33,2,9,64,21,8"
    TRUN=("$PY" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1)
    free_port() { "$PY" -c "from optimized.parallel import free_port; print(free_port())"; }
    T_PAR=$(date +%s)
    par_left() { local s=$(( PAR_TIMEOUT - ($(date +%s) - T_PAR) )); [ "$s" -lt 30 ] && s=30; echo "$s"; }
    # shellcheck disable=SC2086
    "$PY" scripts/bench_parallel.py --write-checkpoint "$PAR_DIR/ckpt" $QUICK_ARG >/dev/null \
      && with_timeout "$(par_left)" "${TRUN[@]}" --master-port "$(free_port)" -m qwen35 generate \
           --model "$PAR_DIR/ckpt" --tensor-parallel 2 --device "$PAR_DEV" --prompt-ids "$PROMPT_IDS" \
           --max-new-tokens 16 --json >"$PAR_DIR/tp2.json"
    rc_gen=$?
    with_timeout "$(par_left)" "$PY" -m qwen35 generate --model "$PAR_DIR/ckpt" --engine optimized \
      --device "$PAR_DEV" --prompt-ids "$PROMPT_IDS" --max-new-tokens 16 --json >"$PAR_DIR/one.json"
    rc_one=$?
    with_timeout "$(par_left)" "${TRUN[@]}" --master-port "$(free_port)" scripts/bench_parallel.py \
      --check-logits "$PAR_DIR/ckpt" --device "$PAR_DEV" --generate-json "$PAR_DIR/tp2.json" "$PAR_DIR/one.json" \
      --out "$PAR_OUT"
    rc_check=$?
    echo "  torchrun generate --tensor-parallel 2: rc=$rc_gen; one device: rc=$rc_one; logits check: rc=$rc_check"
    rc_par=$rc_check
    if [ $rc_gen -ne 0 ]; then rc_par=$rc_gen; elif [ $rc_one -ne 0 ]; then rc_par=$rc_one; fi
    par_ran=1; par_status="on $PAR_DEV; JSON: $PAR_OUT"
    rm -rf "$PAR_DIR"
  fi
fi

if [ "${GPU_CHECK_SKIP_BENCH:-0}" = "1" ]; then
  echo "== benchmarks skipped (GPU_CHECK_SKIP_BENCH=1)"
else
  if [ -z "$BENCH_TIMEOUT" ]; then
    BENCH_TIMEOUT=$(( BUDGET - ($(date +%s) - T0) ))
    if [ "$BENCH_TIMEOUT" -lt 120 ]; then BENCH_TIMEOUT=120; fi
  fi
  echo "== GPU benchmarks -> $OUT (time limit ${BENCH_TIMEOUT} s)"
  # shellcheck disable=SC2086
  DRY_ARG=""; [ $DRY -eq 1 ] && DRY_ARG="--dry-run"
  # shellcheck disable=SC2086
  with_timeout "$BENCH_TIMEOUT" "$PY" scripts/gpu_bench.py --out "$OUT" $DRY_ARG ${GPU_CHECK_BENCH_ARGS:-}
  rc_bench=$?
fi

echo "== gpu_check summary ($(( $(date +%s) - T0 )) s)"
st() { case "$1" in 0) echo "ok";; 124|137) echo "TIMEOUT";; 5) echo "no tests collected";; *) echo "FAILED (rc=$1)";; esac; }
echo "  triton tests:         $(st $rc_triton)"
echo "  optimized-path tests: $(st $rc_opt)"
if [ $par_ran -eq 1 ]; then par_status="$(st $rc_par)  ($par_status)"; fi
echo "  tensor parallel:      $par_status"
echo "  benchmarks:           $(st $rc_bench)  (JSON: $OUT)"
if [ $rc_triton -ne 0 ] || [ $rc_opt -ne 0 ] || [ $rc_par -ne 0 ] || [ $rc_bench -ne 0 ]; then exit 1; fi
exit 0
