"""An OpenAI-compatible HTTP API in front of the coordinator: /v1/models, /v1/chat/completions.

Sampling runs on the cluster's last stage; this layer turns the token stream into OpenAI's
shapes: reasoning_content, content and tool_calls (Kimi's formats, see reply.py), stop strings,
usage with prompt_tokens_details.cached_tokens, and SSE streaming. A client that disconnects
mid-stream stops the generation and frees its caches on every node.
"""

import hmac
import json
import time
import uuid

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers

from .coordinator import GenerateError
from .generated import kimi_cluster_pb2 as pb
from .reply import ReplyParser, prompt_ends_thinking

ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4
DEFAULT_MAX_TOKENS = 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def _number(body: dict, name: str, default, low=None, high=None, low_open=False, integer=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"`{name}` must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if low is not None and (value <= low if low_open else value < low):
        raise ApiError(400, f"`{name}` must be {'>' if low_open else '>='} {low}, got {value}", name)
    if high is not None and value > high:
        raise ApiError(400, f"`{name}` must be <= {high}, got {value}", name)
    return value


def _messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of messages", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ApiError(400, f"`messages[{i}].role` must be one of {', '.join(ROLES)}, got {role!r}",
                           f"messages[{i}].role")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ApiError(400, f"`messages[{i}].content` must be a string or a list of parts", f"messages[{i}].content")
        if m["role"] == "tool" and not m.get("tool_call_id"):
            raise ApiError(400, f"`messages[{i}].tool_call_id` is required for tool messages",
                           f"messages[{i}].tool_call_id")
    return messages


def _stop(body: dict) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"`stop` must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    return stop


def _thinking(body: dict):
    """K2.5-style templates think unless told not to: `thinking: false` (or in chat_template_kwargs)."""
    kwargs = body.get("chat_template_kwargs") or {}
    value = body.get("thinking", kwargs.get("thinking", kwargs.get("enable_thinking")))
    if isinstance(value, dict):  # {"type": "disabled"} as some clients send it
        value = value.get("type") != "disabled"
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, "`thinking` must be true or false", "thinking")
    return value


