"""The whole optimized model with backend="triton" vs backend="torch" on a tiny checkpoint.

Every Gated DeltaNet layer then runs the Triton kernels (chunked prefill, decode with the slot pools, conv, gated
norm) inside the real pipeline: ragged prompts, prefill split across calls, decode.  On CPU through the interpreter
(tests/conftest.py); on a CUDA machine (QWEN35_TRITON_GPU=1, scripts/gpu_check.sh) on the GPU, in fp32 and bf16.
The torch backend is itself checked against the float64 reference model in tests/test_optimized_model.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("transformers")  # the tiny checkpoint is written with save_pretrained

import optimized.model as OM
from reference.context import TextContext
from tests._tolerance import assert_close
from tests.hf_checkpoints import make_hf_checkpoint

ON_GPU = os.environ.get("QWEN35_TRITON_GPU") == "1" and torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if ON_GPU else "cpu"
V = 97

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (ON_GPU or INTERPRETED),
                       reason="needs TRITON_INTERPRET=1 (CPU) or QWEN35_TRITON_GPU=1 with a CUDA device"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("triton_model") / "dense", kind="dense", seed=21)


def _models(ckpt, dtype=torch.float32):
    a = OM.Qwen35Model.from_pretrained(ckpt, device=DEV, dtype=dtype, max_batch_size=4, backend="torch")
    b = OM.Qwen35Model.from_pretrained(ckpt, device=DEV, dtype=dtype, max_batch_size=4, backend="triton")
    return a, b


def _prompt(seed, n):
    return np.random.default_rng(seed).integers(0, V, n).tolist()


def test_triton_backend_logits_and_generation_match_torch(ckpt):
    torch_m, triton_m = _models(ckpt)
    prompts = [_prompt(1, 7), _prompt(2, 70), _prompt(3, 1)]  # ragged: 70 crosses a 64-token chunk
    for a, b in zip(torch_m.logits(prompts), triton_m.logits(prompts), strict=True):
        assert_close("logits", a, b, "f32_logits")
    assert triton_m.generate(prompts, max_new_tokens=4) == torch_m.generate(prompts, max_new_tokens=4)
    assert triton_m.active_requests == []


def test_triton_backend_split_prefill_then_decode(ckpt):
    """prefill(a) + prefill(b) + decode through the Triton kernels == the torch backend's one-shot logits."""
    torch_m, triton_m = _models(ckpt)
    toks = _prompt(4, 40)
    full = torch_m.logits([toks])[0]
    rid = "split"
    triton_m.execute(triton_m.prepare_initial_token_inputs([TextContext(rid, toks[:3])]))
    inputs = triton_m.prepare_initial_token_inputs([TextContext(rid, toks[3:38])])
    out = triton_m.execute(inputs)
    assert_close("after second chunk", full[37], out.logits[0], "f32_logits")
    for t in (38, 39):  # decode: the in-place slot pools of the Triton decode kernels
        inputs = triton_m.prepare_next_token_inputs([toks[t]], inputs)
        out = triton_m.execute(inputs)
        assert inputs.is_decode
        assert_close(f"decode at {t}", full[t], out.logits[0], "f32_logits")
    assert triton_m.release(rid)


@pytest.mark.skipif(not ON_GPU, reason="bf16 model run: CUDA only (the interpreter cannot emulate bf16)")
def test_triton_backend_bf16_cuda(ckpt):
    torch_m, triton_m = _models(ckpt, dtype=torch.bfloat16)
    prompts = [_prompt(5, 9), _prompt(6, 130)]
    for a, b in zip(torch_m.logits(prompts), triton_m.logits(prompts), strict=True):
        assert_close("logits bf16", a.float(), b.float(), "bf16")
