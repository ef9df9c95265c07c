"""Fuzzing (hypothesis) of a live 2-stage cluster with its API, for a bounded time: generated and
mutated messages to the nodes' and the coordinator's gRPC services; generated JSON, numbers,
headers, paths and raw request lines to every API endpoint, where anything but a 5xx or a logged
traceback is fine. Every gRPC call must be answered, or refused with a status that says why: UNKNOWN (a servicer raised),
INTERNAL (an unexpected error inside a server) and DEADLINE_EXCEEDED (a hang) fail the test.
Throughout, a generation runs alongside and must keep giving mlx-lm's tokens; each test ends by
checking that one more generation after its fuzzing gives them too, and that every process is
alive, answers at once, and has not grown without bound.

The control calls (Load, Stop, Join) are fuzzed as a member sends them: Loads to the chain's
nodes as another coordinator (refused while the owner lives), any Load and Stop (not exit) to a
spare, which the real coordinator must then still be able to load; Joins name only loopback
(127.0.0.0/8) addresses, never a host name, so nothing leaves the machine.
"""

import http.client
import json
import signal
import socket
import subprocess
import threading
from urllib.parse import urlsplit

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.generated import kimi_cluster_pb2 as pb
from harness import ApiCluster, oracle_reply, poll, start_node

ALONGSIDE_TOKENS = 12
EXAMPLES = 60  # per test: about 25 s for the whole module on two cores, cluster start included
RSS_GROWTH_LIMIT = 150 << 20
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


# What grpc itself answers to a request body that does not parse (no servicer runs).
UNPARSED_BODY = "Exception deserializing request!"
FAILURES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED)


def _rss(pid: int) -> int:
    """Resident bytes of a process, by `ps` (its RSS column is KiB on macOS and Linux alike)."""
    return int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True,
                              check=True).stdout) * 1024


class Alongside:
    """Greedy generations one after another on the coordinator, each checked against mlx-lm."""

    def __init__(self, client, prompt: list, expected: list):
        self.client, self.prompt, self.expected = client, prompt, expected
        self.finished, self.wrong, self.errors = 0, [], []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        request = pb.GenerateRequest(prompt_tokens=self.prompt, max_tokens=ALONGSIDE_TOKENS)
        while not self._stop.is_set():
            try:
                ids = [e.token.id for e in self.client.Generate(request, timeout=60)
                       if e.HasField("token") and e.token.id >= 0]
            except grpc.RpcError as e:
                ids = f"{e.code().name}: {e.details()}"
            with self._changed:
                if isinstance(ids, str):
                    self.errors.append(ids)
                elif ids != self.expected:
                    self.wrong.append(ids)
                self.finished += 1
                self._changed.notify_all()

    def check_after(self, timeout: float = 120):
        """Wait for a generation started after this call to finish, then assert that every
        generation since the last check gave mlx-lm's tokens."""
        with self._changed:
            # the one in flight now started before; the one after it is wholly after this call
            after = self.finished + 2
            assert self._changed.wait_for(lambda: self.finished >= after, timeout), "the generation alongside hangs"
            wrong, errors, self.wrong, self.errors = self.wrong, self.errors, [], []
        assert wrong == [], f"generations alongside gave other tokens than mlx-lm: {wrong[:3]}"
        assert errors == [], f"generations alongside failed: {errors[:3]}"

    def stop(self):
        self._stop.set()
        self._thread.join(120)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tiny_dir, oracle, chat_prompt_ids):
    workdir = tmp_path_factory.mktemp("fuzz")
    with ApiCluster(workdir, tiny_dir, stages=2, coordinator_extra=["--api-port", "0"]) as cluster:
        url = urlsplit(cluster.api_url)
        cluster.host, cluster.port = url.hostname, url.port
        stubs = {n.name: cluster.node_stub(n) for n in cluster.nodes}
        cluster.owner = stubs["coord"].Health(pb.HealthRequest(), timeout=10).coordinator_id
        cluster.stubs = stubs
        cluster.rss_before = {n.name: _rss(n.proc.pid) for n in cluster.nodes}
        cluster.alongside = Alongside(cluster.client, chat_prompt_ids,
                                      oracle_reply(oracle, chat_prompt_ids, ALONGSIDE_TOKENS))
        yield cluster
        cluster.alongside.stop()


