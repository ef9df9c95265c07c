"""Continuous batching and pipelined prefill on a real 2-stage cluster (separate node processes).

Concurrent generations run as batched decode steps on every stage and still give mlx-lm's tokens
(its own batch_generate, and each prompt's single-stream generation, greedy or seeded); a long
prompt prefills in chunks while a running generation keeps producing tokens.
"""

import random
import threading

import grpc
import pytest
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler

from cluster.generated import kimi_cluster_pb2 as pb
from harness import LocalCluster, oracle_reply, run_at_once

TOKENS = 16
CHUNK = 32  # --prefill-chunk: a long prompt is many chunks


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory, tiny_dir):
    with LocalCluster(tmp_path_factory.mktemp("batching"), tiny_dir, stages=2,
                      coordinator_extra=["--prefill-chunk", str(CHUNK)]) as cluster:
        yield cluster


def _params(temperature=0.0, top_p=0.0, seed=None) -> pb.SamplingParams:
    params = pb.SamplingParams(temperature=temperature, top_p=top_p)
    if seed is not None:
        params.seed = seed
    return params


def _stream(cluster, prompt: list, params: pb.SamplingParams, events: list, lock, name: str, max_tokens=TOKENS):
    """Generate, appending (name, token id) to `events` as each token arrives; the ids."""
    ids = []
    request = pb.GenerateRequest(prompt_tokens=prompt, max_tokens=max_tokens, sampling=params)
    for event in cluster.client.Generate(request, timeout=300):
        if event.HasField("token") and event.token.id >= 0:
            ids.append(event.token.id)
            with lock:
                events.append((name, event.token.id))
    return ids


def _batching(cluster) -> dict:
    return {name: (h.max_batch, h.batched_rows) for name, h in cluster.health().items()}


def test_concurrent_generations_are_batched_and_equal_mlx_lm(cluster2, oracle, make_chat_prompt):
    model, tokenizer = oracle
    texts = ["Hi!", "Name a cat.", "What is two plus two?", "Tell me a story.", "Why?", "Count to three."]
    prompts = [make_chat_prompt(tokenizer, t) for t in texts]
    single = [oracle_reply(oracle, p, TOKENS) for p in prompts]
    batched = batch_generate(model, tokenizer, prompts, max_tokens=TOKENS, return_token_ids=True).token_ids
    assert batched == single  # mlx-lm's own batched generation equals its single streams here
    assert len({tuple(s) for s in single}) > 2  # the prompts lead to different replies
    assert all(rows == 0 for _, rows in _batching(cluster2).values())

    events, lock = [], threading.Lock()
    got = run_at_once([lambda p=p, i=i: _stream(cluster2, p, _params(), events, lock, i)
                        for i, p in enumerate(prompts)])
    assert got == batched
    batching = _batching(cluster2)
    # every stage ran several sessions' decode steps as one forward
    assert all(max_batch >= 2 and rows >= 2 for max_batch, rows in batching.values()), batching


@pytest.mark.parametrize("seeds", [(7, 1234, None, 99)])
def test_seeded_rows_keep_their_own_sampling(cluster2, oracle, make_chat_prompt, seeds):
    """Seeded, differently sampled and greedy sessions in the same batches: each row draws with
    its own parameters and random state, as its own single-stream mlx-lm run does."""
    tokenizer = oracle[1]
    prompts = [make_chat_prompt(tokenizer, t) for t in ["Hi!", "Name a cat.", "Hi!", "Name a dog."]]
    params = [_params(0.8, 0.0, seeds[0]), _params(1.0, 0.9, seeds[1]), _params(), _params(0.7, 0.0, seeds[3])]
    expected = [oracle_reply(oracle, p, TOKENS, sampler=make_sampler(s.temperature, top_p=s.top_p),
                             seed=s.seed if s.HasField("seed") else None)
                for p, s in zip(prompts, params)]
    assert expected[0] != expected[2]  # the seeded row really samples
    before = _batching(cluster2)
    events, lock = [], threading.Lock()
    got = run_at_once([lambda p=p, s=s, i=i: _stream(cluster2, p, s, events, lock, i)
                        for i, (p, s) in enumerate(zip(prompts, params))])
    assert got == expected
    after = _batching(cluster2)
    assert any(after[n][1] > before[n][1] for n in after), (before, after)


def test_decode_goes_on_while_a_long_prompt_prefills(cluster2, oracle, make_chat_prompt):
    """A running generation keeps producing tokens while another session's long prompt prefills
    in chunks (ordering of tokens, not wall time): its tokens arrive between the long prompt's
    request and that prompt's first token."""
    tokenizer = oracle[1]
    short = make_chat_prompt(tokenizer, "Hi!")
    rng = random.Random(0)
    long_prompt = [rng.randrange(256, 500) for _ in range(20 * CHUNK)]
    n_short = 96
    expected_short = oracle_reply(oracle, short, n_short)
    expected_long = oracle_reply(oracle, long_prompt, 4)
    assert len(expected_short) == n_short, "the short reply must not stop early"
    events, lock = [], threading.Lock()
    short_started = threading.Event()
    results = {}

    def run_short():
        ids = []
        request = pb.GenerateRequest(prompt_tokens=short, max_tokens=n_short, sampling=_params())
        for event in cluster2.client.Generate(request, timeout=300):
            if event.HasField("token") and event.token.id >= 0:
                ids.append(event.token.id)
                with lock:
                    events.append(("short", event.token.id))
                short_started.set()
        results["short"] = ids

    thread = threading.Thread(target=run_short)
    thread.start()
    assert short_started.wait(120)
    with lock:
        events.append(("long sent", None))
    results["long"] = _stream(cluster2, long_prompt, _params(), events, lock, "long", max_tokens=4)
    thread.join(timeout=300)
    assert results["short"] == expected_short
    assert results["long"] == expected_long
    names = [name for name, _ in events]
    sent, first_long = names.index("long sent"), names.index("long")
    during = names[sent:first_long].count("short")
    # the long prompt is 20 chunks; without interleaving the short reply would stall for all of them
    assert during >= 5, f"only {during} tokens of the running reply during the long prefill: {names}"


def test_a_row_that_fails_fails_alone(cluster2, oracle, make_chat_prompt):
    """A request whose sampling fails on the last stage (top_k past the vocabulary) fails with
    the reason, while a reply batched beside it goes on with mlx-lm's tokens."""
    tokenizer = oracle[1]
    good = make_chat_prompt(tokenizer, "Hi!")
    expected = oracle_reply(oracle, good, 64)
    events, lock, results = [], threading.Lock(), {}
    def run_good():
        try:
            results["good"] = _stream(cluster2, good, _params(), events, lock, "good", max_tokens=64)
        except grpc.RpcError as e:  # reported below
            results["good"] = e.details()

    thread = threading.Thread(target=run_good)
    thread.start()
    failures = []
    while thread.is_alive() and len(failures) < 8:
        request = pb.GenerateRequest(prompt_tokens=good[:5], max_tokens=4,
                                     sampling=pb.SamplingParams(temperature=1.0, top_k=100_000))
        try:
            list(cluster2.client.Generate(request, timeout=60))
        except grpc.RpcError as e:
            failures.append(e.details())
    thread.join(timeout=300)
    assert failures and all("top_k" in f for f in failures), failures
    assert results["good"] == expected
