#!/usr/bin/env python3
"""A soak: mixed load on a loopback cluster for a bounded time, with faults, and memory that must stay flat.

    python scripts/soak.py                      # 30 minutes (the figures in README come from this)
    python scripts/soak.py --minutes 5          # a look

It starts real `kimi-cluster up` processes on loopback (tests/harness.py) on a tiny generated
checkpoint: a coordinator serving the OpenAI API and two workers, each with just enough memory that
the model needs all three. The coordinator and the first worker (peer1) run for the whole soak;
the other stage is the one the faults hit. For --minutes, --clients clients send requests one after another through the
official openai and anthropic clients, drawn from scripts/load_test.py's jobs: short and long prompts,
greedy and seeded, completions, Responses and Messages, streamed and not, some clients leaving
mid-stream. Every --fault-every seconds the next
fault of a cycle happens: a spare joins (`--peer COORDINATOR`); that stage's worker is killed -9 and
restarted under its name (the spare takes its layers, and the restarted one is the next spare; or,
back before its loss is acted on, the restarted one takes its own layers again); the
spare leaves (SIGTERM); that stage's worker is killed -9 and restarted with no spare (the cluster is
degraded until it is back: the requests in flight pause, new ones are refused with 503 and retried
by their client). Every process's RSS is sampled every --sample-every seconds. It stops by itself.

It prints figures and exits 1 when:
  - a finished reply differs from mlx-lm's on the same prompt ids (load_test.reply_problems), a
    request failed other than with a 503 while the cluster was degraded, or one did not end within
    --request-timeout (hung);
  - the cluster was not ready again within --recover-timeout of a fault;
  - afterwards a node holds sessions other than the cached conversations, or a node logged a traceback;
  - a process that served (held layers) for at least half the run grew its RSS by more than
    --rss-bound percent over the last two thirds of that time (the first third is warm-up: caches
    filling, MLX's allocator; a spare that takes layers over grows by their size, which is no leak).
tests/test_soak.py runs it for under a minute.
"""

import argparse
import collections
import dataclasses
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import load_test  # noqa: E402

STEADY = "peer1"  # the worker no fault touches (with the coordinator, what the RSS bound judges)
FAULTS = ("a spare joins", "the worker is killed and restarted (a spare takes over)", "the spare leaves",
          "the worker is killed and restarted (no spare: degraded until it is back)")


@dataclass
class Process:
    """A node process the soak started, and its RSS samples (seconds into the run, bytes)."""

    node: object  # harness.NodeProcess
    started: float
    ended: float | None = None
    rss: list = field(default_factory=list)  # (seconds into the run, bytes, whether it held layers then)

    def serving(self) -> list:
        """The samples taken while it held layers."""
        return [(t, b) for t, b, holds in self.rss if holds]

    @property
    def label(self) -> str:
        return f"{self.node.name} (pid {self.node.proc.pid})"


@dataclass
class Run:
    outcomes: list = field(default_factory=list)
    retried: int = 0  # 503s while the cluster was not ready (degraded, reloading), retried by their client
    hung: list = field(default_factory=list)
    faults: list = field(default_factory=list)  # (seconds into the run, what, seconds until ready again)
    processes: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    seconds: float = 0.0


def unavailable(outcome) -> bool:
    """Refused with 503 because the cluster is not ready (degraded, or loading a slice again)."""
    return bool(outcome.error) and "Error code: 503" in outcome.error and "the cluster is " in outcome.error


def rss_bytes(pid: int) -> int | None:
    done = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(done.stdout) * 1024 if done.returncode == 0 and done.stdout.strip() else None


def growth(samples: list) -> float:
    """RSS growth over the last two thirds of `samples` ((seconds, bytes)): the median of the last
    3 against the median of the 3 from one third on (a fraction)."""
    values = [b for _, b in samples]
    first = len(values) // 3
    return statistics.median(values[-3:]) / statistics.median(values[first:first + 3]) - 1


