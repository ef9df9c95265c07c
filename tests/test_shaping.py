"""The shaping fields on the wire (cluster/shaping.py) and the request fields that fill them
(cluster/structured.py): a step's fields, filled by the coordinator's Shaper and applied by the last
stage, give the logits mlx-lm's processors give on the whole history; bounds and bad fields are
refused by name."""

import numpy as np
import mlx.core as mx
import pytest

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.shaping import Shaper, check_step, penalties_of, put_penalties, shape_logits
from cluster.structured import FieldError, constraint_spec, penalties
from mlx_kimi.constrain import Constraint, ConstraintSpec, Tool
from mlx_kimi.kimi_tokenizer import load_tokenizer
from mlx_kimi.penalties import Penalties

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}


def test_a_filled_step_shapes_logits_as_mlx_lms_processors_on_the_whole_history(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    prompt = list(range(100, 200))
    reply = tokenizer.encode('{"a": 1', add_special_tokens=False)
    chosen = Penalties(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.2,
                       logit_bias={7: 3.0}, frequency_context_size=64)
    spec = ConstraintSpec(json_schema=SCHEMA)
    shaper = Shaper(prompt, chosen, Constraint.for_spec(spec, tokenizer, 512, tokenizer.eos_token_ids))
    request = pb.ForwardRequest(sample=True)
    put_penalties(request.sampling, chosen)
    shaper.fill(request, reply)
    request = pb.ForwardRequest.FromString(request.SerializeToString())  # as it arrives
    check_step(request, 512)
    assert penalties_of(request.sampling) == chosen and len(request.penalty_history) == 64

    logits = mx.array(np.random.default_rng(0).normal(size=(1, 512)).astype(np.float32))
    oracle = Constraint.for_spec(spec, tokenizer, 512, tokenizer.eos_token_ids)
    want = logits
    for processor in chosen.processors() + [oracle.processor(len(prompt))]:
        want = processor(mx.array(prompt + reply), want)
    assert np.array_equal(np.array(shape_logits(logits, request)), np.array(want))
    assert not shaper.complete()


def test_out_of_bounds_fields_are_refused_by_name():
    cases = [
        (pb.ForwardRequest(allowed_tokens=b"\xff" * 12), "allowed_tokens must be 64 bytes"),
        (pb.ForwardRequest(penalty_history=[1] * 1025), "at most 1024"),
        (pb.ForwardRequest(penalty_history=[512]), r"token ids must be in \[0, 512\)"),
        (pb.ForwardRequest(sampling=pb.SamplingParams(presence_penalty=9.0)), "presence_penalty must be between"),
        (pb.ForwardRequest(sampling=pb.SamplingParams(logit_bias={600: 1.0})), "logit_bias names token 600"),
        (pb.ForwardRequest(sampling=pb.SamplingParams(repetition_context=5000)), "repetition_context_size"),
        (pb.ForwardRequest(sampling=pb.SamplingParams(top_k=512)), "top_k must be below the vocabulary size 512"),
        (pb.ForwardRequest(sampling=pb.SamplingParams(top_logprobs=21)), "top_logprobs must be at most 20"),
    ]
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            check_step(request, 512)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}


def test_openai_and_anthropic_fields_give_one_spec():
    openai = constraint_spec({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA,
                                                                                         "strict": True}}}, thinking=True)
    assert openai == ConstraintSpec(thinking=True, json_schema=SCHEMA, tools=(Tool("get_weather", SCHEMA),),
                                    tool_choice="get_weather")
    anthropic = constraint_spec({"tools": [{"name": "get_weather", "input_schema": SCHEMA}],
                                 "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}, False, anthropic=True)
    assert anthropic == ConstraintSpec(tools=(Tool("get_weather", SCHEMA),), tool_choice="required",
                                       parallel_tool_calls=False)
    assert penalties({"presence_penalty": 1, "logit_bias": {"5": -100}}, 512) == Penalties(presence_penalty=1.0,
                                                                                              logit_bias={5: -100.0})


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "no"}}}, "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_shaping_fields_are_refused_by_name(body, field):
    with pytest.raises(FieldError) as refused:
        constraint_spec(body, thinking=False)
    assert refused.value.field == field


@pytest.mark.parametrize("body, field", [
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"9999": 1}}, "logit_bias"),
    ({"repetition_context_size": 2.5}, "repetition_context_size"),
])
def test_bad_penalties_are_refused_by_name(body, field):
    with pytest.raises(FieldError) as refused:
        penalties(body, 512)
    assert refused.value.field == field
