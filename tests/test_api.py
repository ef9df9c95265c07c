"""The OpenAI-compatible API end to end: real `kimi-cluster up` processes, real HTTP, the official
`openai` client. Every generated text is compared with single-process mlx-lm on the same
checkpoint (the `oracle` fixture): greedy tokens cut at the first EOS, split at </think> the way
Kimi replies are, each part turned into text the way mlx-lm's generate() does it.

Clusters (module-scoped, started when first needed):
  `api`    2 stages, --api-key, --context 512: almost every test; they leave it usable by the next.
  `reaper` 1 stage, --session-ttl 1: a node frees an idle session the coordinator still lists.
"""

import json
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import mlx.core as mx
import openai
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import common_prefix_len

import harness
from cluster.generated import kimi_cluster_pb2 as pb
from harness import KIMI, ApiCluster, oracle_scores, poll

API_KEY = "sk-test-0123456789"
CONTEXT = 512
SYSTEM = "Be brief."
NO_THINKING = {"thinking": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def chat(user: str, system: str = SYSTEM) -> list:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---- the oracle -----------------------------------------------------------------------------------


def detokenize(tokenizer, tokens: list) -> str:
    """The text mlx-lm's own generate() gives for these tokens: its streaming detokenizer, which
    (for this byte-level BPE vocabulary) drops the reply's leading space where decode() keeps it."""
    detokenizer = tokenizer.detokenizer
    for t in tokens:
        detokenizer.add_token(t)
    detokenizer.finalize()
    return detokenizer.text


@dataclass
class Expected:
    prompt: list        # the chat-templated prompt
    generated: list     # what the cluster samples: up to and including the first EOS, or max_tokens
    tokens: list        # the reply's tokens (before EOS)
    logprobs: list      # log-probability of each reply token
    top: list           # each reply token's 5 most likely tokens at its position, as (id, logprob)
    reasoning: str
    content: str
    finish: str


@pytest.fixture(scope="module")
def expect(oracle):
    """expect(messages, max_tokens, thinking=None, tools=None) -> Expected, from mlx-lm greedy."""
    model, tokenizer = oracle
    think_start, think_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
    tool_section = tokenizer.convert_tokens_to_ids("<|tool_calls_section_begin|>")
    memo = {}

    def get(messages, max_tokens, thinking=None, tools=None) -> Expected:
        extra = {} if thinking is None else {"thinking": thinking}
        prompt = list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **extra))
        key = (tuple(prompt), max_tokens)
        if key not in memo:
            generated, logprobs, top = [], [], []
            for token, lp in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
                generated.append(int(token))
                logprobs.append(float(lp[int(token)]))
                top.append([(i, float(lp[i])) for i in mx.argsort(-lp)[:5].tolist()])
                if int(token) in tokenizer.eos_token_ids:
                    break
            memo[key] = generated, logprobs, top
        generated, logprobs, top = memo[key]
        stopped = generated[-1] in tokenizer.eos_token_ids
        tokens = generated[:-1] if stopped else generated
        assert tool_section not in tokens, "the oracle reply calls a tool: pick other messages"
        # reasoning until </think> when the prompt ends inside <think>, content after it
        parts, mode, segment = {"reasoning": "", "content": ""}, \
            "reasoning" if prompt[-1] == think_start else "content", []
        for t in tokens + [None]:
            if t in (think_start, think_end, None):
                parts[mode] += detokenize(tokenizer, segment)
                mode, segment = ("reasoning" if t == think_start else "content"), []
            else:
                segment.append(t)
        return Expected(prompt, generated, tokens, logprobs[:len(tokens)], top[:len(tokens)], parts["reasoning"],
                        parts["content"], "stop" if stopped else "length")

    return get


# ---- clusters and clients -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_dir):
    with ApiCluster(tmp_path_factory.mktemp("api"), tiny_dir, stages=2,
                    coordinator_extra=["--api-port", "0", "--api-key", API_KEY, "--context", str(CONTEXT)]) as c:
        yield c