def _unharmed(cluster):
    """How every fuzz test ends: the generations alongside gave mlx-lm's tokens, one after the
    fuzzing too; every node is alive, answers Health at once, holds its slice, and has not grown
    by RSS_GROWTH_LIMIT since the cluster started."""
    cluster.alongside.check_after()
    for node in cluster.nodes:
        assert node.proc.poll() is None, f"{node.name} died:\n{node.log()[-2000:]}"
        assert cluster.stubs[node.name].Health(pb.HealthRequest(), timeout=2).loaded, f"{node.name} lost its slice"
        grown = _rss(node.proc.pid) - cluster.rss_before[node.name]
        assert grown < RSS_GROWTH_LIMIT, f"{node.name} grew by {grown >> 20} MiB"


# ---- gRPC: generated messages --------------------------------------------------------------------

tensors = st.builds(
    pb.Tensor,
    data=st.binary(max_size=4096),
    shape=st.lists(st.integers(0, 2**32 - 1), max_size=4),
    dtype=st.sampled_from(["float32", "bfloat16", "float16", "int8", "", "float64"]),
)
sampling = st.builds(
    pb.SamplingParams,
    temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
    top_p=st.floats(allow_nan=True, allow_infinity=True, width=32),
    top_k=st.integers(-2**31, 2**31 - 1),
    min_p=st.floats(allow_nan=True, allow_infinity=True, width=32),
)


@st.composite
def forward_requests(draw, owner: str):
    request = pb.ForwardRequest(
        session_id=draw(st.sampled_from(["fuzz-a", "fuzz-b", "", "x" * 300])),
        offset=draw(st.integers(0, 2**32 - 1) | st.integers(0, 8)),
        sample=draw(st.booleans()), new_generation=draw(st.booleans()),
        max_positions=draw(st.integers(0, 64) | st.integers(0, 2**32 - 1)),
        coordinator_id=draw(st.sampled_from([owner, "", "another-coordinator"])),
        sampling=draw(sampling), seq=draw(st.integers(0, 2**64 - 1)),
        time_left_s=draw(st.floats(0, 5, width=32)),
    )
    request.tokens.extend(draw(st.lists(st.integers(-2**31, 2**31 - 1) | st.integers(0, 300), max_size=16)))
    if draw(st.booleans()):
        request.hidden.CopyFrom(draw(tensors))
    return request


def _answered(call, unparsed_body: bool = False):
    """Run one call: an answer, or a refusal with a status and a message saying why. With
    `unparsed_body` (mutated bytes), grpc's own INTERNAL for a body that does not parse is a refusal."""
    try:
        call()
    except grpc.RpcError as e:
        if unparsed_body and e.code() == grpc.StatusCode.INTERNAL and e.details() == UNPARSED_BODY:
            return
        assert e.code() not in FAILURES, f"{e.code().name}: {e.details()}"
        assert e.details(), f"{e.code().name} without a message"


def _without_tracebacks(fuzzed, run):
    """Run the fuzzing `run`, then fail on any traceback a node logged meanwhile."""
    start = {node.name: len(node.log()) for node in fuzzed.nodes}
    run()
    for node in fuzzed.nodes:
        logged = node.log()[start[node.name]:]
        assert "Traceback" not in logged, (node.name, logged[logged.find("Traceback") - 300:][:3000])


def test_fuzz_node_services(fuzzed):
    @FUZZ
    @given(data=st.data())
    def run(data):
        node = data.draw(st.sampled_from(sorted(fuzzed.stubs)))
        stub = fuzzed.stubs[node]
        request = data.draw(forward_requests(fuzzed.owner))
        _answered(lambda: stub.Forward(request, timeout=20))
        _answered(lambda: stub.Release(pb.ReleaseRequest(session_id=request.session_id), timeout=20))
        _answered(lambda: stub.Health(pb.HealthRequest(coordinator_id=data.draw(st.text(max_size=40))), timeout=20))

    run()
    _unharmed(fuzzed)


