"""`kimi-cluster convert`: official Kimi weights -> an MLX checkpoint sized for the cluster."""

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .cli_args import mac_memory, size
from .model_cli import mac_nodes
from .units import format_bytes

console = Console()


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert Moonshot's official weights (FP8, INT4 or bf16) to an MLX checkpoint")
    p.add_argument("src", help="official checkpoint directory, a repo id already in the Hugging Face cache, a GGUF "
                               "file (or the first of a split set), or (with --dry-run) a built-in model: kimi-k2, "
                               "kimi-k2.5, kimi-k2.6")
    p.add_argument("out", type=Path, nargs="?", help="output directory (a conversion interrupted there resumes)")
    p.add_argument("--expert-bits", type=int, default=2, help="routed-expert bits (default 2)")
    p.add_argument("--other-bits", type=int, default=4, help="bits of every other linear (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--recipe", metavar="NAME", help="one of mlx-lm's mixed recipes: mixed_2_6, mixed_3_4, ...")
    p.add_argument("--fit", metavar="NxSIZE",
                   help="choose bits per module to fit these Macs with the KV cache for --context, e.g. 2x192GB "
                        "(or 192GB+128GB)")
    p.add_argument("--wired-limit-mb", type=int,
                   help="with --fit: the GPU wired limit set on every Mac (default: macOS's 75%% of memory)")
    p.add_argument("--budget", type=size, help="choose bits per module so the weights take at most this, e.g. 350GB")
    p.add_argument("--context", type=int, default=32768, help="with --fit: tokens of KV cache to leave room for")
    p.add_argument("--calibrate", action="store_true",
                   help="correct rounding errors while quantizing (GPTQ), each module's Hessian from the calibration "
                        "tokens that reach it, streamed one layer at a time (any size of model)")
    p.add_argument("--calibration-text", type=Path, metavar="FILE",
                   help="text to calibrate on (default: built in: code, prose, Chinese, a chat with tools and thinking)")
    p.add_argument("--calibration-tokens", type=int, default=1024,
                   help="tokens of the calibration set streamed through the layers (default 1024)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="with a GGUF source: the directory holding Kimi's tokenizer files (the official checkpoint's)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of unquantized weights, scales and biases (default bfloat16)")
    p.add_argument("--dry-run", action="store_true", help="print the recipe and predicted size only")
    p.set_defaults(func=cmd_convert)


def parse_fit(text: str) -> list:
    """"2x192GB" or "192GB+128GB" -> the Macs' memory in bytes, GB as Apple means it (as `plan --node`)."""
    sizes = []
    for term in text.split("+"):
        count, _, each = term.strip().rpartition("x")
        if count and not count.isdigit():
            raise ValueError(f"--fit {text!r}: write the Macs as COUNTxSIZE, e.g. 2x192GB, joined by +")
        try:
            sizes += [mac_memory(each)] * (int(count) if count else 1)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--fit {text!r}: {e}") from None
    return sizes


def resolve_source(src: str) -> Path:
    from mlx_kimi.hub import resolve_model_dir

    try:
        return resolve_model_dir(src)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def _recipe(args, config):
    from mlx_kimi.recipe import fixed_recipe, mlx_lm_recipe

    if args.recipe:
        return args.recipe, mlx_lm_recipe(args.recipe, config, args.group_size)
    scheme = f"experts {args.expert_bits}-bit, rest {args.other_bits}-bit, group {args.group_size}"
    return scheme, fixed_recipe(args.expert_bits, args.other_bits, args.group_size)


def print_recipe(title: str, parts: dict, dtype) -> int:
    from mlx_kimi.convert import shard_bytes
    from mlx_kimi.recipe import bits_histogram

    sizes = {p: shard_bytes(t, dtype) for p, t in parts.items()}
    total = sum(sizes.values())
    table = Table(title=title, title_justify="left")
    for column in ("part", "bits (parameters)", "GB"):
        table.add_column(column)
    for part in ["embed"] + sorted(p for p in parts if isinstance(p, int)) + ["head"]:
        hist = bits_histogram(parts[part])
        label = {"embed": "embedding", "head": "final norm + lm_head"}.get(part, f"layer {part}")
        table.add_row(label, ", ".join(f"{k} ({v:,})" for k, v in hist.items()), f"{sizes[part] / 1e9:.3f}")
    table.add_row("[bold]total", "", f"[bold]{total / 1e9:.3f}")
    console.print(table)
    return total


def part_sizes(parts: dict, dtype):
    from mlx_kimi.checkpoint import SizeReport
    from mlx_kimi.convert import shard_bytes

    layers = sorted(p for p in parts if isinstance(p, int))
    return SizeReport([shard_bytes(parts[i], dtype) for i in layers], shard_bytes(parts["embed"], dtype),
                      shard_bytes(parts["head"], dtype))


