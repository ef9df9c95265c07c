"""The generation loop in-process (no cluster): its tokens come from mlx-lm's own generate_step
on the tiny checkpoint, where the cluster's come from the scheduler. Where a reply ends (EOS,
max_tokens, a stop string, a client leaving), the checks made before any token, and what the
result and the loop's counts say."""

import json

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.generation import ContextTooLong, GenerationLoop, GenerationRequest, PromptTokenizer
from cluster.scheduler import GenerateError
from harness import oracle_reply
from mlx_kimi.checkpoint import text_config

CONTEXT = 256
DEFAULTS = {"temperature": 0.0, "top_p": 0.0, "top_k": 0}


class MlxLmTokens:
    """Coordinator.generate's interface over mlx-lm's generate_step; records what it was asked."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, prompt, max_tokens, sampling, stats, deadline):
        self.calls.append((max_tokens, sampling))
        stats.update(session_id="in-process", cached_tokens=0)
        for token, logprobs in generate_step(mx.array(prompt), self.model, max_tokens=max_tokens):
            yield int(token), logprobs[token].item()


@pytest.fixture
def vocab(tiny_dir) -> int:
    return text_config(json.loads((tiny_dir / "config.json").read_text()))["vocab_size"]


@pytest.fixture
def loop(oracle, vocab):
    model, tokenizer = oracle
    return GenerationLoop(tokenizer, CONTEXT, DEFAULTS, MlxLmTokens(model), lambda: ["here"], vocab)


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


def test_sampling_the_model_cannot_honour_and_foreign_ids_refused(loop, vocab, chat_prompt_ids):
    with pytest.raises(GenerateError, match=f"top_k must be below the model's vocabulary of {vocab}"):
        loop.start(GenerationRequest(chat_prompt_ids, 4, pb.SamplingParams(top_k=vocab)))
    with pytest.raises(GenerateError, match=r"prompt token ids must be in \[0, "):
        loop.start(GenerationRequest(chat_prompt_ids + [vocab], 4, pb.SamplingParams()))
    assert not loop.tokens.calls
    assert list(loop.start(GenerationRequest(chat_prompt_ids, 2, pb.SamplingParams(top_k=vocab - 1))))


class CountingTokenizer:
    """The tiny checkpoint's tokenizer, counting the characters it was given to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encoded = tokenizer, 0

    def encode(self, text, **options):
        self.encoded += len(text)
        return self.tokenizer.encode(text, **options)

    def apply_chat_template(self, messages, **options):
        return self.tokenizer.apply_chat_template(messages, **options)


def test_a_prompt_past_the_context_is_refused_before_it_is_encoded_whole(oracle):
    counting = CountingTokenizer(oracle[1])
    text = "word " * (3 * 2**20 // 2)  # 7.5 MiB in one message, as a client may send
    with pytest.raises(ContextTooLong) as error:
        PromptTokenizer(counting, CONTEXT).apply_chat_template([{"role": "user", "content": text}],
                                                                add_generation_prompt=True)
    assert not error.value.counted_all and error.value.prompt_tokens >= CONTEXT
    assert "more than" in error.value.message
    assert counting.encoded < 64 * CONTEXT, counting.encoded  # about the context's worth, not 7.5 MiB


@pytest.mark.parametrize("words", [3, 40, 2000])
def test_a_prompt_that_fits_is_encoded_as_the_tokenizer_does(oracle, words):
    """Near the limit too: counting a piece at a time never refuses a prompt that fits."""
    tokenizer = oracle[1]
    messages = [{"role": "user", "content": " ".join(f"w{i % 97}, x" for i in range(words))}]
    expected = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    for context in (len(expected) + 1, 4 * len(expected)):  # exactly full (one token to generate), roomy
        assert PromptTokenizer(tokenizer, context).apply_chat_template(messages, add_generation_prompt=True) == expected
    assert PromptTokenizer(tokenizer, 10**6).encode("Once upon") == list(tokenizer.encode("Once upon",
                                                                                         add_special_tokens=False))
