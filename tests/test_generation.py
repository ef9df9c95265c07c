"""The generation loop in-process (no cluster): its tokens come from mlx-lm's own generate_step
on the tiny checkpoint, where the cluster's come from the scheduler. Where a reply ends (EOS,
max_tokens, a stop string, a client leaving), the checks made before any token, and what the
result and the loop's counts say."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.generation import ContextTooLong, GenerationLoop, GenerationRequest
from cluster.scheduler import GenerateError
from harness import oracle_reply

CONTEXT = 256
DEFAULTS = {"temperature": 0.0, "top_p": 0.0, "top_k": 0}


class MlxLmTokens:
    """Coordinator.generate's interface over mlx-lm's generate_step; records what it was asked."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, prompt, max_tokens, sampling, stats, deadline, speculate):
        self.calls.append((max_tokens, sampling))
        stats.update(session_id="in-process", cached_tokens=0)
        for token, logprobs in generate_step(mx.array(prompt), self.model, max_tokens=max_tokens):
            yield int(token), logprobs[token].item()


@pytest.fixture
def loop(oracle):
    model, tokenizer = oracle
    return GenerationLoop(tokenizer, CONTEXT, DEFAULTS, MlxLmTokens(model), lambda: ["here"])


def run(loop, prompt, **fields):
    generation = loop.start(GenerationRequest(prompt, fields.pop("max_tokens", 12), pb.SamplingParams(), **fields))
    pieces = list(generation)
    return pieces, generation.result


def test_raw_text_is_the_oracle_reply(loop, oracle, chat_prompt_ids):
    want = oracle_reply(oracle, chat_prompt_ids, 12)
    pieces, result = run(loop, chat_prompt_ids)
    assert [p.token for p in pieces if p.token is not None] == want
    assert "".join(p.delta.content for p in pieces) == oracle[1].decode(want)
    assert result.finish_reason == ("length" if len(want) == 12 else "stop")
    assert (result.prompt_tokens, result.completion_tokens) == (len(chat_prompt_ids), len(want))
    assert result.ttft_s > 0 and loop.in_flight == 0 and loop.served == 1
    assert loop.tokens.calls[0][1].temperature == 0 and loop.tokens.calls[0][1].HasField("top_k")  # defaults filled


def test_a_stop_string_ends_the_reply_before_it(loop, oracle, chat_prompt_ids):
    text = oracle[1].decode(oracle_reply(oracle, chat_prompt_ids, 12))
    assert len(text) > 6, f"the tiny model's reply {text!r} is too short to hold a stop string"
    pieces, result = run(loop, chat_prompt_ids, stops=[text[4:6]])
    content = "".join(p.delta.content for p in pieces)
    assert content == text[:text.find(text[4:6])] and result.finish_reason == "stop"


def test_a_client_that_left_stops_it_and_frees_its_session(loop, chat_prompt_ids):
    seen = []
    request = GenerationRequest(chat_prompt_ids, 12, pb.SamplingParams(), cancelled=lambda: len(seen) >= 2)
    generation = loop.start(request)
    for piece in generation:
        seen.append(piece)
    assert len(seen) == 2 and generation.result.finish_reason == "cancelled"
    assert generation.stats["cancelled"]  # the scheduler frees the session instead of keeping it
    assert loop.in_flight == 0


def test_refused_before_any_token(loop, chat_prompt_ids):
    with pytest.raises(ContextTooLong) as error:
        loop.start(GenerationRequest(chat_prompt_ids, CONTEXT, pb.SamplingParams()))
    assert f"exceeds the planned context of {CONTEXT} tokens" in error.value.message
    with pytest.raises(GenerateError, match="top_p"):
        loop.start(GenerationRequest(chat_prompt_ids, 4, pb.SamplingParams(top_p=1.5)))
    assert not loop.tokens.calls and loop.served == 0
    # no max_tokens: what the context leaves, up to the default
    generation = loop.start(GenerationRequest(chat_prompt_ids, None, pb.SamplingParams(), default_max_tokens=10**6))
    assert generation.max_tokens == CONTEXT - len(chat_prompt_ids)
