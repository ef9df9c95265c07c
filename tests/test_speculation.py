"""Speculative decoding: drafting by prompt lookup at the coordinator, verification at the last stage.

In-process: the draft, the choice of how far to draft, and Session.verify's rejection rule (a
chi-square test over many seeded draws against the distribution sample() draws from). On real
clusters (separate node processes): greedy tokens equal mlx-lm's and the non-speculative cluster's
with 1, 2 and 3 stages, with concurrent requests, and after a node is killed mid-generation; a
reply copying its prompt has drafts accepted, and health, the map and the request log say so.
"""

import math
import re
import signal

import mlx.core as mx
import pytest

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.speculation import (MAX_DRAFT, PromptLookup, Speculator, StepCost, best_draft,
                                 speculation_mode)
from cluster.stage_session import Session, most_likely
from harness import LocalCluster, oracle_reply, poll, run_at_once
from test_cluster_failures import generate_during, stage_ranges

TOKENS = 40
COPY_TEXT = "Repeat this text exactly: the quick brown fox jumps over the lazy dog. " * 2


# ---- the coordinator's side ------------------------------------------------------------------------


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    assert lookup.draft(3) == [4, 5, 9]     # "1 2 3" came before 4 5 9 (the later "2 3" is shorter)
    lookup.extend([4])
    assert lookup.draft(2) == [5, 9]        # "2 3 4" occurred once, before 5 9
    assert PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]).draft(3) == [7, 8, 6]  # the latest "2 3"
    assert PromptLookup([1, 2, 3]).draft(4) == []  # nothing occurred before
    assert PromptLookup([5, 5]).draft(4) == [5, 5, 5, 5]  # a loop is drafted on, as far as asked
    assert PromptLookup([1, 7, 8, 7, 8]).draft(5) == [7, 8, 7, 8, 7]


def test_a_prediction_is_drafted_first_and_followed_past_an_edit():
    prompt, prediction = [50, 51, 52], [1, 2, 3, 4, 5, 6, 7, 8]
    lookup = PromptLookup(prompt, prediction)
    assert lookup.draft(3) == [1, 2, 3]       # nothing replied yet: the prediction's start
    lookup.extend([1, 2])
    assert lookup.draft(3) == [3, 4, 5]
    lookup.extend([3, 40, 41])                 # an edit: 4 5 replaced by 40 41
    assert lookup.draft(3) == []               # nothing the reply ends with is predicted, nor in the session
    lookup.extend([6])
    assert lookup.draft(3) == [7, 8]           # the copy picks up after the edit
    lookup.extend([7, 8, 51])
    assert lookup.draft(2) == [52, 1]          # past the prediction: looked up in the session as before
    # where the reply's last token occurs twice, the place at or after where it stood is taken
    repeated = PromptLookup([], [9, 1, 2, 9, 3, 4])
    repeated.extend([9, 1, 2, 9])
    assert repeated.draft(2) == [3, 4]
    assert PromptLookup([1, 2, 1], []).draft(2) == [2, 1]  # no prediction: prompt lookup alone


def test_draft_length_follows_acceptance_and_cost():
    assert best_draft(0.0, 0.1, MAX_DRAFT)[0] == 0
    assert best_draft(0.95, 0.02, MAX_DRAFT)[0] == MAX_DRAFT
    assert 0 < best_draft(0.6, 0.1, MAX_DRAFT)[0] < MAX_DRAFT
    assert best_draft(0.95, 0.02, 3)[0] == 3  # never past the room left
    auto, on = Speculator("auto", StepCost()), Speculator("on", StepCost())
    assert auto.draft_length(10) > 0  # a new session tries where a position costs little (b's prior)
    for _ in range(5):  # five failed drafts outweigh the prior: a sampled reply that copies nothing stops soon
        auto.observe([7], [6])
    assert auto.draft_length(10) == 0
    for speculator in (auto, on):
        for _ in range(40):
            speculator.observe([7, 8], [6])  # every guess wrong
    assert auto.draft_length(10) == 0 and on.draft_length(10) == 1  # auto turns itself off; on keeps 1
    for _ in range(60):
        auto.observe([1, 2, 3], [1, 2, 3, 4])
    assert auto.draft_length(100) >= 4 and auto.draft_length(2) == 2
    assert Speculator("off", StepCost()).draft_length(10) == 0


