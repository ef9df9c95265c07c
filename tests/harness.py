"""Start real `kimi-cluster up` processes on loopback for end-to-end tests."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
from mlx_lm.generate import generate_step

from cluster.client import read_reply
from cluster.generated import kimi_cluster_pb2 as pb
from cluster.loading import checkpoint_sizes, plan_for, prefill_chunk
from mlx_kimi.checkpoint import open_checkpoint
from mlx_kimi.convert import convert
from cluster.wire import coordinator_stub, node_stub, open_channel

KIMI = str(Path(sys.executable).parent / "kimi-cluster")
TEST_SECRET = "5a1c0e7f3b9d2468ace13579bdf02468a5c3e1f0b2d4f6e8c0a9b8c7d6e5f4a3"  # hex, as load_secret wants
START_TIMEOUT_S = 120.0


def oracle_reply(oracle, prompt_ids, max_tokens: int, sampler=None, seed=None, logits_processors=None) -> list:
    """The reference: mlx-lm's own generation on the whole model ((model, tokenizer) = `oracle`),
    cut before the first EOS like the coordinator's token stream."""
    model, tokenizer = oracle
    if seed is not None:
        mx.random.seed(seed)
    out = []
    for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens, sampler=sampler,
                                  logits_processors=logits_processors):
        if int(token) in tokenizer.eos_token_ids:
            break
        out.append(int(token))
    return out


