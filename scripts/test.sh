#!/usr/bin/env bash
# The test suite, from a fresh clone: creates .venv if needed, installs qwen35 with its test extra, lints with ruff
# (any finding fails the run; the rules are in pyproject.toml, the cache goes under .venv), runs pytest.
# CI=true selects the bounded hypothesis profile and skips cases marked slow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
.venv/bin/ruff check .
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec .venv/bin/python -m pytest -q "$@"
