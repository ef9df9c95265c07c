"""Constrained sampling (mlx_kimi/constrain.py) and penalties (mlx_kimi/penalties.py) in one
process, with mlx-lm's own generate_step: replies under a schema validate with `jsonschema` on
random tiny models of both tokenizer layouts, tool calls parse and validate on the scripted model,
the matcher's state is a function of the reply's tokens, masks apply row by row, and the
penalties equal mlx-lm's processors fed the whole history."""

import json
import random
import subprocess

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import load_model

from harness import KIMI
from mlx_kimi.constrain import (Constraint, ConstraintError, ConstraintSpec, Tool, apply_bitmask, cached_llg_tokenizer,
                                grammar_for, words_for)
from mlx_kimi.kimi_tokenizer import KimiTokenizer, load_tokenizer
from mlx_kimi.penalties import Penalties
from mlx_kimi.tiny import TinyShape, make_tiny

ANSWER = {"type": "object", "additionalProperties": False, "required": ["name", "count", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "count": {"type": "integer", "minimum": 0,
                                                                              "maximum": 99},
                         "ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}}}
WEATHER = Tool("get_weather", {"type": "object", "additionalProperties": False, "required": ["city"],
                               "properties": {"city": {"enum": ["Paris", "Rome"]}}})
TIME = Tool("get_time", {"type": "object", "additionalProperties": False, "required": ["zone"],
                         "properties": {"zone": {"type": "string", "maxLength": 4}}})
SCRIPTED_CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
                 '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
SCRIPT = f"<think>Call a tool</think>Sure!{SCRIPTED_CALL}<|im_end|>"


@pytest.fixture(scope="module", params=["tokenizer.json", "tiktoken"])
def model_dir(request, tmp_path_factory, tiny_dir):
    if request.param == "tokenizer.json":
        return tiny_dir
    return make_tiny(tmp_path_factory.mktemp("tiktoken") / "ckpt", TinyShape(layers=2, vocab_size=1024),
                     tokenizer="tiktoken")


@pytest.fixture(scope="module")
def model(model_dir):
    loaded, config = load_model(model_dir)
    return loaded, load_tokenizer(model_dir), config.get("text_config", config)["vocab_size"]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    out = tmp_path_factory.mktemp("scripted-constrain") / "ckpt"
    done = subprocess.run([KIMI, "make-tiny", str(out), "--layers", "2", "--script", SCRIPT],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded, config = load_model(out)
    return loaded, load_tokenizer(out), config.get("text_config", config)["vocab_size"]


def prompt_for(tokenizer, thinking: bool) -> list:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=thinking))


def run(model_tuple, spec, prompt: list, max_tokens: int, seed=None, penalties=None):
    """mlx-lm's generate_step with the constraint (None: none) and penalties as logits processors:
    the reply before the stop token, whether a stop token ended it, and the constraint."""
    model, tokenizer, vocab = model_tuple
    constraint = spec and Constraint.for_spec(spec, tokenizer, vocab, tokenizer.eos_token_ids)
    processors = (penalties.processors() if penalties else []) + ([constraint.processor(len(prompt))] if spec else [])
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(1.0) if seed is not None else None
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=sampler,
                                  logits_processors=processors):
        if int(token) in tokenizer.eos_token_ids:
            return out, True, constraint
        out.append(int(token))
    return out, False, constraint


