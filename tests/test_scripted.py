"""The scripted tiny model (mlx_kimi/scripted.py) and, through it, what a random tiny model never
says: thinking blocks, tool calls, multi-byte text and stop strings, end to end through a real
2-stage cluster, the OpenAI API (official client) and `kimi-cluster chat`.

The script is the oracle here, checked first against single-process mlx-lm on the same checkpoint.
"""

import json
import os
import re
import urllib.error
import urllib.request
from unittest.mock import ANY as ANY_MESSAGE

import anthropic
import mlx.core as mx
import mlx_lm
import openai
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_tokenizer
from pathlib import Path

import browser as browser_module

from harness import make_scripted, openai_client, scripted_api
from cluster.api_openai_responses import custom_arguments, custom_input
from cluster.sampling import generation_defaults
from mlx_kimi.scripted import ScriptError, script_ids

REASONING, CONTENT = "Call a tool", "Yes, 世界!"
CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"input": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
SCRIPT = f"<think>{REASONING}</think>{CONTENT}{CALL}<|im_end|>"
API_KEY = "sk-scripted"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"input": {"type": "string"}}}}}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory):
    return make_scripted(tmp_path_factory.mktemp("scripted") / "ckpt", SCRIPT)


def test_script_ids_decode_to_the_script_with_one_successor_per_token(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    ids = script_ids(tokenizer, SCRIPT)
    assert tokenizer.decode(ids) == SCRIPT
    successors = {}
    for token, after in zip(ids, ids[1:]):
        assert successors.setdefault(token, after) == after


def test_a_script_no_bigram_model_can_emit_is_refused_naming_the_clash(tiny_dir):
    with pytest.raises(ScriptError, match=r"'\.' is followed by both 'b' and 'c'"):
        script_ids(load_tokenizer(tiny_dir), "a.b.c")


def test_mlx_lm_greedy_decoding_follows_the_script(scripted_dir):
    model, tokenizer = mlx_lm.load(str(scripted_dir))
    for thinking, want in ((None, SCRIPT[len("<think>"):]), (False, SCRIPT[SCRIPT.index("</think>") + 8:])):
        extra = {} if thinking is None else {"thinking": thinking}
        prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, **extra)
        out = []
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=80):
            out.append(int(token))
            if out[-1] in tokenizer.eos_token_ids:
                break
        assert tokenizer.decode(out) == want


# ---- through a real cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory, scripted_dir):
    with scripted_api(tmp_path_factory.mktemp("scripted-api"), scripted_dir, API_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def client(api):
    with openai_client(api, API_KEY) as c:
        yield c


def create(client, api, **kwargs):
    return client.chat.completions.create(model=api.model_name, messages=MESSAGES, max_tokens=80, temperature=0,
                                          tools=[WEATHER_TOOL], **kwargs)


def test_api_returns_reasoning_content_and_tool_calls(api, client):
    reply = create(client, api)
    choice = reply.choices[0]
    assert choice.message.model_extra["reasoning_content"] == REASONING
    assert choice.message.content == CONTENT
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"input": "Paris"}
    assert call.id == "functions.get_weather:0" and choice.finish_reason == "tool_calls"


def test_api_streams_the_same_reply(api, client):
    reasoning, content, calls, finish = "", "", [], None
    for chunk in create(client, api, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content, finish) == (REASONING, CONTENT, "tool_calls")
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [(0, "get_weather", {"input": "Paris"})]


def test_api_instant_mode_skips_the_thinking(api, client):
    reply = create(client, api, extra_body={"thinking": False})
    assert reply.choices[0].message.content == CONTENT
    assert not (reply.choices[0].message.model_extra or {}).get("reasoning_content")


def budgeted_reply(scripted_dir, budget: int) -> str:
    """mlx-lm's greedy reply to MESSAGES with </think> forced after `budget` reasoning tokens (a
    logits processor leaving it the only choice), decoded whole."""
    model, tokenizer = mlx_lm.load(str(scripted_dir))
    prompt = tokenizer.apply_chat_template(MESSAGES, tools=[WEATHER_TOOL], add_generation_prompt=True)
    think_end = tokenizer.convert_tokens_to_ids("</think>")

    def force(tokens, logits):
        if len(tokens) - len(prompt) == budget:
            return mx.where(mx.arange(logits.shape[-1]) == think_end, logits, -mx.inf)
        return logits

    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=80, logits_processors=[force]):
        if int(token) in tokenizer.eos_token_ids:
            break
        out.append(int(token))
    return tokenizer.decode(out)


