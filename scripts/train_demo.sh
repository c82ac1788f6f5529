#!/usr/bin/env bash
# Train the bundled demo checkpoint, qwen35/demo/, from scratch: one reproducible command (seed 0, 600 updates,
# held-out evaluation every 100; every other setting the default of `qwen35 train`: shape `small`, 16 x 256 bytes
# of CPython's documentation topics per update).  About 10 minutes on 2 CPU cores.  Then score it on the whole
# held-out split and install the Hugging Face files (not the optimizer state) into qwen35/demo/.
# Usage: scripts/train_demo.sh [WORKDIR]  (default checkpoints/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh torch
out="${1:-checkpoints/demo}"
.venv/bin/qwen35 train --out "$out" --threads 2 --seed 0 --steps 600 --eval-every 100 --log results/train_log.json
.venv/bin/qwen35 eval --model "$out" --max-bytes 0 --out results/eval.json
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
    cp "$out/$f" qwen35/demo/
done
.venv/bin/qwen35 plot
echo "qwen35/demo/ now holds the model trained in $out (results/train_log.json, results/eval.json, docs/plots/)"