@pytest.fixture(scope="module")
def client(api):
    with openai.OpenAI(base_url=api.api_url, api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def create(client, api, messages, max_tokens, **kwargs):
    """A greedy chat completion (temperature 0) for the served model."""
    return client.chat.completions.create(model=api.model_name, messages=messages, max_tokens=max_tokens,
                                          temperature=0, **kwargs)


def reasoning_of(message) -> str:
    return (message.model_extra or {}).get("reasoning_content") or ""


def raw(api, path: str, body: dict | None = None, key: str | None = API_KEY):
    """(status, body text) of a plain HTTP request; `key=None` sends no Authorization header."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api.api_url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---- models, greedy text, streaming ---------------------------------------------------------------


def test_a_developer_message_is_a_system_message(api, client, expect):
    """OpenAI's clients send reasoning models their instructions as a "developer" message: it is
    the system message (the chat template knows no other), so the reply is the same."""
    messages = chat("Hi!", system="Answer in one word.")
    want = expect(messages, 12, thinking=False)
    developer = [{**messages[0], "role": "developer"}, messages[1]]
    reply = create(client, api, developer, 12, extra_body={"thinking": False})
    assert reply.choices[0].message.content == want.content
    assert reply.usage.prompt_tokens == len(want.prompt)


@pytest.mark.parametrize("path,body,status,says", [
    ("/embeddings", {"input": "hi"}, 404, "no such endpoint here; this API serves GET /v1/models, "),
    ("/chat/completions", None, 405, "GET /v1/chat/completions: use POST"),
    ("/models", {}, 405, "POST /v1/models: use GET"),
], ids=["unknown-endpoint", "chat-by-GET", "models-by-POST"])
def test_a_path_or_method_not_served_is_named(api, path, body, status, says):
    """An endpoint this API lacks is a 404 listing those it has (a POST had been "Method Not
    Allowed", from the web view's files); a known one by another method says which to use."""
    got, text = raw(api, path, body)
    error = json.loads(text)["error"]
    assert got == status and says in error["message"], (got, error)
    if status == 404:
        assert "POST /v1/chat/completions" in error["message"] and error["code"] == "not_found"


def test_models_lists_the_served_model(api, client, tiny_dir):
    assert api.model_name == tiny_dir.name  # the checkpoint directory's name, as `up` printed it
    assert [m.id for m in client.models.list().data] == [api.model_name]


@pytest.mark.parametrize("how", [{"thinking": False}, {"chat_template_kwargs": {"thinking": False}},
                                 {"reasoning_effort": "none"}], ids=["thinking", "chat_template_kwargs", "reasoning_effort"])
def test_greedy_without_thinking_matches_mlx_lm(api, client, expect, how):
    messages = chat("Hi!")
    want = expect(messages, 40, thinking=False)
    assert len(want.tokens) > 10 and want.content
    reply = create(client, api, messages, 40, extra_body=how)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.content
    assert reasoning_of(choice.message) == ""
    assert choice.message.tool_calls is None
    assert choice.finish_reason == want.finish
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(want.prompt), len(want.tokens))
    assert reply.usage.total_tokens == len(want.prompt) + len(want.tokens)
    assert reply.model == api.model_name and reply.object == "chat.completion"


def test_text_parts_are_joined_as_the_template_joins_them(api, client, expect):
    want = expect(chat("Hi there!"), 24, thinking=False)
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}, {"type": "text", "text": "!"}]
    reply = create(client, api, chat(parts), 24, extra_body=NO_THINKING)
    assert reply.choices[0].message.content == want.content
    assert reply.usage.prompt_tokens == len(want.prompt)


def test_greedy_with_thinking_matches_mlx_lm(api, client, expect):
    messages = chat("Why is the sky blue?")
    want = expect(messages, 40)  # the template's default: the prompt ends with <think>
    assert want.reasoning, "a thinking reply starts as reasoning"
    reply = create(client, api, messages, 40)
    message = reply.choices[0].message
    assert reasoning_of(message) == want.reasoning
    assert message.content == want.content
    assert reasoning_of(message) + message.content == want.reasoning + want.content
    assert reply.choices[0].finish_reason == want.finish
    assert reply.usage.prompt_tokens == len(want.prompt)


@pytest.mark.parametrize("thinking", [False, True])
def test_stream_equals_non_stream(api, client, expect, thinking):
    messages = chat("Tell me a story.")
    want = expect(messages, 32, thinking=thinking)
    whole = create(client, api, messages, 32, extra_body={"thinking": thinking})
    chunks = list(create(client, api, messages, 32, extra_body={"thinking": thinking}, stream=True,
                         stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choice = [c for c in chunks if c.choices]
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in with_choice)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in with_choice)
    finishes = [c.choices[0].finish_reason for c in with_choice]
    assert content == whole.choices[0].message.content == want.content
    assert reasoning == reasoning_of(whole.choices[0].message) == want.reasoning
    assert finishes[-1] == whole.choices[0].finish_reason == want.finish
    assert all(f is None for f in finishes[:-1])
    # include_usage: one last chunk without choices, with the same usage as the whole reply
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == len(want.prompt)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == len(want.tokens)