@pytest.mark.parametrize("budget", [0, 2])
def test_a_thinking_budget_ends_the_thinking_as_mlx_lm_forced_does(api, client, scripted_dir, budget):
    """`thinking: {"type": "enabled", "budget_tokens": N}` (Anthropic's, read on both APIs): after N
    reasoning tokens the next is </think>, then the reply goes on as the model goes on."""
    want = budgeted_reply(scripted_dir, budget)
    reasoning, rest = want.split("</think>")
    assert len(reasoning) < len(REASONING) and rest.startswith(CONTENT)  # the budget cut the thinking short
    reply = create(client, api, extra_body={"thinking": {"type": "enabled", "budget_tokens": budget}})
    message = reply.choices[0].message
    assert ((message.model_extra or {}).get("reasoning_content") or "", message.content) == (reasoning, CONTENT)
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    with anthropic.Anthropic(base_url=api.api_url.removesuffix("/v1"), api_key=API_KEY, max_retries=0) as claude:
        message = claude.messages.create(model=api.model_name, max_tokens=80, system="Be brief.", tools=[{
            "name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}],
            messages=[{"role": "user", "content": "Weather?"}],
            thinking={"type": "enabled", "budget_tokens": budget}, extra_body={"temperature": 0})
    blocks = {b.type: b for b in message.content}
    assert (blocks["thinking"].thinking if "thinking" in blocks else "") == reasoning
    assert blocks["text"].text == CONTENT and blocks["tool_use"].name == "get_weather"


def test_a_bad_thinking_budget_is_refused_naming_it(api, client):
    with pytest.raises(openai.BadRequestError, match="`thinking.budget_tokens` must be an integer >= 0"):
        create(client, api, extra_body={"thinking": {"type": "enabled", "budget_tokens": -1}})


def test_a_right_prediction_is_verified_many_tokens_a_step(api, scripted_dir):
    """Predicted outputs (here as token ids over gRPC Generate): the script's reply, of which the
    prompt holds nothing for prompt lookup to draft, takes at most half a step per token when
    predicted right, a few steps more when predicted with an edit, and is the same reply whatever
    was predicted."""
    ids = script_ids(load_tokenizer(scripted_dir), SCRIPT)
    prompt, reply = ids[:1], ids[1:-1]  # the trigger, and the script up to its closing EOS
    edited = reply[:10] + [ids[0]] * 2 + reply[12:]
    steps = {}
    for name, prediction in (("none", ()), ("right", reply), ("edited", edited), ("wrong", reply[::-1])):
        before = api.memory_map().speculation
        got, _ = api.generate(prompt_tokens=prompt, max_tokens=len(reply) + 1, prediction=prediction, speculate=True)
        assert got == reply, name
        after = api.memory_map().speculation
        steps[name] = after.steps - before.steps
    assert steps["right"] <= len(reply) / 2 and steps["right"] < steps["edited"] < steps["none"], steps
    assert steps["none"] == len(reply) + 1 >= steps["wrong"], steps  # none drafted: a step per token, one for EOS


def test_usage_counts_the_reasoning_and_the_prediction_kept(api, client, scripted_dir):
    """completion_tokens_details as OpenAI gives them: reasoning_tokens are the thinking block's
    (its text and </think>), in chat completions and the Responses API alike; a prediction's
    tokens are accepted where drafted and kept, rejected otherwise (here its text encodes the
    tool call in other tokens than the script's), none without one. (Without tools: their schemas
    would constrain the reply, and a constrained reply drafts nothing.)"""
    tokenizer = load_tokenizer(scripted_dir)
    ids = script_ids(tokenizer, SCRIPT)
    thought = ids.index(tokenizer.convert_tokens_to_ids("</think>"))  # the reply starts after the prompt's <think>
    plain = create(client, api).usage
    assert plain.completion_tokens == len(ids) - 2  # neither the prompt's <think> nor the EOS
    details = plain.completion_tokens_details
    assert (details.reasoning_tokens, details.accepted_prediction_tokens, details.rejected_prediction_tokens) == \
        (thought, 0, 0)
    assert respond(client, api).usage.output_tokens_details.reasoning_tokens == thought
    both = create(client, api, n=2).usage  # the replies' counts together
    assert (both.completion_tokens, both.completion_tokens_details.reasoning_tokens) == \
        (2 * (len(ids) - 2), 2 * thought)
    prediction = SCRIPT[len("<think>"):]
    predicted = tokenizer.encode(prediction)
    assert predicted != ids[1:], "the prediction should differ from the reply somewhere"
    reply = client.chat.completions.create(model=api.model_name, messages=MESSAGES, max_tokens=80, temperature=0,
                                           prediction={"type": "content", "content": prediction})
    assert reply.choices[0].message.content == CONTENT
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == len(predicted)
    assert len(predicted) // 2 < details.accepted_prediction_tokens < len(predicted), details


RESPONSES_TOOL = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
CALL_ID = "functions.get_weather:0"


def respond(client, api, **kwargs):
    """The same exchange as `create`, through OpenAI's Responses API."""
    return client.responses.create(**{"model": api.model_name, "instructions": "Be brief.", "input": "Weather?",
                                      "max_output_tokens": 80, "temperature": 0, "tools": [RESPONSES_TOOL], **kwargs})


def items(output) -> list:
    """(type, text or call) of each output item, without their ids."""
    return [(o.type, o.content[0].text if o.type in ("reasoning", "message") else (o.call_id, o.name, o.arguments))
            for o in output]


def test_responses_api_returns_reasoning_a_message_and_the_function_call(api, client):
    reply = respond(client, api)
    assert items(reply.output) == [("reasoning", REASONING), ("message", CONTENT),
                                   ("function_call", (CALL_ID, "get_weather", '{"input": "Paris"}'))]
    assert reply.output_text == CONTENT and reply.status == "completed"
    chat = create(client, api)  # the same prompt and the same tokens as chat completions'
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                      chat.usage.completion_tokens)
    instant = respond(client, api, extra_body={"reasoning": {"effort": "none"}})
    assert [o.type for o in instant.output] == ["message", "function_call"] and instant.output_text == CONTENT
    short = respond(client, api, max_output_tokens=3)
    assert (short.status, short.incomplete_details.reason, short.usage.output_tokens) == \
        ("incomplete", "max_output_tokens", 3)


def test_responses_api_streams_typed_events_adding_up_to_the_whole_reply(api, client):
    events = list(respond(client, api, stream=True))
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    assert (events[0].type, events[-1].type) == ("response.created", "response.completed")
    deltas = {}
    for e in events:
        if e.type.endswith(".delta"):
            deltas[e.type] = deltas.get(e.type, "") + e.delta
    assert deltas == {"response.reasoning_text.delta": REASONING, "response.output_text.delta": CONTENT,
                      "response.function_call_arguments.delta": '{"input": "Paris"}'}
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert items(done) == items(events[-1].response.output) == items(respond(client, api).output)


def test_responses_api_next_turn_renders_the_prompt_chat_completions_would(api, client):
    """A stateless agent's next turn: the previous output items sent back with the tool's output."""
    first = respond(client, api)
    turn = [{"role": "user", "content": "Weather?"}, *(o.model_dump(exclude_none=True) for o in first.output),
            {"type": "function_call_output", "call_id": CALL_ID, "output": "18 C"}]
    reply = respond(client, api, input=turn)
    messages = [*MESSAGES, {"role": "assistant", "content": CONTENT, "reasoning_content": REASONING, "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"input": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": CALL_ID, "content": "18 C"}]
    chat = client.chat.completions.create(model=api.model_name, messages=messages, max_tokens=80, temperature=0,
                                          tools=[WEATHER_TOOL])
    assert reply.usage.input_tokens == chat.usage.prompt_tokens > first.usage.input_tokens + 10
    assert items(reply.output)[1:] == [("message", CONTENT), ("function_call", (CALL_ID, "get_weather",
                                                                                 '{"input": "Paris"}'))]


def test_a_request_shaped_as_codex_sends_it_is_served(api, client):
    """The fields Codex sends beside the conversation (store, include, prompt_cache_key, reasoning's
    summary, text.verbosity, client_metadata...) change nothing; a developer message is a system one."""
    codex = {"store": False, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "thread-1",
             "reasoning": {"effort": "medium", "summary": "auto"}, "text": {"verbosity": "medium"},
             "tool_choice": "auto", "parallel_tool_calls": False, "client_metadata": {"x": "1"}}
    plain = respond(client, api)
    reply = respond(client, api, instructions=None, input=[
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}],
        extra_body=codex)
    assert items(reply.output) == items(plain.output) and reply.usage.input_tokens == plain.usage.input_tokens


