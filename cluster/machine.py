"""What this machine offers: backend, chip, physical memory and what a node may use of it."""

import os
import platform
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .auth import config_dir
from .units import format_bytes

# Left to the OS and other programs on top of what the GPU may wire (or what is free on Linux).
USABLE_RESERVE_BYTES = 2 * 10**9

# Unified memory bandwidth of the Macs in the facts sheet, by chip (bytes/s). The M4 Max comes in
# two: 14 CPU cores 410 GB/s, 16 cores 546 GB/s. Other chips are left unknown rather than guessed.
MAC_BANDWIDTH_BYTES_PER_S = {"Apple M2 Ultra": 800 * 10**9, "Apple M3 Ultra": 819 * 10**9}
M4_MAX_BANDWIDTH_BYTES_PER_S = {14: 410 * 10**9, 16: 546 * 10**9}


@dataclass(frozen=True)
class Machine:
    backend: str  # metal, cuda or cpu
    chip: str
    total_bytes: int
    usable_bytes: int
    wired_limit_bytes: int | None  # Apple GPU working-set limit, when known
    bandwidth_bytes_per_s: int | None = None  # memory bandwidth, when the chip is a known one


def memory_bandwidth(chip: str, cpu_cores: int | None) -> int | None:
    """A known Mac's memory bandwidth; None for any other chip (the planner then balances bytes)."""
    if chip == "Apple M4 Max":
        return M4_MAX_BANDWIDTH_BYTES_PER_S.get(cpu_cores)
    return MAC_BANDWIDTH_BYTES_PER_S.get(chip)


def _backend() -> str:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def _meminfo() -> dict:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _chip() -> str:
    if platform.system() == "Darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(memory_override: int | None = None) -> Machine:
    """Usable memory: the GPU wired limit minus a reserve on Apple Silicon, available RAM minus a
    reserve elsewhere, or exactly `memory_override` (--memory)."""
    info = mx.device_info()
    wired = info.get("max_recommended_working_set_size")
    meminfo = _meminfo()
    total = info.get("memory_size") or meminfo.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf(
        "SC_PHYS_PAGES"
    )
    if memory_override is not None and memory_override > total:
        raise ValueError(f"--memory {format_bytes(memory_override)} is more than this machine has "
                         f"({format_bytes(int(total))}); give at most that, or leave --memory out")
    if memory_override is not None:
        usable = memory_override
    elif wired:
        usable = max(0, wired - USABLE_RESERVE_BYTES)
    else:
        usable = max(0, meminfo.get("MemAvailable", total) - USABLE_RESERVE_BYTES)
    chip = _chip()
    return Machine(_backend(), chip, int(total), int(usable), int(wired) if wired else None,
                   memory_bandwidth(chip, os.cpu_count()))


def node_id(name: str) -> str:
    """Stable across restarts: a per-machine id kept in the config dir, plus the node's name."""
    path = config_dir() / "machine-id"
    try:
        machine = path.read_text().strip()
    except OSError:
        machine = uuid.uuid4().hex[:12]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(machine + "\n")
    return f"{machine}-{name}"
