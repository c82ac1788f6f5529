"""Triton kernels of the qwen35 fast path (Gated DeltaNet prefill/decode, causal conv1d, gated RMSNorm).

Same names and signatures as the torch twins in `optimized/`; `optimized.backend` dispatches here on CUDA (and on
CPU under TRITON_INTERPRET=1, which is how the tests check them without a GPU).  Design, FLOP/byte counts and how
to run: docs/triton_kernels.md.
"""
from optimized.triton._common import poison_outputs
from optimized.triton.conv import causal_conv1d, causal_conv1d_update
from optimized.triton.gated_delta import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule_update,
    recurrent_gated_delta_rule,
)
from optimized.triton.norm import gated_rms_norm

__all__ = [
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "gated_rms_norm",
    "poison_outputs",
]