def test_llguidance_tokenizer_holds_every_tokens_bytes(model):
    _, tokenizer, vocab = model
    llg = cached_llg_tokenizer(tokenizer, vocab, tuple(sorted(tokenizer.eos_token_ids)))
    assert llg.vocab_size == vocab
    assert sorted(llg.eos_tokens) == sorted(tokenizer.eos_token_ids)
    inner = tokenizer._tokenizer
    if isinstance(inner, KimiTokenizer):
        for i in range(inner.base_vocab_size):
            if b"\xff" not in inner.token_bytes(i):  # never in UTF-8; llguidance's mark of a special token
                assert llg.decode_bytes([i]) == inner.token_bytes(i), i
    text = 'The weather in Paris: {"city": "Paris", "temperature": 24} 你好 🚀'
    assert llg.decode_str(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("seed", [0, 1])
def test_a_random_model_writes_json_that_validates(model, seed):
    _, tokenizer, _ = model
    prompt = prompt_for(tokenizer, thinking=False)
    reply, stopped, constraint = run(model, ConstraintSpec(json_schema=ANSWER), prompt, max_tokens=80, seed=seed)
    assert stopped and constraint.accepting
    jsonschema.validate(json.loads(tokenizer.decode(reply)), ANSWER)


def test_a_reply_cut_by_max_tokens_is_not_complete(model):
    _, tokenizer, _ = model
    reply, stopped, constraint = run(model, ConstraintSpec(json_schema=ANSWER), prompt_for(tokenizer, False),
                                     max_tokens=4, seed=0)
    assert not stopped and not constraint.accepting and len(reply) == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(tokenizer.decode(reply))


@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_required_and_named_tool_choice_force_a_call_that_validates(model, choice):
    _, tokenizer, _ = model
    spec = ConstraintSpec(tools=(WEATHER, TIME), tool_choice=choice, parallel_tool_calls=False)
    reply, stopped, _ = run(model, spec, prompt_for(tokenizer, False), max_tokens=80, seed=3)
    text = tokenizer.decode(reply)
    assert stopped and text.startswith("<|tool_calls_section_begin|><|tool_call_begin|>functions.")
    [(name, arguments)] = parse_calls(text)
    assert name == choice if choice != "required" else name in ("get_weather", "get_time")
    jsonschema.validate(arguments, {"get_weather": WEATHER, "get_time": TIME}[name].parameters)


def parse_calls(text: str) -> list:
    """[(name, arguments)] of Kimi's tool call section, by mlx-lm's parser for it."""
    from mlx_lm.tool_parsers.kimi_k2 import parse_tool_call
    body = text.split("<|tool_calls_section_begin|>", 1)[1].split("<|tool_calls_section_end|>")[0]
    return [(c["name"], c["arguments"] if isinstance(c["arguments"], dict) else json.loads(c["arguments"]))
            for c in parse_tool_call(body)]


def test_the_scripted_call_passes_its_own_schema_unchanged(scripted):
    _, tokenizer, _ = scripted
    prompt = prompt_for(tokenizer, thinking=True)
    free, _, _ = run(scripted, None, prompt, max_tokens=80)
    held, stopped, _ = run(scripted, ConstraintSpec(thinking=True, tools=(WEATHER,)), prompt, max_tokens=80)
    assert stopped and held == free and tokenizer.decode(held).endswith(SCRIPTED_CALL)


def test_arguments_the_schema_forbids_are_steered_into_it(scripted):
    _, tokenizer, _ = scripted
    rome = Tool("get_weather", {"type": "object", "additionalProperties": False, "required": ["city"],
                                "properties": {"city": {"const": "Rome"}}})
    reply, stopped, _ = run(scripted, ConstraintSpec(thinking=True, tools=(rome,)), prompt_for(tokenizer, True), 80)
    text = tokenizer.decode(reply)
    assert stopped and text.startswith("Call a tool</think>Sure!")
    assert parse_calls(text) == [("get_weather", {"city": "Rome"})]


def test_tool_choice_none_and_json_mode_keep_calls_out(scripted):
    _, tokenizer, _ = scripted
    prompt = prompt_for(tokenizer, thinking=True)
    for spec in (ConstraintSpec(thinking=True, tools=(WEATHER,), tool_choice="none"),
                 ConstraintSpec(thinking=True, json_object=True)):
        reply, _, _ = run(scripted, spec, prompt, max_tokens=60)
        text = tokenizer.decode(reply)
        assert text.startswith("Call a tool</think>") and "<|tool_calls_section_begin|>" not in text


def test_the_matchers_state_is_a_function_of_the_reply(model):
    """A fresh constraint synced to any prefix of a reply (a replay, a reused prefix) gives the
    masks of the first run, and one synced to a different history first still agrees."""
    _, tokenizer, vocab = model
    spec = ConstraintSpec(json_schema=ANSWER)
    reply, _, _ = run(model, spec, prompt_for(tokenizer, False), max_tokens=80, seed=5)
    first = Constraint.for_spec(spec, tokenizer, vocab, tokenizer.eos_token_ids)
    masks = []
    for i in range(len(reply) + 1):
        first.sync(reply[:i])
        masks.append(first.mask())
    assert len(masks[0]) == words_for(vocab)
    other = Constraint.for_spec(spec, tokenizer, vocab, tokenizer.eos_token_ids)
    other.sync(tokenizer.encode('{"name": "zz', add_special_tokens=False))
    for i in random.Random(0).sample(range(len(reply) + 1), min(8, len(reply) + 1)):
        other.sync(reply[:i])
        assert np.array_equal(other.mask(), masks[i]), i


def test_masks_apply_row_by_row():
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(3, 100)).astype(np.float32))
    allowed = rng.random((3, 100)) < 0.3
    packed = np.zeros((3, words_for(100)), dtype=np.uint32)
    for row, col in zip(*np.nonzero(allowed)):
        packed[row, col // 32] |= np.uint32(1 << (col % 32))
    out = np.array(apply_bitmask(logits, packed))
    assert np.array_equal(np.isfinite(out), allowed)
    assert np.array_equal(out[allowed], np.array(logits)[allowed])
    for row in range(3):
        assert np.array_equal(np.array(apply_bitmask(logits[row:row + 1], packed[row:row + 1]))[0], out[row])


def test_unsupported_schemas_and_choices_are_refused_by_name(model):
    _, tokenizer, vocab = model
    eos = tokenizer.eos_token_ids
    cases = [
        (ConstraintSpec(json_schema={"type": "string", "if": {"maxLength": 2}, "then": {"pattern": "a"}}), r'"if", "then"'),
        (ConstraintSpec(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (ConstraintSpec(json_schema={"type": "strin"}), "strin"),
        (ConstraintSpec(json_schema=["not", "a", "schema"]), "a JSON schema is an object"),
        (ConstraintSpec(tools=(Tool("f", {"type": "object", "not": {}}),)), r"tools\[0\] \(f\).parameters.*not"),
        (ConstraintSpec(tools=(WEATHER,), tool_choice="get_time"), "'get_time', which is not among the tools"),
        (ConstraintSpec(tool_choice="required"), "needs at least one tool"),
    ]
    for spec, message in cases:
        with pytest.raises(ConstraintError, match=message):
            Constraint.for_spec(spec, tokenizer, vocab, eos)


def test_keywords_that_constrain_nothing_are_not_refused(model):
    """What schema generators write for agents' tools: no-op keywords pass, real ones still hold."""
    _, tokenizer, vocab = model
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
              "required": ["tags", "meta"], "properties": {
                  "tags": {"type": "array", "uniqueItems": False, "maxItems": 1, "items": {"enum": ["a"]}},
                  "meta": {"type": "object", "propertyNames": {"type": "string"}, "maxProperties": 0,
                           "default": {"uniqueItems": False}}}}
    constraint = Constraint.for_spec(ConstraintSpec(json_schema=schema), tokenizer, vocab, tokenizer.eos_token_ids)
    constraint.sync(tokenizer.encode('{"tags": ["a"], "meta": {}}', add_special_tokens=False))
    assert constraint.accepting
    with pytest.raises(ConstraintError, match="uniqueItems"):
        Constraint.for_spec(ConstraintSpec(json_schema={"type": "array", "uniqueItems": True}), tokenizer, vocab,
                            tokenizer.eos_token_ids)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=12)
schema_keys = st.sampled_from(["type", "properties", "items", "enum", "const", "anyOf", "oneOf", "allOf", "required",
                               "minimum", "maxLength", "pattern", "format", "$ref", "additionalProperties", "not"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(schema_keys, json_values, max_size=4))
def test_fuzzed_schemas_compile_or_are_refused(model, schema):
    """Any schema either gives a working constraint or a ConstraintError: nothing else escapes."""
    _, tokenizer, vocab = model
    try:
        constraint = Constraint.for_spec(ConstraintSpec(json_schema=schema), tokenizer, vocab, tokenizer.eos_token_ids)
    except ConstraintError:
        return
    assert constraint.mask().shape == (words_for(vocab),)


def test_a_grammar_names_kimis_tokens_by_id(model):
    _, tokenizer, _ = model
    grammar = grammar_for(ConstraintSpec(thinking=True, tools=(WEATHER,)), tokenizer, tokenizer.eos_token_ids)
    assert f"<[{tokenizer.convert_tokens_to_ids('<|tool_calls_section_begin|>')}]>" in grammar


# ---- penalties -------------------------------------------------------------------------------

PENALTIES = [
    Penalties(presence_penalty=1.5),
    Penalties(frequency_penalty=0.7, frequency_context_size=50),
    Penalties(repetition_penalty=1.3, repetition_context_size=7),
    Penalties(presence_penalty=-0.5, frequency_penalty=2.0, repetition_penalty=1.1, logit_bias={3: 5.0, 17: -100.0}),
    Penalties(logit_bias={0: 2.5}),
]


@pytest.mark.parametrize("penalties", PENALTIES)
def test_penalties_on_the_history_tail_equal_mlx_lms_on_the_whole_history(penalties):
    rng = np.random.default_rng(1)
    history = rng.integers(0, 64, size=300).tolist()
    logits = mx.array(rng.normal(size=(1, 64)).astype(np.float32))
    want = logits
    for processor in make_logits_processors(
            logit_bias=penalties.logit_bias or None, repetition_penalty=penalties.repetition_penalty or None,
            repetition_context_size=penalties.repetition_context_size, presence_penalty=penalties.presence_penalty or None,
            presence_context_size=penalties.presence_context_size, frequency_penalty=penalties.frequency_penalty or None,
            frequency_context_size=penalties.frequency_context_size):
        want = processor(mx.array(history), want)
    tail = history[len(history) - penalties.history_size:] if penalties.history_size else []
    assert np.array_equal(np.array(penalties.apply(logits, tail)), np.array(want))


def test_penalties_with_a_constraint_match_a_run_that_applies_them_by_hand(model):
    """A step-by-step loop that applies penalties (from the history tail) and the packed mask to
    each step's logits, as a last stage does, gives mlx-lm's generate_step reply token for token."""
    net, tokenizer, vocab = model
    prompt = prompt_for(tokenizer, thinking=False)
    penalties = Penalties(presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.2, logit_bias={5: 3.0})
    spec = ConstraintSpec(json_schema=ANSWER)
    want, _, _ = run(model, spec, prompt, max_tokens=30, seed=7, penalties=penalties)

    from mlx_lm.models.cache import make_prompt_cache
    constraint = Constraint.for_spec(spec, tokenizer, vocab, tokenizer.eos_token_ids)
    cache, sampler, got = make_prompt_cache(net), make_sampler(1.0), []
    mx.random.seed(7)
    logits = net(mx.array(prompt)[None], cache=cache)[:, -1, :]
    while len(got) < 30:
        logits = penalties.apply(logits, (prompt + got)[-penalties.history_size:])
        constraint.sync(got)
        logits = apply_bitmask(logits, constraint.mask()[None])
        token = int(sampler(logits - mx.logsumexp(logits, keepdims=True))[0])
        if token in tokenizer.eos_token_ids:
            break
        got.append(token)
        logits = net(mx.array([[token]]), cache=cache)[:, -1, :]
    assert got == want


def test_penalties_out_of_range_are_refused():
    for kwargs, message in (({"presence_penalty": 3.0}, "presence_penalty must be between"),
                            ({"repetition_penalty": -1.0}, "repetition_penalty"),
                            ({"frequency_context_size": 5000}, "frequency_context_size"),
                            ({"logit_bias": {i: 1.0 for i in range(301)}}, "at most 300")):
        with pytest.raises(ValueError, match=message):
            Penalties(**kwargs)
    with pytest.raises(ValueError, match="logit_bias names token 99"):
        Penalties(logit_bias={99: 1.0}).check_vocab(64)
