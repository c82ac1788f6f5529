#!/usr/bin/env bash
# The main job on the bundled default, from a fresh clone: creates .venv if needed, installs qwen35, runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/qwen35 info
echo
.venv/bin/qwen35 memory --preset 27b --memory 80GiB
