"""Where weights come from: `kimi-cluster download` (only the shards a node's layers need, from the
Hugging Face hub) and `kimi-cluster cache list|prune` (the slices a node received from its peers)."""

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mlx_kimi.checkpoint import INDEX_FILE, shards_for_slice
from mlx_kimi.slice_cache import SliceCache

from .units import format_bytes

console = Console()

# What a slice needs besides its shards: config, index, tokenizer and chat template (mlx-lm's
# allow-list without the weights).
METADATA_PATTERNS = ["*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl",
                     "*.jinja"]
ALL_WEIGHTS = "model*.safetensors"


def download_patterns(repo: str, layers: tuple | None, local_dir=None, offline: bool = False) -> list:
    """The allow_patterns of the snapshot_download that fetches `repo`, or only the shards holding
    `layers` (start, end) as the repo's index says (read from the hub, or the local cache if offline)."""
    if layers is None:
        return METADATA_PATTERNS + [ALL_WEIGHTS]
    from huggingface_hub import hf_hub_download

    def fetch(name):
        return json.loads(Path(hf_hub_download(repo, name, local_dir=local_dir, local_files_only=offline)).read_text())

    config = fetch("config.json")
    weight_map = fetch(INDEX_FILE)["weight_map"]
    start, end = layers
    shards = shards_for_slice(weight_map, config, start, end)
    if not shards:
        raise ValueError(f"{repo}: no shard holds layers {start}-{end - 1}; the model has "
                         f"{len(set(weight_map.values()))} shards: check --layers")
    print(f"layers {start}-{end - 1} of {repo} are in {len(shards)} of its {len(set(weight_map.values()))} "
          f"shards: {', '.join(shards)}", flush=True)
    return METADATA_PATTERNS + shards


def download(repo: str, layers: tuple | None = None, local_dir=None, offline: bool = False) -> Path:
    """Download `repo` (only the shards `layers` need, when given) with huggingface_hub: resumable
    (a cut download continues from its .incomplete file) and with its progress bars."""
    from huggingface_hub import snapshot_download

    patterns = download_patterns(repo, layers, local_dir, offline)
    path = Path(snapshot_download(repo, allow_patterns=patterns, local_dir=local_dir, local_files_only=offline))
    if missing := [p for p in patterns if p not in METADATA_PATTERNS + [ALL_WEIGHTS] and not (path / p).exists()]:
        raise FileNotFoundError(f"{path}: {', '.join(missing)} missing after the download; run it again to resume")
    return path


def _layers(text: str) -> tuple:
    try:
        first, last = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"--layers {text!r}: write FIRST-LAST, e.g. 0-30") from None
    if not 0 <= first <= last:
        raise ValueError(f"--layers {text!r}: FIRST must be >= 0 and <= LAST")
    return first, last + 1


def cmd_download(args) -> None:
    try:
        path = download(args.repo, _layers(args.layers) if args.layers else None, args.local_dir)
    except OSError as e:  # huggingface_hub's network and not-found errors are OSErrors
        raise ValueError(f"downloading {args.repo} failed: {e}; run the same command again to resume") from e
    print(f"{args.repo} (layers {args.layers}) is in {path}" if args.layers else
          f"{args.repo} is in {path}: `kimi-cluster up --model {path}` (coordinator) or --model-dir {path} (worker)",
          flush=True)


def _cache(args) -> SliceCache:
    from .auth import config_dir

    return SliceCache(args.cache_dir or config_dir() / "cache")


def cmd_cache_list(args) -> None:
    cache = _cache(args)
    models = cache.models()
    if args.json:
        print(json.dumps([{"model_id": m.model_id, "model": m.model_name, "path": str(m.path), "parts": m.parts,
                           "bytes": m.bytes} for m in models], indent=2))
        return
    if not models:
        console.print(f"no slices in {cache.root}", highlight=False)
        return
    table = Table(title=f"slices received, in {cache.root}", title_justify="left")
    for col in ("model", "id", "parts", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for m in models:
        table.add_row(m.model_name, m.model_id[:16], ", ".join(m.parts) or "-", format_bytes(m.bytes))
    console.print(table)


def cmd_cache_prune(args) -> None:
    cache = _cache(args)
    gone = cache.prune(args.keep)
    for m in gone:
        console.print(f"deleted {m.model_name} ({m.model_id[:16]}): {format_bytes(m.bytes)}", highlight=False)
    if not gone:
        console.print(f"nothing to delete in {cache.root}", highlight=False)


def add_weights_parsers(sub) -> None:
    p = sub.add_parser("download", help="download a model from the Hugging Face hub (only some layers' shards "
                                        "with --layers)")
    p.add_argument("repo", help="repo id, e.g. mlx-community/Kimi-K2-Instruct-4bit")
    p.add_argument("--layers", metavar="FIRST-LAST", help="only the shards holding these layers (the index says "
                   "which), e.g. the layers `kimi-cluster plan` gives this Mac")
    p.add_argument("--local-dir", type=Path, help="download into this directory instead of the Hugging Face cache")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("cache", help="the slices this machine received from its peers")
    actions = p.add_subparsers(dest="action", required=True)
    for name, func, what in (("list", cmd_cache_list, "list cached slices"),
                             ("prune", cmd_cache_prune, "delete cached slices (all but --keep)")):
        a = actions.add_parser(name, help=what)
        a.add_argument("--cache-dir", type=Path, help="the cache (default: the cache folder beside the cluster secret)")
        if name == "list":
            a.add_argument("--json", action="store_true", help="print JSON")
        else:
            a.add_argument("--keep", action="append", default=[], metavar="MODEL_ID",
                           help="keep this model (its id or a prefix of it, as `cache list` shows; repeat)")
        a.set_defaults(func=func)
