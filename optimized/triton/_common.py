"""Shared helpers for the Triton wrappers: output allocation (with a NaN-poison test hook), device checks, sizes.

The poison hook (the fla conftest trick, pitfall B15): inside `with poison_outputs():` — or with the environment
variable QWEN35_TRITON_POISON=1 — every buffer a wrapper allocates (outputs *and* internal scratch) is filled with
NaN instead of left uninitialised, so a kernel that forgets to write an element, or reads scratch it never wrote,
turns the result into NaN and the test fails loudly.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton

__all__ = ["alloc", "poison_outputs", "force_blocks", "block", "interpreting", "check_device", "pow2"]

_poison_depth = 0
_forced_blocks: dict = {}


@contextlib.contextmanager
def force_blocks(**sizes):
    """Test hook: override the wrappers' block sizes (gdn_bv, conv_bt, conv_bc, conv_update_bc, norm_br) inside the
    block, so the GPU's tilings (D_v split across programs, several token/channel tiles, ragged last tiles) also
    run under the interpreter, where the wrappers otherwise pick one big block."""
    old = dict(_forced_blocks)
    _forced_blocks.update(sizes)
    try:
        yield
    finally:
        _forced_blocks.clear()
        _forced_blocks.update(old)


def block(name: str, default: int) -> int:
    """The block size a wrapper uses: `default`, unless a test forces one with `force_blocks`."""
    return int(_forced_blocks.get(name, default))


@contextlib.contextmanager
def poison_outputs():
    """Make every wrapper allocation NaN-filled (float) or -1-filled (integer) inside the block."""
    global _poison_depth
    _poison_depth += 1
    try:
        yield
    finally:
        _poison_depth -= 1


def _poisoning() -> bool:
    return _poison_depth > 0 or os.environ.get("QWEN35_TRITON_POISON") == "1"


def alloc(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor while poisoning (see module docstring)."""
    if _poisoning():
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(who: str, *tensors) -> torch.device:
    """All tensors on one device; CUDA, or CPU under the Triton interpreter."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) != 1:
        raise ValueError(f"{who}: all tensors must be on one device, got {sorted(map(str, devs))}")
    dev = devs.pop()
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{who}: the Triton kernels need CUDA tensors (got {dev}); on CPU set TRITON_INTERPRET=1 before importing "
            "triton to run them through the interpreter, or use the torch backend"
        )
    return dev


def pow2(n: int, lo: int = 1) -> int:
    """Smallest power of two >= max(n, lo) (Triton block sizes must be powers of two)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))
