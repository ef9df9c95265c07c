"""An OpenAI-compatible HTTP API in front of the coordinator: /v1/models, /v1/chat/completions,
/v1/completions (a raw prompt), and /health for load balancers.

Sampling runs on the cluster's last stage; this layer turns the token stream into OpenAI's
shapes: reasoning_content, content and tool_calls (Kimi's formats, see reply.py), stop strings,
usage with prompt_tokens_details.cached_tokens, and SSE streaming. A client that disconnects
mid-stream stops the generation and frees its caches on every node.
"""

import hmac
import json
import logging
import time
import uuid

from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers

from .coordinator import GenerateError
from .generated import kimi_cluster_pb2 as pb
from .reply import RawText, ReplyParser, prompt_ends_thinking
from .sampling import generation_defaults

log = logging.getLogger("kimi_cluster.api")

WEB_DIR = Path(__file__).parent / "web"
ROLES = ("system", "user", "assistant", "tool")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def _nonzero(value) -> bool:
    return value not in (None, 0, 0.0)


# Accepted by OpenAI, not done here: a request that asks for them is refused rather than ignored.
UNSUPPORTED = {
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "response_format": lambda v: v not in (None, {"type": "text"}),
    "presence_penalty": _nonzero,
    "frequency_penalty": _nonzero,
    "logit_bias": bool,
    "echo": bool,
    "suffix": bool,
}