class Soak:
    def __init__(self, cluster, memory: str, args, jobs: list, began: float):
        self.cluster, self.memory, self.args, self.jobs, self.began = cluster, memory, args, jobs, began
        self.run = Run(processes=[Process(n, 0.0) for n in cluster.nodes])
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.spares = 0

    def now(self) -> float:
        return time.monotonic() - self.began

    # ---- load -----------------------------------------------------------------------------------

    def client(self, index: int):
        rng = random.Random(index)
        start = threading.Event()
        start.set()
        with load_test.api_clients(self.cluster.api_url, self.args.request_timeout) as api:
            while not self.stop.is_set():
                job = rng.choice(self.jobs)
                began = time.monotonic()
                while True:
                    outcome = load_test.run_one(api, self.cluster.model_name, job, start)
                    if not unavailable(outcome) or time.monotonic() - began > self.args.request_timeout:
                        break
                    with self.lock:
                        self.run.retried += 1
                    self.stop.wait(0.5)  # a client's pause before it retries
                with self.lock:
                    self.run.outcomes.append(outcome)

    # ---- faults ---------------------------------------------------------------------------------

    def live(self) -> dict:
        """{name: Process} of the nodes running now."""
        return {p.node.name: p for p in self.run.processes if p.ended is None}

    def start_node(self, name: str, extra=()):
        import harness

        node = harness.start_node(self.cluster.workdir, name, self.memory, env=self.cluster.env, extra=extra)
        with self.lock:
            self.run.processes.append(Process(node, self.now()))
            self.cluster.peers.append(node)

    def end_node(self, name: str, how):
        process = self.live()[name]
        process.node.kill(how)
        process.ended = self.now()
        with self.lock:
            self.cluster.peers.remove(process.node)

    def fault(self, kind: int):
        """Cause fault FAULTS[kind]; returns what the memory map shows once it has healed: a test
        of {name: (status, address, holds layers)}."""
        import signal

        nodes = {n.name: n for n in self.cluster.memory_map().nodes}
        if kind == 0:
            self.spares += 1
            name = f"spare{self.spares}"
            self.start_node(name, extra=["--peer", self.cluster.coordinator.address])
            return lambda now: now[name][0] == "spare"
        if kind == 2:
            name = next(n for n, e in nodes.items() if e.status == "spare")
            self.end_node(name, signal.SIGTERM)
            return lambda now: now[name][0] == "lost"
        name = next(n for n, e in nodes.items() if e.has_layers and n not in (self.cluster.coordinator.name, STEADY))
        spare = next((n for n, e in nodes.items() if e.status == "spare"), None)
        self.end_node(name, signal.SIGKILL)
        self.start_node(name)  # it finds the coordinator that loaded it (saved in its config dir)
        address = self.live()[name].node.address
        if spare:  # the spare took the layers and the restarted node is the next spare; or the restarted
            # node was back before its loss was acted on and took its own layers again (the spare stays one)
            return lambda now: (now[spare][2] and now[name][:2] == ("spare", address)) or (
                now[name] == ("ready", address, True) and now[spare][0] == "spare")
        return lambda now: now[name] == ("ready", address, True)

    def healed(self, done) -> bool:
        reply = self.cluster.memory_map()
        now = collections.defaultdict(lambda: ("absent", "", False))  # a node not in the map yet
        now.update({n.name: (n.status, n.address, n.has_layers) for n in reply.nodes})
        return reply.state == "ready" and done(now)

    def faults(self):
        step = 0
        while not self.stop.wait(self.args.fault_every):
            at = self.now()
            done = self.fault(step % len(FAULTS))
            deadline = time.monotonic() + self.args.recover_timeout
            while not self.healed(done):
                if time.monotonic() > deadline:  # (after the load stopped too: the checks need a whole cluster)
                    self.run.problems.append(f"at {at:.0f} s, {FAULTS[step % len(FAULTS)]}: the cluster was not "
                                             f"ready again within {self.args.recover_timeout:.0f} s")
                    return
                time.sleep(0.2)  # pacing between reads of the map; the map is what we wait on
            self.run.faults.append((at, FAULTS[step % len(FAULTS)], self.now() - at))
            step += 1

    # ---- memory ---------------------------------------------------------------------------------

    def sample(self):
        while True:
            holding = {n.name for n in self.cluster.memory_map().nodes if n.has_layers and n.status == "ready"}
            for p in list(self.run.processes):
                if p.ended is None and (rss := rss_bytes(p.node.proc.pid)):
                    p.rss.append((self.now(), rss, p.node.name in holding))
            if self.stop.wait(self.args.sample_every):
                return


