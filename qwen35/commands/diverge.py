"""`qwen35 diverge`: layer-wise divergence of the NumPy reference from Hugging Face transformers.

For one prompt, record the embedding, every decoder layer's output, the final norm and the logits in both models
(forward hooks on the HF side), and print per point the max / mean absolute difference and the relative RMS
error, flagging the first point above the tolerance.  `hf_trace` is importable for tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ._common import DEMO_DIR

NAME = "diverge"
HELP = ("layer-wise divergence report, reference (float64) vs Hugging Face transformers (float32, eager): max and "
        "mean |diff| per layer and the first layer that differs")

DEFAULT_PROMPT = "Hello, Qwen3.5! The quick brown fox jumps over the lazy dog."


def add_arguments(parser):
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a Hugging Face Qwen3.5 checkpoint directory (default: the bundled demo)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="prompt text (tokenized with the checkpoint's tokenizer)")
    g.add_argument("--prompt-ids", default=None, metavar="IDS", help="comma-separated token ids")
    parser.add_argument("--length", type=int, default=None,
                        help="use N random token ids (seeded) instead of a prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="reference dtype (default float64, the oracle)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="relative RMS error above which a point counts as divergent (default 1e-4: fp32 "
                             "rounding reaches a few 1e-5 on small random models)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _text_model(hf):
    """The HF decoder stack (embed_tokens, layers, norm) of a CausalLM or a ConditionalGeneration model."""
    inner = hf.model
    return inner.language_model if hasattr(inner, "language_model") else inner


def hf_trace(hf, tokens, names) -> list[tuple[str, np.ndarray]]:
    """The same trace points as reference.divergence.reference_trace, captured with forward hooks on an HF model."""
    import torch

    text = _text_model(hf)
    captured: list[np.ndarray] = []

    def grab(_module, _inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(out[0].detach().double().cpu().numpy())

    modules = [text.embed_tokens, *text.layers, text.norm]
    handles = [m.register_forward_hook(grab) for m in modules]
    try:
        with torch.no_grad():
            logits = hf(input_ids=torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    arrays = captured + [logits[0].double().numpy()]
    if len(arrays) != len(names):
        raise RuntimeError(f"captured {len(arrays)} points from the HF model, expected {len(names)}")
    return list(zip(names, arrays))


def divergence_vs_hf(path, tokens, *, dtype=np.float64, tolerance: float = 1e-4, hf=None):
    """Build both models from checkpoint `path` and compare them on `tokens` (a DivergenceReport)."""
    import torch
    import transformers

    from reference.divergence import compare_traces, reference_trace, trace_names
    from reference.model import Qwen35Model

    model = Qwen35Model.from_pretrained(path, max_batch_size=1, dtype=dtype)
    if hf is None:
        arch = (json.loads((Path(path) / "config.json").read_text()).get("architectures") or ["?"])[0]
        if not hasattr(transformers, arch):
            raise ValueError(f"transformers {transformers.__version__} has no class {arch!r}")
        hf = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    ref = reference_trace(model, tokens)
    other = hf_trace(hf, tokens, trace_names(model.config))
    report = compare_traces(ref, other, tolerance=tolerance,
                            labels=(f"reference ({np.dtype(dtype).name})", "transformers (float32, eager)"))
    report.notes.append(f"{len(tokens)} tokens; checkpoint {path}")
    return report


def run(args) -> int:
    from qwen35.tokenizer import ByteTokenizer, load_tokenizer
    from reference.config import Qwen35Config

    path = Path(args.model) if args.model else DEMO_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json (expected a Hugging Face Qwen3.5 checkpoint directory)")
    config = Qwen35Config.from_pretrained(path)
    if args.length is not None:
        tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, args.length).tolist()
    elif args.prompt_ids is not None:
        tokens = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
    else:
        tok = load_tokenizer(path)
        if isinstance(tok, ByteTokenizer) and config.vocab_size < tok.vocab_size:
            tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, 32).tolist()
        else:
            tokens = tok.encode(args.prompt or DEFAULT_PROMPT)
    report = divergence_vs_hf(path, tokens, dtype=np.dtype(args.dtype), tolerance=args.tolerance)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.format())
    return 0 if report.ok else 1