def test_fuzz_mutated_bytes(fuzzed):
    valid = pb.ForwardRequest(session_id="fuzz-bytes", tokens=[1, 2, 3], max_positions=8,
                              coordinator_id=fuzzed.owner).SerializeToString()
    methods = ["/kimi_cluster.v1.Node/Forward", "/kimi_cluster.v1.Node/Release", "/kimi_cluster.v1.Node/Info",
               "/kimi_cluster.v1.Node/Health", "/kimi_cluster.v1.Coordinator/MemoryMap"]
    channel = fuzzed.channel

    @FUZZ
    @given(method=st.sampled_from(methods), flips=st.lists(st.tuples(st.integers(0, len(valid) - 1),
                                                                      st.integers(0, 255)), max_size=8),
           tail=st.binary(max_size=64))
    def run(method, flips, tail):
        body = bytearray(valid)
        for at, value in flips:
            body[at] = value
        _answered(lambda: channel.unary_unary(method)(bytes(body) + tail, timeout=20), unparsed_body=True)

    run()
    _unharmed(fuzzed)


def test_fuzz_generate(fuzzed):
    @FUZZ
    @given(messages=st.text(max_size=200) | st.just('[{"role": "user", "content": "Hi"}]'),
           tokens=st.lists(st.integers(-2**31, 2**31 - 1) | st.integers(0, 300), max_size=12),
           max_tokens=st.integers(0, 3), thinking=st.booleans(), params=sampling)
    def run(messages, tokens, max_tokens, thinking, params):
        request = pb.GenerateRequest(messages_json=messages, max_tokens=max_tokens or 1, sampling=params,
                                     thinking=thinking, tools_json=messages[:50])
        request.prompt_tokens.extend(tokens)
        _answered(lambda: list(fuzzed.client.Generate(request, timeout=30)))

    _without_tracebacks(fuzzed, run)
    _unharmed(fuzzed)


# ---- the API: generated JSON ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["messages", "prompt", "model", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
          "tools", "tool_choice", "thinking", "chat_template_kwargs", "logprobs", "n", "response_format",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "parallel_tool_calls",
          "system", "stop_sequences", "input", "instructions", "text", "reasoning",
          "previous_response_id", "background"]
SCHEMA_KEYS = st.sampled_from(["type", "properties", "items", "enum", "const", "anyOf", "required", "pattern",
                               "format", "$ref", "additionalProperties", "not", "minimum", "maxLength"])
schemas = st.dictionaries(SCHEMA_KEYS, json_values, max_size=4)


def typed(kinds: list, keys: list, values=json_values | st.just("f"), max_keys: int = 4):
    """Objects of one of `kinds` (their "type") holding some of `keys`, each value arbitrary."""
    return st.builds(lambda kind, rest: {**rest, "type": kind}, st.sampled_from(kinds),
                     st.dictionaries(st.sampled_from(keys), values, max_size=max_keys))


# The Responses API's typed items and flat tools, each field arbitrary.
responses_items = typed(["message", "function_call", "function_call_output", "custom_tool_call",
                         "custom_tool_call_output", "reasoning", "item_reference"],
                        ["role", "content", "call_id", "name", "arguments", "input", "output", "summary"])
grammars = st.fixed_dictionaries({"type": st.sampled_from(["grammar", "text", "x"])},
                                 optional={"syntax": st.sampled_from(["lark", "regex"]) | json_values,
                                           "definition": st.text(max_size=30) | json_values})
flat_tools = st.one_of(
    st.builds(lambda s, name: {"type": "function", "name": name, "parameters": s}, schemas, st.just("f") | json_values),
    st.builds(lambda fmt, name: {"type": "custom", "name": name, "format": fmt}, grammars | json_values,
              st.just("f") | json_values))
