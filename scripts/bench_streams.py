#!/usr/bin/env python3
"""Many requests at once: aggregate decode tok/s of concurrent streams on 1, 2 and 3 stages, and
the time to the first token of a long prompt against single-process mlx-lm, in one run.

    python scripts/bench_streams.py            # 1/2/4/8 streams, 1,024- and 4,096-token prompts
    python scripts/bench_streams.py --quick    # 1/2/4 streams, 256-token prompt

Same tiny checkpoint as bench_pipeline.py (bench_common.py's make_checkpoint, start_cluster). For each
cluster size, `streams` Generate calls run at once (greedy, --tokens each); the aggregate rate is
every token after each stream's first, over the span from the earliest first token to the latest
last one. Ratios are against one stream on the same cluster. TTFT is the coordinator's DoneEvent
ttft_s (prefill and the first token) against mlx-lm's generate_step to its first token, same
prompt, same machine. Where the machine has a core for this process and one for each stage, each
is pinned to its own (mlx-lm runs on one core, as each stage does); with fewer cores they share
them and the figures measure the machinery, not a multi-Mac result (the script says so). The
issue's targets are printed as ratios against what was measured, met or not. Last, in this
process: one batched decode step of 8 sessions at 1,024 positions and the share of it spent
merging and extracting their KV caches (mlx_kimi/batch.py; it prefills the 8 sessions first).
"""

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (sets up sys.path for cluster/ and tests/)

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from rich.table import Table  # noqa: E402

from mlx_lm.models.cache import BatchKVCache  # noqa: E402

from cluster.client import read_reply  # noqa: E402
from cluster.generated import kimi_cluster_pb2 as pb  # noqa: E402
from mlx_kimi.batch import forward_rows  # noqa: E402
from mlx_kimi.checkpoint import open_checkpoint  # noqa: E402
from mlx_kimi.slice import LayerRange, load_slice  # noqa: E402


def concurrent_decode(cluster, prompts: list, n: int) -> float:
    """Aggregate decode tok/s of len(prompts) streams at once."""
    firsts, lasts, counts = [], [], []

    def one(prompt):
        stamps = []
        request = pb.GenerateRequest(prompt_tokens=prompt, max_tokens=n, sampling=pb.SamplingParams())
        read_reply(cluster.client.Generate(request, timeout=1200),
                   lambda token: token.id >= 0 and stamps.append(time.perf_counter()))
        if len(stamps) >= 2:
            firsts.append(stamps[0]), lasts.append(stamps[-1]), counts.append(len(stamps) - 1)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (max(lasts) - min(firsts)) if counts else float("nan")


def cluster_ttft(cluster, prompt: list) -> float:
    request = pb.GenerateRequest(prompt_tokens=prompt, max_tokens=1, sampling=pb.SamplingParams())
    return read_reply(cluster.client.Generate(request, timeout=1200)).done.ttft_s


def mlx_ttft(model, prompt: list) -> float:
    started = time.perf_counter()
    next(generate_step(mx.array(prompt), model, max_tokens=1))
    return time.perf_counter() - started