def test_a_wider_step_that_costs_more_drafts_less():
    cheap, dear = StepCost(), StepCost()
    for cost, per_position in ((cheap, 0.001), (dear, 0.5)):
        for _ in range(50):
            cost.record(1, 0.1)
            cost.record(5, 0.1 + 4 * per_position)
    assert cheap.position_cost < 0.03 and dear.position_cost > 4
    sure = [Speculator("auto", c) for c in (cheap, dear)]
    for s in sure:
        s.acceptance = 0.8
    assert sure[0].draft_length(20) > 4 and sure[1].draft_length(20) == 0
    for _ in range(400):  # no step drafts: the cost drifts back to the prior, and drafting is tried again
        dear.record(1, 0.1)
    assert sure[1].draft_length(20) > 0


def test_speculation_mode_per_request():
    greedy, seeded = pb.SamplingParams(temperature=0.0), pb.SamplingParams(temperature=0.7, seed=3)
    assert speculation_mode("auto", None, greedy) == "auto"
    assert speculation_mode("auto", None, seeded) == "off"  # seeded draws stay mlx-lm's
    assert speculation_mode("auto", True, seeded) == "on"
    assert speculation_mode("on", False, greedy) == "off"
    assert speculation_mode("on", True, greedy, constrained=True) == "off"  # a mask per position
    assert speculation_mode("off", None, seeded, predicted=True) == "on"  # a prediction asks for it
    assert speculation_mode("auto", False, greedy, predicted=True) == "off"  # unless the request says otherwise


# ---- the last stage's verification -----------------------------------------------------------------

VOCAB_LOGITS = [2.0, 1.2, 0.5, 0.0, -1.0]
CHI2_P001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}  # chi-square quantile 0.999 by degrees of freedom
DRAWS = 1500


def _logprobs(rows: list) -> mx.array:
    logits = mx.array(rows)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _same_distribution(a: list, b: list) -> bool:
    """Chi-square test of homogeneity of two samples' counts per token, at p = 0.001 (the seeds
    are fixed, so the outcome is too)."""
    cells = [(x, y) for x, y in zip(a, b) if x + y]
    na, nb = sum(a), sum(b)
    stat = sum((x - na * (x + y) / (na + nb)) ** 2 / (na * (x + y) / (na + nb)) +
               (y - nb * (x + y) / (na + nb)) ** 2 / (nb * (x + y) / (na + nb)) for x, y in cells)
    return stat < CHI2_P001[len(cells) - 1]


def test_most_likely_ranks_each_row_and_leaves_out_what_cannot_be_drawn():
    rows = _logprobs([[0.0, 3.0, 1.0, 2.0, -1.0], [-math.inf, 0.0, -math.inf, -math.inf, 1.0]])
    first, second = most_likely(rows, 3)
    assert list(first.tokens) == [1, 3, 2]
    assert list(first.logprobs) == pytest.approx([rows[0, i].item() for i in (1, 3, 2)])
    assert list(second.tokens) == [4, 1] and len(second.logprobs) == 2  # the masked ones are no alternatives
    assert [list(t.tokens) for t in most_likely(rows, 20)] == [[1, 3, 2, 0, 4], [4, 1]]  # past the vocabulary


def test_greedy_verify_keeps_the_argmax_prefix():
    rows = _logprobs([[0, 5, 0, 0, 0], [0, 0, 5, 0, 0], [5, 0, 0, 0, 0], [0, 0, 0, 5, 0]])
    params = pb.SamplingParams(temperature=0.0)
    assert Session([], 0).verify(rows, [1, 2, 0], params) == [1, 2, 0, 3]  # all kept, and the bonus
    assert Session([], 0).verify(rows, [1, 4, 0], params) == [1, 2]        # corrected at the first miss
    assert Session([], 0).verify(rows[:1], [], params) == [1]


@pytest.mark.parametrize("params", [pb.SamplingParams(temperature=0.8),
                                    pb.SamplingParams(temperature=1.0, top_p=0.9)])
