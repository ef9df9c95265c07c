#!/usr/bin/env python3
"""Many users at once through the OpenAI API: every reply equals single-process mlx-lm's, clients
that go away are cancelled cleanly, and no node is ever marked lost.

    python scripts/load_test.py                     # 64 requests, 50- and 2,000-token prompts, 2 stages
    python scripts/load_test.py --requests 16 --long-tokens 512 --max-tokens 8

The full run takes about 10 minutes on a 2-core VM, 3-4 of them for the oracle.

It starts a loopback cluster of real `kimi-cluster up` processes (tests/harness.py) on a tiny
generated checkpoint, sends every request at once (streamed /v1/completions through the official
openai client; greedy, and every --seeded-every'th short one sampled with a seed of its own; every
--chat-every'th one, if greedy, instead as a user message through OpenAI's /v1/responses or
Anthropic's /v1/messages, in turn, with their official clients), and has every
--disconnect-every'th client close its stream after its first tokens. Meanwhile it polls the
coordinator's memory map. It prints a summary and exits 1 when:
  - a reply that ran to the end differs from mlx-lm's for the same prompt ids (greedy, or sampled
    after mx.random.seed(seed)): text, finish reason and token count (a chat reply's text is its
    reasoning and its answer, as cluster/reply.py splits mlx-lm's tokens); or a request failed;
  - a node was ever anything but `ready`, or the coordinator logged a lost node or a traceback;
  - afterwards a node holds a session other than the cached conversations (a cancelled request's
    session was not freed).
tests/test_load.py runs the same checks, smaller. All processes share this machine's cores: the
timings it prints are of a loaded machine, not a speed claim.
"""

import argparse
import json
import os
import random
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

API_KEY = "sk-load-test"
SAMPLED_TEMPERATURE = 0.8
WORDS = ("cluster token stage layer expert memory prompt reply hidden state stream node mac wire "
         "cache batch queue ring model slice prefill decode sample answer").split()


API_SHAPES = ("completions", "responses", "messages")  # the raw prompt; a user message for the other two


@dataclass
class Job:
    index: int
    text: str          # the raw prompt (completions), or the user message
    prompt: list       # its ids, as the API encodes it (the chat template's, for a user message)
    max_tokens: int
    disconnect_after: int | None  # chunks read before the client closes its stream (None: reads all)
    seed: int | None = None  # sampled at SAMPLED_TEMPERATURE with this seed; None: greedy
    stream: bool = True  # False: one JSON reply (then the client never leaves early)
    api: str = "completions"  # one of API_SHAPES

    @property
    def key(self) -> tuple:
        """What its reply depends on (jobs with equal keys have equal replies)."""
        return self.api == "completions", tuple(self.prompt), self.max_tokens, self.seed


@dataclass
class Outcome:
    job: Job
    text: str = ""
    finish: str | None = None
    completion_tokens: int | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def cancelled(self) -> bool:
        return self.job.disconnect_after is not None


