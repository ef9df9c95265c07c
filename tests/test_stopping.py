"""A coordinator that is stopped (SIGTERM, as Ctrl-C's SIGINT) tells every open stream why before
it closes: an OpenAI stream gets an error event, an Anthropic one its `event: error`, a gRPC
Generate ends UNAVAILABLE "coordinator stopping"."""

import http.client
import json
import signal
from urllib.parse import urlsplit

import grpc
import pytest

from cluster.generated import kimi_cluster_pb2 as pb
from harness import ApiCluster

LONG_REPLY = 400  # tokens: the streams are still running when the signal comes


def _open_stream(url, path: str, body: dict) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return connection


def _has_token(line: bytes) -> bool:
    if not line.startswith(b"data: {"):
        return False
    delta = json.loads(line.removeprefix(b"data: "))["choices"][0]["delta"]
    return bool(delta.get("content") or delta.get("reasoning_content"))


def _events(response) -> list:
    """The SSE data payloads read from `response` until the server closes it."""
    return [line.removeprefix(b"data: ").decode() for line in response.read().split(b"\n\n")
            if line.startswith(b"data: ")]


def test_sigterm_sends_open_streams_an_error_event(tmp_path, tiny_dir, chat_prompt_ids):
    with ApiCluster(tmp_path, tiny_dir, stages=2, coordinator_extra=["--api-port", "0"]) as cluster:
        url = urlsplit(cluster.api_url)
        openai = _open_stream(url, "/v1/chat/completions", {"model": cluster.model_name, "stream": True,
                              "messages": [{"role": "user", "content": "Hi"}], "max_tokens": LONG_REPLY})
        anthropic = _open_stream(url, "/v1/messages", {"model": cluster.model_name, "stream": True,
                                 "messages": [{"role": "user", "content": "Hi"}], "max_tokens": LONG_REPLY})
        response = openai.getresponse()
        assert response.status == 200
        while not _has_token(line := response.readline()):  # until a token's chunk: the reply is generating
            assert line, "the stream ended before its first token"
        messages = anthropic.getresponse()
        assert messages.status == 200
        while b"content_block_delta" not in (line := messages.readline()):
            assert line, "the Anthropic stream ended before its first token"
        generate = cluster.client.Generate(pb.GenerateRequest(prompt_tokens=chat_prompt_ids, max_tokens=LONG_REPLY),
                                           timeout=120)
        next(generate)  # its first token

        cluster.coordinator.proc.send_signal(signal.SIGTERM)

        events = _events(response)
        errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
        assert len(errors) == 1, f"no single error event before the stream closed: {events[-3:]}"
        assert "coordinator stopping" in errors[0]["message"] and errors[0]["type"] == "server_error"
        assert events[-1].startswith('{"error"'), "the error event is the stream's last"
        rest = messages.read().decode().strip().split("\n\n")
        assert rest[-1].startswith("event: error\n"), f"the Anthropic stream did not end with an error: {rest[-2:]}"
        error = json.loads(rest[-1].split("data: ", 1)[1])
        assert error["type"] == "error" and "coordinator stopping" in error["error"]["message"]
        with pytest.raises(grpc.RpcError) as ended:
            for _ in generate:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details().startswith("coordinator stopping"), ended.value.details()
        assert cluster.coordinator.proc.wait(30) == 0
        openai.close()
        anthropic.close()