def rss_problems(processes: list, seconds: float, bound: float) -> list:
    out = []
    for p in processes:
        serving = p.serving()
        if len(serving) >= 9 and serving[-1][0] - serving[0][0] >= seconds / 2 and (g := growth(serving)) * 100 > bound:
            out.append(f"{p.label} grew its RSS {g * 100:.1f}% over the last two thirds of the time it held layers "
                       f"(bound {bound:.0f}%)")
    return out


def rss_lines(processes: list, seconds: float) -> list:
    out = []
    for p in processes:
        if not p.rss:
            continue
        end = p.ended if p.ended is not None else seconds
        mb = [b / 2**20 for _, b, _ in p.rss]
        serving = p.serving()
        figure = (f"{growth(serving) * 100:+.1f}% over the last 2/3 of the {len(serving)} taken while it held layers"
                  if len(serving) >= 9 else f"{len(serving)} samples while it held layers: too few to judge")
        out.append(f"  {p.label}, {p.started:.0f}-{end:.0f} s: RSS {mb[0]:.0f} -> {mb[len(mb) // 3]:.0f} -> "
                   f"{mb[-1]:.0f} MB (start, 1/3, end; {len(mb)} samples), {figure}")
    return out


def soak(work: Path, args, model_dir: Path | None = None) -> Run:
    """Run the soak in `work` on `model_dir` (default: a tiny checkpoint made there) and check it; the Run."""
    import mlx_lm

    import harness
    from mlx_kimi.kimi_tokenizer import load_tokenizer
    from mlx_kimi.tiny import TinyShape, make_tiny

    model_dir = model_dir or make_tiny(work / "ckpt", TinyShape(layers=args.layers), model_type="kimi_k25")
    tokenizer = load_tokenizer(model_dir)
    jobs = load_test.make_jobs(tokenizer, args.distinct * 8, args.short_tokens, args.long_tokens, args.long_every,
                               args.disconnect_every, args.max_tokens, args.distinct, args.seeded_every,
                               chat_every=args.chat_every)
    jobs = [dataclasses.replace(j, stream=False) if j.disconnect_after is None and j.index % args.plain_every == 0
            else j for j in jobs]
    expected = load_test.oracle_replies(mlx_lm.load(str(model_dir)), tokenizer, jobs)
    # Each node's memory: the model needs all three, with KV room for --context positions, which
    # --clients requests at once (and the cached conversations) use a fraction of.
    context = max(max(len(j.prompt) for j in jobs) + args.max_tokens, args.context)
    memory = harness.tight_memory(model_dir, 3, context)
    (work / "cluster").mkdir(parents=True, exist_ok=True)
    with harness.ApiCluster(work / "cluster", model_dir, stages=3, memory=memory, coordinator_extra=[
            "--api-port", "0", "--api-key", load_test.API_KEY, "--context", str(context)]) as cluster:
        try:
            run = _run(cluster, memory, args, jobs, expected)
        finally:
            for node in cluster.nodes:
                node.kill()
    return run


