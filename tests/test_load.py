"""Many users at once (issue 13's first "done when", at test size): concurrent streamed API requests
mixing short and long prompts, greedy and seeded sampling, completions with user messages through
/v1/responses and /v1/messages, some clients leaving mid-stream, on a 2-stage loopback cluster.
Every reply that runs to the end equals single-process mlx-lm's; a client that leaves gets its
session freed on every node; the memory map never shows a node other than `ready`, and the
coordinator logs no lost node. scripts/load_test.py runs the same checks at full size (64 requests,
2,000-token prompts). And a stream kept waiting (here by a paused node) says it is alive."""

import json
import random
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import harness
from cluster.api_responses import KEEPALIVE_S
from mlx_kimi.kimi_tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import load_test  # noqa: E402

REQUESTS = 24
SHORT, LONG = 50, 300
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def jobs(tokenizer, oracle):
    jobs = load_test.make_jobs(tokenizer, REQUESTS, SHORT, LONG, long_every=6, disconnect_every=4,
                               max_tokens=MAX_TOKENS, distinct=2, seeded_every=3, chat_every=3)
    return jobs, load_test.oracle_replies(oracle, tokenizer, jobs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_dir):
    with harness.ApiCluster(tmp_path_factory.mktemp("load"), tiny_dir, stages=2, coordinator_extra=[
            "--api-port", "0", "--api-key", load_test.API_KEY, "--context", str(LONG + 64)]) as c:
        yield c


def test_concurrent_mixed_requests_with_clients_leaving(cluster, jobs):
    jobs, expected = jobs
    assert {len(j.prompt) >= LONG for j in jobs} == {True, False} and any(j.disconnect_after for j in jobs)
    assert {j.seed is None for j in jobs if not j.disconnect_after} == {True, False}
    assert {j.api for j in jobs} == set(load_test.API_SHAPES)
    outcomes, seen, polls, took = load_test.run_load(cluster, jobs)
    sessions = load_test.settled_sessions(cluster)
    log = cluster.coordinator.log()
    found = load_test.problems(outcomes, expected, seen, sessions, log)
    assert polls > 0, "the memory map was never read during the run"
    assert not found, "\n".join([load_test.summary(outcomes, took, polls), *found])
    assert "(cancelled)" in log, "no client left while its reply was generating: the test cancels nothing"
    finished = [o for o in outcomes if not o.cancelled]
    assert all(o.completion_tokens for o in finished) and len(finished) > REQUESTS // 2


def test_a_stream_kept_waiting_says_it_is_alive(cluster, tokenizer, oracle):
    """The last stage is paused (SIGSTOP) for longer than the client's read timeout: the stream
    sends SSE comments meanwhile, so the client keeps waiting, and the reply goes on, whole and
    right, once the node runs again (a pause this short is not a lost node)."""
    pause_s, read_timeout_s = 4.0, 2.5  # a pause under membership's 6 s of silence for a lost node
    assert KEEPALIVE_S < read_timeout_s
    text, ids = load_test.prompt_of(tokenizer, random.Random(7), SHORT)
    job = load_test.Job(0, text, ids, max_tokens=48, disconnect_after=None)
    want_text, want_finish, want_tokens = load_test.oracle_replies(oracle, tokenizer, [job])[job.key]
    assert want_tokens >= 24, "the test needs a reply still generating when the node stops: pick another seed"
    body = {"model": cluster.model_name, "prompt": text, "max_tokens": 48, "temperature": 0, "stream": True}
    peer = cluster.peers[0]
    got, comments, resume_at = [], 0, None
    try:
        request = urllib.request.Request(f"{cluster.api_url}/completions", data=json.dumps(body).encode(), headers={
            "Authorization": f"Bearer {load_test.API_KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=read_timeout_s) as response:  # the timeout of every read
            for line in (raw.decode().rstrip("\n") for raw in response):
                if line.startswith(":"):
                    comments += 1
                elif line.startswith("data: {"):
                    got.append(json.loads(line[len("data: "):])["choices"][0])
                    if len(got) == 1:  # the reply has begun: stop the last stage mid-generation
                        peer.kill(signal.SIGSTOP)
                        resume_at = time.monotonic() + pause_s
                if resume_at and time.monotonic() >= resume_at:  # read between comments: no sleep here
                    peer.kill(signal.SIGCONT)
                    resume_at = None
    finally:
        peer.kill(signal.SIGCONT)
    assert comments >= 2, f"{comments} keep-alive comments during a {pause_s:.0f} s pause"
    assert "".join(c["text"] for c in got) == want_text and got[-1]["finish_reason"] == want_finish
    assert all(n.status == "ready" for n in cluster.memory_map().nodes)
