"""`qwen35 diverge`: layer-wise divergence of the NumPy reference from Hugging Face transformers.

For one prompt, record the embedding, every decoder layer's output, the final norm and the logits in both models
(forward hooks on the HF side), and print per point the max / mean absolute difference and the relative RMS
error, flagging the first point above the tolerance.  The HF side is `qwen35.compare.hf_trace`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qwen35.compare import hf_trace
from reference.errors import CheckpointError

from ._common import add_checkpoint_prompt_arguments, checkpoint_dir, prompt_tokens, read_config
from ._validate import positive_float

NAME = "diverge"
HELP = ("layer-wise divergence report, reference (float64) vs Hugging Face transformers (float32, eager): max and "
        "mean |diff| per layer and the first layer that differs")

def add_arguments(parser):
    add_checkpoint_prompt_arguments(parser)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="reference dtype (default float64, the oracle)")
    parser.add_argument("--tolerance", type=positive_float, default=1e-4,
                        help="relative RMS error above which a point counts as divergent (default 1e-4: fp32 "
                             "rounding reaches a few 1e-5 on small random models)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def divergence_vs_hf(path, tokens, *, dtype=np.float64, tolerance: float = 1e-4, hf=None,
                     allow_nonfinite: bool = False):
    """Build both models from checkpoint `path` and compare them on `tokens` (a DivergenceReport); allow_nonfinite
    goes to the reference's from_pretrained (a NaN / inf tensor is refused by default)."""
    import transformers  # first, so a machine with neither is told the one extra that brings both (hf)
    # isort: split
    import torch

    from reference.divergence import compare_traces, reference_trace, trace_names
    from reference.model import Qwen35Model

    model = Qwen35Model.from_pretrained(path, max_batch_size=1, dtype=dtype, allow_nonfinite=allow_nonfinite)
    if hf is None:
        config_json = Path(path) / "config.json"
        arch = (json.loads(config_json.read_text()).get("architectures") or ["?"])[0]
        if not isinstance(arch, str) or not hasattr(transformers, arch):
            raise CheckpointError(f"{config_json}: architectures[0] is {arch!r}, which transformers "
                                  f"{transformers.__version__} has no class for (expected e.g. "
                                  "'Qwen3_5ForCausalLM')")
        hf = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    ref = reference_trace(model, tokens)
    other = hf_trace(hf, tokens, trace_names(model.config))
    report = compare_traces(ref, other, tolerance=tolerance,
                            labels=(f"reference ({np.dtype(dtype).name})", "transformers (float32, eager)"))
    report.notes.append(f"{len(tokens)} tokens; checkpoint {path}")
    return report


def run(args) -> int:
    path = checkpoint_dir(args)
    config = read_config(path)
    tokens = prompt_tokens(args, path, config)
    report = divergence_vs_hf(path, tokens, dtype=np.dtype(args.dtype), tolerance=args.tolerance,
                              allow_nonfinite=args.allow_nonfinite)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.format())
    return 0 if report.ok else 1
