"""`kimi-cluster inspect`, `plan` and `make-tiny`: a model's sizes, whether it fits some Macs, and
tiny checkpoints for tests and demos. Nothing here talks to a cluster."""

import json
from pathlib import Path

from rich.table import Table

from mlx_kimi.builtin import BUILTIN_MODELS
from mlx_kimi.checkpoint import SizeReport, open_checkpoint, text_config

from .cli_args import console, fail, mac_memory
from .units import format_bytes


def quant_scheme(args):
    """(name, QuantScheme) a built-in model is described under: a preset, or bits and group size."""
    from mlx_kimi.spec import PRESETS, QuantScheme

    if args.preset:
        if any(v is not None for v in (args.expert_bits, args.other_bits, args.group_size)):
            fail("--preset names the bits and group size: give it without --expert-bits/--other-bits/--group-size")
        if args.preset not in PRESETS:
            fail(f"unknown preset {args.preset!r}; presets: "
                 + ", ".join(f"{name} ({scheme})" for name, scheme in PRESETS.items()))
        return f"{args.preset}: {PRESETS[args.preset]}", PRESETS[args.preset]
    try:
        scheme = QuantScheme(args.expert_bits or 2, args.other_bits or 4, args.group_size or 64)
    except ValueError as e:
        fail(str(e))
    return str(scheme), scheme


def model_sizes(args) -> tuple:
    """(display name, SizeReport, text config, activation bytes, unused bytes by kind) of a built-in
    model or a checkpoint."""
    if args.model in BUILTIN_MODELS:
        from mlx_kimi.spec import describe_sizes

        name, scheme = quant_scheme(args)
        config = BUILTIN_MODELS[args.model]
        return f"{args.model} ({name})", describe_sizes(config, scheme), text_config(config), 2, {}
    if any(v is not None for v in (args.expert_bits, args.other_bits, args.group_size, args.preset)):
        fail("--preset/--expert-bits/--other-bits/--group-size describe a built-in model; a checkpoint's sizes "
             "come from its files")
    checkpoint = open_checkpoint(args.model)
    return (f"{checkpoint.path} (model id {checkpoint.model_id[:16]})", checkpoint.sizes(),
            text_config(checkpoint.config), checkpoint.activation_itemsize, checkpoint.unused_bytes())


def _layer_groups(layer_bytes: list) -> list:
    """Runs of consecutive layers with equal bytes: [(first, last, bytes)]."""
    groups = []
    for i, b in enumerate(layer_bytes):
        if groups and groups[-1][2] == b and groups[-1][1] == i - 1:
            groups[-1] = (groups[-1][0], i, b)
        else:
            groups.append((i, i, b))
    return groups