def _refuse_unsupported(body: dict) -> None:
    bad = [name for name, asked in UNSUPPORTED.items() if asked(body.get(name))]
    if bad:
        names = ", ".join(f"`{name}`" for name in bad)
        raise ApiError(400, f"not supported by kimi-cluster: {names} (one choice per request, plain text, no "
                            "penalties or logit bias); drop them from the request", bad[0], "unsupported_parameter")
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
    """401 on /v1/ unless `Authorization: Bearer KEY`. A plain ASGI middleware: one made with
    @app.middleware("http") (BaseHTTPMiddleware) hides a client's disconnect from a streaming
    response, which then never stops and never frees its session."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        # /v1 needs the key; /health (for load balancers) and the web view's static files do not
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                response = ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                    code="invalid_api_key").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(coordinator, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="kimi-cluster", docs_url=None, redoc_url=None)
    tokenizer = coordinator.tokenizer
    defaults = generation_defaults(coordinator.checkpoint.path)
    created = int((Path(coordinator.checkpoint.path) / "config.json").stat().st_mtime)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error.response()

    @app.get("/health")
    def health():
        body = {"status": coordinator.state, "message": coordinator.message, "model": model_name}
        return JSONResponse(body, status_code=200 if coordinator.state == "ready" else 503)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "kimi-cluster",
                "state": coordinator.state}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} is not served here; this cluster serves {model_name!r}",
                           "model", "model_not_found")
        return model_card()

    def check_model(body: dict) -> None:
        if body.get("model") not in (None, model_name):
            raise ApiError(404, f"model {body.get('model')!r} is not served here; this cluster serves {model_name!r}",
                           "model", "model_not_found")

    def sampling(body: dict):
        _refuse_unsupported(body)
        temperature = _number(body, "temperature", defaults["temperature"], low=0, high=2)
        top_p = _number(body, "top_p", defaults["top_p"] or 1.0, low=0, high=1, low_open=True)
        seed = _number(body, "seed", None, integer=True)
        params = pb.SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 and top_p < 1 else 0,
                                   top_k=defaults["top_k"] if temperature > 0 else 0)
        if seed is not None:
            params.seed = seed % 2**64
        return params

    def fit_context(prompt: list, max_tokens, default_max: int, field: str) -> int:
        if max_tokens is None:  # not given: what the context leaves, up to default_max
            max_tokens = max(1, min(default_max, coordinator.context - len(prompt)))
        if len(prompt) + max_tokens > coordinator.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; with max_tokens {max_tokens} it exceeds the "
                                f"cluster's context of {coordinator.context} tokens: shorten `{field}` or lower "
                                "`max_tokens`", field, "context_length_exceeded")
        return max_tokens

    def prepare(body: dict) -> dict:
        check_model(body)
        messages = _messages(body)
        thinking = _thinking(body)
        max_tokens = _number(body, "max_completion_tokens", None, low=1, integer=True)
        max_tokens = _number(body, "max_tokens", max_tokens, low=1, integer=True)
        params = sampling(body)
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
        max_tokens = fit_context(prompt, max_tokens, DEFAULT_MAX_TOKENS, "messages")
        return dict(prompt=prompt, max_tokens=max_tokens, sampling=params, stops=_stop(body), raw=False,
                    thinking=prompt_ends_thinking(tokenizer, prompt), logprobs=bool(body.get("logprobs")),
                    stream=bool(body.get("stream")),
                    include_usage=bool((body.get("stream_options") or {}).get("include_usage")))

    activity = {"in_flight": 0, "served": 0}

    def run(job: dict, stats: dict):
        """(delta, token, logprob) per generated token; the last item carries the finish reason."""
        activity["in_flight"] += 1
        began = time.monotonic()
        try:
            yield from generate_reply(job, stats)
        finally:
            activity["in_flight"] -= 1
            log_request(job, stats, began)

    def log_request(job: dict, stats: dict, began: float) -> None:
        activity["served"] += 1
        first, last = stats.get("first_token_at"), stats.get("last_token_at")
        coordinator.log_request(len(job["prompt"]), stats, stats.get("completion_tokens", 0),
                                stats.get("finish_reason", "error"), (first - began) if first else 0.0,
                                (last - first) if first else 0.0)

    def generate_reply(job: dict, stats: dict):
        parser = RawText(tokenizer) if job["raw"] else ReplyParser(tokenizer, job["thinking"])
        stop = StopMatcher(job["stops"])
        eos = tokenizer.eos_token_ids
        finish = "length"
        for token, logprob in coordinator.generate(job["prompt"], job["max_tokens"], job["sampling"], stats):
            stats["last_token_at"] = time.monotonic()
            stats.setdefault("first_token_at", stats["last_token_at"])
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
        # A token may hold part of a character: its own bytes let clients join them (Kimi's tokenizer).
        raw = tokenizer.token_bytes(token) if hasattr(tokenizer, "token_bytes") else text.encode()
        return {"token": text, "logprob": logprob, "bytes": list(raw), "top_logprobs": []}

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

    async def read_body(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if coordinator.state != "ready":
            raise ApiError(503, f"the cluster is {coordinator.state}: {coordinator.message}", kind="server_error",
                           code="cluster_unavailable")
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        job = prepare(await read_body(request))
        if job["stream"]:
            return StreamingResponse(stream(job), media_type="text/event-stream")
        return await anyio.to_thread.run_sync(complete, job)

    def prepare_text(body: dict) -> dict:
        check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "`prompt` must be a non-empty string (one prompt per request)", "prompt")
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        max_tokens = _number(body, "max_tokens", DEFAULT_COMPLETION_TOKENS, low=1, integer=True)
        if body.get("logprobs") not in (None, 0, False):
            raise ApiError(400, "not supported by kimi-cluster: `logprobs` on /v1/completions (use "
                                "/v1/chat/completions)", "logprobs", "unsupported_parameter")
        return dict(prompt=ids, max_tokens=fit_context(ids, max_tokens, max_tokens, "prompt"), sampling=sampling(body),
                    stops=_stop(body), raw=True, thinking=False, logprobs=False, stream=bool(body.get("stream")),
                    include_usage=bool((body.get("stream_options") or {}).get("include_usage")))

    def text_completion(job: dict) -> dict:
        stats, text = {}, []
        try:
            for delta, _, _ in run(job, stats):
                text.append(delta.content)
        except GenerateError as e:
            raise ApiError(503, e.message, kind="server_error", code="cluster_unavailable") from e
        choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": stats["finish_reason"]}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": usage(job, stats)}

    async def stream_text(job: dict):
        stats, base = {}, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                           "created": int(time.time()), "model": model_name}

        def chunk(text: str, finish=None) -> str:
            body = {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n"

        tokens = run(job, stats)
        done = False
        try:
            while (item := await anyio.to_thread.run_sync(next, tokens, None)) is not None:
                if item[0].content:
                    yield chunk(item[0].content)
            yield chunk("", stats["finish_reason"])
            if job["include_usage"]:
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(job, stats)})}\n\n"
            yield "data: [DONE]\n\n"
            done = True
        except GenerateError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'server_error'}})}\n\n"
            done = True
        finally:
            if not done:
                stats["cancelled"] = True
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(tokens.close)

    @app.get("/v1/cluster")
    def cluster():
        """The cluster at a glance, for the web view."""
        from .client import map_json

        return {**map_json(coordinator.memory_map()), "context": coordinator.context,
                "requests_in_flight": activity["in_flight"], "requests_served": activity["served"],
                "cached_conversations": len(coordinator.sessions.cached),
                "last_decode_tok_s": coordinator.last_decode_tok_s}

    @app.post("/v1/completions")
    async def completions(request: Request):
        job = prepare_text(await read_body(request))
        if job["stream"]:
            return StreamingResponse(stream_text(job), media_type="text/event-stream")
        return await anyio.to_thread.run_sync(text_completion, job)

    app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")  # last: /v1 and /health first

    return app
