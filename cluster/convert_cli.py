"""`kimi-cluster convert`: official Kimi weights -> an MLX checkpoint sized for the cluster."""

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console()


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert Moonshot's official weights (FP8, INT4 or bf16) to an MLX checkpoint")
    p.add_argument("src", help="official checkpoint directory, or a repo id already in the Hugging Face cache")
    p.add_argument("out", type=Path, help="output directory (a conversion interrupted there resumes)")
    p.add_argument("--expert-bits", type=int, default=2, help="routed-expert bits (default 2)")
    p.add_argument("--other-bits", type=int, default=4, help="bits of every other linear (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--recipe", metavar="NAME", help="one of mlx-lm's mixed recipes: mixed_2_6, mixed_3_4, ...")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of unquantized weights, scales and biases (default bfloat16)")
    p.add_argument("--dry-run", action="store_true", help="print the recipe and predicted size only")
    p.set_defaults(func=cmd_convert)


def resolve_source(src: str) -> Path:
    path = Path(src).expanduser()
    if path.exists() or "/" not in src or src.startswith((".", "/", "~")):
        return path
    from mlx_lm.utils import hf_repo_to_path

    try:
        return hf_repo_to_path(src)
    except Exception as e:  # huggingface_hub raises several kinds when the repo is not cached
        raise ValueError(f"{src}: not a directory, and not a repo in the local Hugging Face cache ({e}); "
                         "download it first (kimi-cluster never downloads weights)") from e


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


def cmd_convert(args) -> None:
    from mlx_kimi.convert import OUTPUT_DTYPES, check_source, convert, open_source, plan_targets

    source = open_source(resolve_source(args.src))
    name, recipe = _recipe(args, source.config)
    parts = plan_targets(source, recipe)
    check_source(source, parts)
    total = print_recipe(f"{source.path.name} -> {args.out} ({name}, {args.dtype})", parts, OUTPUT_DTYPES[args.dtype])
    console.print(f"predicted size: {total:,} bytes ({total / 1e9:.2f} GB)")
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

        report = convert(source.path, args.out, recipe, dtype=args.dtype, progress=progress)
    console.print(f"wrote {report.out}: {len(report.written)} shards written, {len(report.reused)} kept from an "
                  f"earlier run, {report.total_bytes:,} bytes in {time.monotonic() - start:.1f} s, "
                  f"model id {report.model_id[:16]}")
