"""Constructor options of both engines, and the command line's prompt checks: a bad value is a Qwen35Error naming
the option (never a bare ValueError / TypeError / torch RuntimeError), raised before any weight is read."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import optimized
import reference
from hf_checkpoints import tiny_config
from qwen35.cli import main
from reference.checkpoint import write_checkpoint
from reference.context import TextContext
from reference.errors import ConfigError, Qwen35Error, RequestError, StateCacheError


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("dense"), tiny_config("dense"), seed=0)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("mm"), tiny_config("multimodal"), seed=0)


def test_both_packages_export_the_model_api():
    for pkg in (reference, optimized):
        assert pkg.Qwen35Config is reference.config.Qwen35Config
        assert pkg.TextContext is TextContext
        assert issubclass(pkg.ConfigError, pkg.Qwen35Error)
    assert optimized.Qwen35Model is not reference.Qwen35Model


@pytest.mark.parametrize("kwargs, message", [
    ({"return_logits": "bogus"}, "return_logits must be one of"),
    ({"return_hidden_states": "every"}, "return_hidden_states must be one of"),
    ({"max_batch_size": 0}, "max_batch_size must be a positive int"),
    ({"max_batch_size": True}, "max_batch_size must be a positive int"),
    ({"dtype": np.int32}, "dtype must be float64 or float32, got int32"),
    ({"dtype": "nonsense"}, "dtype must be float64 or float32, got 'nonsense'"),
    ({"max_length": -1}, "max_length must be a positive int"),
])
def test_reference_options_are_config_errors(dense, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        reference.Qwen35Model.from_pretrained(dense, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"return_logits": "bogus"}, "return_logits must be one of"),
    ({"max_batch_size": 0}, "max_batch_size must be a positive int or None"),
    ({"max_batch_size": 2.5}, "max_batch_size must be a positive int or None"),
    ({"dtype": torch.int32}, "dtype must be torch.float32"),
    ({"backend": "bogus"}, "backend must be one of"),
    ({"device": "bogus"}, "device 'bogus' is not a torch device"),
])
def test_optimized_options_are_config_errors(dense, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        optimized.Qwen35Model.from_pretrained(dense, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_optimized_cuda_without_cuda_is_a_config_error(dense):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        optimized.Qwen35Model.from_pretrained(dense, device="cuda")


def test_pool_that_does_not_fit_is_a_state_cache_error():
    assert issubclass(StateCacheError, RuntimeError) and issubclass(StateCacheError, Qwen35Error)


@pytest.mark.parametrize("engine", [reference, optimized])
def test_logits_for_an_id_not_in_the_batch(dense, engine):
    model = engine.Qwen35Model.from_pretrained(dense, max_batch_size=2)
    out = model.execute(model.prepare_initial_token_inputs([TextContext("a", [1, 2, 3])]))
    assert out.logits_for("a").shape[0] == 1
    with pytest.raises(RequestError, match="request 5 is not in this batch"):
        out.logits_for(5)


def _one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", ["compare", "diverge"])
def test_prompts_longer_than_the_model_are_refused_before_running(dense, capsys, command):
    extra = ["--no-hf"] if command == "compare" else []
    err = _one_error_line(capsys, [command, "--model", str(dense), "--length", "100000", *extra])
    assert "more than the model's maximum sequence length 4096" in err


@pytest.mark.parametrize("command", ["compare", "diverge"])
def test_placeholder_ids_without_pixels_are_refused(multimodal, capsys, command):
    cfg = reference.Qwen35Config.from_pretrained(multimodal)
    extra = ["--no-hf"] if command == "compare" else []
    err = _one_error_line(capsys, [command, "--model", str(multimodal), "--prompt-ids", f"1,{cfg.image_token_id}",
                                   *extra])
    assert "image_token_id" in err


def test_explicit_prompt_the_byte_tokenizer_cannot_encode_is_refused(dense, capsys):
    err = _one_error_line(capsys, ["compare", "--model", str(dense), "--prompt", "hi", "--no-hf"])
    assert "pass --prompt-ids or --length" in err


@pytest.mark.parametrize("size", ["1e400", "1e30TiB"])
def test_absurd_memory_sizes_are_refused(capsys, size):
    err = _one_error_line(capsys, ["memory", "--memory", size])
    assert "--memory" in err