def test_sampled_verify_keeps_the_distribution(params):
    """Over many seeded draws, the first token of a verified step is distributed as sample()
    draws it alone (the drafted token is the most likely one, so the rejection path runs often
    too), and the second, given the first was the drafted one, as sample() draws from the next row."""
    first, second = [0.0, 1.5, 0.3, 0.0, -1.0], VOCAB_LOGITS
    rows = _logprobs([first, second, second])
    plain, plain_next, verified, after_kept = [0] * 5, [0] * 5, [0] * 5, [0] * 5
    for seed in range(DRAWS):
        params.seed = seed
        plain[Session([], 0).sample(rows[:1], params).item()] += 1
        plain_next[Session([], 0).sample(rows[1:2], params).item()] += 1
        params.seed = DRAWS + seed
        tokens = Session([], 0).verify(rows, [1, 0], params)
        verified[tokens[0]] += 1
        if tokens[0] == 1:
            after_kept[tokens[1]] += 1
    assert 0.3 < plain[1] / DRAWS < 0.9  # the draft is rejected often enough to test that path
    assert _same_distribution(verified, plain), (verified, plain)
    assert sum(after_kept) > DRAWS // 4 and _same_distribution(after_kept, plain_next), (after_kept, plain_next)


def test_verify_replays_from_its_random_state():
    params = pb.SamplingParams(temperature=1.0, seed=11)
    rows = _logprobs([VOCAB_LOGITS] * 4)
    session = Session([], 0)
    session.sample(rows[:1], params)
    state = session.rng_seed
    once = [session.verify(rows, [0, 0, 1], params) for _ in range(5)]
    replayed = Session([], 0)
    replayed.sample(rows[:1], params, rng_state=state)  # a replayed session is told where it stopped
    again = [replayed.verify(rows, [0, 0, 1], params, rng_state=state if i == 0 else None) for i in range(5)]
    assert once == again and len({tuple(t) for t in once}) > 1


# ---- on real clusters ------------------------------------------------------------------------------


def _generate(cluster, prompt: list, max_tokens=TOKENS, speculate=None, **sampling) -> list:
    return cluster.generate(prompt_tokens=prompt, max_tokens=max_tokens, timeout=300, speculate=speculate,
                            **sampling)[0]


def _last_stage_speculation(cluster) -> pb.Speculation:
    last = max(cluster.memory_map().nodes, key=lambda n: n.end)
    return cluster.health()[last.name].speculation


@pytest.mark.parametrize("stages", [1, 3])  # 2 stages: cluster2 below
def test_greedy_tokens_equal_mlx_lm_with_and_without_speculation(stages, tmp_path, tiny_dir, oracle,
                                                                  make_chat_prompt):
    tokenizer = oracle[1]
    prompts = [make_chat_prompt(tokenizer, COPY_TEXT), make_chat_prompt(tokenizer, "Hi!")]
    # the copy prompt's reply ends at the context's last position: drafts near it are shortened, never past it
    context = len(prompts[0]) + TOKENS
    with LocalCluster(tmp_path, tiny_dir, stages=stages,
                      coordinator_extra=["--speculate", "on", "--context", str(context)]) as cluster:
        for prompt in prompts:
            expected = oracle_reply(oracle, prompt, TOKENS)
            assert prompt is not prompts[0] or len(expected) == TOKENS, "the copy reply must reach the context's end"
            assert _generate(cluster, prompt) == expected
            assert _generate(cluster, prompt, speculate=False) == expected
        spec = cluster.memory_map().speculation
        assert spec.drafted > 0 and spec.accepted > 0, spec
        assert spec.steps < spec.tokens  # fewer steps than tokens: drafts were accepted
        last = _last_stage_speculation(cluster)
        assert last.drafted == spec.drafted and last.accepted == spec.accepted, (last, spec)
        log = cluster.coordinator.log()
        assert re.search(r"; \d+ steps \([\d.]+ per token\), [1-9]\d* drafted, [1-9]\d* accepted", log), log


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory, tiny_dir):
    with LocalCluster(tmp_path_factory.mktemp("speculation"), tiny_dir, stages=2,
                      coordinator_extra=["--speculate", "on"]) as cluster:
        yield cluster