def prompt_of(tokenizer, rng: random.Random, tokens: int) -> tuple:
    """(text, ids) of a raw prompt of random words, `tokens` ids long or a word's ids longer."""
    words = []
    while len(ids := tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words += rng.choices(WORDS, k=max(1, (tokens - len(ids)) // 8))  # a word is 1-8 tokens
    return " ".join(words), list(ids)


def make_jobs(tokenizer, requests: int, short: int, long: int, long_every: int, disconnect_every: int,
              max_tokens: int, distinct: int, seeded_every: int = 0, seed: int = 0, chat_every: int = 0) -> list:
    """`requests` jobs: every `long_every`th has a `long`-token prompt, the rest `short` ones; each
    kind cycles over `distinct` prompts (a repeat may continue a cached conversation); every
    `disconnect_every`th client goes away after 1-3 chunks; every `seeded_every`th short one
    samples with a seed of its own instead of greedy; every `chat_every`th one, if greedy, sends its
    text as a user message through /v1/responses or /v1/messages, in turn (neither API has a seed)."""
    rng = random.Random(seed)
    prompts = {size: [prompt_of(tokenizer, rng, size) for _ in range(distinct)] for size in {short, long}}
    jobs, used = [], {short: 0, long: 0}
    for i in range(requests):
        size = long if long_every and i % long_every == long_every - 1 else short
        text, ids = prompts[size][used[size] % distinct]
        used[size] += 1
        leave = 1 + i % 3 if disconnect_every and i % disconnect_every == disconnect_every - 1 else None
        sampled = size == short and seeded_every and used[short] % seeded_every == 0
        job = Job(i, text, ids, max_tokens, leave, seed=1000 + i if sampled else None)
        if chat_every and i % chat_every == 1 and not sampled:
            job.api = API_SHAPES[1 + (i // chat_every) % 2]
            job.prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                            add_generation_prompt=True))
        jobs.append(job)
    return jobs


def oracle_replies(oracle, tokenizer, jobs: list) -> dict:
    """{job.key: (text, finish, tokens)}: mlx-lm's generation in this process (`oracle`:
    mlx_lm.load's (model, tokenizer)), greedy or after mx.random.seed(job.seed), cut before the
    first EOS, turned into text by `tokenizer` (the API's): decoded whole for a raw completion, or,
    for a user message, as its reasoning and answer (cluster/reply.py's split, which the chat APIs use)."""
    from mlx_lm.sample_utils import make_sampler

    from cluster.reply import ReplyParser, prompt_ends_thinking
    from harness import oracle_reply

    out = {}
    for job in jobs:
        if job.key not in out:
            sampler = None if job.seed is None else make_sampler(SAMPLED_TEMPERATURE)
            tokens = oracle_reply(oracle, job.prompt, job.max_tokens, sampler, job.seed)
            if job.api == "completions":
                text = tokenizer.decode(tokens)
            else:
                parser = ReplyParser(tokenizer, prompt_ends_thinking(tokenizer, job.prompt))
                deltas = [parser.feed(t) for t in tokens] + [parser.finish()]
                text = "".join(d.reasoning + d.content for d in deltas)
            out[job.key] = text, "length" if len(tokens) == job.max_tokens else "stop", len(tokens)
    return out


def run_chat(clients: dict, model: str, job: Job, outcome: Outcome):
    """A user-message job through /v1/responses or /v1/messages: the text of its reasoning and
    answer deltas (or items / blocks), its finish as "stop" or "length", its output tokens."""
    message = [{"role": "user", "content": job.text}]
    if job.api == "responses":
        reply = clients["openai"].responses.create(model=model, input=message, max_output_tokens=job.max_tokens,
                                                   temperature=0, stream=job.stream)
        texts, ends = ("response.reasoning_text.delta", "response.output_text.delta"), \
            ("response.completed", "response.incomplete")
    else:
        # greedy (the anthropic client no longer takes sampling fields; the API still reads them)
        reply = clients["anthropic"].messages.create(model=model, messages=message, max_tokens=job.max_tokens,
                                                     stream=job.stream, extra_body={"temperature": 0})
        texts, ends = ("content_block_delta",), ("message_delta",)
    if not job.stream:
        if job.api == "responses":
            outcome.text = "".join(o.content[0].text for o in reply.output if o.type in ("reasoning", "message"))
            outcome.finish = "stop" if reply.status == "completed" else "length"
            outcome.completion_tokens = reply.usage.output_tokens
        else:
            outcome.text = "".join(getattr(b, "thinking", None) or getattr(b, "text", "") for b in reply.content)
            outcome.finish = "length" if reply.stop_reason == "max_tokens" else "stop"
            outcome.completion_tokens = reply.usage.output_tokens
        return
    with reply:
        for n, event in enumerate(reply, 1):
            if event.type == "error":  # the Responses stream's failure is an event, not an exception
                raise RuntimeError(f"error event: {event.message}")
            if event.type in texts:
                delta = event.delta
                outcome.text += delta if isinstance(delta, str) else getattr(delta, "thinking", None) or \
                    getattr(delta, "text", "")
            elif event.type in ends:
                if job.api == "responses":
                    outcome.finish = "stop" if event.response.status == "completed" else "length"
                    outcome.completion_tokens = event.response.usage.output_tokens
                else:
                    outcome.finish = "length" if event.delta.stop_reason == "max_tokens" else "stop"
                    outcome.completion_tokens = event.usage.output_tokens
            if job.disconnect_after is not None and n >= job.disconnect_after:
                break  # leaving the `with` closes the connection mid-stream


def run_one(clients: dict, model: str, job: Job, start: threading.Event) -> Outcome:
    """One job through `clients` ({"openai": ..., "anthropic": ...}, see api_clients)."""
    outcome = Outcome(job)
    start.wait()
    began = time.monotonic()
    client = clients["openai"]
    try:
        if job.api != "completions":
            run_chat(clients, model, job, outcome)
            outcome.seconds = time.monotonic() - began
            return outcome
        sampling = {"temperature": 0} if job.seed is None else {"temperature": SAMPLED_TEMPERATURE, "seed": job.seed}
        if not job.stream:
            reply = client.completions.create(model=model, prompt=job.text, max_tokens=job.max_tokens, **sampling)
            outcome.text, outcome.finish = reply.choices[0].text, reply.choices[0].finish_reason
            outcome.completion_tokens = reply.usage.completion_tokens
            outcome.seconds = time.monotonic() - began
            return outcome
        stream = client.completions.create(model=model, prompt=job.text, max_tokens=job.max_tokens, stream=True,
                                           stream_options={"include_usage": True}, **sampling)
        with stream:
            for n, chunk in enumerate(stream, 1):
                if chunk.choices:
                    outcome.text += chunk.choices[0].text
                    outcome.finish = chunk.choices[0].finish_reason or outcome.finish
                if chunk.usage:
                    outcome.completion_tokens = chunk.usage.completion_tokens
                if job.disconnect_after is not None and n >= job.disconnect_after:
                    break  # leaving the `with` closes the connection mid-stream
    except Exception as e:  # noqa: BLE001 (every failure is reported, none stops the others)
        outcome.error = f"{type(e).__name__}: {e}"
    outcome.seconds = time.monotonic() - began
    return outcome


class MapWatch:
    """Polls the coordinator's memory map until stopped; `seen` holds every status but `ready`."""

    def __init__(self, cluster, every_s: float = 0.25):
        self.cluster, self.every_s, self.seen, self.polls = cluster, every_s, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every_s):
            reply = self.cluster.memory_map()
            self.polls += 1
            self.seen += [f"{n.name}: {n.status} ({reply.state})" for n in reply.nodes if n.status != "ready"]

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        return self.seen


@contextmanager
def api_clients(api_url: str, timeout: float = 600.0):
    """{"openai": the official OpenAI client, "anthropic": the official Anthropic one} of the API at
    `api_url` (http://HOST:PORT/v1), closed on leaving."""
    import anthropic
    import openai

    with openai.OpenAI(base_url=api_url, api_key=API_KEY, max_retries=0, timeout=timeout) as oa, \
            anthropic.Anthropic(base_url=api_url.removesuffix("/v1"), api_key=API_KEY, max_retries=0,
                                timeout=timeout) as an:
        yield {"openai": oa, "anthropic": an}


def run_load(cluster, jobs: list) -> tuple:
    """Send every job at once; (outcomes, what the memory map showed besides `ready`, how many
    times it was read, seconds)."""
    start = threading.Event()
    results: list = [None] * len(jobs)
    with api_clients(cluster.api_url) as clients:
        def one(job):
            results[job.index] = run_one(clients, cluster.model_name, job, start)

        threads = [threading.Thread(target=one, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        watch = MapWatch(cluster)
        began = time.monotonic()
        start.set()
        for t in threads:
            t.join()
        took = time.monotonic() - began
        seen = watch.stop()
    return results, seen, watch.polls, took


def node_sessions(cluster) -> tuple:
    """(conversations the coordinator keeps cached, {node name: sessions it holds})."""
    request = urllib.request.Request(f"{cluster.api_url}/cluster", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        cached = json.loads(response.read())["cached_conversations"]
    return cached, {name: sessions for name, (sessions, _) in cluster.kv_state().items()}


def settled_sessions(cluster, timeout: float = 15.0, nodes=None) -> tuple:
    """node_sessions (of the nodes named in `nodes`, default all) once each holds just the cached
    conversations, or the last reading after `timeout` s (a cancelled request frees its sessions
    just after its client left)."""
    deadline = time.monotonic() + timeout
    while True:
        cached, held = node_sessions(cluster)
        held = {name: n for name, n in held.items() if nodes is None or name in nodes}
        if all(n == cached for n in held.values()) or time.monotonic() > deadline:
            return cached, held
        time.sleep(0.1)  # pacing between readings; the state is what we wait on


def reply_problems(outcomes: list, expected: dict) -> list:
    """Every reply that is not mlx-lm's (or not its start, for a client that left), or failed, in words."""
    out = []
    for o in outcomes:
        want_text, want_finish, want_tokens = expected[o.job.key]
        where = f"request {o.job.index} ({o.job.api}, {len(o.job.prompt)}-token prompt, " + \
            ("greedy)" if o.job.seed is None else f"seed {o.job.seed})")
        if o.error:
            out.append(f"{where} failed: {o.error}")
        elif o.cancelled:
            if not want_text.startswith(o.text):
                out.append(f"{where}, cancelled: its first chunks {o.text!r} are not the start of {want_text!r}")
        elif (o.text, o.finish, o.completion_tokens) != (want_text, want_finish, want_tokens):
            out.append(f"{where}: got {o.text!r} ({o.finish}, {o.completion_tokens} tokens), mlx-lm gives "
                       f"{want_text!r} ({want_finish}, {want_tokens} tokens)")
    return out


def problems(outcomes: list, expected: dict, seen: list, sessions: tuple, coordinator_log: str) -> list:
    """Everything that is not as it must be, in words (empty: all good)."""
    out = reply_problems(outcomes, expected)
    out += [f"the memory map showed {s}" for s in sorted(set(seen))]
    cached, held = sessions
    out += [f"node {name} holds {n} sessions after the run, the coordinator caches {cached} conversations"
            for name, n in held.items() if n != cached]
    for marker in ("lost node", "Traceback"):
        if marker in coordinator_log:
            line = next(l for l in coordinator_log.splitlines() if marker in l)
            out.append(f"the coordinator logged {marker!r}: {line.strip()}")
    return out


def summary(outcomes: list, took: float, polls: int) -> str:
    done = [o for o in outcomes if not o.cancelled and not o.error]
    left = [o for o in outcomes if o.cancelled]
    sizes = sorted({len(o.job.prompt) for o in outcomes})
    slowest = max((o.seconds for o in outcomes), default=0.0)
    return (f"{len(outcomes)} requests at once (prompts of {', '.join(map(str, sizes))} tokens) in {took:.1f} s: "
            f"{len(done)} ran to the end, {len(left)} clients went away mid-stream, "
            f"{sum(1 for o in outcomes if o.error)} failed; slowest request {slowest:.1f} s; memory map read "
            f"{polls} times during the run")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--short-tokens", type=int, default=50, help="tokens of a short prompt")
    p.add_argument("--long-tokens", type=int, default=2000, help="tokens of a long prompt")
    p.add_argument("--long-every", type=int, default=4, help="every Nth request has a long prompt (0: none)")
    p.add_argument("--disconnect-every", type=int, default=5, help="every Nth client goes away mid-stream (0: none)")
    p.add_argument("--seeded-every", type=int, default=3,
                   help=f"every Nth short request samples (temperature {SAMPLED_TEMPERATURE}) with a seed of its "
                        "own (0: none)")
    p.add_argument("--chat-every", type=int, default=3,
                   help="every Nth request, if greedy, is a user message through /v1/responses or /v1/messages, in "
                        "turn (0: none)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--distinct", type=int, default=8, help="different prompts of each length")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--layers", type=int, default=6, help="decoder layers of the tiny checkpoint")
    p.add_argument("--out", type=Path, help="work directory (default: a new temporary one)")
    return p.parse_args()


def main():
    import tempfile

    import mlx_lm

    import harness
    from mlx_kimi.kimi_tokenizer import load_tokenizer
    from mlx_kimi.tiny import TinyShape, make_tiny

    args = parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="load_test-"))
    print(f"load_test: work dir {work}; {os.cpu_count()} CPU cores shared by the client, the oracle and "
          f"{args.stages} node processes (timings are of this loaded machine)", flush=True)
    model_dir = make_tiny(work / "ckpt", TinyShape(layers=args.layers), model_type="kimi_k25")
    tokenizer = load_tokenizer(model_dir)
    jobs = make_jobs(tokenizer, args.requests, args.short_tokens, args.long_tokens, args.long_every,
                     args.disconnect_every, args.max_tokens, args.distinct, args.seeded_every,
                     chat_every=args.chat_every)
    began = time.monotonic()
    expected = oracle_replies(mlx_lm.load(str(model_dir)), tokenizer, jobs)
    print(f"mlx-lm oracle: {len(expected)} distinct replies in {time.monotonic() - began:.1f} s", flush=True)
    context = max(len(j.prompt) for j in jobs) + args.max_tokens
    (work / "cluster").mkdir(parents=True, exist_ok=True)
    with harness.ApiCluster(work / "cluster", model_dir, stages=args.stages,
                            coordinator_extra=["--api-port", "0", "--api-key", API_KEY,
                                               "--context", str(context)]) as cluster:
        outcomes, seen, polls, took = run_load(cluster, jobs)
        sessions = settled_sessions(cluster)
        found = problems(outcomes, expected, seen, sessions, cluster.coordinator.log())
    print(summary(outcomes, took, polls))
    print(f"sessions afterwards: {sessions[0]} cached conversations; held on the nodes: {sessions[1]}")
    for line in found:
        print(f"PROBLEM: {line}")
    print("PASS: every reply equals mlx-lm's, cancellations were clean, no node was lost" if not found
          else f"FAIL: {len(found)} problems")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
