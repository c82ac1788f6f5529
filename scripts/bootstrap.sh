#!/usr/bin/env bash
# Create .venv (if missing) and install qwen35 into it.  Usage: scripts/bootstrap.sh [EXTRAS]
# EXTRAS = "" (the core: numpy + safetensors, the NumPy oracle), or comma-separated extras of pyproject.toml,
# e.g. "torch,tokenizers" (scripts/run.sh) or "test" (scripts/test.sh: everything the test suite needs).
# With any extra, torch is pinned first to a CPU build (on the project's machines torch==2.13.0 lies on local
# disk): an extra that pulls plain `torch` would otherwise bring a multi-GB CUDA build.  QWEN35_TORCH_VERSION picks
# another version.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.qwen35-installed${extra:+-$extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
    if [ -n "$extra" ]; then
        "${pip[@]}" "torch==${QWEN35_TORCH_VERSION:-2.13.0}"
        "${pip[@]}" -e ".[$extra]"
    else
        "${pip[@]}" -e .
    fi
    touch "$stamp"
fi