# Shapes that reach the grammar compiler and the adapters, besides the arbitrary values of FIELDS.
SHAPED = {
    "response_format": st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "f", "schema": s}}, schemas),
    "tools": st.lists(st.builds(lambda s: {"type": "function", "function": {"name": "f", "parameters": s}}, schemas)
                      | flat_tools, max_size=2),
    "input": st.lists(responses_items, max_size=3),
}


def test_fuzz_api(fuzzed):
    @FUZZ
    @given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/messages",
                                 "/v1/messages/count_tokens", "/v1/responses"]),
           fields=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
           shaped=st.fixed_dictionaries({}, optional=SHAPED),
           valid_messages=st.booleans(), max_tokens=st.integers(1, 3) | json_values)
    def run(path, fields, shaped, valid_messages, max_tokens):
        body = {**fields, **shaped, "max_tokens": max_tokens, "max_output_tokens": max_tokens}
        if valid_messages:
            body.setdefault("messages", [{"role": "user", "content": "Hi"}])
            body.setdefault("prompt", "Hi")
            body.setdefault("input", "Hi")
        _post_answered(fuzzed, path, body)

    _without_tracebacks(fuzzed, run)
    _unharmed(fuzzed)


def _post_answered(fuzzed, path: str, body: dict):
    """POST `body`: a reply or a 4xx/503 that says what was wrong, never a 500."""
    connection = http.client.HTTPConnection(fuzzed.host, fuzzed.port, timeout=30)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    assert response.status in (200, 400, 404, 503), (response.status, body, text[:300])
    if response.status != 200:
        assert json.loads(text)["error"]["message"]


def test_fuzz_responses_items_and_tools(fuzzed):
    """The Responses adapter's own shapes (typed input items, flat function and custom tools), each
    field arbitrary, with a valid user message among the items or not."""
    @FUZZ
    @given(items=st.lists(responses_items, max_size=3), tools=st.lists(flat_tools, max_size=2),
           fields=st.dictionaries(st.sampled_from(["tool_choice", "text", "reasoning", "instructions",
                                                   "parallel_tool_calls", "stream", "include", "top_logprobs",
                                                   "truncation"]),
                                  json_values | st.sampled_from([["message.output_text.logprobs"], "auto"]), max_size=3),
           with_message=st.booleans())
    def run(items, tools, fields, with_message):
        message = [{"role": "user", "content": "Hi"}] if with_message else []
        _post_answered(fuzzed, "/v1/responses", {**fields, "input": [*message, *items], "tools": tools,
                                                 "max_output_tokens": 2})

    _without_tracebacks(fuzzed, run)
    _unharmed(fuzzed)


content_parts = typed(["text", "image_url", "input_audio", "file", "refusal"], ["text", "image_url", "refusal"],
                      json_values, max_keys=2)
tool_calls = st.lists(st.fixed_dictionaries({}, optional={
    "id": st.just("call_0") | json_values, "type": st.just("function") | json_values,
    "function": st.fixed_dictionaries({}, optional={"name": st.just("f") | json_values,
                                                    "arguments": st.just("{}") | json_values}) | json_values}),
    max_size=2)
chat_messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]) | json_values},
    optional={"content": st.text(max_size=20) | st.lists(content_parts, max_size=2) | json_values,
              "tool_calls": tool_calls | json_values, "tool_call_id": st.just("call_0") | json_values,
              "reasoning_content": json_values, "name": json_values})


predictions = st.fixed_dictionaries({}, optional={"type": st.just("content") | json_values,
                                                  "content": st.text(max_size=20) | st.lists(content_parts, max_size=2)
                                                  | json_values}) | json_values


def test_fuzz_chat_messages(fuzzed):
    """Chat completions' own shapes (roles, content parts, assistant tool calls and tool replies, a
    prediction, logprobs with top_logprobs), each field arbitrary, after a valid user message."""
    @FUZZ
    @given(messages=st.lists(chat_messages, max_size=3), stream=st.booleans(),
           fields=st.fixed_dictionaries({}, optional={"prediction": predictions, "logprobs": st.booleans() | json_values,
                                                      "top_logprobs": st.integers(-2, 22) | json_values}))
    def run(messages, stream, fields):
        _post_answered(fuzzed, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}, *messages],
                                                        "max_tokens": 2, "stream": stream, **fields})

    _without_tracebacks(fuzzed, run)
    _unharmed(fuzzed)