PATCH_GRAMMAR = 'start: "*** Begin Patch" /(.|\\n)*/ "*** End Patch"'
CUSTOM_TOOL = {"type": "custom", "name": "get_weather", "description": "The weather in a city.",
               "format": {"type": "grammar", "syntax": "lark", "definition": PATCH_GRAMMAR}}


def test_a_custom_tool_is_a_function_with_one_string_argument_and_its_call_a_custom_tool_call(api, client):
    """Codex's freeform tools (apply_patch): shown to the model as a function taking `input`, its grammar
    in that argument's description; the call's `input` comes back as the item's input, and sent back
    it renders as the model wrote it."""
    reply = respond(client, api, tools=[CUSTOM_TOOL], stream=True)
    events = list(reply)
    call = events[-1].response.output[-1]
    assert (call.type, call.call_id, call.name, call.input) == ("custom_tool_call", CALL_ID, "get_weather", "Paris")
    assert "".join(e.delta for e in events if e.type == "response.custom_tool_call_input.delta") == call.input
    as_function = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                   "parameters": {"type": "object", "properties": {"input": {
                       "type": "string", "description": "The tool's raw input text. It must match this lark "
                                                        f"grammar:\n{PATCH_GRAMMAR}"}}, "required": ["input"]}}}
    chat = client.chat.completions.create(model=api.model_name, messages=MESSAGES, max_tokens=80, temperature=0,
                                          tools=[as_function])
    assert events[-1].response.usage.input_tokens == chat.usage.prompt_tokens
    turn = [{"role": "user", "content": "Weather?"}, *(o.model_dump(exclude_none=True) for o in
                                                      events[-1].response.output),
            {"type": "custom_tool_call_output", "call_id": CALL_ID, "output": "18 C"}]
    again = respond(client, api, input=turn, tools=[CUSTOM_TOOL])
    messages = [*MESSAGES, {"role": "assistant", "content": CONTENT, "reasoning_content": REASONING, "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"input": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": CALL_ID, "content": "18 C"}]
    chat = client.chat.completions.create(model=api.model_name, messages=messages, max_tokens=80, temperature=0,
                                          tools=[as_function])
    assert again.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize("arguments, text", [
    ('{"input": "*** Begin Patch\\n*** End Patch"}', "*** Begin Patch\n*** End Patch"),
    ('{"city": "Paris"}', '{"city": "Paris"}'),  # other JSON: the text as the model wrote it
    ("not json", "not json"),
])
def test_a_custom_tool_calls_input_and_its_arguments_round_trip(arguments, text):
    assert custom_input(arguments) == text
    assert custom_input(custom_arguments(text)) == text


