"""The text the trained tiny Kimi (mlx_kimi/trained/) learned from, and its fixed held-out split.

Text every machine with Python has: the standard library's sources (docstrings, comments and code)
and prose where the system has it (the license texts under /usr/share/common-licenses). pydoc's pages
are left out: they print sets in hash order and objects with their addresses, so they differ from one
run to the next. A document is held out by a hash of its name, so the split does not move when a
Python version adds or drops files.
"""

import sysconfig
import zlib
from pathlib import Path

HELD_OUT_ONE_IN = 20
LICENSE_DIR = Path("/usr/share/common-licenses")
# Generated tables, vendored tests and GUI demos: text nobody writes, or that would crowd out the rest.
_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
                 "encodings", "__pycache__", "ensurepip", "pydoc_data"}


def stdlib_sources() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not _SKIPPED_DIRS & set(p.relative_to(root).parts[:-1])
                   and not any(part.startswith("config-") for part in p.parts))
    return [(f"stdlib/{p.relative_to(root)}", p.read_text(errors="replace")) for p in files]


def license_texts() -> list[tuple[str, str]]:
    if not LICENSE_DIR.is_dir():
        return []
    return [(f"licenses/{p.name}", p.read_text(errors="replace"))
            for p in sorted(LICENSE_DIR.iterdir()) if p.is_file() and not p.is_symlink()]


def documents() -> list[tuple[str, str]]:
    """(name, text) of every document, in a fixed order."""
    return stdlib_sources() + license_texts()


def is_held_out(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELD_OUT_ONE_IN == 0


def split(docs: list) -> tuple[list, list]:
    """(training documents, held-out documents)."""
    return [d for d in docs if not is_held_out(d[0])], [d for d in docs if is_held_out(d[0])]


def joined(docs: list) -> str:
    return "\n\n".join(text for _, text in docs)


def held_out_text(max_chars: int = None) -> str:
    """The held-out documents (all, or their first `max_chars` characters)."""
    text = joined(split(documents())[1])
    return text if max_chars is None else text[:max_chars]
