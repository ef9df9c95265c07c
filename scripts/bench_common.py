"""What the cluster benchmarks share (scripts/bench_pipeline.py, bench_hops.py, bench_streams.py):
the tiny checkpoint, loopback clusters of real node processes (tests/harness.py) that are all
killed when the script exits, pinning to cores, the prompts, the console and small statistics."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

import harness  # noqa: E402  (tests/harness.py)
from mlx_kimi.tiny import TinyShape, make_tiny  # noqa: E402

PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the cluster passes hidden states along.",
    "Pipeline parallel decoding sends one token's hidden state from each stage to the next.",
    "Once upon a time a small model ran on three processes that shared two cores.",
    "Mixture of experts layers route every token to a few experts and a shared expert.",
    "Latency per hop matters more than bandwidth when a single token crosses the wire.",
]

console = Console(width=max(Console().width, 140))


# ---- processes: every node process this script starts is killed when it exits ---------------

STARTED: list = []
PINNED_CORES: list = []  # free cores handed to node processes in turn (see pin_to_own_cores)


def pin_to_own_cores(processes: int) -> str:
    """Pin this process to one core and each node process started after it to another, where
    the machine has a core for each; returns what was done, for the report."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < processes + 1:
        return (f"{len(cores) or os.cpu_count()} cores for this process and {processes} stage processes: "
                "not pinned, they share the cores (figures measure the machinery, not separate Macs)")
    os.sched_setaffinity(0, {cores[0]})
    PINNED_CORES[:] = cores[1:]
    return f"pinned: this process (mlx-lm) to core {cores[0]}, each stage process to its own core of {cores[1:]}"


class _TrackingSubprocess:
    """Stands in for the subprocess module inside tests/harness.py so every node it starts is
    recorded here, including one that dies before LocalCluster returns, and pinned to a core of
    its own when pin_to_own_cores handed some out."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):
        if PINNED_CORES:  # set in the child before it runs anything, so all its threads inherit it
            core = PINNED_CORES[sum(p.poll() is None for p in STARTED) % len(PINNED_CORES)]
            kwargs["preexec_fn"] = lambda: os.sched_setaffinity(0, {core})
        proc = subprocess.Popen(*args, **kwargs)
        STARTED.append(proc)
        return proc


harness.subprocess = _TrackingSubprocess()


def stop_started_processes():
    live = [p for p in STARTED if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


# ---- statistics ------------------------------------------------------------------------------

def on_vm() -> bool:
    """Whether this machine says it runs under a hypervisor (Linux: the cpuinfo flag)."""
    try:
        return " hypervisor" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"
    except OSError:
        return "load average unknown"


def pct(values, q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def decode_rate(stamps: list) -> float:
    """tok/s over the N - 1 intervals between the first and the Nth token."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---- checkpoint and clusters -----------------------------------------------------------------

def make_checkpoint(work: Path, args) -> Path:
    shape = TinyShape(layers=args.layers, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      moe_intermediate_size=args.moe_intermediate, routed_experts=args.experts,
                      experts_per_token=args.experts_per_token, vocab_size=args.vocab)
    key = hashlib.sha256(json.dumps([repr(shape), args.dtype, args.seed]).encode()).hexdigest()[:12]
    out = work / f"checkpoint-{key}"
    if not (out / "tiny_shape.json").exists():  # make_tiny writes it last
        shutil.rmtree(out, ignore_errors=True)
        make_tiny(out, shape, seed=args.seed, model_type="kimi_k25", dtype=args.dtype)
    return out


def plan_text(cluster) -> str:
    m = cluster.memory_map()
    stages = sorted((e.start, e.end, e.name) for e in m.nodes if e.has_layers)
    return " > ".join(f"{name}[{start},{end})" for start, end, name in stages)


def start_cluster(stack: ExitStack, workdir: Path, model_dir: Path, stages: int):
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cluster = stack.enter_context(harness.LocalCluster(workdir, model_dir, stages=stages))
    stack.callback(cluster.channel.close)
    m = cluster.memory_map()
    used = [e for e in m.nodes if e.has_layers]
    if len(used) != stages:
        raise RuntimeError(f"the planner used {len(used)} of {stages} nodes: {plan_text(cluster)}")
    return cluster, time.perf_counter() - started

