"""What the `kimi-cluster` commands share: argument types (sizes, a Mac's memory, counts), the
console they print to, and the error exit for bad input."""

import argparse
import sys

from rich.console import Console

from .units import parse_size

# Rich assumes 80 columns when stdout is not a terminal; tables of nodes need more.
console = Console(width=None if sys.stdout.isatty() else 140)
SECRET_HELP = "file holding the cluster secret (default: $KIMI_CLUSTER_SECRET or the config dir)"


def fail(message: str, code: int = 2):
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(code)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def size(text: str) -> int:
    """Bytes from "500MB", "1.5GiB", "4096" (units.parse_size), as an argument type."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def mac_memory(text: str) -> int:
    """A Mac's unified memory: "192GB" is Apple's 192 GiB (and TB is TiB); KiB/MiB/GiB as written."""
    text = text.strip()
    if text[-2:].lower() in ("gb", "tb") and text[-3:-2].lower() != "i":
        text = text[:-2].rstrip() + text[-2].upper() + "iB"
    return size(text)


def memory(text: str) -> int:
    """Memory a node may use: a size that must carry its unit (GB and GiB differ by 7%)."""
    if text.strip().replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} has no unit: write e.g. {text.strip()}GB (10^9 bytes) or "
                                         f"{text.strip()}GiB (2^30 bytes)")
    return size(text)