class StopMatcher:
    """Cuts content at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list):
        self.stops, self.held, self.stopped = stops, "", False
        self.keep = max((len(s) for s in stops), default=1) - 1

    def push(self, text: str) -> str:
        if not self.stops or self.stopped:
            return "" if self.stopped else text
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.held = self.held[:cut], ""
            return out
        out = self.held[:max(0, len(self.held) - self.keep)]  # hold the last `keep` characters
        self.held = self.held[len(out):]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


class RequireKey:
    """401 unless `Authorization: Bearer KEY`. A plain ASGI middleware: one made with
    @app.middleware("http") (BaseHTTPMiddleware) hides a client's disconnect from a streaming
    response, which then never stops and never frees its session."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                response = ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                    code="invalid_api_key").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(coordinator, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="kimi-cluster", docs_url=None, redoc_url=None)
    tokenizer = coordinator.tokenizer
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error.response()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "kimi-cluster"}]}

    def prepare(body: dict) -> dict:
        if body.get("model") not in (None, model_name):
            raise ApiError(404, f"model {body.get('model')!r} is not served here; this cluster serves {model_name!r}",
                           "model", "model_not_found")
        messages = _messages(body)
        thinking = _thinking(body)
        max_tokens = _number(body, "max_completion_tokens", None, low=1, integer=True)
        max_tokens = _number(body, "max_tokens", max_tokens, low=1, integer=True)
        temperature = _number(body, "temperature", 1.0 if thinking is not False else 0.6, low=0, high=2)
        top_p = _number(body, "top_p", 0.95, low=0, high=1, low_open=True)
        seed = _number(body, "seed", None, integer=True)
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ApiError(400, "`tools` must be a list of tool definitions", "tools")
        if body.get("tool_choice") == "none":
            tools = None
        extra = {} if thinking is None else {"thinking": thinking}
        try:
            prompt = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, **extra)
        except Exception as e:  # the template refused these messages
            raise ApiError(400, f"`messages` cannot be rendered with the model's chat template: {e}", "messages")
        if max_tokens is None:  # not given: what the context leaves, up to DEFAULT_MAX_TOKENS
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, coordinator.context - len(prompt)))
        if len(prompt) + max_tokens > coordinator.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; with max_tokens {max_tokens} it exceeds the "
                                f"cluster's context of {coordinator.context} tokens: shorten `messages` or lower "
                                "`max_tokens`", "messages", "context_length_exceeded")
        sampling = pb.SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 0)
        if seed is not None:
            sampling.seed = seed % 2**64
        return dict(prompt=prompt, max_tokens=max_tokens, sampling=sampling, stops=_stop(body),
                    thinking=prompt_ends_thinking(tokenizer, prompt), logprobs=bool(body.get("logprobs")),
                    stream=bool(body.get("stream")),
                    include_usage=bool((body.get("stream_options") or {}).get("include_usage")))

    def run(job: dict, stats: dict):
        """(delta, token, logprob) per generated token; the last item carries the finish reason."""
        parser = ReplyParser(tokenizer, job["thinking"])
        stop = StopMatcher(job["stops"])
        eos = tokenizer.eos_token_ids
        finish = "length"
        for token, logprob in coordinator.generate(job["prompt"], job["max_tokens"], job["sampling"], stats):
            if token in eos:
                finish = "stop"
                break
            stats["completion_tokens"] = stats.get("completion_tokens", 0) + 1
            delta = parser.feed(token)
            delta.content = stop.push(delta.content)
            yield delta, token, logprob
            if stop.stopped:
                finish = "stop"
                break
        tail = parser.finish()
        tail.content = stop.push(tail.content) + stop.flush()
        if parser.tool_calls:
            finish = "tool_calls"
        stats["finish_reason"] = finish
        yield tail, None, None

    def usage(job, stats) -> dict:
        completion = stats.get("completion_tokens", 0)
        return {"prompt_tokens": len(job["prompt"]), "completion_tokens": completion,
                "total_tokens": len(job["prompt"]) + completion,
                "prompt_tokens_details": {"cached_tokens": stats.get("cached_tokens", 0)}}

    def tool_call_json(call, index=None) -> dict:
        out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        return out if index is None else {"index": index, **out}

    def logprob_json(token, logprob) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []}

    def complete(job: dict) -> dict:
        stats, reasoning, content, calls, logprobs = {}, [], [], [], []
        try:
            for delta, token, logprob in run(job, stats):
                reasoning.append(delta.reasoning)
                content.append(delta.content)
                calls += delta.tool_calls
                if token is not None and job["logprobs"]:
                    logprobs.append(logprob_json(token, logprob))
        except GenerateError as e:
            raise ApiError(503, e.message, kind="server_error", code="cluster_unavailable") from e
        message = {"role": "assistant", "content": "".join(content)}
        if any(reasoning):
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = [tool_call_json(c) for c in calls]
        choice = {"index": 0, "message": message, "finish_reason": stats["finish_reason"],
                  "logprobs": {"content": logprobs} if job["logprobs"] else None}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": usage(job, stats)}

    async def stream(job: dict):
        stats, base = {}, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                           "created": int(time.time()), "model": model_name}

        def chunk(delta: dict, finish=None, **extra) -> str:
            body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}
            return f"data: {json.dumps(body)}\n\n"

        tokens = run(job, stats)
        done = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            calls = 0
            while (item := await anyio.to_thread.run_sync(next, tokens, None)) is not None:
                delta, token, logprob = item
                out = {}
                if delta.reasoning:
                    out["reasoning_content"] = delta.reasoning
                if delta.content:
                    out["content"] = delta.content
                if delta.tool_calls:
                    out["tool_calls"] = [tool_call_json(c, calls + i) for i, c in enumerate(delta.tool_calls)]
                    calls += len(delta.tool_calls)
                extra = {"logprobs": {"content": [logprob_json(token, logprob)]}} if job["logprobs"] and token is not None else {}
                if out or extra:
                    yield chunk(out, **extra)
            yield chunk({}, stats["finish_reason"])
            if job["include_usage"]:
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(job, stats)})}\n\n"
            yield "data: [DONE]\n\n"
            done = True
        except GenerateError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'server_error'}})}\n\n"
            done = True
        finally:
            if not done:  # the client went away: stop, and free the session on every node
                stats["cancelled"] = True
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(tokens.close)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if coordinator.state != "ready":
            raise ApiError(503, f"the cluster is {coordinator.state}: {coordinator.message}", kind="server_error",
                           code="cluster_unavailable")
        job = prepare(body)
        if job["stream"]:
            return StreamingResponse(stream(job), media_type="text/event-stream")
        return await anyio.to_thread.run_sync(complete, job)

    return app
