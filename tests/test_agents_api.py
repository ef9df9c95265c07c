"""What coding agents send, end to end through a real 2-stage cluster of the scripted tiny model:
structured outputs, tool calls held to their schemas, penalties, `n`, and Anthropic's Messages API
(official `openai` and `anthropic` clients). Every constrained reply equals single-process mlx-lm
on the same checkpoint with the same logits processors (mlx_kimi/constrain.py, penalties.py)."""

import json
import re
import urllib.error
import urllib.request

import anthropic
import jsonschema
import mlx.core as mx
import mlx_lm
import openai
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

import browser as browser_module
from harness import make_scripted, openai_client, run_at_once, scripted_api
from mlx_kimi.constrain import Constraint, ConstraintSpec, Tool
from mlx_kimi.penalties import Penalties

REASONING, CONTENT = "Call a tool", "Sure, 世界!"
CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
SCRIPT = f"<think>{REASONING}</think>{CONTENT}{CALL}<|im_end|>"
KEY = "sk-agents"
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 12}}}
ROME = {"type": "object", "additionalProperties": False, "required": ["city"], "properties": {"city": {"const": "Rome"}}}
ANSWER = {"type": "object", "additionalProperties": False, "required": ["name", "count"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "count": {"type": "integer", "minimum": 0,
                                                                              "maximum": 999}}}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]


def weather_tool(schema=CITY) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "parameters": schema}}


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory):
    return make_scripted(tmp_path_factory.mktemp("agents") / "ckpt", SCRIPT)


@pytest.fixture(scope="module")
def oracle(scripted_dir):
    return mlx_lm.load(str(scripted_dir))


@pytest.fixture(scope="module")
def api(tmp_path_factory, scripted_dir):
    with scripted_api(tmp_path_factory.mktemp("agents-api"), scripted_dir, KEY) as c:
        yield c


@pytest.fixture(scope="module")
def client(api):
    with openai_client(api, KEY) as c:
        yield c


@pytest.fixture(scope="module")
def claude(api):
    with anthropic.Anthropic(base_url=api.api_url.removesuffix("/v1"), api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def oracle_text(oracle, spec, thinking: bool, max_tokens=80, seed=None, penalties=Penalties()) -> tuple:
    """(text, stopped) of mlx-lm's generate_step with the same processors on the whole model."""
    model, tokenizer = oracle
    prompt = tokenizer.apply_chat_template(MESSAGES, tools=[weather_tool()] if spec and spec.tools else None,
                                           add_generation_prompt=True, thinking=thinking)
    processors = penalties.processors()
    if spec is not None:
        constraint = Constraint.for_spec(spec, tokenizer, 512, tokenizer.eos_token_ids)
        processors.append(constraint.processor(len(prompt)))
    if seed is not None:
        mx.random.seed(seed)
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, logits_processors=processors,
                                  sampler=make_sampler(1.0) if seed is not None else None):
        if int(token) in tokenizer.eos_token_ids:
            return tokenizer.decode(out), True
        out.append(int(token))
    return tokenizer.decode(out), False


def chat(client, api, **kwargs):
    kwargs.setdefault("max_tokens", 80)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=api.model_name, messages=MESSAGES, **kwargs)


# ---- OpenAI: tools and structured outputs ----------------------------------------------------------------


def test_a_call_that_fits_its_schema_comes_back_unchanged(api, client):
    choice = chat(client, api, tools=[weather_tool()]).choices[0]
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert choice.message.content == CONTENT and choice.finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_arguments_are_held_to_the_tools_schema(api, client, oracle, stream):
    reply = chat(client, api, tools=[weather_tool(ROME)], stream=stream)
    if stream:
        chunks = [c for c in reply if c.choices]
        calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
        content, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        calls, content = reply.choices[0].message.tool_calls, reply.choices[0].message.content
        finish = reply.choices[0].finish_reason
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Rome"})]
    assert content == CONTENT and finish == "tool_calls"
    want, _ = oracle_text(oracle, ConstraintSpec(thinking=True, tools=(Tool("get_weather", ROME),)), thinking=True)
    assert want.endswith('{"city": "Rome"}<|tool_call_end|><|tool_calls_section_end|>')


