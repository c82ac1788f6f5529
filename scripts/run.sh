#!/usr/bin/env bash
# The main job on the bundled default, from a fresh clone: creates .venv if needed, installs qwen35 with the torch
# and tokenizers extras (the NumPy reference needs neither; they let the same .venv run --engine optimized and a real
# checkpoint's tokenizer.json), then generates from the bundled demo checkpoint (a small Qwen3.5 trained on Python's
# documentation, docs/training.md) with the NumPy reference (prints text and tokens/s), and shows the demo's layer
# map and the 27B memory budget.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh torch,tokenizers
.venv/bin/qwen35 generate --max-new-tokens 200 --temperature 0.6 --top-k 40 --seed 0
echo
.venv/bin/qwen35 info
echo
.venv/bin/qwen35 memory --preset 27b --memory 80GiB