def batch_copy_cost(model_dir: Path, sessions: int = 8, positions: int = 1024) -> tuple:
    """(ms of one batched decode step of `sessions` sessions at `positions` each, ms of its merge and
    extract copies alone): what mlx_kimi/batch.py pays for batching with mlx-lm's BatchKVCache."""
    checkpoint = open_checkpoint(model_dir)
    whole = load_slice(checkpoint, LayerRange(0, checkpoint.num_layers))
    caches = []
    for _ in range(sessions):
        c = whole.make_caches()
        mx.eval(whole.forward(mx.random.randint(0, 256, (1, positions)), c), [x.state for x in c])
        caches.append(c)
    x = [mx.array([[1]]) for _ in range(sessions)]

    def step():
        mx.eval(forward_rows(whole, x, caches), [[c.state for c in s] for s in caches])
        for s in caches:
            for c in s:
                c.trim(1)

    def copies():
        merged = [BatchKVCache.merge(list(layer)) for layer in zip(*caches)]
        mx.eval([m.keys for m in merged])
        mx.eval([[m.extract(i).state for m in merged] for i in range(sessions)])

    def ms(fn, n=5):
        fn()
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - started) / n * 1e3

    return ms(step), ms(copies)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1/2/4 streams and a 256-token prompt")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per stream (default 32)")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=None,
                   help="long-prompt lengths for TTFT (default 1024 4096; 256 with --quick)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--streams", type=int, nargs="+", default=None,
                   help="concurrent stream counts, the first is the ratios' base (default 1 2 4 8; 1 2 4 with --quick)")
    args = p.parse_args()
    streams = args.streams or ([1, 2, 4] if args.quick else [1, 2, 4, 8])
    lengths = args.prompt_tokens or ([256] if args.quick else [1024, 4096])
    shape = argparse.Namespace(layers=20, hidden=256, intermediate=512, moe_intermediate=128, experts=16,
                               experts_per_token=4, vocab=512, dtype="float32", seed=0)
    pinning = bc.pin_to_own_cores(max(args.stages))
    with ExitStack() as stack:
        stack.callback(bc.stop_started_processes)
        work = Path(tempfile.mkdtemp(prefix="bench_streams-"))
        stack.callback(shutil.rmtree, work, True)
        model_dir = bc.make_checkpoint(work, shape)
        model, tokenizer = mlx_lm.load(str(model_dir))
        rng = random.Random(0)
        short = [list(tokenizer.encode(text)) for text in bc.PROMPTS]
        prompts = [short[i % len(short)] for i in range(max(streams))]
        long_prompts = {n: [rng.randrange(256, shape.vocab) for _ in range(n)] for n in lengths}
        mlx_ttft(model, short[0])  # warm-up (compiles, first allocations), as each cluster gets one
        mlx_first = {n: mlx_ttft(model, prompt) for n, prompt in long_prompts.items()}
        bc.console.print(pinning)
        table = Table(title=f"aggregate decode tok/s ({args.tokens} tokens per stream) and TTFT; {bc.load_average()}")
        table.add_column("")
        for s in streams:
            table.add_column(f"{s} stream{'s' * (s > 1)}", justify="right")
        for n in lengths:
            table.add_column(f"TTFT {n} tokens", justify="right")
        table.add_row("mlx-lm, one process", *[""] * len(streams), *[f"{mlx_first[n]:.2f} s" for n in lengths])
        measured = {}  # stages -> (rates by streams, ttft by prompt length)
        for stages in args.stages:
            with ExitStack() as inner:
                cluster, _ = bc.start_cluster(inner, work / f"s{stages}", model_dir, stages)
                concurrent_decode(cluster, prompts[:1], 4)  # warm-up
                rates = [concurrent_decode(cluster, prompts[:s], args.tokens) for s in streams]
                ttfts = {n: cluster_ttft(cluster, prompt) for n, prompt in long_prompts.items()}
                table.add_row(f"cluster, {stages} stage{'s' * (stages > 1)}",
                              *[f"{r:.1f} ({r / rates[0]:.2f}x)" for r in rates],
                              *[f"{ttfts[n]:.2f} s ({ttfts[n] / mlx_first[n]:.2f}x)" for n in lengths])
                measured[stages] = (dict(zip(streams, rates)), ttfts)
                cluster.stop()
        bc.console.print(table)
        print_targets(measured, mlx_first)
        step_ms, copy_ms = batch_copy_cost(model_dir)
        bc.console.print(f"batched decode step, 8 sessions at 1,024 positions, in one process: {step_ms:.1f} ms, "
                         f"of which merging and extracting their KV caches {copy_ms:.1f} ms "
                         f"({copy_ms / step_ms:.0%})")


def print_targets(measured: dict, mlx_first: dict):
    """Issue 13's targets, each as the ratio this run measured."""
    rows = []
    if 1 in measured and {1, 4} <= measured[1][0].keys():
        rows.append(("4 streams on 1 stage / 1 stream", measured[1][0][4] / measured[1][0][1], ">=", 2.5))
    if 2 in measured and {1, 8} <= measured[2][0].keys():
        rows.append(("8 streams on 2 stages / 1 stream", measured[2][0][8] / measured[2][0][1], ">=", 4.0))
    if 2 in measured:
        for n, ttft in measured[2][1].items():
            rows.append((f"TTFT {n} tokens, 2 stages / mlx-lm", ttft / mlx_first[n], "<=", 0.65))
    if 1 in measured and 2 in measured and 1 in measured[1][0] and 1 in measured[2][0]:
        rows.append(("1 stream, 2 stages / 1 stage", measured[2][0][1] / measured[1][0][1], ">=", 0.95))
    table = Table(title="targets (issue 13), as measured in this run")
    for column in ("ratio", "measured", "target", "met"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for name, value, sense, target in rows:
        met = value >= target if sense == ">=" else value <= target
        table.add_row(name, f"{value:.2f}x", f"{sense} {target}x", "yes" if met else "[red]no[/]")
    bc.console.print(table)


if __name__ == "__main__":
    main()