def test_fuzz_completions_prompts_echo_and_logprobs(fuzzed):
    """/v1/completions' own shapes: a prompt of text, token ids (nested or not, in range or not) or
    anything, with echo, logprobs and max_tokens arbitrary."""
    @FUZZ
    @given(prompt=st.text(max_size=20) | st.lists(st.integers(-2, 600), max_size=6)
           | st.lists(st.lists(st.integers(0, 600), max_size=4), max_size=2) | json_values,
           fields=st.fixed_dictionaries({}, optional={"echo": st.booleans() | json_values,
                                                      "logprobs": st.integers(-1, 21) | json_values,
                                                      "max_tokens": st.integers(-1, 3) | json_values,
                                                      "stream": st.booleans()}))
    def run(prompt, fields):
        _post_answered(fuzzed, "/v1/completions", {"max_tokens": 2, **fields, "prompt": prompt})

    _without_tracebacks(fuzzed, run)
    _unharmed(fuzzed)


content_blocks = typed(["text", "thinking", "redacted_thinking", "tool_use", "tool_result", "image", "document"],
                       ["text", "thinking", "id", "name", "input", "tool_use_id", "content", "is_error"])


def test_fuzz_messages_blocks_and_tools(fuzzed):
    """The Messages adapter's own shapes (content blocks in either role, tools, a system of blocks),
    each field arbitrary."""
    @FUZZ
    @given(turns=st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.lists(content_blocks, max_size=3)),
                          max_size=3),
           tools=st.lists(st.fixed_dictionaries({}, optional={"name": st.just("f") | json_values,
                                                              "input_schema": schemas | json_values,
                                                              "description": json_values,
                                                              "type": st.just("custom") | json_values}), max_size=2),
           fields=st.dictionaries(st.sampled_from(["tool_choice", "system", "thinking", "stop_sequences",
                                                   "stream", "mcp_servers", "container"]),
                                  json_values | st.lists(content_blocks, max_size=2), max_size=3))
    def run(turns, tools, fields):
        messages = [{"role": "user", "content": "Hi"}, *({"role": r, "content": c} for r, c in turns)]
        _post_answered(fuzzed, "/v1/messages", {**fields, "messages": messages, "tools": tools, "max_tokens": 2})

    _without_tracebacks(fuzzed, run)
    _unharmed(fuzzed)


# ---- the API: numbers, headers, paths and request lines, for every endpoint ----------------------

ENDPOINTS = [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("GET", "/v1/cluster"),
             ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/messages"),
             ("POST", "/v1/responses"),
             ("GET", "/"), ("GET", "/chat.html")]
NUMBER_FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "timeout",
                 "n", "presence_penalty", "logprobs", "top_logprobs"]
numbers = (st.integers() | st.integers(-2**70, 2**70).map(lambda n: n * 10**330) | st.floats()
           | st.sampled_from(["1e400", "-1e400", "1" + "0" * 400, "-0", "1e-400", "0x10", "1_000", "01"]))
header_text = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40)


def _header(*odd: str):
    return st.sampled_from(odd) | header_text


headers = st.fixed_dictionaries({}, optional={
    "Host": _header("[", "[::1", "[::1]:x", "localhost:", "::1", "", "a" * 300, "localhost"),
    "Origin": _header("http://[", "http://[::1", "null", "http://localhost", "//", ""),
    "Content-Type": _header("application/json; x", "application/jsonx", "", "APPLICATION/JSON"),
    "Content-Length": _header("-1", "99999999999999999999", "1x", "", "0"),
    "Authorization": _header("Bearer ", "Bearer \xe9", "Basic", ""),
    "Transfer-Encoding": _header("chunked", "gzip", ""),
    "Expect": _header("100-continue"),
    "X" * 300: header_text,
})
path_tail = st.text(st.sampled_from("/.%?#;=&az09~:[]@!$'()*+,\x7f"), max_size=40) | st.sampled_from(
    ["%00", "%ff%fe", "/../../etc/passwd", "%2e%2e/", "a" * 5000, "?" + "x=1&" * 500, "//", "/%"])


