"""`qwen35 memory`: Gated DeltaNet state, KV cache and weight sizing, and the batch each rule allows — on one device,
or per device and in total for a tensor-parallel x data-parallel layout."""
from __future__ import annotations

import json

from reference.memory import RULES, conv_state_shape, format_bytes, memory_budget, recurrent_state_shape

from ._common import add_config_arguments, load_config
from ._validate import dtype_name, memory_size, positive_int

NAME = "memory"
HELP = ("size the state cache, the KV cache and the weights for a memory budget, and show the max batch under the "
        "documented gather/scatter rule (3 x per request) and the in-place pool rule (1 x per request); with "
        "--tensor-parallel / --data-parallel, per device and in total")


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--memory", type=memory_size, default="80GiB",
                        help="memory of ONE device, e.g. 80GiB, 141GB (default 80GiB)")
    parser.add_argument("--context", type=positive_int, default=8192,
                        help="tokens per request for the KV cache, >= 1 (default 8192)")
    parser.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N",
                        help="devices one model replica is split over (reference.parallel's plan; N must divide the "
                             "attention heads, the key heads and the MLP, and divide the KV heads or be a "
                             "multiple of them); default 1")
    parser.add_argument("--data-parallel", type=positive_int, default=1, metavar="M",
                        help="model replicas, each with its own state pool; default 1")
    parser.add_argument("--state-dtype", type=dtype_name, default="bfloat16",
                        help="state dtype: bfloat16 (default) or float32")
    parser.add_argument("--kv-dtype", type=dtype_name, default="bfloat16", help="KV-cache dtype (default bfloat16)")
    parser.add_argument("--weight-dtype", type=dtype_name, default="bfloat16", help="weight dtype (default bfloat16)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _rows(b, config) -> list[tuple[str, str, str, str]]:
    """(name, exact bytes, human bytes, note) of one device's budget."""
    tp = b.tensor_parallel
    conv, rec = conv_state_shape(config, tensor_parallel=tp), recurrent_state_shape(config, tensor_parallel=tp)
    nkv = config.num_key_value_heads
    kv_note = (f", {nkv // tp} of {nkv} KV heads" if nkv % tp == 0 else
               f", 1 of {nkv} KV heads, copied on {tp // nkv} ranks")  # tp a multiple of nkv (reference.parallel)
    rows = [("weights", f"{b.weight_bytes:,} B", format_bytes(b.weight_bytes),
             b.weight_dtype + (f", the largest of {tp} ranks" if tp > 1 else ""))]
    if tp > 1:
        whole = ["norms"] + (["router", "shared-expert gate"] if config.is_moe else []) + (
            ["vision tower"] if config.vision_config is not None else [])
        rows.append(("  replicated part", f"{b.replicated_weight_bytes:,} B", format_bytes(b.replicated_weight_bytes),
                     f"{', '.join(whole)}: whole on every rank"))
    rows += [
        ("free after weights", f"{b.free_bytes:,} B", format_bytes(b.free_bytes), "") if b.free_bytes >= 0 else
        ("weights exceed it by", f"{-b.free_bytes:,} B", format_bytes(-b.free_bytes), "nothing fits"),
        ("state per request", f"{b.state_bytes_per_request:,} B", format_bytes(b.state_bytes_per_request),
         b.state_dtype + (f", 1/{tp} of each request's state" if tp > 1 else "")),
        ("  conv part", f"{b.conv_state_bytes_per_request:,} B", format_bytes(b.conv_state_bytes_per_request),
         f"{config.num_linear_layers} x [{conv[0]}, {conv[1]}]"),
        ("  recurrent part", f"{b.recurrent_state_bytes_per_request:,} B",
         format_bytes(b.recurrent_state_bytes_per_request),
         f"{config.num_linear_layers} x [{rec[0]}, {rec[1]}, {rec[2]}]"),
        ("KV per token", f"{b.kv_bytes_per_token:,} B", format_bytes(b.kv_bytes_per_token),
         f"{b.kv_dtype}, {config.num_full_layers} full layers"
         + (kv_note if tp > 1 else "")),
        ("KV per request", f"{b.kv_bytes_per_request:,} B", format_bytes(b.kv_bytes_per_request),
         f"at {b.context_len} tokens"),
    ]
    return rows


def _print_table(rows) -> None:
    w = max(len(r[1]) for r in rows)
    for name, exact, human, note in rows:
        print(f"  {name:<20} {exact:>{w}}  {human:>10}  {note}")


def run(args) -> int:
    config, label = load_config(args)
    b = memory_budget(config, args.memory, args.context, state_dtype=args.state_dtype,
                      kv_dtype=args.kv_dtype, weight_dtype=args.weight_dtype,
                      tensor_parallel=args.tensor_parallel, data_parallel=args.data_parallel)
    if args.json:
        d = b.as_dict()
        d["model"] = label
        print(json.dumps(d, indent=2))
        return 0
    tp, dp = b.tensor_parallel, b.data_parallel
    layout = b.devices > 1
    if layout:
        print(f"Memory budget for {label}: {b.devices} devices of {format_bytes(b.memory_bytes)} "
              f"(tensor parallel {tp} x data parallel {dp}), context {b.context_len} tokens")
        print("\nPer device:")
    else:
        print(f"Memory budget for {label}: {format_bytes(b.memory_bytes)} device memory, "
              f"context {b.context_len} tokens")
    _print_table(_rows(b, config))
    print(f"  one request's state = the KV of {b.kv_tokens_equal_to_state:,.0f} tokens")
    print()
    per = " per replica" if layout else ""
    head = (f"  {'rule':<15} {'copies':>6} {'state max batch':>16} {'reserved':>10} {'KV max batch':>13} "
            f"{'max batch' + per:>{10 + len(per)}}")
    print(head + (f" {'total':>7}" if layout else "") + "  bound by")
    for rule, r in b.rules.items():
        line = (f"  {rule:<15} {RULES[rule]:>6} {r['state_max_batch']:>16} {format_bytes(r['reserved_bytes']):>10} "
                f"{r['kv_max_batch']:>13} {r['max_batch']:>{10 + len(per)}}")
        print(line + (f" {r['total_max_batch']:>7}" if layout else "") + f"  {r['bound_by']}")
    print("\n  state max batch = max(1, floor(0.15 x free) // (copies x state per request)); "
          "KV max batch = (free - reserved) // KV per request")
    if layout:
        print(f"  every device of a replica holds the same requests (its share of each), so a replica's batch is one "
              f"device's; total = {dp} replicas x that")
        print("\nTotal:")
        _print_table([
            ("devices", f"{b.devices}", "", f"{tp} tensor-parallel ranks x {dp} replicas"),
            ("memory", f"{b.total_memory_bytes:,} B", format_bytes(b.total_memory_bytes), f"{b.devices} x per device"),
            ("weights", f"{b.total_weight_bytes:,} B", format_bytes(b.total_weight_bytes),
             f"{dp} x the sum over {tp} ranks"),
        ])
    return 0
