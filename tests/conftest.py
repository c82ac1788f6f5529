"""Test-suite set-up: Triton interpreter, hypothesis profiles, the slow marker.

`TRITON_INTERPRET=1` must be set before any Triton kernel module is imported, so it is set here, at the very
top of the first module pytest imports.  On a machine with a CUDA GPU, `QWEN35_TRITON_GPU=1` keeps the real
compiler (scripts/gpu_check.sh sets it).
"""
import os

if os.environ.get("QWEN35_TRITON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

try:  # a GPU machine may lack hypothesis: scripts/gpu_check.sh then runs the explicit tables only
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    settings = None

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if settings is not None:
    # `ci`: bounded, deterministic; `dev`: deeper.  Select with HYPOTHESIS_PROFILE=dev|ci (CI=true picks ci).
    settings.register_profile(
        "ci",
        max_examples=25,
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "dev",
        max_examples=60,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if IN_CI else "dev"))


def pytest_collection_modifyitems(config, items):
    if not IN_CI or os.environ.get("QWEN35_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow case: skipped under CI=true (set QWEN35_RUN_SLOW=1 to run it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