@pytest.mark.parametrize("extra, field, says", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]", "function and custom tools only"),
    ({"tools": [{"type": "custom", "name": "x", "format": {"type": "grammar", "syntax": "ebnf", "definition": ""}}]},
     "tools[0].format", "lark or regex"),
    ({"tools": [{"type": "custom", "name": ["x"]}]}, "tools[0].name", "must be a string"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content[0]", "language model only"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "not supported here"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": 5}}}, "text.format.schema", "JSON schema"),
])
def test_responses_api_refuses_what_it_cannot_do_by_name(api, client, extra, field, says):
    with pytest.raises(openai.BadRequestError, match=re.escape(says)) as refused:
        client.responses.create(model=api.model_name, input="Weather?", max_output_tokens=4, extra_body=extra)
    assert refused.value.body["param"] == field


def test_responses_truncation_auto_leaves_out_the_fewest_oldest_turns(api, client):
    """A conversation past the context (512 here, 80 of it for the reply) is refused, and with
    `truncation: "auto"` answered from its instructions and the fewest of its latest turns that
    fit: chat completions on those same messages count the same prompt tokens, and with one turn
    more they do not fit."""
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Turn {i}: " + "some earlier words " * 12},
                  {"role": "assistant", "content": f"Noted {i}."}]
    turns.append({"role": "user", "content": "Weather?"})
    with pytest.raises(openai.BadRequestError, match="context"):
        respond(client, api, input=turns)
    reply = respond(client, api, input=turns, truncation="auto")
    assert [(i.type, i.content[0].text) for i in reply.output if i.type == "reasoning"] == [("reasoning", REASONING)]

    def chat_prompt_tokens(kept: list) -> int | None:
        """The prompt tokens chat completions counts for these turns, None where they do not fit."""
        try:
            return client.chat.completions.create(model=api.model_name, max_tokens=80, tools=[WEATHER_TOOL],
                                                  messages=[{"role": "system", "content": "Be brief."}, *kept]
                                                  ).usage.prompt_tokens
        except openai.BadRequestError as e:
            assert "context" in str(e)
            return None

    counts = {i: chat_prompt_tokens(turns[i:]) for i in range(2, len(turns), 2)}  # a cut before each user turn
    fewest = min(i for i, n in counts.items() if n is not None)
    assert fewest > 2 and counts[fewest] == reply.usage.input_tokens and reply.usage.input_tokens + 80 <= 512, counts


