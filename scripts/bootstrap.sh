#!/usr/bin/env bash
# Create .venv (if missing) and install qwen35 into it.  Usage: scripts/bootstrap.sh [extra]
# extra = "" (run the package) or "test" (run the test suite).
# torch is pinned first to a CPU build (on the project's machines torch==2.13.0 lies on local disk);
# installing plain `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.qwen35-installed${extra:+-$extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==${QWEN35_TORCH_VERSION:-2.13.0}"
    if [ -n "$extra" ]; then
        .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extra]"
    else
        .venv/bin/python -m pip install -q --disable-pip-version-check -e .
    fi
    touch "$stamp"
fi
