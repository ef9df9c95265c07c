"""The OpenAI-compatible API against hostile or careless clients: a real `kimi-cluster up` with
the API, raw HTTP. Malformed fields are 400s naming them, bodies are JSON and bounded, other
sites' pages are refused, the key stays out of `ps`, clients that leave stop their generation,
and a flood of whole replies queues without starving anything else."""

import http.client
import json
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import harness
from cluster.api import MAX_WHOLE_REPLIES
from cluster.api_guards import MAX_BODY_BYTES
from harness import ApiCluster, poll, wait_for_log

API_KEY = "sk-security-test-0123456789"
EXTRA_BYTES_PER_REFUSAL = 160 << 20  # the body, its parsed text and the rendered prompt, once each (README)


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_dir):
    workdir = tmp_path_factory.mktemp("api-sec")
    env = harness.node_env(workdir / "home")
    env["KIMI_CLUSTER_API_KEY"] = API_KEY  # the key never appears on the command line
    with ApiCluster(workdir, tiny_dir, stages=1, env=env, coordinator_extra=["--api-port", "0"]) as cluster:
        url = urlsplit(cluster.api_url)
        cluster.host, cluster.port = url.hostname, url.port
        yield cluster


def request(api, method: str, path: str, body=b"", headers=None, key=API_KEY) -> tuple:
    """(status, parsed JSON body) of one raw HTTP request."""
    connection = http.client.HTTPConnection(api.host, api.port, timeout=60)
    try:
        sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
                **(headers or {})}
        connection.request(method, path, body=body, headers={k: v for k, v in sent.items() if v is not None})
        response = connection.getresponse()
        text = response.read().decode()
        return response.status, (json.loads(text) if text.startswith("{") else text)
    finally:
        connection.close()


def chat_body(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4, **fields}).encode()


def test_api_key_from_the_environment_stays_out_of_ps(api):
    assert API_KEY not in Path(f"/proc/{api.coordinator.proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert request(api, "GET", "/v1/models", key=None)[0] == 401
    assert request(api, "GET", "/v1/models")[0] == 200


@pytest.mark.parametrize("raw, field", [
    (b'{"messages": [{"role": "user", "content": "Hi!"}], "temperature": NaN}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "Hi!"}], "top_p": Infinity}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "Hi!"}], "temperature": -Infinity}', "temperature"),
    (chat_body(stream=True, stream_options="yes"), "stream_options"),
    (chat_body(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat_body(chat_template_kwargs=["thinking", False]), "chat_template_kwargs"),
    (chat_body(stream="yes"), "stream"),
    (chat_body(logprobs="yes"), "logprobs"),
    (chat_body(tools=["get_weather"]), "tools"),
])
def test_malformed_field_is_a_400_naming_it(api, raw, field):
    status, body = request(api, "POST", "/v1/chat/completions", raw)
    assert status == 400, body
    assert body["error"]["param"] == field and f"`{field}`" in body["error"]["message"]


HUGE = "1" + "0" * 400  # 10**400: past any float


@pytest.mark.parametrize("field, value", [
    ("max_tokens", HUGE), ("temperature", HUGE), ("seed", HUGE), ("timeout", HUGE), ("top_p", HUGE),
    ("max_tokens", "-" + HUGE), ("seed", "-" + HUGE), ("temperature", "-1"), ("max_tokens", "0"),
    ("timeout", "-3"), ("max_tokens", "2.5"), ("seed", '"7"'), ("temperature", "[1]"), ("max_tokens", "true"),
])
def test_bad_number_is_a_400_naming_it(api, field, value):
    raw = chat_body(**{field: "@"}).replace(b'"@"', value.encode())
    status, body = request(api, "POST", "/v1/chat/completions", raw)
    assert status == 400 and body["error"]["param"] == field, (status, body)


@pytest.mark.parametrize("part", [1, None, {"x": 2}, {"type": "image_url", "image_url": {"url": "data:,"}},
                                  {"type": "text", "text": 3}, {"type": "audio"}, "Hi"])
def test_content_part_other_than_text_is_a_400_naming_it(api, part):
    content = [{"type": "text", "text": "Hi"}, part]
    status, body = request(api, "POST", "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": content}]))
    assert status == 400 and body["error"]["param"] == "messages[0].content[1]", (status, body)
    if isinstance(part, dict) and part.get("type") == "image_url":
        assert "vision tower" in body["error"]["message"]


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/v1/chat/completions"])
@pytest.mark.parametrize("headers", [{"Host": "["}, {"Host": "[::1"}, {"Origin": "http://["},
                                     {"Content-Length": "1x"}, {"Content-Type": "\u00ff/\u00ff"},
                                     {"Authorization": "Bearer \u00e9\u00e9"}, {"Authorization": "Basic"}])
def test_malformed_header_is_a_4xx_in_the_error_shape(api, path, headers):
    method = "POST" if path.startswith("/v1/chat") else "GET"
    try:
        status, body = request(api, method, path, chat_body() if method == "POST" else b"", headers=headers)
    except http.client.RemoteDisconnected:
        pytest.fail(f"the API dropped the connection on {headers}")
    refused = {"Host", "Origin", "Content-Length"} & set(headers) or method == "POST" or (
        path.startswith("/v1/") and "Authorization" in headers)  # the rest are fine on a GET of /health
    assert (400 <= status < 500 and body["error"]["message"]) if refused else status == 200, (status, body)


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1 extra\r\n", b"\x00\x01\x02\r\n", b"GET /\xff HTTP/1.1\r\n",
                                  b"GET / HTTP/1.1\r\nBad Header\r\n", b"POST /v1/models HTTP/1.1\r\n"
                                  b"Content-Length: 1\r\nContent-Length: 2\r\n"])