def test_speculating_and_plain_rows_run_together(cluster2, oracle, make_chat_prompt):
    """Concurrent requests, three speculating and three not: every reply equals mlx-lm's, and the
    plain rows still ran batched on every stage (the verify steps run as forwards of their own)."""
    tokenizer = oracle[1]
    texts = ["Hi!", COPY_TEXT, "Why?", "Name a cat.", COPY_TEXT, "Tell me a story."]
    prompts = [make_chat_prompt(tokenizer, t) for t in texts]
    expected = [oracle_reply(oracle, p, TOKENS) for p in prompts]
    got = run_at_once([lambda p=p, i=i: _generate(cluster2, p, speculate=i % 2 == 0) for i, p in enumerate(prompts)])
    assert got == expected
    batching = {name: h.batched_rows for name, h in cluster2.health().items()}
    assert all(rows >= 2 for rows in batching.values()), batching


def test_forced_speculation_with_a_seed_repeats_its_draws(cluster2, oracle, make_chat_prompt):
    prompt = make_chat_prompt(oracle[1], COPY_TEXT)
    before = _last_stage_speculation(cluster2)
    runs = [_generate(cluster2, prompt, temperature=0.8, seed=5, speculate=True) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == TOKENS
    assert _last_stage_speculation(cluster2).drafted > before.drafted


def test_a_request_cancelled_mid_verification_frees_its_caches(cluster2, oracle, make_chat_prompt):
    """A client leaving while its steps verify drafts: its session is freed on every stage (the
    sessions cached for earlier requests stay)."""
    prompt = make_chat_prompt(oracle[1], COPY_TEXT + " Then stop.")  # continues no cached session
    cached = {name: sessions for name, (sessions, _) in cluster2.kv_state().items()}
    request = pb.GenerateRequest(prompt_tokens=prompt, max_tokens=400, speculate=True)
    call = cluster2.client.Generate(request, timeout=300)
    before = _last_stage_speculation(cluster2).drafted
    for event in call:  # leave once drafts have been verified
        if event.HasField("token") and _last_stage_speculation(cluster2).drafted > before:
            break
    call.cancel()
    poll(cluster2.kv_state, lambda state: {name: s for name, (s, _) in state.items()} == cached, 60,
         "every stage to free the cancelled session")


def test_a_node_killed_mid_generation_replays_exactly(tmp_path, tiny_dir, oracle, make_chat_prompt):
    """kill -9 of the last stage of three during speculating generations, greedy and seeded, and
    one drafting from a prediction with an edit in it: the stage before takes its layers, each
    session is replayed in the steps it ran (the drafted tokens accepted included) and then
    verifies the same draft with the same random state; the prediction's lookup keeps its place.
    Every reply equals an uninterrupted run (mlx-lm's for greedy, the same cluster's before the
    kill for the seeded ones)."""
    tokenizer = oracle[1]
    prompts = [make_chat_prompt(tokenizer, t) for t in (COPY_TEXT, "Hi!")]
    with LocalCluster(tmp_path, tiny_dir, stages=3, coordinator_extra=["--speculate", "on"]) as cluster:
        requests, expected = [], []
        for i, prompt in enumerate(prompts):
            requests.append(pb.GenerateRequest(prompt_tokens=prompt, max_tokens=64))
            expected.append(oracle_reply(oracle, prompt, 64))
            seeded = pb.SamplingParams(temperature=0.8, seed=40 + i)
            requests.append(pb.GenerateRequest(prompt_tokens=prompt, max_tokens=64, sampling=seeded))
            expected.append(_generate(cluster, prompt, 64, temperature=0.8, seed=40 + i))
        assert len(expected[2]) > 30, "the greedy reply to 'Hi!' must run past the prediction's edit"
        edited = expected[2][:20] + expected[2][22:]  # the reply less two tokens: where it leaves it, found again
        requests.append(pb.GenerateRequest(prompt_tokens=prompts[1], max_tokens=64, prediction_tokens=edited))
        expected.append(expected[2])
        last = next(n for n in cluster.peers if stage_ranges(cluster.memory_map())[n.name] == (4, 6))
        drafted = cluster.memory_map().speculation.drafted
        results = generate_during(cluster, requests, lambda: last.kill(signal.SIGKILL), after_tokens=3)
        assert results == expected
        assert cluster.memory_map().speculation.drafted > drafted
        assert "replaying" in cluster.coordinator.log()