def fit_to_cluster(parts: dict, config: dict, nodes: list, context: int, dtype, errors):
    """The best --fit recipe whose shards the planner places on `nodes` with `context` tokens of
    KV cache: start from all usable memory less KV and scratch, and shrink the budget by what
    the planner says is missing until it fits."""
    from mlx_kimi.checkpoint import text_config
    from mlx_kimi.recipe import apply_choice, fit

    from .planner import kv_cache_bytes, plan_partition, prefill_scratch_bytes, sizes_for_model

    def model_sizes(report):
        return sizes_for_model(report.layer_bytes, report.embed_bytes, report.head_bytes, text_config(config))

    probe = model_sizes(part_sizes(parts, dtype))
    budget = (sum(n.usable_bytes for n in nodes) - kv_cache_bytes(probe, probe.num_layers, context)
              - len(nodes) * prefill_scratch_bytes(probe, context, 2048))
    for _ in range(50):
        try:
            result = fit(parts, budget, dtype, errors)
        except ValueError as e:
            raise ValueError(f"{e} (usable memory less KV cache and prefill scratch for {context:,} tokens); "
                             "raise the GPU wired limit (--wired-limit-mb N, set on every Mac with "
                             "`sudo sysctl iogpu.wired_limit_mb=N`), add a Mac, or lower --context") from None
        plan = plan_partition(model_sizes(part_sizes(apply_choice(parts, result.choice), dtype)), nodes, context)
        if plan.feasible:
            return result, plan
        budget -= max(plan.shortfall_bytes, budget // 200)
    raise ValueError("no recipe fits these Macs; add a Mac, raise the wired limit, or lower --context")


def streamed_calibration(source, args, scratch: Path):
    """The calibration set and the streamed pass over `source` (None, with a note, when the source has no
    tokenizer to encode it with and --calibrate was not asked)."""
    from mlx_kimi.calibrate import Calibration
    from mlx_kimi.calibration_set import calibration_ids, has_tokenizer
    from mlx_kimi.convert import CALIBRATION_DIR

    if not has_tokenizer(source.path):
        if args.calibrate:
            raise ValueError(f"{source.path}: no tokenizer files (tiktoken.model, tokenizer_config.json) to encode the "
                             "calibration set with; copy them from the official checkpoint")
        console.print(f"[bold yellow]note:[/] {source.path} holds no tokenizer: no quality card, and --fit falls back "
                      "to each module's weight error")
        return None
    ids = calibration_ids(source.path, args.calibration_tokens, args.calibration_text)
    return Calibration(source, ids, (args.out or scratch) / CALIBRATION_DIR, gptq=args.calibrate)


def print_card(card: dict) -> None:
    """The quality card as a table, one row per part and module kind; unrouted experts and those rounded to
    nearest for want of tokens below it."""
    from mlx_kimi.quality_card import CARD_FILE, card_rows

    calibration = card["calibration"]
    table = Table(title=f"quality card ({CARD_FILE}): relative output error against the master on the same "
                        f"{calibration['tokens']} calibration tokens{', GPTQ' if calibration['gptq'] else ''}",
                  title_justify="left")
    for column in ("part", "module kind", "bits", "relative error"):
        table.add_column(column)
    notes = []
    for part, kind, bits, error, note in card_rows(card):
        table.add_row(part, kind, bits, f"{error:.4f}")
        if note:
            notes.append(f"{part} experts: {note}")
    console.print(table)
    for note in notes:
        console.print(note)


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="KL divergence of B's next-token distribution against A's, and perplexities")
    p.add_argument("a", type=Path, help="the reference checkpoint (e.g. bf16 or a higher-bit conversion)")
    p.add_argument("b", type=Path, help="the checkpoint to judge (same model)")
    p.add_argument("--text", type=Path, metavar="FILE", help="text to evaluate on (default: built in)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens of the text to use (default 512)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> None:
    import json

    from mlx_kimi.quality import DEFAULT_TEXT, compare_checkpoints

    text = args.text.read_text() if args.text else DEFAULT_TEXT
    result = compare_checkpoints(args.a, args.b, text, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(result.to_json()))
        return
    console.print(f"{result.tokens} tokens: KL(A||B) mean {result.kl_mean:.4f}, p95 {result.kl_p95:.4f}; "
                  f"perplexity A {result.perplexity_a:.3f}, B {result.perplexity_b:.3f}")


def no_fewer_bits(errors, source):
    """A GGUF source's candidates: none below the bits a module had."""
    from mlx_kimi.gguf_source import at_least_source_bits

    floor = at_least_source_bits(lambda name, module: {"bits": 2, "group_size": 64}, source)

    def allowed(target):
        least = floor(target.module, None)
        return {c: e for c, e in errors(target).items()
                if c is None or (least and c[0] >= least["bits"])}

    return allowed


def cmd_convert(args) -> None:
    from mlx_kimi.builtin import BUILTIN_MODELS
    from mlx_kimi.convert import open_source
    from mlx_kimi.gguf_source import open_gguf

    if args.out is None and not args.dry_run:
        raise ValueError("convert needs an output directory (or --dry-run)")
    if args.src in BUILTIN_MODELS:
        if not args.dry_run:
            raise ValueError(f"{args.src} is a built-in description without weights: add --dry-run, or give "
                             "the directory of the official checkpoint")
        source, config, title = None, BUILTIN_MODELS[args.src], args.src
    elif args.src.endswith(".gguf"):
        if args.tokenizer is None:
            raise ValueError("a GGUF holds no Kimi tokenizer files: add --tokenizer DIR (the official checkpoint's "
                             "tiktoken.model, tokenizer_config.json, ...)")
        source = open_gguf(Path(args.src).expanduser(), args.tokenizer)
        config, title = source.config, Path(args.src).name
        console.print("[bold yellow]note:[/] a GGUF is already quantized; converting it quantizes a second time, "
                      "which loses more quality than converting the official weights (see the README)")
    else:
        source = open_source(resolve_source(args.src))
        config, title = source.config, source.path.name
    with tempfile.TemporaryDirectory(prefix="kimi-calibration-") as scratch:
        calibration = streamed_calibration(source, args, Path(scratch)) if source is not None else None
        _convert(args, source, config, title, calibration)


def _convert(args, source, config, title, calibration) -> None:
    from mlx_kimi.convert import OUTPUT_DTYPES, check_source, convert, plan_targets
    from mlx_kimi.gguf_source import at_least_source_bits
    from mlx_kimi.recipe import apply_choice, fit, measured_errors, synthetic_errors, weighted_errors

    dtype = OUTPUT_DTYPES[args.dtype]
    if source is not None:
        check_source(source, plan_targets(config, lambda name, module: False))
    if args.fit or args.budget:
        parts = plan_targets(config, lambda name, module: False)
        if source is None:
            table = synthetic_errors()
            errors = weighted_errors(lambda target: table, parts)
        elif calibration is None:
            errors = weighted_errors(lambda target: measured_errors(source, target), parts)
        else:
            console.print("measuring each module's effect on its layer's output and each block's on the model's "
                          f"output: {calibration.ids.size} calibration tokens streamed through {len(parts) - 2} layers")
            table = calibration.measure(parts, dtype)
            errors = lambda target: table[target.module]  # noqa: E731
        if args.src.endswith(".gguf"):
            errors = no_fewer_bits(errors, source)
        if args.fit:
            nodes = mac_nodes(parse_fit(args.fit), args.wired_limit_mb)
            result, plan = fit_to_cluster(parts, config, nodes, args.context, dtype, errors)
        else:
            result, plan = fit(parts, args.budget, dtype, errors), None
        parts, name = apply_choice(parts, result.choice), f"fit: measured error {result.error:.4g}"
        recipe = result.recipe
    else:
        name, recipe = _recipe(args, config)
        if args.src.endswith(".gguf"):
            recipe = at_least_source_bits(recipe, source)
        parts, plan = plan_targets(config, recipe), None
    total = print_recipe(f"{title} -> {args.out} ({name}, {args.dtype})", parts, dtype)
    console.print(f"predicted size: {total:,} bytes ({format_bytes(total)})")
    if plan is not None:
        wired = f"iogpu.wired_limit_mb={args.wired_limit_mb}" if args.wired_limit_mb else "the default wired limit (75%)"
        console.print(f"fits {args.fit} at {wired} with {args.context:,} tokens of context:")
        for st in plan.stages:
            console.print(f"  {st.node}: layers {st.start}-{st.end - 1}, weights {format_bytes(st.weight_bytes)}, "
                          f"KV {format_bytes(st.kv_bytes)}, scratch {format_bytes(st.scratch_bytes)}, "
                          f"free {format_bytes(st.free_bytes)}")
    if args.dry_run:
        return
    start = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[shards]}"), console=console, transient=False) as bar:
        task = bar.add_task("converting", total=total, shards="")
        count = {"done": 0}

        def progress(event, part, file, nbytes):
            if event == "bytes":
                bar.advance(task, nbytes)
                return
            count["done"] += 1
            if event == "skip":
                bar.advance(task, nbytes)
            bar.update(task, shards=f"{count['done']}/{len(parts)} shards ({file}{' kept' if event == 'skip' else ''})")

        report = convert(source, args.out, recipe, dtype=args.dtype, progress=progress, calibration=calibration)
    console.print(f"wrote {report.out}: {len(report.written)} shards written, {len(report.reused)} kept from an "
                  f"earlier run, {report.total_bytes:,} bytes in {time.monotonic() - start:.1f} s, "
                  f"model id {report.model_id[:16]}")
    print_summary(parts, dtype)
    if report.card:
        print_card(report.card)


def print_summary(parts: dict, dtype) -> None:
    """Size per part and the bits histogram of the whole model."""
    from mlx_kimi.recipe import bits_histogram

    sizes = part_sizes(parts, dtype)
    layers = sizes.layer_bytes
    console.print(f"embedding {format_bytes(sizes.embed_bytes)}, layers 0-{len(layers) - 1} "
                  f"{format_bytes(sum(layers))} ({format_bytes(min(layers))} to {format_bytes(max(layers))} each), "
                  f"norm + head {format_bytes(sizes.head_bytes)}")
    hist = bits_histogram([t for targets in parts.values() for t in targets])
    count = sum(hist.values())
    console.print("bits: " + ", ".join(f"{k} {v / count:.1%}" for k, v in hist.items())
                  + f"; {8 * sizes.total_bytes / count:.2f} bits per parameter overall")