def _exchange(fuzzed, raw: bytes, half_close: bool = False) -> tuple:
    """(status, body) of one raw HTTP exchange; None status when the API closed without answering.
    `half_close`: say nothing more follows (a request whose framing may promise more than it sends)."""
    with socket.create_connection((fuzzed.host, fuzzed.port), timeout=30) as conn:
        conn.sendall(raw)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    first = head.split(b"\r\n", 1)[0].split()
    return (int(first[1]) if len(first) > 1 and first[1].isdigit() else None), body


def _no_5xx(status, body: bytes, sent):
    assert status is not None and status < 500, (status, sent[:300], body[:300])
    if status >= 400 and body[:1] == b"{":
        assert json.loads(body)["error"]["message"], body[:300]




def _request(method: str, target: str, fields: dict, body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    fields = {"Host": "localhost", "Content-Type": "application/json", **fields, "Connection": "close"}
    fields.setdefault("Content-Length", str(len(body)))
    lines += [f"{name}: {value}".encode("latin-1") for name, value in fields.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def test_fuzz_api_numbers(fuzzed):
    @FUZZ
    @given(endpoint=st.sampled_from([e for e in ENDPOINTS if e[0] == "POST"]),
           values=st.dictionaries(st.sampled_from(NUMBER_FIELDS), numbers, min_size=1, max_size=3),
           stream=st.booleans())
    def run(endpoint, values, stream):
        # numbers written into the JSON as text: json.dumps cannot write 1e400, and a client can
        body = {"messages": [{"role": "user", "content": "Hi"}], "prompt": "Hi", "max_tokens": 2, "stream": stream,
                **{name: f"@{name}@" for name in values}}
        raw = json.dumps(body)
        for name, value in values.items():
            raw = raw.replace(f'"@{name}@"', value if isinstance(value, str) else json.dumps(value))
        sent = _request(*endpoint, {}, raw.encode())
        _no_5xx(*_exchange(fuzzed, sent), sent)

    _without_tracebacks(fuzzed, run)
    _unharmed(fuzzed)


def test_fuzz_api_headers_and_paths(fuzzed):
    @FUZZ
    @given(endpoint=st.sampled_from(ENDPOINTS), fields=headers, tail=path_tail, valid_body=st.booleans())
    def run(endpoint, fields, tail, valid_body):
        method, path = endpoint
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "prompt": "Hi", "max_tokens": 2}).encode()
        body = body if valid_body else body[:len(body) // 2]
        target = path + tail if tail.startswith(("/", "?")) or path == "/" else path
        if "\r" in "".join(fields.values()) or "\n" in "".join(fields.values()):
            fields = {k: v.replace("\r", "").replace("\n", "") for k, v in fields.items()}
        sent = _request(method, target, fields, body if method == "POST" else b"")
        framing = {"Content-Length", "Transfer-Encoding", "Expect"} & set(fields)
        status, reply = _exchange(fuzzed, sent, half_close=bool(framing))
        if status is not None or not framing:  # framing that promises more gets no answer once the client stops
            _no_5xx(status, reply, sent)

    _without_tracebacks(fuzzed, run)
    _unharmed(fuzzed)


def test_fuzz_api_request_lines(fuzzed):
    valid = _request("POST", "/v1/completions", {}, b'{"prompt": "Hi", "max_tokens": 2}')

    @FUZZ
    @given(flips=st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1, max_size=6),
           cut=st.integers(0, len(valid)))
    def run(flips, cut):
        sent = bytearray(valid)
        for at, value in flips:
            sent[at] = value
        status, body = _exchange(fuzzed, bytes(sent[:cut] if cut < 40 else sent), half_close=True)
        if status is not None:  # a request cut short, or promising more body, gets no answer once the client stops
            _no_5xx(status, body, bytes(sent))

    _without_tracebacks(fuzzed, run)
    _unharmed(fuzzed)


# ---- control calls: Load, Stop, Join, as a member sends them ---------------------------------------

