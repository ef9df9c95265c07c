"""The generation loop in-process (no cluster): its tokens come from mlx-lm's own generate_step
on the tiny checkpoint, where the cluster's come from the scheduler. Where a reply ends (EOS,
max_tokens, a stop string, a client leaving), the checks made before any token, and what the
result and the loop's counts say."""

import dataclasses
import json

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.generation import ContextTooLong, GenerationLoop, GenerationRequest, PromptTokenizer
from cluster.scheduler import GenerateError
from cluster.shaping import put_penalties, shape_logits
from harness import oracle_reply
from mlx_kimi.checkpoint import text_config
from mlx_kimi.constrain import Constraint, ConstraintSpec, Tool
from mlx_kimi.penalties import Penalties

CONTEXT = 256
DEFAULTS = {"temperature": 0.0, "top_p": 0.0, "top_k": 0}


class MlxLmTokens:
    """Coordinator.generate's interface over mlx-lm's generate_step; records what it was asked.
    A shaper's step fields go through the wire format and are applied as the last stage does."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, prompt, max_tokens, sampling, stats, deadline, shaper=None, speculate=None, prediction=(),
                 score_prompt=False):
        self.calls.append((max_tokens, sampling))
        stats.update(session_id="in-process", cached_tokens=0)

        def as_the_last_stage(tokens, logits):
            step = pb.ForwardRequest(sample=True, sampling=sampling)
            shaper.fill(step, tokens[len(prompt):].tolist())
            return shape_logits(logits, pb.ForwardRequest.FromString(step.SerializeToString()))

        processors = [as_the_last_stage] if shaper else None
        sampler = make_sampler(sampling.temperature) if sampling.temperature else None
        for token, logprobs in generate_step(mx.array(prompt), self.model, max_tokens=max_tokens, sampler=sampler,
                                             logits_processors=processors):
            yield int(token), logprobs[token].item(), None


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
    with pytest.raises(GenerateError, match="top_logprobs must be at most 20"):
        loop.start(GenerationRequest(chat_prompt_ids, 4, pb.SamplingParams(top_logprobs=21)))
    with pytest.raises(GenerateError, match=r"prompt token ids must be in \[0, "):
        loop.start(GenerationRequest(chat_prompt_ids + [vocab], 4, pb.SamplingParams()))
    with pytest.raises(GenerateError, match=r"prediction token ids must be in \[0, "):
        loop.start(GenerationRequest(chat_prompt_ids, 4, pb.SamplingParams(), prediction=[1, vocab]))
    with pytest.raises(GenerateError, match=f"longer than any reply can be .the planned context is {CONTEXT} tokens"):
        loop.start(GenerationRequest(chat_prompt_ids, 4, pb.SamplingParams(), prediction=[1] * (CONTEXT + 1)))
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


ANSWER = {"type": "object", "additionalProperties": False, "required": ["name", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 5}, "ok": {"type": "boolean"}}}


def instant_prompt(tokenizer) -> list:
    messages = [{"role": "user", "content": "Hi!"}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=False))


def test_a_schema_and_penalties_through_the_loop_equal_mlx_lm_with_the_same_processors(loop, oracle):
    model, tokenizer = oracle
    prompt = instant_prompt(tokenizer)
    penalties = Penalties(presence_penalty=0.5, repetition_penalty=1.1, logit_bias={9: 2.0})
    sampling = pb.SamplingParams(temperature=1.0, seed=3)
    put_penalties(sampling, penalties)
    mx.random.seed(3)
    generation = loop.start(GenerationRequest(prompt, 60, sampling, raw=False, constraint=ConstraintSpec(json_schema=ANSWER)))
    pieces = list(generation)
    reply = [p.token for p in pieces if p.token is not None]
    jsonschema.validate(json.loads("".join(p.delta.content for p in pieces)), ANSWER)
    assert generation.result.finish_reason == "stop"

    constraint = Constraint.for_spec(ConstraintSpec(json_schema=ANSWER), tokenizer, 512, tokenizer.eos_token_ids)
    mx.random.seed(3)
    want = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=60, sampler=make_sampler(1.0),
                                  logits_processors=penalties.processors() + [constraint.processor(len(prompt))]):
        if int(token) in tokenizer.eos_token_ids:
            break
        want.append(int(token))
    assert reply == want


def test_a_constrained_reply_cut_by_max_tokens_says_length(loop, oracle):
    tokenizer = oracle[1]
    arguments = {"type": "object", "additionalProperties": False, "required": ["x"],
                 "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}}
    spec = ConstraintSpec(tools=(Tool("f", arguments),), tool_choice="required")
    generation = loop.start(GenerationRequest(instant_prompt(tokenizer), 12, pb.SamplingParams(), raw=False,
                                              constraint=spec))
    list(generation)
    assert generation.result.finish_reason == "length"
    forced = loop.start(GenerationRequest(instant_prompt(tokenizer), 80, pb.SamplingParams(), raw=False,
                                          constraint=dataclasses.replace(spec, parallel_tool_calls=False)))
    calls = [c for p in forced for c in p.delta.tool_calls]
    assert forced.result.finish_reason == "tool_calls" and [c.name for c in calls] == ["f"]
    jsonschema.validate(json.loads(calls[0].arguments), arguments)


def test_a_schema_the_grammar_engine_cannot_enforce_is_refused_before_any_token(loop, chat_prompt_ids):
    spec = ConstraintSpec(json_schema={"type": "object", "not": {"required": ["a"]}})
    with pytest.raises(GenerateError, match='Unimplemented keys: \\["not"\\]'):
        loop.start(GenerationRequest(chat_prompt_ids, 8, pb.SamplingParams(), raw=False, constraint=spec))
    with pytest.raises(GenerateError, match="presence_penalty must be between"):
        loop.start(GenerationRequest(chat_prompt_ids, 8, pb.SamplingParams(presence_penalty=5.0)))
    assert not loop.tokens.calls