def test_raw_stream_ends_with_done(api, expect):
    messages = chat("Count to three.")
    want = expect(messages, 12, thinking=False)
    status, text = raw(api, "/chat/completions", {"model": api.model_name, "messages": messages, "max_tokens": 12,
                                                  "temperature": 0, "thinking": False, "stream": True})
    assert status == 200, text
    events = [line for line in text.split("\n") if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    chunks = [json.loads(line[len("data: "):]) for line in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.content
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish


# ---- refusals -------------------------------------------------------------------------------------

LONG = " ".join(map(str, range(300)))  # about 780 prompt tokens: past the 512-token context


@pytest.mark.parametrize("change,param,code", [
    ({"temperature": -0.5}, "temperature", None),
    ({"top_p": 0}, "top_p", None),
    ({"top_p": 1.5}, "top_p", None),
    ({"extra_body": {"top_k": -1}}, "top_k", None),  # not OpenAI's: the client sends it in extra_body
    ({"extra_body": {"top_k": 2.5}}, "top_k", None),
    ({"extra_body": {"min_p": 1.5}}, "min_p", None),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    ({"top_logprobs": 2}, "top_logprobs", None),  # without logprobs
    ({"max_tokens": 0}, "max_tokens", None),
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", None),
    ({"messages": [*chat("x"), {"role": "tool", "content": "21 C"}]}, "messages[2].tool_call_id", None),
    ({"messages": chat(LONG)}, "messages", "context_length_exceeded"),
    ({"max_tokens": CONTEXT}, "messages", "context_length_exceeded"),  # fits alone, not with max_tokens
], ids=["temperature<0", "top_p=0", "top_p>1", "top_k<0", "top_k-float", "min_p>1", "top_logprobs>20",
        "top_logprobs-alone", "max_tokens=0", "no-messages",
        "unknown-role", "tool-without-id", "long-prompt", "prompt+max_tokens"])
def test_bad_request_names_the_field(api, client, change, param, code):
    request = {"messages": chat("Hi!"), "max_tokens": 8, **change}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=api.model_name, **request)
    error = info.value
    assert error.status_code == 400
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"] == error.body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == error.param == param
    assert f"`{param.split('[')[0]}" in body["error"]["message"]
    assert body["error"]["code"] == code


def test_top_k_and_min_p_are_read_and_applied(api, client, expect):
    """At temperature 1 the reply is a draw (here not the greedy one); top_k 1, or min_p 1, keeps only
    the likeliest token, so the draw is the greedy reply. A top_k past the vocabulary is refused."""
    messages = chat("Hi!")
    want = expect(messages, 24, thinking=False)

    def drawn(**extra):
        return client.chat.completions.create(model=api.model_name, messages=messages, max_tokens=24, temperature=1.0,
                                              seed=3, extra_body={**NO_THINKING, **extra}).choices[0].message.content

    assert drawn() != want.content
    assert drawn(top_k=1) == want.content and drawn(min_p=1.0) == want.content
    with pytest.raises(openai.BadRequestError, match="top_k must be below the model's vocabulary"):
        drawn(top_k=10**9)


def test_unknown_model_is_404(api, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=chat("Hi!"), max_tokens=4)
    assert info.value.code == "model_not_found" and api.model_name in info.value.message


def test_wrong_or_missing_key_is_401(api):
    with openai.OpenAI(base_url=api.api_url, api_key="sk-wrong", max_retries=0) as wrong:
        for call in (lambda: wrong.models.list(),
                     lambda: wrong.chat.completions.create(model=api.model_name, messages=chat("Hi!"), max_tokens=4)):
            with pytest.raises(openai.AuthenticationError) as info:
                call()
            assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    body = {"model": api.model_name, "messages": chat("Hi!"), "max_tokens": 4}
    for path, request in (("/models", None), ("/chat/completions", body)):
        status, text = raw(api, path, request, key=None)
        assert status == 401, text
        assert json.loads(text)["error"]["code"] == "invalid_api_key"
    assert raw(api, "/models", key=API_KEY)[0] == 200  # the same request with the key is served


def test_exposed_api_without_key_is_refused_at_start(tmp_path, tiny_dir):
    env = harness.node_env(tmp_path / "home")
    base = [KIMI, "up", "--model", str(tiny_dir), "--no-mdns", "--port", "0", "--api-port", "0"]
    started = time.monotonic()
    exposed = subprocess.run([*base, "--api-host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60)
    assert exposed.returncode != 0
    assert "--api-key" in exposed.stderr and "--api-allow-no-key" in exposed.stderr, exposed.stderr
    assert "listening on" not in exposed.stdout  # refused before it served anything
    assert time.monotonic() - started < 30
    no_model = subprocess.run([KIMI, "up", "--no-mdns", "--port", "0", "--api-port", "0"],
                              capture_output=True, text=True, env=env, timeout=60)
    assert no_model.returncode != 0 and "--model" in no_model.stderr, no_model.stderr


# ---- stop strings, logprobs -----------------------------------------------------------------------


def pick_stop(text: str) -> tuple:
    """A short piece of `text` whose first occurrence is past its first third: (stop, text before it)."""
    for length in range(3, 9):
        for start in range(len(text) // 2, len(text) - length):
            stop = text[start:start + length]
            if text.find(stop) >= len(text) // 3:
                return stop, text[:text.find(stop)]
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_reply(api, client, expect, stream):
    messages = chat("Name a colour.")
    want = expect(messages, 48, thinking=False)
    stop, before = pick_stop(want.content)
    other = "\u00a7never\u00a7"  # a second stop that never occurs
    reply = create(client, api, messages, 48, extra_body=NO_THINKING, stop=[other, stop], stream=stream)
    if stream:
        chunks = [c for c in reply if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        content, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert content == before and finish == "stop"


def test_stop_string_that_never_occurs_changes_nothing(api, client, expect):
    messages = chat("Name a colour.")
    want = expect(messages, 48, thinking=False)
    reply = create(client, api, messages, 48, extra_body=NO_THINKING, stop="\u00a7never\u00a7")
    assert reply.choices[0].message.content == want.content
    assert reply.choices[0].finish_reason == want.finish


def test_default_max_tokens_fits_the_context(api, client, expect):
    """Without max_tokens the reply may use what the context leaves; a stop string ends it early."""
    messages = chat("Name a colour.")
    want = expect(messages, 48, thinking=False)
    stop, before = pick_stop(want.content)
    reply = client.chat.completions.create(model=api.model_name, messages=messages, temperature=0,
                                           extra_body=NO_THINKING, stop=stop)
    assert reply.choices[0].message.content == before and reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_one_per_generated_token(api, client, expect, oracle, stream):
    messages = chat("Say something.")
    want = expect(messages, 24, thinking=False)
    reply = create(client, api, messages, 24, extra_body=NO_THINKING, logprobs=True, stream=stream)
    if stream:
        chunks = [c for c in reply if c.choices]
        entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        entries, content = reply.choices[0].logprobs.content, reply.choices[0].message.content
        assert reply.usage.completion_tokens == len(entries)
    assert content == want.content
    assert len(entries) == len(want.tokens)
    tokenizer = oracle[1]
    assert [e.token for e in entries] == [tokenizer.decode([t]) for t in want.tokens]
    for entry, logprob in zip(entries, want.logprobs):
        assert entry.logprob <= 0 and entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert bytes(entry.bytes) == entry.token.encode()
        assert entry.top_logprobs == []  # none asked for


def assert_top_logprobs(entries: list, want: Expected, tokenizer, n: int):
    """Each entry's top_logprobs are mlx-lm's n most likely tokens at that position, in order."""
    assert len(entries) == len(want.tokens)
    for entry, top in zip(entries, want.top):
        got = entry["top_logprobs"] if isinstance(entry, dict) else [t.model_dump() for t in entry.top_logprobs]
        assert [t["token"] for t in got] == [tokenizer.decode([i]) for i, _ in top[:n]]
        assert [t["logprob"] for t in got] == pytest.approx([lp for _, lp in top[:n]], abs=1e-4)
        assert got[0]["logprob"] == pytest.approx(entry["logprob"] if isinstance(entry, dict) else entry.logprob)


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_top_logprobs_are_mlx_lms(api, client, expect, oracle, stream, speculate):
    """top_logprobs: the n most likely tokens at every position, as single-process mlx-lm ranks
    them; a speculative step reports them for each token it verified."""
    messages = chat("Tell me everything.", system="Rank your words.")  # a conversation no other test caches
    want = expect(messages, 48, thinking=False)
    before = json.loads(raw(api, "/cluster")[1])["speculation"]
    reply = create(client, api, messages, 48, extra_body={**NO_THINKING, "speculate": speculate}, logprobs=True,
                   top_logprobs=3, stream=stream)
    if stream:
        chunks = [c for c in reply if c.choices]
        entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        entries = reply.choices[0].logprobs.content
    assert_top_logprobs(entries, want, oracle[1], 3)
    after = json.loads(raw(api, "/cluster")[1])["speculation"]
    assert (after["accepted"] > before["accepted"]) == speculate, (before, after)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_with_logprobs_are_mlx_lms(api, client, oracle, stream):
    """/v1/completions (a raw prompt): mlx-lm's greedy text, and with the legacy `logprobs: 3`
    each token's logprob, its alternatives by text (the token itself among them) and offsets."""
    model, tokenizer = oracle
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    want, top = [], []
    for token, lp in generate_step(mx.array(ids), model, max_tokens=12):
        want.append((int(token), float(lp[int(token)])))
        top.append({tokenizer.decode([i]): float(lp[i]) for i in reversed(mx.argsort(-lp)[:3].tolist())})
        assert int(token) not in tokenizer.eos_token_ids, "pick a prompt whose greedy reply runs 12 tokens"
    reply = client.completions.create(model=api.model_name, prompt=prompt, max_tokens=12, temperature=0, logprobs=3,
                                      stream=stream)
    if stream:
        chunks = [c.choices[0] for c in reply]
        text = "".join(c.text for c in chunks)
        parts = [c.logprobs for c in chunks if c.logprobs]
        logprobs = {key: [v for part in parts for v in getattr(part, key)] for key in
                    ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        assert reply.usage.prompt_tokens == len(ids)
        text, logprobs = reply.choices[0].text, reply.choices[0].logprobs.model_dump()
    assert text == tokenizer.decode([t for t, _ in want])
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t, _ in want]
    assert logprobs["token_logprobs"] == pytest.approx([lp for _, lp in want], abs=1e-4)
    for got, expected, (token, lp) in zip(logprobs["top_logprobs"], top, want):
        expected.setdefault(tokenizer.decode([token]), lp)
        assert got == pytest.approx(expected, abs=1e-4)
    pieces = logprobs["tokens"]
    assert logprobs["text_offset"] == [sum(map(len, pieces[:i])) for i in range(len(pieces))]


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_scores_the_prompt_as_mlx_lm_does(api, client, oracle, max_tokens):
    """/v1/completions with `echo` and `logprobs` (how evaluation harnesses ask for a text's
    loglikelihood, its prompt as token ids): the text begins with the prompt; every prompt token
    after the first has mlx-lm's logprob of it after the ones before (a prompt of two prefill chunks:
    the last stage scores each chunk), with its top alternatives; max_tokens 0 scores it alone."""
    model, tokenizer = oracle
    ids = tokenizer.encode(" ".join(map(str, range(100, 220))), add_special_tokens=False)
    assert 256 < len(ids) < CONTEXT - 4, len(ids)  # past one prefill chunk (256), within the context
    scores, want = oracle_scores(oracle, ids)
    reply_ids = []
    for token, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
        reply_ids.append(int(token))
    reply = client.completions.create(model=api.model_name, prompt=[ids], max_tokens=max_tokens, temperature=0,
                                      echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == tokenizer.decode(ids) + tokenizer.decode(reply_ids)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), max_tokens)
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in ids + reply_ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    for i, got in enumerate(logprobs.top_logprobs[1:len(ids)]):
        best = {tokenizer.decode([t]): scores[i, t].item() for t in reversed(mx.argsort(-scores[i])[:2].tolist())}
        best.setdefault(tokenizer.decode([ids[i + 1]]), want[i])
        assert got == pytest.approx(best, abs=1e-4), i


def test_long_prompts_scored_at_once_each_score_as_mlx_lm(api, client, oracle, expect):
    """Three prompts of two prefill chunks each scored at once, beside a chat reply: every score is
    its own prompt's (the chunks of one request never take another's targets)."""
    model, tokenizer = oracle
    prompts = [tokenizer.encode(" ".join(map(str, range(start, start + 120))), add_special_tokens=False)
               for start in (100, 400, 700)]
    assert all(len(ids) > 256 for ids in prompts) and len({tuple(ids) for ids in prompts}) == 3
    want_chat = expect(chat("Describe a cat."), 24, thinking=False)

    def score(ids):
        return client.completions.create(model=api.model_name, prompt=[ids], max_tokens=0, echo=True, logprobs=0,
                                         temperature=0).choices[0].logprobs.token_logprobs

    with ThreadPoolExecutor(4) as pool:
        scored = [pool.submit(score, ids) for ids in prompts]
        replied = pool.submit(create, client, api, chat("Describe a cat."), 24, extra_body=NO_THINKING)
        for ids, future in zip(prompts, scored):
            _, want = oracle_scores(oracle, ids)
            got = future.result()
            assert got[0] is None and got[1:] == pytest.approx(want, abs=1e-4)
        assert replied.result().choices[0].message.content == want_chat.content


@pytest.mark.parametrize("body,param", [
    ({"prompt": "Hi", "echo": True, "stream": True}, "echo"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [1, "two"]}, "prompt"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),
    ({"prompt": "Hi", "echo": "yes"}, "echo"),
], ids=["echo-streamed", "max_tokens-0-without-echo", "mixed-ids", "two-prompts", "echo-not-bool"])
def test_bad_completions_request_is_refused_naming_the_field(api, body, param):
    status, text = raw(api, "/completions", body)
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == param and f"`{param}`" in error["message"], text


def test_generate_events_carry_top_logprobs(api, expect):
    """gRPC Generate (the chat CLI's and any client's): each TokenEvent carries its alternatives."""
    want = expect(chat("Say something."), 24, thinking=False)
    request = pb.GenerateRequest(prompt_tokens=want.prompt, max_tokens=24,
                                 sampling=pb.SamplingParams(temperature=0, top_logprobs=4))
    events = [e.token for e in api.client.Generate(request, timeout=60) if e.HasField("token") and e.token.id >= 0]
    got = [e.id for e in events]
    assert got == want.generated[:len(got)] and len(got) == len(want.tokens)
    for event, top in zip(events, want.top):
        assert list(event.top.tokens) == [i for i, _ in top[:4]]
        assert list(event.top.logprobs) == pytest.approx([lp for _, lp in top[:4]], abs=1e-4)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_responses_logprobs_are_mlx_lms(api, client, expect, oracle, stream):
    """/v1/responses with include message.output_text.logprobs and top_logprobs: the answer's
    output_text carries every token's logprob and alternatives (streamed with each text delta)."""
    messages = chat("Say something.")
    want = expect(messages, 24, thinking=False)
    reply = client.responses.create(model=api.model_name, input=messages, max_output_tokens=24, temperature=0,
                                    reasoning={"effort": "none"}, include=["message.output_text.logprobs"],
                                    top_logprobs=2, stream=stream)
    if stream:
        events = list(reply)
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        text, entries = "".join(e.delta for e in deltas), [lp.model_dump() for e in deltas for lp in e.logprobs]
        done = next(e for e in events if e.type == "response.output_text.done")
        assert [lp.model_dump() for lp in done.logprobs] == entries
    else:
        part = reply.output[-1].content[0]
        text, entries = part.text, [lp.model_dump() for lp in part.logprobs]
    assert text == want.content
    assert [e["logprob"] for e in entries] == pytest.approx(want.logprobs, abs=1e-4)
    assert_top_logprobs(entries, want, oracle[1], 2)


# ---- prompt cache, concurrency, tools -------------------------------------------------------------


def test_next_turn_reuses_the_cached_prefix(api, client, expect):
    """Turn 2 = turn 1 + its reply + a new question. The cluster kept turn 1's session with the
    prompt and every reply token but the last sampled one (the next turn computes at least its
    last prompt token again), so turn 2's cached_tokens is exactly the common prefix of that and
    turn 2's prompt, capped at len(prompt) - 1. It covers at least all of turn 1's prompt (the
    template renders the earlier reply after the same `<think></think>` turn 1 ended with), and
    reusing those positions must not change turn 2's greedy reply."""
    turn1 = chat("Plan a trip to Rome.", system="You are a travel agent.")
    want1 = expect(turn1, 24, thinking=False)
    reply1 = create(client, api, turn1, 24, extra_body=NO_THINKING)
    assert reply1.choices[0].message.content == want1.content
    turn2 = turn1 + [{"role": "assistant", "content": reply1.choices[0].message.content},
                     {"role": "user", "content": "And on day two?"}]
    want2 = expect(turn2, 24, thinking=False)
    held = want1.prompt + want1.generated[:-1]
    cached = min(common_prefix_len(held, want2.prompt), len(want2.prompt) - 1)
    assert cached >= len(want1.prompt)
    reply2 = create(client, api, turn2, 24, extra_body=NO_THINKING)
    assert reply2.usage.prompt_tokens == len(want2.prompt)
    assert reply2.usage.prompt_tokens_details.cached_tokens == cached
    prefilled = reply2.usage.prompt_tokens - reply2.usage.prompt_tokens_details.cached_tokens
    assert prefilled <= len(want2.prompt) - len(want1.prompt)
    assert reply2.choices[0].message.content == want2.content


def test_concurrent_requests_each_match_mlx_lm(api, client, expect):
    questions = ["What is 2+2?", "Describe a cat.", "Write a haiku."]
    wants = [expect(chat(q), 32, thinking=False) for q in questions]
    assert len({w.content for w in wants}) == 3, "the test needs three different replies"
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda q: create(client, api, chat(q), 32, extra_body=NO_THINKING), questions))
    for reply, want in zip(replies, wants):
        assert reply.choices[0].message.content == want.content
        assert reply.choices[0].finish_reason == want.finish


def test_tools_end_to_end(api, client, expect):
    """The tool is declared in the prompt (the template renders it) and a conversation that used it
    goes on; the random tiny model does not call it, so its reply is compared as text."""
    messages = chat("Weather in Paris?")
    want = expect(messages, 16, thinking=False, tools=[WEATHER_TOOL])
    assert len(want.prompt) > len(expect(messages, 16, thinking=False).prompt)
    reply = create(client, api, messages, 16, extra_body=NO_THINKING, tools=[WEATHER_TOOL])
    assert reply.usage.prompt_tokens == len(want.prompt)
    assert reply.choices[0].message.content == want.content
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == want.finish

    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    followed = messages + [{"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
    want = expect(followed, 16, thinking=False, tools=[WEATHER_TOOL])
    reply = create(client, api, followed, 16, extra_body=NO_THINKING, tools=[WEATHER_TOOL])
    assert reply.usage.prompt_tokens == len(want.prompt)
    assert reply.choices[0].message.content == want.content


def test_unrelated_request_keeps_another_conversations_cache(api, client, expect):
    system = "You answer in one line."
    first = chat("What is the capital of France?", system=system)
    reply = create(client, api, first, 8, extra_body=NO_THINKING)
    create(client, api, chat("Spell cat.", system=system), 8, extra_body=NO_THINKING)  # someone else
    turn2 = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "And of Spain?"}]
    again = create(client, api, turn2, 8, extra_body=NO_THINKING)
    assert again.usage.prompt_tokens_details.cached_tokens >= len(expect(first, 8, thinking=False).prompt)


# ---- cancellation ---------------------------------------------------------------------------------


def test_client_that_goes_away_frees_the_session_on_every_node(api, client, expect):
    messages = chat("Tell me everything.")  # continues no cached conversation: it gets a session of its own
    before = api.kv_state()
    stream = create(client, api, messages, 400, extra_body=NO_THINKING, stream=True)
    chunks = iter(stream)
    for _ in range(5):
        next(chunks)
    during = api.kv_state()
    for name, (sessions, kv) in during.items():  # the request holds a new session on every node
        assert sessions == before[name][0] + 1 and kv > before[name][1], (name, before, during)
    stream.close()
    poll(api.kv_state, lambda state: state == before, 15, f"every node's KV to be back at {before}")
    # nothing of it is reused: the next request starts from scratch, and is right
    want = expect(messages, 12, thinking=False)
    reply = create(client, api, messages, 12, extra_body=NO_THINKING)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.choices[0].message.content == want.content


# ---- the client's deadline -------------------------------------------------------------------------


def assert_only_cached_sessions_left(api):
    """Every node holds the sessions of the conversations the coordinator keeps cached, no more."""
    def state():
        cached = json.loads(raw(api, "/cluster")[1])["cached_conversations"]
        return cached, {name: sessions for name, (sessions, _) in api.kv_state().items()}

    poll(state, lambda s: all(n == s[0] for n in s[1].values()), 15, "nodes to hold only the cached sessions")


@pytest.mark.parametrize("timeout", [0, -1, "soon", True])
def test_bad_timeout_is_refused_naming_it(api, timeout):
    status, body = raw(api, "/chat/completions", {"messages": chat("Hi!"), "max_tokens": 4, "timeout": timeout})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "timeout" and "`timeout`" in error["message"], body


def test_bad_speculate_is_refused_naming_it(api):
    status, body = raw(api, "/chat/completions", {"messages": chat("Hi!"), "max_tokens": 4, "speculate": "yes"})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "speculate" and "`speculate`" in error["message"], body


def test_speculate_forced_or_disabled_keeps_the_reply(api, client, expect):
    """`speculate` true drafts and verifies (the cluster's figures grow), false does not; the
    greedy reply is mlx-lm's either way."""
    messages = chat("Tell me everything.")
    want = expect(messages, 48, thinking=False)
    for speculate in (False, True):
        before = json.loads(raw(api, "/cluster")[1])["speculation"]
        reply = create(client, api, messages, 48, extra_body={**NO_THINKING, "speculate": speculate})
        assert reply.choices[0].message.content == want.content
        after = json.loads(raw(api, "/cluster")[1])["speculation"]
        assert after["steps"] > before["steps"]
        assert (after["drafted"] > before["drafted"]) == speculate, (before, after)


def test_a_prediction_never_changes_the_reply(api, client, expect):
    """OpenAI's predicted outputs: the reply the client expects is drafted first (speculation on
    for the request, though the cluster's --speculate is off); right, given as text parts, edited
    or wrong, the reply is mlx-lm's. (How much a right one saves is tested on the scripted model,
    tests/test_scripted.py: this random model's replies are not what their text encodes to.)"""
    messages = chat("Repeat my words.", system="You are a helpful assistant.")
    want = expect(messages, 48, thinking=False)
    edited = want.content[:len(want.content) // 3] + " an edit " + want.content[len(want.content) // 2:]
    for prediction in (want.content, [{"type": "text", "text": want.content}], edited, "Nothing like it at all."):
        before = json.loads(raw(api, "/cluster")[1])["speculation"]
        reply = create(client, api, messages, 48, extra_body=NO_THINKING,
                       prediction={"type": "content", "content": prediction})
        assert reply.choices[0].message.content == want.content, prediction
        after = json.loads(raw(api, "/cluster")[1])["speculation"]
        assert after["drafted"] > before["drafted"], prediction


@pytest.mark.parametrize("prediction,param", [
    ("text", "prediction"), ({"type": "image", "content": "x"}, "prediction"),
    ({"type": "content", "content": 7}, "prediction.content"),
    ({"type": "content", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "prediction.content[0]"),
    ({"type": "content", "content": LONG * 2}, "prediction"),
], ids=["string", "other-type", "number", "image-part", "past-the-context"])
def test_bad_prediction_is_refused_naming_it(api, prediction, param):
    status, body = raw(api, "/chat/completions", {"messages": chat("Hi!"), "max_tokens": 4, "prediction": prediction})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == param and f"`{param}" in error["message"], body


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_timeout_stops_the_request_and_frees_its_caches(api, client, expect, stream):
    """`timeout` (seconds) is the client's deadline: a reply that cannot be done in time stops,
    says why and what to do, and leaves nothing on the nodes. The official client's own timeout
    (an HTTP setting, 60 s here) is untouched by it."""
    messages = chat("Tell me everything.")
    want = expect(messages, 300, thinking=False)
    assert len(want.tokens) >= 100, "the test needs a long reply: pick another question"
    with pytest.raises(openai.APIError) as info:
        reply = create(client, api, messages, 300, extra_body={**NO_THINKING, "timeout": 0.3}, stream=stream)
        for _ in reply if stream else ():
            pass
    error = info.value
    if not stream:
        assert error.status_code == 504 and error.code == "deadline_exceeded" and error.param == "timeout"
    assert "deadline passed" in error.message and "`timeout`" in error.message, error.message
    assert_only_cached_sessions_left(api)
    # the same request with time enough is whole and right
    reply = create(client, api, messages, 24, extra_body={**NO_THINKING, "timeout": 60})
    assert reply.choices[0].message.content == expect(messages, 24, thinking=False).content


def test_grpc_deadline_stops_generate_and_frees_its_caches(api, expect):
    """A gRPC client's own deadline is the request's: Generate stops when it passes."""
    want = expect(chat("Tell me everything."), 300, thinking=False)
    with pytest.raises(grpc.RpcError) as info:
        api.generate(prompt_tokens=want.prompt, max_tokens=300, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_only_cached_sessions_left(api)


# ---- a session a node freed on its own ------------------------------------------------------------


@pytest.fixture(scope="module")
def reaper(tmp_path_factory, tiny_dir):
    with ApiCluster(tmp_path_factory.mktemp("reaper"), tiny_dir, stages=1, extra=["--session-ttl", "1"],
                    coordinator_extra=["--api-port", "0"]) as c:
        yield c


def test_request_after_the_node_freed_an_idle_session(reaper, expect):
    """The coordinator still lists the conversation as cached; the node has freed it (idle past
    --session-ttl). The next request must be served from scratch, not fail."""
    messages = chat("Hello again.")
    want = expect(messages, 12, thinking=False)
    with openai.OpenAI(base_url=reaper.api_url, api_key="unused", max_retries=0, timeout=60) as client:
        assert create(client, reaper, messages, 12, extra_body=NO_THINKING).choices[0].message.content == want.content
        poll(reaper.kv_state, lambda state: all(s == (0, 0) for s in state.values()), 15,
             "the node to free the idle session")
        reply = create(client, reaper, messages, 12, extra_body=NO_THINKING)
        assert reply.choices[0].message.content == want.content
        assert reply.usage.prompt_tokens_details.cached_tokens == 0