def _run(cluster, memory: str, args, jobs: list, expected: dict) -> Run:
    began = time.monotonic()
    soak = Soak(cluster, memory, args, jobs, began)
    run = soak.run
    clients = [threading.Thread(target=soak.client, args=(i,), daemon=True) for i in range(args.clients)]
    helpers = [threading.Thread(target=soak.faults, daemon=True), threading.Thread(target=soak.sample, daemon=True)]
    for t in clients + helpers:
        t.start()
    soak.stop.wait(args.minutes * 60)
    soak.stop.set()
    for t in clients:  # each finishes the request it is in, which has --request-timeout to end
        t.join(timeout=args.request_timeout + 30)
    for t in helpers:
        t.join(timeout=args.recover_timeout + 30)
    run.seconds = soak.now()
    run.hung = [t.name for t in clients if t.is_alive()]
    run.problems += [f"a client's request never ended ({n})" for n in run.hung]
    run.problems += load_test.reply_problems([o for o in run.outcomes if not unavailable(o)], expected)
    run.problems += [f"a request was refused (503) for {args.request_timeout:.0f} s: {o.error}" for o in run.outcomes
                     if unavailable(o)]
    stages = {n.name for n in cluster.memory_map().nodes if n.has_layers}  # a spare holds no session
    cached, held = load_test.settled_sessions(cluster, nodes=stages)
    run.problems += [f"node {name} holds {n} sessions after the run, the coordinator caches {cached} conversations"
                     for name, n in held.items() if n != cached]
    for p in run.processes:
        if "Traceback" in p.node.log():
            run.problems.append(f"{p.label} logged a traceback")
    run.problems += rss_problems(run.processes, run.seconds, args.rss_bound)
    return run


def report(run: Run) -> str:
    finished = [o for o in run.outcomes if not o.error and not o.cancelled]
    left = [o for o in run.outcomes if o.cancelled and not o.error]
    plain = sum(1 for o in finished if not o.job.stream)
    slowest = max((o.seconds for o in run.outcomes), default=0.0)
    lines = [f"{run.seconds:.0f} s: {len(run.outcomes)} requests, {len(finished)} ran to the end ({plain} not "
             f"streamed, {sum(1 for o in finished if o.job.seed is not None)} seeded), {len(left)} clients left "
             f"mid-stream, {sum(1 for o in run.outcomes if o.error)} failed, {len(run.hung)} hung; "
             f"{run.retried} retries of 503s while not ready; slowest request {slowest:.1f} s",
             f"{len(run.faults)} faults, each ready again after:"]
    lines += [f"  at {at:.0f} s, {what}: {took:.1f} s" for at, what, took in run.faults]
    lines += ["RSS per process:", *rss_lines(run.processes, run.seconds)]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    p.add_argument("--clients", type=int, default=4, help="clients sending requests one after another")
    p.add_argument("--fault-every", type=float, default=90.0, help="seconds between faults (a kill every second one)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--rss-bound", type=float, default=5.0,
                   help="percent of RSS growth over the last 2/3 of the time a process held layers (judged when that "
                        "is at least half the run) that fails the run")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds after which a request is hung")
    p.add_argument("--recover-timeout", type=float, default=120.0, help="seconds a fault may take to heal")
    p.add_argument("--short-tokens", type=int, default=40)
    p.add_argument("--long-tokens", type=int, default=600)
    p.add_argument("--long-every", type=int, default=4, help="every Nth job has a long prompt")
    p.add_argument("--disconnect-every", type=int, default=5, help="every Nth client leaves mid-stream")
    p.add_argument("--seeded-every", type=int, default=3, help="every Nth short job samples with a seed")
    p.add_argument("--plain-every", type=int, default=3, help="every Nth job (not leaving) is not streamed")
    p.add_argument("--chat-every", type=int, default=3,
                   help="every Nth job, if greedy, is a user message through /v1/responses or /v1/messages, in turn")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--distinct", type=int, default=4, help="different prompts of each length")
    p.add_argument("--context", type=int, default=4096, help="KV positions planned (room for the clients at once)")
    p.add_argument("--layers", type=int, default=6, help="decoder layers of the tiny checkpoint")
    p.add_argument("--out", type=Path, help="work directory (default: a new temporary one)")
    return p.parse_args(argv)


def main():
    import os
    import tempfile

    args = parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="soak-"))
    print(f"soak: {args.minutes:g} minutes in {work}; {os.cpu_count()} CPU cores shared by every process", flush=True)
    run = soak(work, args)
    print(report(run))
    for line in run.problems:
        print(f"PROBLEM: {line}")
    print("PASS: every reply equals mlx-lm's, none hung, every fault healed, memory flat" if not run.problems
          else f"FAIL: {len(run.problems)} problems")
    sys.exit(1 if run.problems else 0)


if __name__ == "__main__":
    main()