# IP literals only (a host name would be resolved): on 127.0.0.0/8, plainly or respelled
loopback_hosts = st.just("127.0.0.1") | st.builds("127.{}.{}.{}".format, *[st.integers(0, 255)] * 3)


def loopback_addresses(ports: list):
    """Addresses on 127.0.0.0/8 (the cluster's own ports among them, in other spellings), and
    malformed ones that never reach a resolver."""
    port = st.sampled_from(ports) | st.integers(0, 70000)
    spelled = st.builds(lambda p, zeros: "0" * zeros + str(p), port, st.integers(0, 2))
    well_formed = st.builds("{}{}:{}".format, st.sampled_from(["", "ipv4:", "dns:"]), loopback_hosts, spelled)
    malformed = loopback_hosts | st.builds("{}:{}".format, loopback_hosts, st.sampled_from(["", "x", "-1", "7e3"]))
    return well_formed | malformed | st.just("")


def load_requests(addresses, model_ids: list, owners: list, take_over):
    return st.builds(
        pb.LoadRequest, model_id=st.sampled_from(model_ids) | st.text(max_size=20),
        start=st.integers(0, 8) | st.integers(0, 2**32 - 1), end=st.integers(0, 8) | st.integers(0, 2**32 - 1),
        kv_budget_bytes=st.integers(0, 2**64 - 1), next_address=addresses, next_name=st.text(max_size=20),
        coordinator=addresses, drop_sessions=st.booleans(), sources=st.lists(addresses, max_size=3),
        coordinator_id=st.text(max_size=20), owner=st.sampled_from(owners) | st.text(max_size=20),
        take_over=take_over)


def test_fuzz_control_calls(fuzzed, tmp_path):
    """Last of the module: it ends by killing the chain's last stage, for the spare to replace."""
    spare = start_node(tmp_path, "spare", env=fuzzed.env, extra=["--peer", fuzzed.coordinator.address])
    try:
        _fuzz_control_calls(fuzzed, spare)
    finally:
        spare.kill()


def _fuzz_control_calls(fuzzed, spare):
    statuses = lambda: {n.name: n.status for n in fuzzed.memory_map().nodes}
    poll(statuses, lambda s: s.get("spare") == "spare", 30, "the node started with --peer to be a spare")
    spare_stub = fuzzed.node_stub(spare)
    model_id = fuzzed.memory_map().model_id
    ports = [int(n.address.rsplit(":", 1)[1]) for n in [*fuzzed.nodes, spare]] + [fuzzed.port]
    addresses = loopback_addresses(ports)
    coordinator = fuzzed.client

    @FUZZ
    @given(data=st.data())
    def run(data):
        _answered(lambda: coordinator.Join(pb.JoinRequest(address=data.draw(addresses)), timeout=20))
        chain_node = fuzzed.stubs[data.draw(st.sampled_from(sorted(fuzzed.stubs)))]
        # another coordinator's Load: refused while the owner lives, whatever else it says
        load = data.draw(load_requests(addresses, [model_id], [""], st.just(False)))
        _answered(lambda: list(chain_node.Load(load, timeout=20)))
        load = data.draw(load_requests(addresses, [model_id], [""], st.booleans()))
        _answered(lambda: list(spare_stub.Load(load, timeout=20)))
        _answered(lambda: spare_stub.Stop(pb.StopRequest(exit=False), timeout=20))  # exit ends the process: its job

    run()
    _unharmed(fuzzed)
    # The spare stays usable for the real coordinator: once the fuzzer's ownership lapses (a lease
    # of a few seconds), the last stage's loss puts the spare in its place, and replies go on.
    poll(lambda: spare_stub.Health(pb.HealthRequest(), timeout=2), lambda h: not h.owner, 30,
         "the fuzzer's lease on the spare to lapse")
    last = fuzzed.peers[-1]
    last.kill(signal.SIGKILL)
    poll(statuses, lambda s: s.get("spare") == "ready" and s.get(last.name) != "ready", 60,
         "the spare to take the lost stage's place")
    fuzzed.alongside.check_after()