@pytest.mark.parametrize("stream", [False, True])
def test_api_stop_string_inside_multibyte_text(api, client, stream):
    reply = create(client, api, stop=["界"], stream=stream)
    if stream:
        chunks = [c for c in reply if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
        calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    else:
        content, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        calls = reply.choices[0].message.tool_calls or []
    assert (content, finish, calls) == (CONTENT[:CONTENT.index("界")], "stop", [])


def test_cli_chat_prints_the_scripted_reply(api):
    done = api.cli("chat", "--coordinator", api.coordinator.address, "--prompt", "Weather?", "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["text"] == SCRIPT[len("<think>"):-len("<|im_end|>")] and reply["finish_reason"] == "stop"


def test_cli_chat_thinking_budget(api, scripted_dir):
    """`kimi-cluster chat --thinking-budget N`: the reply's thinking ends after N tokens, as mlx-lm's
    with </think> forced there (the bigram model's reply does not depend on the rest of the prompt);
    a budget that is not a count is refused naming the flag."""
    done = api.cli("chat", "--coordinator", api.coordinator.address, "--prompt", "Weather?", "--json",
                   "--thinking-budget", "2")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == budgeted_reply(scripted_dir, 2)
    refused = api.cli("chat", "--coordinator", api.coordinator.address, "--prompt", "Weather?", "--thinking-budget", "-1")
    assert refused.returncode == 2 and "--thinking-budget" in refused.stderr and "a number of tokens" in refused.stderr


# ---- API completeness --------------------------------------------------------------------------------


def get(api, path: str, key: str | None = API_KEY):
    request = urllib.request.Request(api.api_url.removesuffix("/v1") + path,
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_needs_no_key_and_says_ready(api):
    assert get(api, "/health", key=None) == (200, {"status": "ready", "message": ANY_MESSAGE, "model": api.model_name})


def test_models_show_state_and_when_the_checkpoint_was_made(api, client, scripted_dir):
    created = int((scripted_dir / "config.json").stat().st_mtime)
    [card] = client.models.list().data
    assert (card.id, card.created, card.model_extra["state"]) == (api.model_name, created, "ready")
    assert client.models.retrieve(api.model_name).created == created
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("stream", [False, True])
def test_completions_continue_a_raw_prompt(api, client, scripted_dir, stream):
    reply = client.completions.create(model=api.model_name, prompt="<think>", max_tokens=80, temperature=0,
                                      stop=["<|tool_calls_section_begin|>"], stream=stream)
    if stream:
        chunks = list(reply)
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = reply.choices[0].text, reply.choices[0].finish_reason
        # generated: the script after the <think> prompt, up to and including the token the stop string is
        assert reply.usage.completion_tokens == len(script_tokens_until(scripted_dir, "<|tool_calls_section_begin|>"))
        assert reply.usage.prompt_tokens == 1
    assert (text, finish) == (f"{REASONING}</think>{CONTENT}", "stop")


def script_tokens_until(scripted_dir, stop: str) -> list:
    """The scripted ids from <think> up to (not including) the token that starts `stop`."""
    tokenizer = load_tokenizer(scripted_dir)
    ids = script_ids(tokenizer, SCRIPT)
    return ids[:ids.index(tokenizer.convert_tokens_to_ids(stop))]


@pytest.mark.parametrize("extra, names", [
    ({"best_of": 2}, "`best_of`"),
    ({"best_of": 3, "suffix": "x"}, "`best_of`, `suffix`"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "`audio`, `modalities`"),
    ({"web_search_options": {}}, "`web_search_options`"),
    ({"echo": True}, "`echo` on chat completions"),
    ({"functions": [{"name": "get_weather", "parameters": {}}]}, "`functions`"),
    ({"function_call": "auto"}, "`function_call`"),
])
def test_unsupported_parameters_are_refused_by_name(api, client, extra, names):
    with pytest.raises(openai.BadRequestError, match=f"not supported by kimi-cluster: {names}"):
        client.chat.completions.create(model=api.model_name, messages=MESSAGES, max_tokens=4, extra_body=extra)


def test_sampling_defaults_come_from_generation_config(tmp_path):
    assert generation_defaults(tmp_path) == {"temperature": 0.0, "top_p": 0.0, "top_k": 0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 40}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 40}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "do_sample": False}))
    assert generation_defaults(tmp_path)["temperature"] == 0.0


