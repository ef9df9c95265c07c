"""Many users at once (issue 13's first "done when", at test size): concurrent streamed API requests
mixing short and long prompts, some clients leaving mid-stream, on a 2-stage loopback cluster.
Every reply that runs to the end equals single-process mlx-lm's; a client that leaves gets its
session freed on every node; the memory map never shows a node other than `ready`, and the
coordinator logs no lost node. scripts/load_test.py runs the same checks at full size (64 requests,
2,000-token prompts)."""

import sys
from pathlib import Path

import pytest

import harness
from mlx_kimi.kimi_tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import load_test  # noqa: E402

REQUESTS = 24
SHORT, LONG = 50, 300
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def jobs(tiny_dir, oracle):
    tokenizer = load_tokenizer(tiny_dir)
    jobs = load_test.make_jobs(tokenizer, REQUESTS, SHORT, LONG, long_every=6, disconnect_every=4,
                               max_tokens=MAX_TOKENS, distinct=2)
    return jobs, load_test.oracle_replies(oracle, tokenizer, jobs)


def test_concurrent_mixed_requests_with_clients_leaving(tmp_path, tiny_dir, jobs):
    jobs, expected = jobs
    assert {len(j.prompt) >= LONG for j in jobs} == {True, False} and any(j.disconnect_after for j in jobs)
    context = max(len(j.prompt) for j in jobs) + MAX_TOKENS
    with harness.ApiCluster(tmp_path, tiny_dir, stages=2, coordinator_extra=[
            "--api-port", "0", "--api-key", load_test.API_KEY, "--context", str(context)]) as cluster:
        outcomes, seen, polls, took = load_test.run_load(cluster, jobs)
        sessions = load_test.settled_sessions(cluster)
        log = cluster.coordinator.log()
        found = load_test.problems(outcomes, expected, seen, sessions, log)
    assert polls > 0, "the memory map was never read during the run"
    assert not found, "\n".join([load_test.summary(outcomes, took, polls), *found])
    assert "(cancelled)" in log, "no client left while its reply was generating: the test cancels nothing"
    finished = [o for o in outcomes if not o.cancelled]
    assert all(o.completion_tokens for o in finished) and len(finished) > REQUESTS // 2