def print_sizes(title: str, sizes: SizeReport) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("each", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("GB", justify="right")
    table.add_row("embedding", "", f"{sizes.embed_bytes:,}", f"{sizes.embed_bytes / 1e9:.3f}")
    for first, last, b in _layer_groups(sizes.layer_bytes):
        name = f"layer {first}" if first == last else f"layers {first}-{last}"
        n = last - first + 1
        table.add_row(name, f"{b / 1e9:.3f} GB" if n > 1 else "", f"{b * n:,}", f"{b * n / 1e9:.3f}")
    table.add_row("final norm + lm_head", "", f"{sizes.head_bytes:,}", f"{sizes.head_bytes / 1e9:.3f}")
    table.add_row("[bold]total", "", f"[bold]{sizes.total_bytes:,}", f"[bold]{sizes.total_bytes / 1e9:.1f}")
    console.print(table)


def cmd_inspect(args) -> None:
    title, sizes, _, _, unused = model_sizes(args)
    if args.json:
        print(json.dumps({"model": title, **sizes.to_json(), "unused_bytes": unused}))
        return
    print_sizes(title, sizes)
    for what, nbytes in unused.items():
        console.print(f"also in the files, never loaded: {what}, {nbytes:,} bytes", highlight=False)


def cmd_plan(args) -> None:
    from .planner import plan_partition, sizes_for_model

    title, report, config, itemsize, _ = model_sizes(args)
    sizes = sizes_for_model(report.layer_bytes, report.embed_bytes, report.head_bytes, config, itemsize)
    nodes = mac_nodes(args.node, args.wired_limit_mb)
    plan = plan_partition(sizes, nodes, context=args.context)
    by_name = {n.name: n for n in nodes}
    result = {
        "model": title, "feasible": plan.feasible, "total_bytes": report.total_bytes, "context": args.context,
        "nodes": [{"node": n.name, "total_bytes": n.total_bytes, "usable_bytes": n.usable_bytes} for n in nodes],
        "stages": [{"node": st.node, "start": st.start, "end": st.end, "weight_bytes": st.weight_bytes,
                    "kv_bytes": st.kv_bytes, "scratch_bytes": st.scratch_bytes, "usable_bytes": st.usable_bytes,
                    "free_bytes": st.free_bytes} for st in plan.stages],
        "advice": plan.advice,
    }
    if not plan.feasible:
        result["shortfall_bytes"] = plan.shortfall_bytes
        result["wired_limit_mb"] = plan.wired_limit_mb
    if args.json:
        print(json.dumps(result))
        return
    console.print(f"{title}: {format_bytes(report.total_bytes)} of weights, context {args.context:,} tokens")
    usable = sum(n.usable_bytes for n in nodes)
    console.print("Mac memory as Apple counts it (binary): "
                  + ", ".join(f"{n.name} {n.total_bytes / 2**30:g} GiB = {n.total_bytes:,} bytes" for n in nodes),
                  highlight=False)
    console.print(f"{len(nodes)} nodes, {format_bytes(usable)} usable"
                  + ("" if args.wired_limit_mb else " at the default GPU wired limit (75% of memory)"))
    if plan.feasible:
        table = Table(title="plan: fits", title_justify="left")
        for col in ("node", "memory", "usable", "layers", "weights", "KV", "scratch", "free"):
            table.add_column(col, justify="left" if col in ("node", "layers") else "right")
        for st in plan.stages:
            table.add_row(st.node, format_bytes(by_name[st.node].total_bytes), format_bytes(st.usable_bytes),
                          f"{st.start}-{st.end - 1}", format_bytes(st.weight_bytes), format_bytes(st.kv_bytes),
                          format_bytes(st.scratch_bytes), format_bytes(st.free_bytes))
        console.print(table)
    else:
        console.print(f"[bold red]does not fit[/]: {format_bytes(plan.shortfall_bytes)} missing")
    for line in plan.advice:
        console.print(f"- {line}", highlight=False)


def cmd_make_tiny(args) -> None:
    from mlx_kimi.tiny import TinyShape, make_tiny

    master = None
    if args.trained:
        from mlx_kimi.trained import load_trained

        if args.script is not None:
            raise ValueError("--script writes its own weights: give it without --trained")
        if args.layers is not None:
            raise ValueError("the trained model has its own shape: give --trained without --layers")
        master = load_trained()
    shape = TinyShape(layers=args.layers or TinyShape.layers)
    if args.layout:
        from mlx_kimi.layouts import MLX_LAYOUTS, write_layout

        if args.script is not None:
            raise ValueError("--script writes its own weights: give it without --layout")
        out = write_layout(args.dir, args.layout, shape, seed=args.seed, dtype=args.dtype or "bfloat16", master=master)
        if args.layout not in MLX_LAYOUTS:
            console.print(f"wrote {out}: Moonshot's official {args.layout} layout, which kimi-cluster runs after "
                          f"`kimi-cluster convert {out} OUT`")
            return
    elif args.script is not None:
        from mlx_kimi.scripted import make_scripted

        out = make_scripted(args.dir, args.script, shape, model_type=args.model_type, dtype=args.dtype or "float32")
    elif master is not None:  # the trained model unquantized, as trained
        out = make_tiny(args.dir, seed=args.seed, model_type=args.model_type, dtype=args.dtype or "float32",
                        scheme=None, tokenizer="tiktoken", master=master)
    else:
        out = make_tiny(args.dir, shape, seed=args.seed, model_type=args.model_type, dtype=args.dtype or "float32")
    checkpoint = open_checkpoint(out)
    console.print(
        f"wrote {out}: {checkpoint.num_layers} layers, {len(checkpoint.tensors)} tensors, "
        f"{checkpoint.sizes().total_bytes:,} bytes, model id {checkpoint.model_id[:16]}"
    )


def mac_nodes(totals: list, wired_limit_mb=None) -> list:
    """NodeCapacity of each Mac of `totals` bytes of memory, at macOS's default GPU wired limit or
    at `wired_limit_mb` (sudo sysctl iogpu.wired_limit_mb) on every one."""
    from .planner import NodeCapacity, mac_default_usable_bytes, usable_from_wired_limit_mb

    nodes = []
    for i, total in enumerate(totals, 1):
        usable = usable_from_wired_limit_mb(wired_limit_mb) if wired_limit_mb else mac_default_usable_bytes(total)
        nodes.append(NodeCapacity(f"mac{i}", usable, total_bytes=total,
                                  wired_limit_bytes=wired_limit_mb * 2**20 if wired_limit_mb else None))
    return nodes


def add_scheme_arguments(p) -> None:
    """How a built-in model is quantized: a named preset, or bits and group size."""
    p.add_argument("--preset", help="a published scheme by name: native-int4 (K2-Thinking/K2.5/K2.6 as released: "
                                    "experts INT4 group 32, rest bf16), 4bit (mlx-community uniform 4-bit), 3bit, "
                                    "experts2-rest4 (the default), experts2-rest8, experts3-rest6")
    p.add_argument("--expert-bits", type=int, help="routed-expert bits of a built-in model (default 2)")
    p.add_argument("--other-bits", type=int,
                   help="bits of every other weight of a built-in model (default 4; 16: unquantized bf16)")
    p.add_argument("--group-size", type=int, help="quantization group size of a built-in model: 32, 64 (default) "
                                                  "or 128")


def add_model_parsers(sub) -> None:
    p = sub.add_parser("inspect", help="exact bytes per layer of a checkpoint or a built-in model")
    p.add_argument("model", help=f"checkpoint directory, Hugging Face repo id in the local cache, or one of "
                                 f"{', '.join(BUILTIN_MODELS)}")
    add_scheme_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="what-if: would this model fit on these Macs, and how would it be split")
    p.add_argument("--model", required=True, help=f"checkpoint directory, Hugging Face repo id in the local cache, "
                                                  f"or one of {', '.join(BUILTIN_MODELS)}")
    add_scheme_arguments(p)
    p.add_argument("--node", type=mac_memory, action="append", required=True, metavar="SIZE",
                   help="a Mac with SIZE of unified memory, e.g. 192GB (repeat per Mac); GB and TB mean what "
                        "Apple means by them, GiB and TiB: a 192GB Mac has 192 x 2^30 bytes")
    p.add_argument("--wired-limit-mb", type=int, help="GPU wired limit set with sudo sysctl iogpu.wired_limit_mb")
    p.add_argument("--context", type=int, default=32768, help="tokens of KV cache to plan for (default 32768)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("make-tiny", help="write a tiny Kimi-architecture checkpoint for tests and demos")
    p.add_argument("dir", type=Path)
    p.add_argument("--layers", type=int, help="decoder layers of the random model (default 6)")
    p.add_argument("--trained", action="store_true",
                   help="the trained tiny Kimi shipped with kimi-cluster (mlx_kimi/trained/) instead of random "
                        "weights: unquantized, or in any --layout (an official one to start `convert` from)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-type", default="kimi_k25", choices=["kimi_k25", "deepseek_v3", "kimi_k2"])
    p.add_argument("--layout", metavar="NAME",
                   help="copy a published checkpoint's layout (config nesting, tensor names, dtypes, quantization, "
                        "tokenizer files), e.g. k2-instruct-4bit, k2-thinking, k2.5, k2-mixed_2_6, k2-mxfp4, or an "
                        "official one to convert, e.g. k2-instruct-fp8, k2.5-int4 (all: mlx_kimi/layouts.py)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of unquantized weights and activations (default float32, which runs fastest on "
                        "CPU; bfloat16 with --layout, as published)")
    p.add_argument("--script", metavar="TEXT",
                   help="weights whose greedy decoding, after TEXT's first token (e.g. <think>), emits the rest "
                        "of TEXT, then [EOS]; special tokens are written as text, e.g. "
                        "'<think>Hm.</think>Hi!<|im_end|>'")
    p.set_defaults(func=cmd_make_tiny)
