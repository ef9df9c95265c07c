#!/usr/bin/env python3
"""Decode speed of loopback pipeline clusters against single-process mlx-lm, and the cost of one hop.

    python scripts/bench_pipeline.py            # full run (about 100 s on a 2-core CPU)
    python scripts/bench_pipeline.py --quick    # smoke run (about 20 s)

What it measures, all in one run on one tiny Kimi-architecture checkpoint (see mlx_kimi/tiny.py)
sized so that one decode token costs >= 20 ms of compute on this machine:

  1. single-process mlx-lm: mlx_lm.load + mlx_lm.generate.generate_step (greedy), decode tok/s
     over N tokens after the prompt, timed from the first generated token to the Nth
     (prefill and the first token excluded): (N - 1) / (t_N - t_1).
  2. single-process mlx-lm, eval once per token: the same model and greedy decode, but each
     token's graph built only after the previous token is evaluated, as a pipeline stage must (its
     input comes over the network), so the graph-building time is no longer hidden; it is reported.
     single-process, one kimi-cluster slice: all layers as one mlx_kimi.slice.ModelSlice, the
     stages' own code, which overlaps graph building with compute layer by layer (mx.async_eval
     after each layer): the like-for-like baseline of the clusters ("ratio vs slice").
  3. 2- and 3-stage clusters of real `kimi-cluster up` processes on loopback (tests/harness.py),
     same checkpoint, same prompt, greedy: decode tok/s from the DoneEvent the coordinator sends
     ((completion_tokens - 1) / decode_s) and from the client's own clock on the token stream.
     The configurations are measured in interleaved rounds (the order rotates every round) and
     each ratio is the median over rounds of tok/s / the baseline's tok/s of the same round (the
     baselines: generate_step, and the one-slice single process), so drift in background load
     hits both sides of a ratio alike.
  4. per-hop overhead for one bf16 token of width 7168 (Kimi K2's hidden state, 14,336 bytes):
     a. the round trip of one request carrying that hidden state to a real node process on a
        long-lived ForwardStream (cluster.link.ForwardLink, the way Node._call_next sends it:
        the stream was opened and authenticated once); the receiving node is a later stage
        whose own width is not 7168, so it parses the request, validates the tensor
        (cluster.wire.check_tensor) and rejects it with INVALID_ARGUMENT: transport +
        (de)serialization + validation + the reply matched by seq, without model compute;
     b. cluster.wire.encode_tensor of the (1, 1, 7168) bf16 array (sender) and
        cluster.wire.decode_tensor (receiver; like Stage._input it leaves the result's bf16 view
        to be evaluated with the stage's graph), in this process;
     c. the hand-off to and from the node's MLX compute thread (cluster.compute.ComputeWorker.run
        of a no-op), which every stage pays once per token, in this process.
     per-hop estimate = median(a) + median(b encode) + median(b decode) + median(c).
     d. the cost of mutual TLS on that hop: the same message's round trip on a ForwardStream to
        a server in this process that answers at once, over plaintext gRPC and over the
        cluster's mutual TLS (cluster.wire.make_server / open_channel), calls interleaved;
        the difference is what encryption adds per hop (every real channel is TLS). The TLS one is
        the bare round trip the per-hop estimates are held against (issue 19: within 1.25x); the
        same answerer in a process of its own shows what the process boundary alone adds. Both TLS
        round trips are measured again after idle (below): the after-idle estimate, (a) and (c)
        after idle plus (b), is held against the bare round trip after idle, like against like.
     An empty Node.Health round trip is shown too, as the floor of any unary gRPC call, the same
     request as a unary Node.Forward call (a new call per token on the open connection), and (a) again
     with this process idle before every call for as long as a stage of a 2-stage pipeline
     waits while the other one computes (half the single-process time per token): in a real
     chain every hop reaches a node that has been idle, and on some machines waking costs more
     than the hop itself. The in-situ difference (3-stage minus 2-stage time per token) is shown
     as a cross-check.
     e. why after idle costs more: (a) after the same time spent waiting actively instead (spinning
        with sched_yield: what a stage expecting its next message soon could do), alternating with
        (a) after sleeping; and the in-process pieces after idle, check_tensor (pure Python, the
        receiver's validation) and the hand-off of (c). If those grow as much as the round trip,
        the CPU runs the path slower after doing something else (caches, predictors, a VM's vCPU
        halting), which no waiting strategy removes.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

# bench_common first: it puts the repository and tests/ on sys.path
from bench_common import (PROMPTS, console, decode_rate, load_average, make_checkpoint, plan_text, raise_on_sigterm,
                          start_cluster, stop_started_processes, verdict)
from bench_hops import measure_hop, report_hop

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from rich.table import Table

from cluster.client import read_reply
from cluster.generated import kimi_cluster_pb2 as pb
from mlx_kimi.checkpoint import INDEX_FILE, open_checkpoint
from mlx_kimi.slice import LayerRange, load_slice

TARGET_RATIO = 0.95
MIN_COMPUTE_MS = 20.0


# ---- single process ------------------------------------------------------------------------

def run_single(model, prompt: list, n: int) -> dict:
    stamps, ids = [], []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        stamps.append(time.perf_counter())
        ids.append(int(token))
    return {"tok_s": decode_rate(stamps), "client_tok_s": decode_rate(stamps), "ids": ids, "finish": "length"}


def run_stepwise(forward, caches: list, prompt: list, n: int) -> dict:
    """Greedy decode in one process the way a pipeline stage has to run it: build a token's graph
    with `forward(tokens, caches) -> logits` only once the previous token is known, then evaluate
    it. mlx-lm's generate_step instead builds token n+1's graph while token n computes
    (mx.async_eval), which a stage cannot do: its input arrives over the network. The time
    `forward` takes to return (building the graph) is recorded."""
    logits = forward(mx.array(prompt)[None], caches)
    y = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(y)
    stamps, ids, builds = [time.perf_counter()], [y.item()], []
    for _ in range(n - 1):
        started = time.perf_counter()
        logits = forward(y[None], caches)
        y = mx.argmax(logits[:, -1, :], axis=-1)
        builds.append(time.perf_counter() - started)
        mx.eval(y)
        ids.append(y.item())
        stamps.append(time.perf_counter())
    return {"tok_s": decode_rate(stamps), "client_tok_s": decode_rate(stamps), "ids": ids, "finish": "length",
            "build_ms": 1e3 * statistics.median(builds)}


def run_single_sync(model, prompt: list, n: int) -> dict:
    """The mlx-lm model, evaluated once per token: graph building is not hidden at all."""
    return run_stepwise(lambda x, caches: model(x, cache=caches), make_prompt_cache(model), prompt, n)


def run_single_slice(model_slice, prompt: list, n: int) -> dict:
    """The stages' own code: all layers as one mlx_kimi.slice.ModelSlice, whose forward overlaps
    building and compute layer by layer (mx.async_eval after each layer)."""
    return run_stepwise(model_slice.forward, model_slice.make_caches(), prompt, n)


def pick_prompt(model, tokenizer, eos: set, n: int) -> tuple:
    """The first prompt whose greedy continuation of n tokens has no EOS (so no run stops early).
    Returns (prompt ids, that warm-up run's result); exits naming what was tried if none fits."""
    tried = []
    for text in PROMPTS:
        prompt = list(tokenizer.encode(text))
        result = run_single(model, prompt, n)  # doubles as the warm-up
        hit = [i for i, t in enumerate(result["ids"]) if t in eos]
        if not hit:
            return prompt, result
        tried.append(f"{text!r}: EOS at generated token {hit[0] + 1}")
    raise SystemExit("every prompt hits EOS within --tokens; try another --seed or fewer --tokens:\n  "
                     + "\n  ".join(tried))


# ---- clusters --------------------------------------------------------------------------------

def run_cluster(cluster, prompt: list, n: int) -> dict:
    request = pb.GenerateRequest(max_tokens=n, sampling=pb.SamplingParams(temperature=0.0))
    request.prompt_tokens.extend(prompt)
    stamps = []
    reply = read_reply(cluster.client.Generate(request, timeout=600),
                       lambda token: token.id >= 0 and stamps.append(time.perf_counter()))
    ids, done = reply.token_ids, reply.done
    if done.completion_tokens >= 2 and done.decode_s > 0:
        tok_s = (done.completion_tokens - 1) / done.decode_s
    else:
        tok_s = float("nan")
    return {
        "tok_s": tok_s,
        "client_tok_s": decode_rate(stamps) if len(stamps) >= 2 else float("nan"),
        "ids": ids, "finish": done.finish_reason, "completion_tokens": done.completion_tokens,
    }


# ---- main ------------------------------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="work directory (default: a new temporary directory, removed at exit)")
    p.add_argument("--tokens", type=int, default=None, help="decode tokens per timed generation (default 64; 24 with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of single / sync / slice / 2-stage / 3-stage (default 7; 2 with --quick)")
    p.add_argument("--hop-calls", type=int, default=None, help="timed calls per hop measurement (default 2000; 400 with --quick)")
    p.add_argument("--layers", type=int, default=20,
                   help="decoder layers (default 20: about 22-40 ms/token in float32 on a 2-core CPU)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--intermediate", type=int, default=512, help="dense MLP width")
    p.add_argument("--moe-intermediate", type=int, default=128, help="expert MLP width")
    p.add_argument("--experts", type=int, default=16, help="routed experts")
    p.add_argument("--experts-per-token", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="checkpoint dtype (default float32: MLX's CPU backend runs bf16 ~10x slower)")
    p.add_argument("--seed", type=int, default=0, help="checkpoint weights seed")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: fewer tokens, rounds and hop calls")
    args = p.parse_args()
    args.tokens = args.tokens or (24 if args.quick else 64)
    args.rounds = args.rounds or (2 if args.quick else 7)
    args.hop_calls = args.hop_calls or (400 if args.quick else 2000)
    if args.tokens < 2:
        p.error("--tokens must be at least 2 (decode speed is measured between the first and the last token)")
    if args.layers < 3:
        p.error("--layers must be at least 3 to split into 3 stages")
    return args


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    began = time.perf_counter()
    with ExitStack() as stack:
        stack.callback(stop_started_processes)
        if args.out:
            work = args.out.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
            stack.callback(shutil.rmtree, work, True)
        bench(args, work, stack, began)


def bench(args, work: Path, stack: ExitStack, began: float):
    n = args.tokens
    console.print(f"[bold]bench_pipeline[/]: work dir {work}; {os.cpu_count()} CPU cores; "
                  f"MLX {mx.__version__} on {mx.default_device()}; {load_average()} at start")
    model_dir = make_checkpoint(work, args)
    config = json.loads((model_dir / "config.json").read_text())
    eos = set(config["eos_token_id"])
    weight_bytes = json.loads((model_dir / INDEX_FILE).read_text())["metadata"]["total_size"]
    console.print(f"checkpoint {model_dir}: kimi_k25 layout, {args.layers} layers, hidden {args.hidden}, "
                  f"{args.experts} experts (top {args.experts_per_token}), vocab {args.vocab}, "
                  f"[bold]dtype {args.dtype}[/] (experts 2-bit, rest 4-bit), {weight_bytes:,} bytes")

    # single process: load, pick a prompt that does not hit EOS (the warm-up run), time later
    model, tokenizer = mlx_lm.load(str(model_dir))
    prompt, warm = pick_prompt(model, tokenizer, eos, n)
    reference_ids = warm["ids"]
    console.print(f"prompt: {len(prompt)} tokens; greedy; {n} generated tokens per run, no EOS among them "
                  f"(single-process warm-up: {1e3 / warm['tok_s']:.1f} ms/token)")

    clusters = {}
    for stages in (2, 3):
        cluster, took = start_cluster(stack, work / f"cluster{stages}", model_dir, stages)
        clusters[stages] = cluster
        warm_c = run_cluster(cluster, prompt, n)  # warm-up: the first forward compiles
        console.print(f"{stages}-stage cluster up in {took:.1f} s: {plan_text(cluster)}; warm-up "
                      f"{warm_c['completion_tokens']} tokens ({warm_c['finish']})")

    # interleaved rounds
    whole = load_slice(open_checkpoint(model_dir), LayerRange(0, args.layers))
    run_single_slice(whole, prompt, 4)  # warm-up
    configs = ["single", "sync", "slice", 2, 3]
    run = {"single": lambda: run_single(model, prompt, n), "sync": lambda: run_single_sync(model, prompt, n),
           "slice": lambda: run_single_slice(whole, prompt, n),
           2: lambda: run_cluster(clusters[2], prompt, n), 3: lambda: run_cluster(clusters[3], prompt, n)}
    results = {c: [] for c in configs}
    for r in range(args.rounds):
        shift = r % len(configs)
        for c in configs[shift:] + configs[:shift]:
            results[c].append(run[c]())
        line = ", ".join(f"{c if isinstance(c, str) else f'{c}-stage'} {results[c][-1]['tok_s']:.1f}" for c in configs)
        console.print(f"  round {r + 1}/{args.rounds}: tok/s {line}")

    # A stage of a 2-stage pipeline sits idle about half of every token while the other computes.
    idle_s = statistics.median(1 / x["tok_s"] for x in results["single"]) / 2
    hop = measure_hop(clusters[2], args.hidden, args.hop_calls, idle_s)

    # ---- report ----
    single_tok_s = statistics.median(x["tok_s"] for x in results["single"])
    compute_ms = 1e3 / single_tok_s
    table = Table(title=f"Decode: {n} tokens after the prompt, median of {args.rounds} interleaved rounds, "
                        f"dtype {args.dtype}", title_justify="left")
    for col in ("configuration", "tok/s\ncoordinator", "tok/s\nclient", "ms/token", "tok/s\nmin-max",
                "ratio vs\nsingle", "ratio vs\nslice", "tokens,\nfinish", "same ids\nas single"):
        table.add_column(col, justify="left" if col.startswith(("config", "tokens", "same")) else "right",
                         no_wrap=True)

    def paired(c, base):  # median over rounds of c's tok/s over base's tok/s in the same round
        return statistics.median(x["tok_s"] / b["tok_s"] for x, b in zip(results[c], results[base]))

    ratios, slice_ratios, early = {}, {}, []
    names = {"single": "single-process mlx-lm (generate_step)",
             "sync": "single-process mlx-lm, eval once per token",
             "slice": "single-process, all layers as one kimi-cluster slice"}
    for c in configs:
        rs = results[c]
        tok = statistics.median(x["tok_s"] for x in rs)
        client = statistics.median(x["client_tok_s"] for x in rs)
        tokens, same = f"{n}, {rs[0]['finish']}", "-" if c == "single" else \
            ("yes" if all(x["ids"] == reference_ids for x in rs) else "NO")
        ratios[c] = 1.0 if c == "single" else paired(c, "single")
        if c != "sync" and c != "single":
            slice_ratios[c] = paired(c, "slice")
        name = names.get(c, f"{c}-stage loopback cluster")
        ratio, vs_slice = f"{ratios[c]:.3f}x", f"{slice_ratios[c]:.3f}x" if c in slice_ratios else ""
        if isinstance(c, int):
            counts = sorted({x["completion_tokens"] for x in rs})
            finishes = sorted({x["finish"] for x in rs})
            tokens = f"{'/'.join(map(str, counts))}, {'/'.join(finishes)}"
            if counts != [n]:
                early.append(f"{c}-stage stopped at {counts} tokens ({finishes}) instead of {n}")
        table.add_row(name, f"{tok:.1f}", f"{client:.1f}", f"{1e3 / tok:.2f}",
                      f"{min(x['tok_s'] for x in rs):.1f}-{max(x['tok_s'] for x in rs):.1f}", ratio, vs_slice,
                      tokens, same)
    console.print(table)
    console.print("stages: " + "; ".join(f"{c}-stage {plan_text(clusters[c])}" for c in (2, 3))
                  + ". ratio = median over rounds of (tok/s / the baseline's tok/s of the same round); "
                  "tok/s coordinator = (completion_tokens - 1) / decode_s from the DoneEvent.", highlight=False)
    build_ms = statistics.median(x["build_ms"] for x in results["sync"])
    console.print(f"graph building: {build_ms:.2f} ms of every token ({100 * build_ms / compute_ms:.0f}% of "
                  f"single-process decode) goes to building the {args.layers} layers' MLX graph in Python (measured "
                  "in the 'eval once per token' row, which hides none of it). generate_step overlaps it with the "
                  "previous token's compute; a stage cannot (its input arrives over the network), so a kimi-cluster "
                  "slice overlaps it layer by layer instead (mx.async_eval after each layer). 'ratio vs slice' "
                  "compares a cluster with that same code in one process: what the cluster machinery itself costs.",
                  highlight=False)
    for msg in early:
        console.print(f"[bold red]EARLY STOP:[/] {msg}")
    single_rates = [x["tok_s"] for x in results["single"]]
    if args.rounds < 3 or max(single_rates) > 1.2 * min(single_rates):
        console.print(f"[bold yellow]noise:[/] {args.rounds} rounds; single-process speed ranged "
                      f"{min(single_rates):.1f}-{max(single_rates):.1f} tok/s between rounds (background load), so "
                      "the ratios carry that much uncertainty; more --rounds narrow it", highlight=False)
    if compute_ms < MIN_COMPUTE_MS:
        console.print(f"[bold yellow]warning:[/] single-process decode is {compute_ms:.1f} ms/token, under the "
                      f"{MIN_COMPUTE_MS:.0f} ms the measurement asks for; raise --layers or --hidden")
    console.print(
        f"[bold]caveat:[/] all {os.cpu_count()} CPU cores of this one machine are shared by every stage, so the "
        "stages cannot run on separate hardware and a pipeline cannot beat the same code in one process here; "
        "'ratio vs slice' shows what the pipeline machinery costs (per token: one hop per stage boundary, each "
        "stage's eval and hand-off to its compute thread, the coordinator's token stream, and each stage waking "
        "from idle while the others compute), not a multi-machine speed-up; 'ratio vs single' also carries the "
        "slices' evaluation schedule. Background load on this machine moves all figures; ratios are paired per "
        "round.", highlight=False)

    step = {c: [1e6 / x["tok_s"] for x in results[c]] for c in (2, 3)}
    in_situ = statistics.median(b - a for a, b in zip(step[2], step[3]))
    hop_parts = report_hop(hop, idle_s, in_situ, args.rounds)

    parts = [f"{c}-stage {ratios[c]:.3f}x of single-process mlx-lm (target >= {TARGET_RATIO}x: "
             f"{verdict(ratios[c] >= TARGET_RATIO)}), {slice_ratios[c]:.3f}x of the same slice code in one process"
             for c in (2, 3)]
    parts.append(f"one-slice single process {ratios['slice']:.3f}x, eval once per token {ratios['sync']:.3f}x "
                 f"(graph building {build_ms:.1f} ms/token)")
    parts += hop_parts
    console.print(f"[bold]SUMMARY[/] ({args.dtype}, {compute_ms:.1f} ms/token single-process compute, "
                  f"{n} tokens, {args.rounds} rounds, {time.perf_counter() - began:.0f} s): " + "; ".join(parts)
                  + ("; EARLY STOP, see above" if early else "") + f"; {load_average()} at the end",
                  highlight=False)


if __name__ == "__main__":
    main()
