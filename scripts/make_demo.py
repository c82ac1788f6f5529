#!/usr/bin/env python
"""Write a random-weight demo checkpoint with qwen35's own writer (reference.checkpoint).

    python scripts/make_demo.py --out DIR [--seed 0]

The bundled demo, qwen35/demo/, is a trained model (scripts/train_demo.sh, docs/training.md); this script writes
its untrained little sibling, for runs that want weights with no training behind them (and the same tokenizer
files as the bundled demo, byte for byte).  A small Qwen3.5 text model in Hugging Face format: hidden 64,
4 layers (L L L F: three Gated DeltaNet layers and one gated full-attention layer), a byte-level vocabulary of 256
bytes + 4 special tokens, float32 safetensors (under 1 MB), plus tokenizer.json / tokenizer_config.json for the
byte tokenizer.  The weights are random (deterministic in --seed): it exercises the whole pipeline, it does not
know any language.

One deliberate tweak: the lm_head rows of the special tokens and of the non-printable bytes are zero, so their
logits are exactly 0 while printable characters get random logits of spread ~1; greedy decoding then prints
readable (if meaningless) characters instead of control bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen35.tokenizer import BYTE_SPECIAL_TOKENS, byte_tokenizer_json
from reference.checkpoint import random_state_dict, write_checkpoint
from reference.config import Qwen35Config

VOCAB = 256 + len(BYTE_SPECIAL_TOKENS)
EOS, PAD = 256, 256 + BYTE_SPECIAL_TOKENS.index("<|pad|>")


def demo_config() -> Qwen35Config:
    return Qwen35Config(
        model_type="qwen3_5_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=(2, 1, 1),
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD)


def demo_state_dict(config: Qwen35Config, seed: int) -> dict[str, np.ndarray]:
    tensors = random_state_dict(config, seed)
    printable = [b for b in range(256) if 32 <= b < 127] + [10]
    mask = np.zeros(config.vocab_size, dtype=bool)
    mask[printable] = True
    tensors["lm_head.weight"][~mask] = 0.0
    return tensors


README = """# qwen35 random-weight demo checkpoint

Written by `scripts/make_demo.py` (qwen35's own writer, `reference.checkpoint`): a random-weight Qwen3.5 text
model in Hugging Face format.

- `config.json`: model_type `qwen3_5_text`, hidden 64, 4 layers `L L L F`, vocab 260 (256 bytes + 4 specials)
- `model.safetensors`: float32, deterministic (seed {seed})
- `tokenizer.json` / `tokenizer_config.json`: byte-level (token b = byte b; `<|endoftext|>` = 256)

The weights are random: generated text is noise. It exists to run the whole pipeline on weights with no
training behind them.  Rebuild with `python scripts/make_demo.py --out DIR`.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory to write (the bundled qwen35/demo is the trained model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    config = demo_config()
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
               "model_max_length": config.max_position_embeddings, "clean_up_tokenization_spaces": False}
    out = write_checkpoint(args.out, config, tensors=demo_state_dict(config, args.seed), dtype="float32",
                           extra_files={"tokenizer.json": byte_tokenizer_json(),
                                        "tokenizer_config.json": json.dumps(tok_cfg, indent=2) + "\n",
                                        "README.md": README.format(seed=args.seed)})
    size = sum(p.stat().st_size for p in Path(out).iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
