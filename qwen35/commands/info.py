"""`qwen35 info`: the config summary and the layer map."""
from __future__ import annotations

import json

from reference.config import FULL
from reference.memory import format_bytes, parameter_counts, state_bytes_per_request, weight_bytes

from ._common import add_config_arguments, load_config

NAME = "info"
HELP = "print a config summary and the layer map (which layers are linear / full, KV index of each full layer)"


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def summary(config) -> dict:
    c = config
    d = {
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_linear_layers": c.num_linear_layers,
        "num_full_layers": c.num_full_layers,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "full_attention": {"num_attention_heads": c.num_attention_heads,
                           "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                           "rotary_dim": c.rotary_dim, "rope_theta": c.rope_theta,
                           "mrope_section": list(c.mrope_section), "mrope_interleaved": c.mrope_interleaved,
                           "rope_scaling": c.rope_scaling.to_rope_parameters(),
                           "max_seq_len": c.resolve_max_seq_len(),
                           "attn_output_gate": c.attn_output_gate},
        "gated_deltanet": {"linear_num_key_heads": c.linear_num_key_heads,
                           "linear_num_value_heads": c.linear_num_value_heads,
                           "linear_key_head_dim": c.linear_key_head_dim,
                           "linear_value_head_dim": c.linear_value_head_dim,
                           "linear_conv_kernel_dim": c.linear_conv_kernel_dim,
                           "key_dim": c.key_dim, "value_dim": c.value_dim, "conv_dim": c.conv_dim},
        "mlp": ({"num_experts": c.num_experts, "num_experts_per_tok": c.num_experts_per_tok,
                 "moe_intermediate_size": c.moe_intermediate_size,
                 "shared_expert_intermediate_size": c.shared_expert_intermediate_size}
                if c.is_moe else {"intermediate_size": c.intermediate_size}),
        "parameters": sum(parameter_counts(c).values()),
        "weight_bytes_bf16": weight_bytes(c, "bfloat16"),
        "state_bytes_per_request_bf16": state_bytes_per_request(c, "bfloat16"),
        "layer_map": c.layer_map(),
    }
    if c.vision_config is not None:
        v = c.vision_config
        d["vision"] = {"depth": v.depth, "hidden_size": v.hidden_size, "num_heads": v.num_heads,
                       "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
                       "out_hidden_size": v.out_hidden_size,
                       "token_ids": {"image": c.image_token_id, "video": c.video_token_id,
                                     "vision_start": c.vision_start_token_id, "vision_end": c.vision_end_token_id}}
    return d


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return str(n)


def run(args) -> int:
    config, label = load_config(args)
    s = summary(config)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    c = config
    print(f"Qwen3.5 config: {label}  ({c.model_type})")
    print(f"  hidden {c.hidden_size}, layers {c.num_hidden_layers} = {c.num_linear_layers} Gated DeltaNet "
          f"+ {c.num_full_layers} gated full attention, vocab {c.vocab_size}, tied embeddings {c.tie_word_embeddings}")
    print(f"  full attention: {c.num_attention_heads} q heads / {c.num_key_value_heads} kv heads x {c.head_dim}, "
          f"RoPE on {c.rotary_dim} dims (theta {c.rope_theta:g}), MRoPE sections {list(c.mrope_section)} "
          f"{'interleaved' if c.mrope_interleaved else 'chunked'}, output gate {c.attn_output_gate}")
    scaling = {k: v for k, v in c.rope_scaling.to_rope_parameters().items() if k != "rope_type"}
    print(f"  RoPE scaling: {c.rope_type}" + (f" {scaling}" if scaling else "")
          + f"; max sequence length {c.resolve_max_seq_len():,} (max_position_embeddings "
            f"{c.max_position_embeddings:,})")
    print(f"  Gated DeltaNet: {c.linear_num_key_heads} key heads x {c.linear_key_head_dim}, "
          f"{c.linear_num_value_heads} value heads x {c.linear_value_head_dim} "
          f"(r = {c.value_heads_per_key_head}), conv kernel {c.linear_conv_kernel_dim}, conv_dim {c.conv_dim}")
    if c.is_moe:
        print(f"  MoE: {c.num_experts} experts, top-{c.num_experts_per_tok}, expert width {c.moe_intermediate_size}, "
              f"shared expert {c.shared_expert_intermediate_size}")
    else:
        print(f"  SwiGLU MLP width {c.intermediate_size}")
    if "vision" in s:
        v = s["vision"]
        print(f"  vision tower: depth {v['depth']}, width {v['hidden_size']}, {v['num_heads']} heads, "
              f"patch {v['patch_size']}, merge {v['spatial_merge_size']}x{v['spatial_merge_size']} -> "
              f"{v['out_hidden_size']}")
    print(f"  parameters {_count(s['parameters'])}; weights {format_bytes(s['weight_bytes_bf16'])} in bf16; "
          f"state per request {format_bytes(s['state_bytes_per_request_bf16'])} in bf16")
    print("\n  layer  type              cache")
    for row in s["layer_map"]:
        if row["type"] == FULL:
            cache = f"KV index {row['kv_cache_index']}"
        else:
            cache = f"state index {row['state_index']}"
        print(f"  {row['layer']:>5}  {row['type']:<16}  {cache}")
    return 0
