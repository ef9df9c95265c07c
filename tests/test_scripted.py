"""The scripted tiny model (mlx_kimi/scripted.py) and, through it, what a random tiny model never
says: thinking blocks, tool calls, multi-byte text and stop strings, end to end through a real
2-stage cluster, the OpenAI API (official client) and `kimi-cluster chat`.

The script is the oracle here, checked first against single-process mlx-lm on the same checkpoint.
"""

import json
import subprocess

import mlx.core as mx
import mlx_lm
import openai
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_tokenizer

from harness import KIMI, ApiCluster
from mlx_kimi.scripted import ScriptError, script_ids

REASONING, CONTENT = "Call a tool", "Sure, 世界!"
CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
SCRIPT = f"<think>{REASONING}</think>{CONTENT}{CALL}<|im_end|>"
API_KEY = "sk-scripted"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scripted") / "ckpt"
    done = subprocess.run([KIMI, "make-tiny", str(out), "--layers", "4", "--script", SCRIPT],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


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
    with ApiCluster(tmp_path_factory.mktemp("scripted-api"), scripted_dir, stages=2,
                    coordinator_extra=["--api-port", "0", "--api-key", API_KEY, "--context", "512"]) as c:
        yield c


@pytest.fixture(scope="module")
def client(api):
    with openai.OpenAI(base_url=api.api_url, api_key=API_KEY, max_retries=0, timeout=60) as c:
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
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
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
        [(0, "get_weather", {"city": "Paris"})]


def test_api_instant_mode_skips_the_thinking(api, client):
    reply = create(client, api, extra_body={"thinking": False})
    assert reply.choices[0].message.content == CONTENT
    assert not (reply.choices[0].message.model_extra or {}).get("reasoning_content")


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
    assert (content, finish, calls) == ("Sure, 世", "stop", [])


def test_cli_chat_prints_the_scripted_reply(api):
    done = api.cli("chat", "--coordinator", api.coordinator.address, "--prompt", "Weather?", "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["text"] == SCRIPT[len("<think>"):-len("<|im_end|>")] and reply["finish_reason"] == "stop"
