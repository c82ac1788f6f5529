"""`qwen35 memory`: Gated DeltaNet state, KV cache and weight sizing, and the batch each rule allows."""
from __future__ import annotations

import json

from reference.memory import format_bytes, memory_budget

from ._common import add_config_arguments, load_config
from ._validate import dtype_name, memory_size, positive_int

NAME = "memory"
HELP = ("size the state cache, the KV cache and the weights for a memory budget, and show the max batch under the "
        "documented gather/scatter rule (3 x per request) and the in-place pool rule (1 x per request)")


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--memory", type=memory_size, default="80GiB",
                        help="device memory budget, e.g. 80GiB, 141GB (default 80GiB)")
    parser.add_argument("--context", type=positive_int, default=8192,
                        help="tokens per request for the KV cache, >= 1 (default 8192)")
    parser.add_argument("--state-dtype", type=dtype_name, default="bfloat16",
                        help="state dtype: bfloat16 (default) or float32")
    parser.add_argument("--kv-dtype", type=dtype_name, default="bfloat16", help="KV-cache dtype (default bfloat16)")
    parser.add_argument("--weight-dtype", type=dtype_name, default="bfloat16", help="weight dtype (default bfloat16)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    config, label = load_config(args)
    b = memory_budget(config, args.memory, args.context, state_dtype=args.state_dtype,
                      kv_dtype=args.kv_dtype, weight_dtype=args.weight_dtype)
    if args.json:
        d = b.as_dict()
        d["model"] = label
        print(json.dumps(d, indent=2))
        return 0
    print(f"Memory budget for {label}: {format_bytes(b.memory_bytes)} device memory, context {b.context_len} tokens")
    rows = [
        ("weights", f"{b.weight_bytes:,} B", format_bytes(b.weight_bytes), b.weight_dtype),
        ("free after weights", f"{b.free_bytes:,} B", format_bytes(b.free_bytes), "") if b.free_bytes >= 0 else
        ("weights exceed it by", f"{-b.free_bytes:,} B", format_bytes(-b.free_bytes), "nothing fits"),
        ("state per request", f"{b.state_bytes_per_request:,} B", format_bytes(b.state_bytes_per_request),
         b.state_dtype),
        ("  conv part", f"{b.conv_state_bytes_per_request:,} B", format_bytes(b.conv_state_bytes_per_request),
         f"{config.num_linear_layers} x [{config.conv_dim}, {config.linear_conv_kernel_dim - 1}]"),
        ("  recurrent part", f"{b.recurrent_state_bytes_per_request:,} B",
         format_bytes(b.recurrent_state_bytes_per_request),
         f"{config.num_linear_layers} x [{config.linear_num_value_heads}, {config.linear_key_head_dim}, "
         f"{config.linear_value_head_dim}]"),
        ("KV per token", f"{b.kv_bytes_per_token:,} B", format_bytes(b.kv_bytes_per_token),
         f"{b.kv_dtype}, {config.num_full_layers} full layers"),
        ("KV per request", f"{b.kv_bytes_per_request:,} B", format_bytes(b.kv_bytes_per_request),
         f"at {b.context_len} tokens"),
    ]
    w = max(len(r[1]) for r in rows)
    for name, exact, human, note in rows:
        print(f"  {name:<20} {exact:>{w}}  {human:>10}  {note}")
    print(f"  one request's state = the KV of {b.kv_tokens_equal_to_state:,.0f} tokens")
    print()
    print(f"  {'rule':<15} {'copies':>6} {'state max batch':>16} {'reserved':>10} {'KV max batch':>13} "
          f"{'max batch':>10}  bound by")
    copies = {"gather_scatter": 3, "in_place": 1}
    for rule, r in b.rules.items():
        print(f"  {rule:<15} {copies[rule]:>6} {r['state_max_batch']:>16} {format_bytes(r['reserved_bytes']):>10} "
              f"{r['kv_max_batch']:>13} {r['max_batch']:>10}  {r['bound_by']}")
    print("\n  state max batch = max(1, floor(0.15 x free) // (copies x state per request)); "
          "KV max batch = (free - reserved) // KV per request")
    return 0