def oracle_scores(oracle, ids: list) -> tuple:
    """(log-softmax at every position of `ids`, float32; each token after the first's logprob after
    the ones before it): mlx-lm's scoring of a prompt, what /v1/completions' `echo` with `logprobs` gives."""
    logits = oracle[0](mx.array(ids)[None])[0].astype(mx.float32)
    scores = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return scores, [scores[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def tight_memory(model_dir: Path, nodes: int, context: int = 32768) -> str:
    """A --memory with which `nodes` equal nodes hold the model and one fewer cannot (so a lost
    node's layers have nowhere to go and the cluster must wait for it)."""
    sizes = checkpoint_sizes(open_checkpoint(model_dir))

    def fits(n, memory):
        present = [SimpleNamespace(info=pb.NodeInfo(name=f"n{i}", usable_bytes=memory, total_bytes=memory))
                   for i in range(n)]
        return plan_for(sizes, present, context, prefill_chunk(sizes)).feasible

    memory = sizes.total_bytes // nodes
    while not fits(nodes, memory):
        memory = memory * 101 // 100
    assert not fits(nodes - 1, memory), f"{nodes - 1} nodes of {memory} bytes hold the model too"
    return f"{memory}B"


def node_env(home: Path, secret: str = TEST_SECRET) -> dict:
    env = dict(os.environ)
    env.update(KIMI_CLUSTER_HOME=str(home), KIMI_CLUSTER_SECRET=secret, PYTHONUNBUFFERED="1")
    return env


@dataclass
class NodeProcess:
    name: str
    proc: subprocess.Popen
    log_path: Path
    address: str = ""
    lines: queue.Queue = field(default_factory=queue.Queue)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
        """Block until the node prints a line matching `pattern` (its own words, not a sleep)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                line = None
            if line is None:
                if self.proc.poll() is not None or left <= 0:
                    raise AssertionError(
                        f"node {self.name} never printed /{pattern}/ (exit {self.proc.poll()}); log:\n{self.log()}"
                    )
                continue
            if m := re.search(pattern, line):
                return m

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(timeout=30)


def start_node(workdir: Path, name: str, memory: str = "1GB", model: Path | None = None, peers=(),
               extra=(), env: dict | None = None, port: int = 0) -> NodeProcess:
    args = [KIMI, "up", "--host", "127.0.0.1", "--port", str(port), "--name", name, "--memory", memory,
            "--no-mdns", *extra]
    if model:
        args += ["--model", str(model)]
        for p in peers:
            args += ["--peer", p]
    return launch_node(workdir, name, args, env or node_env(workdir / "home"))


class LocalCluster:
    """A coordinator plus `stages - 1` peers (each with `memory`), all on loopback. `extra` goes
    to every node, `coordinator_extra` to the coordinator only. `running_peers`: nodes already up
    (with the same secret) that take the place of as many new peers; they are left running."""

    def __init__(self, workdir: Path, model: Path, stages: int, memory: str = "1GB", extra=(), env=None,
                 coordinator_extra=(), running_peers=()):
        self.workdir, self.env = workdir, env or node_env(workdir / "home")
        self.peers, self.coordinator = [], None
        try:
            for i in range(1 + len(running_peers), stages):
                self.peers.append(start_node(workdir, f"peer{i}", memory, extra=extra, env=self.env))
            self.coordinator = start_node(workdir, "coord", memory, model=model,
                                          peers=[p.address for p in [*running_peers, *self.peers]],
                                          extra=[*extra, *coordinator_extra], env=self.env)
            self._wait_ready()
        except BaseException:
            self.__exit__()  # the constructor raised, so `with` will not clean up
            raise
        self.secret = bytes.fromhex(self.env["KIMI_CLUSTER_SECRET"])
        self.channel = open_channel(self.coordinator.address, self.secret)
        self.client = coordinator_stub(self.channel)

    def _wait_ready(self):
        self.coordinator.wait_for(r"cluster ready")

    @property
    def nodes(self) -> list:
        return [n for n in (self.coordinator, *self.peers) if n is not None]

    def node_stub(self, node: NodeProcess):
        return node_stub(open_channel(node.address, self.secret))

    def generate(self, prompt_tokens=None, messages=None, max_tokens=48, timeout=120, speculate=None, prediction=(),
                 **sampling):
        """(token ids, DoneEvent) of one Generate; `speculate` True or False forces speculation on or off;
        `prediction`: the token ids the reply is expected to be."""
        seed = sampling.pop("seed", None)
        params = pb.SamplingParams(**sampling)
        if seed is not None:
            params.seed = seed
        request = pb.GenerateRequest(max_tokens=max_tokens, sampling=params, prediction_tokens=prediction)
        if speculate is not None:
            request.speculate = speculate
        if prompt_tokens is not None:
            request.prompt_tokens.extend(prompt_tokens)
        else:
            request.messages_json = json.dumps(messages)
        reply = read_reply(self.client.Generate(request, timeout=timeout))
        return reply.token_ids, reply.done

    def memory_map(self) -> pb.MemoryMapReply:
        return self.client.MemoryMap(pb.MemoryMapRequest(), timeout=30)

    def health(self) -> dict:
        """{node name: its HealthReply}."""
        return {node.name: self.node_stub(node).Health(pb.HealthRequest(), timeout=10) for node in self.nodes}

    def kv_state(self) -> dict:
        """{node name: (sessions, KV bytes reserved)} from every node's Health."""
        return {name: (h.sessions, h.kv_bytes) for name, h in self.health().items()}

    def cli(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run([KIMI, *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def stop(self):
        self.channel.close()
        for node in self.nodes:
            node.kill(signal.SIGTERM if node.proc.poll() is None else signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for node in self.nodes:
            node.kill()


# ---- helpers for mDNS discovery tests ---------------------------------------------------------------


def run_at_once(jobs: list, timeout: float = 300) -> list:
    """Run the callables at once, each in its own thread (started together at a barrier); their
    results. A job that raises, or is still running after `timeout`, fails the caller."""
    results, barrier = [None] * len(jobs), threading.Barrier(len(jobs))

    def run(i):
        barrier.wait(timeout=60)
        try:
            results[i] = jobs[i]()
        except Exception as e:  # reported below, in the caller's thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads)
    for r in results:
        assert not isinstance(r, Exception), r
    return results


def launch_node(workdir: Path, name: str, args: list, env: dict, wait_listening: bool = True) -> NodeProcess:
    """Run `args` (a `kimi-cluster up` command line, possibly behind a prefix such as
    `ip netns exec NS`), log its output to workdir/NAME.log and wait until it listens (unless
    `wait_listening` is false)."""
    log_path = workdir / f"{name}.log"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(log_path, "a"), text=True, env=env)
    node = NodeProcess(name, proc, log_path)

    def pump():
        for line in proc.stdout:
            with open(log_path, "a") as f:
                f.write(line)
            node.lines.put(line)
        node.lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    if not wait_listening:
        return node
    try:
        node.address = node.wait_for(r"listening on (\S+)").group(1)
    except BaseException:
        node.kill()
        raise
    return node


def start_mdns_node(workdir: Path, name: str, env: dict, memory: str = "1GB", model: Path | None = None,
                    host: str = "127.0.0.1", port: int = 0, extra=(), prefix=()) -> NodeProcess:
    """Like start_node, but the node announces itself (and, with `model`, browses) over mDNS and
    is given no --peer. `prefix` runs it behind another command, e.g. ("ip", "netns", "exec", NS)."""
    args = [*prefix, KIMI, "up", "--host", host, "--port", str(port), "--name", name, "--memory", memory, *extra]
    if model:
        args += ["--model", str(model)]
    return launch_node(workdir, name, args, env)


def poll(read, done, timeout: float, what: str):
    """Read observable state (an RPC, a log) until `done(state)`, and return it; fail after
    `timeout` seconds naming `what` and the last state."""
    deadline = time.monotonic() + timeout
    while True:
        state = read()
        if done(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last state: {state}")
        time.sleep(0.05)  # pacing between reads; the state is what we wait on


def wait_for_log(node: NodeProcess, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
    """Block until the node's log (stdout and stderr, so its `logging` lines too) matches `pattern`.
    Unlike NodeProcess.wait_for this consumes nothing and also sees lines already written."""
    deadline = time.monotonic() + timeout
    while True:
        if m := re.search(pattern, node.log()):
            return m
        if node.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"node {node.name} never logged /{pattern}/ (exit {node.proc.poll()}); log:\n{node.log()}"
            )
        time.sleep(0.1)  # pacing between reads of the log; the line is what we wait on


# ---- helpers for OpenAI-compatible API tests -------------------------------------------------------

API_LINE = r"OpenAI API on (http://\S+/v1) \(model '([^']*)'\)"


class ApiCluster(LocalCluster):
    """A LocalCluster whose coordinator also serves the OpenAI API: give it the API flags in
    `coordinator_extra` (e.g. ["--api-port", "0", "--api-key", KEY]; `up` refuses them on a node
    without --model). Once both the API line and "cluster ready" have been printed (in either
    order), `api_url` is the base URL the coordinator printed (http://HOST:PORT/v1) and
    `model_name` the model id it serves."""

    def _wait_ready(self):
        self.api_url = self.model_name = None
        ready = False
        while self.api_url is None or not ready:
            m = self.coordinator.wait_for(rf"{API_LINE}|(cluster ready)")
            if m.group(3):
                ready = True
            else:
                self.api_url, self.model_name = m.group(1), m.group(2)


def hub_cache(root: Path, repo: str, source: Path, files) -> Path:
    """`files` of `source` laid out as huggingface_hub's cache holds repo `repo` under `root`
    (refs/main -> snapshots/<commit>/), for tests that run with HF_HUB_CACHE=root, HF_HUB_OFFLINE=1."""
    import shutil

    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for name in files:
        shutil.copy(source / name, snapshot / name)
    return snapshot


def make_scripted(out: Path, script: str, layers: int = 4) -> Path:
    """`kimi-cluster make-tiny OUT --script SCRIPT`: a tiny checkpoint whose greedy reply is `script`."""
    done = subprocess.run([KIMI, "make-tiny", str(out), "--layers", str(layers), "--script", script],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def scripted_api(workdir: Path, checkpoint: Path, key: str) -> ApiCluster:
    """A 2-stage cluster of `checkpoint` serving the API with `key` (context 512)."""
    return ApiCluster(workdir, checkpoint, stages=2,
                      coordinator_extra=["--api-port", "0", "--api-key", key, "--context", "512"])


def openai_client(api: ApiCluster, key: str):
    import openai

    return openai.OpenAI(base_url=api.api_url, api_key=key, max_retries=0, timeout=60)


class ConvertKilled(Exception):
    """What convert_killed_after raises inside convert (a stand-in for the process dying)."""


def convert_killed_after(shards: int, src, out, recipe, **options):
    """Run mlx_kimi.convert until its `shards`-th shard is written, then stop it there (as a kill
    would); the shards written so far stay for the resumed run."""
    def die(event, part, file, nbytes):
        if event == "done" and file.startswith(f"model-{shards:05d}"):
            raise ConvertKilled

    try:
        convert(src, out, recipe, progress=die, **options)
    except ConvertKilled:
        return
    raise AssertionError(f"convert finished before its shard {shards} was written")
