"""The OpenAI-compatible API against hostile or careless clients: a real `kimi-cluster up` with
the API, raw HTTP. Malformed fields are 400s naming them, bodies are JSON and bounded, other
sites' pages are refused, the key stays out of `ps`, clients that leave stop their generation,
and a flood of whole replies queues without starving anything else."""

import http.client
import json
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import harness
from cluster.api import MAX_WHOLE_REPLIES
from cluster.api_guards import MAX_BODY_BYTES
from harness import ApiCluster, poll, wait_for_log

API_KEY = "sk-security-test-0123456789"


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