def test_tool_choice_none_keeps_calls_out_and_a_named_choice_forces_one(api, client):
    none = chat(client, api, tools=[weather_tool()], tool_choice="none").choices[0]
    assert not none.message.tool_calls and none.finish_reason in ("stop", "length")
    named = chat(client, api, tools=[weather_tool(ROME)], extra_body={"thinking": False},
                 tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert named.message.content == "" and named.finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments) for c in named.message.tool_calls] == [{"city": "Rome"}]


@pytest.mark.parametrize("seed", [1, 2])
def test_a_json_schema_reply_validates_and_equals_mlx_lm(api, client, oracle, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    choice = chat(client, api, response_format=fmt, temperature=1.0, seed=seed, extra_body={"thinking": False}).choices[0]
    jsonschema.validate(json.loads(choice.message.content), ANSWER)
    want, stopped = oracle_text(oracle, ConstraintSpec(json_schema=ANSWER), thinking=False, seed=seed)
    assert stopped and choice.message.content == want and choice.finish_reason == "stop"


def test_json_mode_after_the_reasoning(api, client, oracle):
    choice = chat(client, api, response_format={"type": "json_object"}, max_tokens=40).choices[0]
    assert choice.message.model_extra["reasoning_content"] == REASONING
    want, stopped = oracle_text(oracle, ConstraintSpec(thinking=True, json_object=True), thinking=True, max_tokens=40)
    assert want == f"{REASONING}</think>{choice.message.content}"
    assert choice.finish_reason == ("stop" if stopped else "length")
    if stopped:
        assert isinstance(json.loads(choice.message.content), dict)


def test_a_reply_cut_by_max_tokens_says_length(api, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    choice = chat(client, api, response_format=fmt, max_tokens=3, extra_body={"thinking": False}).choices[0]
    assert choice.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


def test_penalties_and_logit_bias_equal_mlx_lms_processors(api, client, oracle):
    chosen = Penalties(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={40: 30.0})
    choice = chat(client, api, presence_penalty=1.5, frequency_penalty=0.5, logit_bias={"40": 30},
                  max_tokens=24, extra_body={"thinking": False, "repetition_penalty": 1.3}).choices[0]
    want, _ = oracle_text(oracle, None, thinking=False, max_tokens=24, penalties=chosen)
    assert choice.message.content == want != CONTENT


def test_n_replies_share_one_prefill_and_each_draws_its_own(api, client, oracle):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    reply = chat(client, api, n=2, response_format=fmt, temperature=1.0, seed=11, extra_body={"thinking": False})
    assert [c.index for c in reply.choices] == [0, 1]
    for i, choice in enumerate(reply.choices):
        want, _ = oracle_text(oracle, ConstraintSpec(json_schema=ANSWER), thinking=False, seed=11 + i)
        assert choice.message.content == want
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens < reply.usage.total_tokens


def test_rows_of_one_batch_are_shaped_each_by_its_own(api, client, oracle):
    """Requests at once decode in the same batched rounds: each row gets its own mask and
    penalties, and each reply equals its own single-process run."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    jobs = [lambda: chat(client, api, response_format=fmt, temperature=1.0, seed=21, extra_body={"thinking": False}),
            lambda: chat(client, api, presence_penalty=2.0, max_tokens=24, extra_body={"thinking": False}),
            lambda: chat(client, api, tools=[weather_tool(ROME)]),
            lambda: chat(client, api, max_tokens=24, extra_body={"thinking": False})]
    schema_reply, penalised, tool_reply, plain = (r.choices[0].message for r in run_at_once(jobs))
    assert schema_reply.content == oracle_text(oracle, ConstraintSpec(json_schema=ANSWER), thinking=False, seed=21)[0]
    content = lambda text: text.split("<|tool_calls_section_begin|>")[0]  # noqa: E731 (the rest is a tool call)
    assert penalised.content == content(oracle_text(oracle, None, thinking=False, max_tokens=24,
                                                    penalties=Penalties(presence_penalty=2.0))[0])
    assert [json.loads(c.function.arguments) for c in tool_reply.tool_calls] == [{"city": "Rome"}]
    assert plain.content == content(oracle_text(oracle, None, thinking=False, max_tokens=24)[0]) == CONTENT


@pytest.mark.parametrize("extra, field, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}}}, None, r'\["if", "then"\]'),
    ({"response_format": {"type": "yaml"}}, "response_format", "must be"),
    ({"tool_choice": "required"}, "tool_choice", "no `tools` are given"),
    ({"presence_penalty": 7}, "presence_penalty", "between -2.0 and 2.0"),
    ({"logit_bias": {"100000": 1}}, None, "logit_bias names token 100000"),
    ({"n": 2, "stream": True}, "n", "not streamed"),
])
def test_what_cannot_be_done_is_a_400_naming_it(api, client, extra, field, message):
    with pytest.raises(openai.BadRequestError, match=message) as refused:
        chat(client, api, max_tokens=4, extra_body=extra)
    assert refused.value.body.get("param") == field


# ---- Anthropic's Messages API ------------------------------------------------------------------------


CLAUDE_TOOL = {"name": "get_weather", "description": "The weather in a city", "input_schema": CITY}


def create(claude, api, **kwargs):
    """Greedy: the scripted checkpoint's defaults (it has no generation_config.json)."""
    kwargs.setdefault("max_tokens", 80)
    return claude.messages.create(model=api.model_name, system="Be brief.",
                                  messages=[{"role": "user", "content": "Weather?"}], **kwargs)


def test_messages_return_thinking_text_and_tool_use_blocks(api, claude):
    message = create(claude, api, tools=[CLAUDE_TOOL])
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    thinking, text, call = message.content
    assert (thinking.thinking, text.text) == (REASONING, CONTENT)
    assert (call.name, call.input, call.id) == ("get_weather", {"city": "Paris"}, "functions.get_weather:0")
    assert message.stop_reason == "tool_use" and message.role == "assistant"
    counted = claude.messages.count_tokens(model=api.model_name, system="Be brief.", tools=[CLAUDE_TOOL],
                                           messages=[{"role": "user", "content": "Weather?"}])
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == counted.input_tokens
    assert message.usage.output_tokens > 0


def test_a_streamed_message_equals_the_whole_one(api, claude):
    whole = create(claude, api, tools=[CLAUDE_TOOL])
    kinds = []
    with claude.messages.stream(model=api.model_name, max_tokens=80, system="Be brief.",
                                tools=[CLAUDE_TOOL], messages=[{"role": "user", "content": "Weather?"}]) as stream:
        for event in stream:
            kinds.append(event.type)
        streamed = stream.get_final_message()
    assert [b.model_dump(exclude={"signature"}) for b in streamed.content] == \
        [b.model_dump(exclude={"signature"}) for b in whole.content]
    assert streamed.stop_reason == "tool_use"
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(kinds)


def test_a_tool_round_trip(api, claude):
    first = create(claude, api, tools=[CLAUDE_TOOL])
    call = first.content[-1]
    turns = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 C"}]}]
    second = claude.messages.create(model=api.model_name, max_tokens=80, tools=[CLAUDE_TOOL], system="Be brief.",
                                    tool_choice={"type": "tool", "name": "get_weather"}, messages=turns)
    [again] = [b for b in second.content if b.type == "tool_use"]
    jsonschema.validate(again.input, CITY)
    assert second.stop_reason == "tool_use"
    assert second.usage.cache_read_input_tokens > 0  # the conversation's caches were reused


def test_stop_sequences_and_max_tokens(api, claude):
    stopped = create(claude, api, stop_sequences=["界"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "界"
    assert stopped.content[-1].text == "Sure, 世"
    cut = create(claude, api, max_tokens=3)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3


def test_anthropic_errors_have_anthropics_shape(api, claude):
    with anthropic.Anthropic(base_url=api.api_url.removesuffix("/v1"), api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError):
            create(stranger, api)
    with pytest.raises(anthropic.BadRequestError, match="uniqueItems") as refused:
        create(claude, api, tools=[{"name": "f", "input_schema": {"type": "array", "uniqueItems": True}}])
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "invalid_request_error"
    request = urllib.request.Request(f"{api.api_url}/messages", method="POST", data=json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}]}).encode(),
        headers={"Content-Type": "application/json", "x-api-key": KEY})
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=30)
    body = json.loads(missing.value.read())
    assert missing.value.code == 400 and body["error"] == {"type": "invalid_request_error",
                                                           "message": "`max_tokens` is required"}