# ---- the web view, in a real headless Chromium ---------------------------------------------------------

ARTIFACTS = Path(os.environ.get("KIMI_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


def open_page(browser, api, page: str):
    browser_module.open_page(browser, api.api_url, API_KEY, page)


def test_web_cluster_page_shows_every_node_and_its_layers(api, browser):
    open_page(browser, api, "")
    want = {n.name: n for n in api.memory_map().nodes}
    rows = browser.wait_for(f"document.querySelectorAll('tr.node').length === {len(want)} && "
                            "[...document.querySelectorAll('tr.node')].map(r => [...r.cells].map(c => c.innerText))",
                            30)
    assert {r[0]: (r[1], r[2], r[3]) for r in rows} == {
        n.name: (n.address, "ready", f"{n.start}-{n.end - 1}") for n in want.values()}
    bar = browser.evaluate("[...document.querySelectorAll('#layerbar .stage')].map(s => "
                           "[s.dataset.node, parseFloat(s.style.width)])")
    total = api.memory_map().num_layers
    assert [(name, round(width, 3)) for name, width in bar] == [
        (n.name, round(100 * (n.end - n.start) / total, 3)) for n in sorted(want.values(), key=lambda n: n.start)]
    assert browser.evaluate("document.getElementById('state').textContent") == "ready"
    browser.screenshot(ARTIFACTS / "web-cluster.png")


def test_web_chat_streams_the_reply_with_thinking_folded(api, browser):
    open_page(browser, api, "chat.html")
    browser.evaluate("""(() => {
        window.seen = []; window.stopEnabled = false;
        new MutationObserver(() => {
            const c = document.querySelector('.msg.assistant .content');
            if (c) window.seen.push(c.textContent);
            if (!document.getElementById('stop').disabled) window.stopEnabled = true;
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
        document.getElementById('prompt').value = 'Weather?';
        document.getElementById('send').click();
    })()""")
    browser.wait_for("!!document.querySelector('.msg.assistant.done')", 60)
    content = browser.evaluate("document.querySelector('.msg.assistant .content').textContent")
    reasoning = browser.evaluate("document.querySelector('.msg.assistant details .reasoning').textContent")
    folded = browser.evaluate("!document.querySelector('.msg.assistant details').open && "
                              "!document.querySelector('.msg.assistant details').hidden")
    assert (content, reasoning, folded) == (CONTENT, REASONING, True)
    assert browser.evaluate("document.querySelector('.msg.assistant .tool-call').textContent") == \
        'calls get_weather({"input": "Paris"})'
    partial = {t for t in browser.evaluate("window.seen") if t and t != CONTENT}
    assert partial and all(CONTENT.startswith(t) for t in partial), partial  # it arrived in pieces
    assert browser.evaluate("window.stopEnabled") and browser.evaluate("document.getElementById('error').textContent") == ""
    browser.screenshot(ARTIFACTS / "web-chat.png")

    # Stop, pressed while the next reply is on its way, ends it and takes back the unanswered message
    browser.evaluate("""(() => {
        document.getElementById('prompt').value = 'Again?';
        document.getElementById('send').click();
        document.getElementById('stop').click();
    })()""")
    browser.wait_for("document.querySelectorAll('.msg.assistant.done').length === 2", 30)
    stats = browser.evaluate("[...document.querySelectorAll('.msg.assistant .stats')].pop().textContent")
    assert stats.startswith("stopped") and browser.evaluate("document.getElementById('send').disabled") is False
    assert browser.evaluate("messages.map(m => m.role)") == ["user", "assistant"]