def test_request_http_cannot_parse_is_a_400_in_the_error_shape(api, line):
    with socket.create_connection((api.host, api.port), timeout=30) as conn:
        conn.sendall(line + b"Host: localhost\r\n\r\n")
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply[:300]
    assert json.loads(body)["error"]["code"] == "invalid_http_request"


def test_prompt_far_past_the_context_is_refused_before_it_is_tokenized(api):
    """7.5 MiB in one message: refused without tokenizing it whole (which took 11-36 s and 1.5 GB)."""
    before = _rss(api.coordinator.proc.pid)
    text = "word " * (MAX_BODY_BYTES * 7 // 8 // 5)
    status, body = request(api, "POST", "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": text}]))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", (status, body)
    assert "more than" in body["error"]["message"] and body["error"]["param"] == "messages"
    status, body = request(api, "POST", "/v1/completions", json.dumps({"prompt": text}).encode())
    assert status == 400 and body["error"]["param"] == "prompt", (status, body)
    grown = _rss(api.coordinator.proc.pid) - before
    assert grown < EXTRA_BYTES_PER_REFUSAL, f"the coordinator grew by {grown >> 20} MiB"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_deeply_nested_json_is_a_400(api):
    status, body = request(api, "POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in body["error"]["message"], body


def test_body_must_be_json(api):
    status, body = request(api, "POST", "/v1/chat/completions", chat_body(), headers={"Content-Type": "text/plain"})
    assert status == 415 and body["error"]["param"] == "Content-Type", body


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_oversized_body_is_refused_before_it_is_read_whole(api, declared):
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (MAX_BODY_BYTES + 1024) + b'"}]}'
    if declared:
        status, body = request(api, "POST", "/v1/chat/completions", big)
        assert status == 413, body
    else:  # no length given: the API stops reading at the limit, answers 413 and drops the connection
        chunks = iter([big[i:i + 65536] for i in range(0, len(big), 65536)])
        try:
            status, body = request(api, "POST", "/v1/chat/completions", chunks,
                                   headers={"Transfer-Encoding": "chunked"})
            assert status == 413, body
        except (ConnectionResetError, BrokenPipeError):
            assert next(chunks, None) is not None  # cut off before the whole body was sent
    assert request(api, "GET", "/v1/models")[0] == 200


def test_other_sites_pages_cannot_call_it(api):
    # DNS rebinding: the browser sends the attacker's host name
    status, body = request(api, "GET", "/v1/models", headers={"Host": f"evil.example:{api.port}"})
    assert status == 403 and body["error"]["param"] == "Host", body
    # a page of another origin posting to the API
    status, body = request(api, "POST", "/v1/chat/completions", chat_body(), headers={"Origin": "http://evil.example"})
    assert status == 403 and body["error"]["param"] == "Origin", body
    # the web view's own origin is fine
    status, body = request(api, "POST", "/v1/chat/completions", chat_body(),
                           headers={"Origin": f"http://{api.host}:{api.port}"})
    assert status == 200, body


def _in_flight(api) -> int:
    return request(api, "GET", "/v1/cluster")[1]["requests_in_flight"]


def _start_whole_reply(api) -> http.client.HTTPConnection:
    """Send a long non-streaming request and return its open connection (the reply not read)."""
    connection = http.client.HTTPConnection(api.host, api.port, timeout=120)
    body = json.dumps({"prompt": "Once", "max_tokens": 3000, "temperature": 1.0, "seed": 7}).encode()
    connection.request("POST", "/v1/completions", body=body,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    return connection


def test_whole_reply_stops_when_its_client_leaves(api):
    connection = _start_whole_reply(api)
    poll(lambda: _in_flight(api), lambda n: n == 1, 60, "the request to start generating")
    connection.close()
    poll(lambda: _in_flight(api), lambda n: n == 0, 30, "the generation to stop")
    line = wait_for_log(api.coordinator, r"request \w+: \d+ prompt tokens .*\(cancelled\)", 30).group(0)
    generated = int(re.search(r"(\d+) generated", line).group(1))
    assert generated < 3000, line


def test_flood_of_whole_replies_queues_and_starves_nothing(api):
    flood = [_start_whole_reply(api) for _ in range(MAX_WHOLE_REPLIES + 4)]
    try:
        poll(lambda: _in_flight(api), lambda n: n == MAX_WHOLE_REPLIES, 60, "every whole-reply slot in use")
        assert request(api, "GET", "/v1/models")[0] == 200
        # a new stream gets its tokens while the whole replies run and queue
        status, text = request(api, "POST", "/v1/chat/completions", chat_body(stream=True))
        assert status == 200 and "data: [DONE]" in text, text
        assert _in_flight(api) == MAX_WHOLE_REPLIES  # the others still wait their turn
    finally:
        for connection in flood:
            connection.close()
    poll(lambda: _in_flight(api), lambda n: n == 0, 60, "every abandoned reply to stop")