@pytest.mark.parametrize("extra, says", [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "`tools[0]` is a tool Anthropic's servers run"),
    ({"mcp_servers": [{"type": "url", "url": "https://example.com/sse", "name": "x"}]}, "`mcp_servers` is not supported"),
    ({"container": "container_1"}, "`container` is not supported"),
], ids=["server-tool", "mcp", "container"])
def test_anthropic_server_side_features_are_refused_by_name(api, claude, extra, says):
    """What Anthropic's own servers would run (their tools, an MCP connector, a code container) is
    refused, never silently left out of a reply that would then pretend to have used it."""
    with pytest.raises(anthropic.BadRequestError, match=re.escape(says)):
        create(claude, api, extra_body=extra)


# ---- kimi-cluster chat ------------------------------------------------------------------------------------


def test_cli_chat_holds_replies_to_a_schema_and_tools(api, oracle, tmp_path):
    schema, tools = tmp_path / "answer.json", tmp_path / "tools.json"
    schema.write_text(json.dumps(ANSWER))
    tools.write_text(json.dumps([weather_tool(ROME)]))
    done = api.cli("chat", "--coordinator", api.coordinator.address, "--prompt", "Weather?", "--system", "Be brief.",
                   "--no-thinking", "--json-schema", str(schema), "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    jsonschema.validate(json.loads(reply["text"]), ANSWER)
    assert reply["text"] == oracle_text(oracle, ConstraintSpec(json_schema=ANSWER), thinking=False)[0]
    done = api.cli("chat", "--coordinator", api.coordinator.address, "--prompt", "Weather?", "--system", "Be brief.",
                   "--tools", str(tools))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith('functions.get_weather:0<|tool_call_argument_begin|>{"city": "Rome"}'
                                        '<|tool_call_end|><|tool_calls_section_end|>')
    schema.write_text(json.dumps({"type": "object", "not": {}}))
    refused = api.cli("chat", "--coordinator", api.coordinator.address, "--prompt", "Hi", "--json-schema", str(schema))
    assert refused.returncode != 0 and 'Unimplemented keys: ["not"]' in refused.stderr



def test_web_chat_sends_a_schema_and_shows_tool_calls(api, browser, oracle):
    browser_module.open_page(browser, api.api_url, KEY, "chat.html")
    browser.evaluate(f"""(() => {{
        document.getElementById('thinking').checked = false;
        document.getElementById('schema').value = {json.dumps(json.dumps(ANSWER))};
        document.getElementById('prompt').value = 'Weather?';
        document.getElementById('send').click();
    }})()""")
    browser.wait_for("!!document.querySelector('.msg.assistant.done')", 60)
    content = browser.evaluate("document.querySelector('.msg.assistant .content').textContent")
    jsonschema.validate(json.loads(content), ANSWER)
    browser.evaluate(f"""(() => {{
        document.getElementById('schema').value = '';
        document.getElementById('tools').value = {json.dumps(json.dumps([weather_tool(ROME)]))};
        document.getElementById('prompt').value = 'And now?';
        document.getElementById('send').click();
    }})()""")
    browser.wait_for("document.querySelectorAll('.msg.assistant.done').length === 2", 60)
    calls = browser.evaluate("[...document.querySelectorAll('.msg.assistant .tool-call')].map(c => c.textContent)")
    assert calls == ['calls get_weather({"city": "Rome"})']
    assert browser.evaluate("messages[3].tool_calls[0].function.name") == "get_weather"
    browser.evaluate("document.getElementById('schema').value = '{not json'; document.getElementById('tools').value = '';"
                     "document.getElementById('prompt').value = 'x'; document.getElementById('send').click();")
    assert "the schema field is not valid JSON" in browser.wait_for(
        "document.getElementById('error').textContent", 30)
