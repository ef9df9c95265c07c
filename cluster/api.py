"""An OpenAI-compatible HTTP API in front of the coordinator: /v1/models, /v1/chat/completions,
/v1/completions (a raw prompt), and /health for load balancers.

Sampling runs on the cluster's last stage; this layer turns the token stream into OpenAI's
shapes: reasoning_content, content and tool_calls (Kimi's formats, see reply.py), stop strings,
usage with prompt_tokens_details.cached_tokens, and SSE streaming. A client that disconnects
mid-stream stops the generation and frees its caches on every node. A request runs until it is
done however busy the cluster is, unless it names a deadline: `timeout` (seconds, from its arrival);
a stream that waits sends SSE comments meanwhile, so no client or proxy takes the wait for a dead
connection.
"""

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import grpc
from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
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
MAX_BODY_BYTES = 8 * 2**20       # a request body larger than this is refused (413) before it is read whole
MAX_WHOLE_REPLIES = 8            # non-streaming generations at once; more wait their turn
MAX_STREAM_THREADS = 64          # threads stepping streaming generations (apart from the above)
KEEPALIVE_S = 1.0                # a stream waiting this long for its next token sends an SSE comment
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


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
    if not math.isfinite(value):
        raise ApiError(400, f"`{name}` must be a finite number, got {value}", name)
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


def _deadline(body: dict, arrived: float) -> float | None:
    """The client's deadline (time.monotonic()) from `timeout`, seconds from the request's arrival.
    The official client's own timeout is an HTTP setting it never sends: when it gives up it
    disconnects, which stops the generation too."""
    timeout = _number(body, "timeout", None, low=0, low_open=True)
    return None if timeout is None else arrived + timeout


def cluster_error(e: GenerateError) -> "ApiError":
    if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, e.message, "timeout", "deadline_exceeded", kind="server_error")
    return ApiError(503, e.message, kind="server_error", code="cluster_unavailable")


def _stop(body: dict) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"`stop` must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    return stop


def _typed(body: dict, name: str, kind: type, what: str):
    """body[name] when it is a `kind` (or absent: None), else a 400 naming it."""
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise ApiError(400, f"`{name}` must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def _stream_flags(body: dict) -> dict:
    stream = bool(_typed(body, "stream", bool, "true or false"))
    options = _typed(body, "stream_options", dict, "an object such as {\"include_usage\": true}") or {}
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, "`stream_options.include_usage` must be true or false", "stream_options.include_usage")
    return {"stream": stream, "include_usage": bool(include_usage)}


def _thinking(body: dict):
    """K2.5-style templates think unless told not to: `thinking: false` (or in chat_template_kwargs)."""
    kwargs = _typed(body, "chat_template_kwargs", dict, "an object") or {}
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


class Guard:
    """Before any handler (a plain ASGI middleware, like RequireKey): the Host header must name
    this API (a DNS-rebinding page names its own), an Origin other than this API's own or the
    allowed ones is refused (another site's page in the user's browser), a POST body must be
    JSON and at most MAX_BODY_BYTES, counted as it arrives."""

    def __init__(self, app, hosts: set | None, origins: set):
        self.app, self.hosts, self.origins = app, hosts, origins  # hosts None: any (listening everywhere)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if error := self._refusal(scope):
            return await error.response()(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:  # stop reading: the handler sees a client that left
                scope["kimi.too_large"] = True
                return {"type": "http.disconnect"}
            return message

        await self.app(scope, counted, send)

    def _refusal(self, scope) -> "ApiError | None":
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = (urlsplit(f"//{host}").hostname or "") if host else ""
        if self.hosts is not None and name not in self.hosts:
            return ApiError(403, f"Host {host!r} is not this API's address (a page using DNS rebinding?); to "
                                 "reach it under that name, start with --api-allow-host NAME", "Host", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins and urlsplit(origin).netloc != host:
            return ApiError(403, f"Origin {origin!r} may not call this API (a page of another site?); to allow "
                                 "it, start with --api-allow-origin ORIGIN", "Origin", "origin_not_allowed")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(415, f"Content-Type must be application/json, got {kind or 'none'!r}",
                                "Content-Type", "unsupported_media_type")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                return ApiError(413, f"the request body ({length} bytes) is over the limit of {MAX_BODY_BYTES:,} "
                                     "bytes", code="request_too_large")
        return None


def allowed_hosts(api_host: str, extra=()) -> set | None:
    """Host names the API answers to: its own address and loopback names, plus `extra`; None
    (any) when it listens on every address."""
    if api_host in ("0.0.0.0", "::", ""):
        return None
    return LOOPBACK_HOSTS | {api_host.strip("[]")} | set(extra)


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


def build_app(coordinator, model_name: str, api_key: str | None = None, hosts: set | None = None,
              origins=()) -> FastAPI:
    """`hosts`: the Host names it answers to (None: any, see allowed_hosts); `origins`: browser
    origins besides its own that may call it."""
    app = FastAPI(title="kimi-cluster", docs_url=None, redoc_url=None)
    tokenizer = coordinator.tokenizer
    defaults = generation_defaults(coordinator.checkpoint.path)
    created = int((Path(coordinator.checkpoint.path) / "config.json").stat().st_mtime)
    # Whole (non-streaming) replies hold a thread each for the whole generation: they get their own
    # few, and queue for them, so they never take the threads that streams and requests need.
    whole_replies = anyio.CapacityLimiter(MAX_WHOLE_REPLIES)
    stream_steps = anyio.CapacityLimiter(MAX_STREAM_THREADS)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)
    app.add_middleware(Guard, hosts=hosts, origins=set(origins))  # outermost: runs first

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error.response()

    @app.get("/health")
    async def health():
        body = {"status": coordinator.state, "message": coordinator.message, "model": model_name}
        return JSONResponse(body, status_code=200 if coordinator.state == "ready" else 503)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "kimi-cluster",
                "state": coordinator.state}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
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

    def prepare(body: dict, arrived: float) -> dict:
        check_model(body)
        messages = _messages(body)
        thinking = _thinking(body)
        max_tokens = _number(body, "max_completion_tokens", None, low=1, integer=True)
        max_tokens = _number(body, "max_tokens", max_tokens, low=1, integer=True)
        params = sampling(body)
        tools = body.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ApiError(400, "`tools` must be a list of tool definitions", "tools")
        logprobs = _typed(body, "logprobs", bool, "true or false")
        if body.get("tool_choice") == "none":
            tools = None
        extra = {} if thinking is None else {"thinking": thinking}
        try:
            prompt = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, **extra)
        except Exception as e:  # the template refused these messages
            raise ApiError(400, f"`messages` cannot be rendered with the model's chat template: {e}", "messages")
        max_tokens = fit_context(prompt, max_tokens, DEFAULT_MAX_TOKENS, "messages")
        return dict(prompt=prompt, max_tokens=max_tokens, sampling=params, stops=_stop(body), raw=False,
                    thinking=prompt_ends_thinking(tokenizer, prompt), logprobs=bool(logprobs),
                    deadline=_deadline(body, arrived), **_stream_flags(body))

    activity, activity_lock = {"in_flight": 0, "served": 0}, threading.Lock()  # requests generating now / done

    def run(job: dict, stats: dict):
        """(delta, token, logprob) per generated token; the last item carries the finish reason."""
        with activity_lock:
            activity["in_flight"] += 1
        began = time.monotonic()
        try:
            yield from generate_reply(job, stats)
        finally:
            with activity_lock:
                activity["in_flight"] -= 1
                activity["served"] += 1
            log_request(job, stats, began)

    def log_request(job: dict, stats: dict, began: float) -> None:
        first, last = stats.get("first_token_at"), stats.get("last_token_at")
        coordinator.log_request(len(job["prompt"]), stats, stats.get("completion_tokens", 0),
                                stats.get("finish_reason", "error"), (first - began) if first else 0.0,
                                (last - first) if first else 0.0)

    def generate_reply(job: dict, stats: dict):
        parser = RawText(tokenizer) if job["raw"] else ReplyParser(tokenizer, job["thinking"])
        stop = StopMatcher(job["stops"])
        eos = tokenizer.eos_token_ids
        finish = "length"
        for token, logprob in coordinator.generate(job["prompt"], job["max_tokens"], job["sampling"], stats,
                                                   job["deadline"]):
            if job.get("cancel") and job["cancel"].is_set():  # the client of a whole reply left
                stats["cancelled"] = True
                break
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
            raise cluster_error(e) from e
        message = {"role": "assistant", "content": "".join(content)}
        if any(reasoning):
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = [tool_call_json(c) for c in calls]
        choice = {"index": 0, "message": message, "finish_reason": stats["finish_reason"],
                  "logprobs": {"content": logprobs} if job["logprobs"] else None}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": usage(job, stats)}

    async def sse(job: dict, stats: dict, base: dict, events, finish, opening=()):
        """A streamed reply: `opening`, the events of each generated item (`events(item)`), the
        `finish()` chunk, the usage when asked, [DONE]; a cluster error as an error event. A client
        that goes away stops the generation and frees its session on every node."""
        tokens = run(job, stats)
        done, step = False, None  # step: the thread computing the next item, while one runs
        try:
            for line in opening:
                yield line
            while True:
                step = step or asyncio.ensure_future(anyio.to_thread.run_sync(next, tokens, None, limiter=stream_steps))
                if not (await asyncio.wait({step}, timeout=KEEPALIVE_S))[0]:
                    # a busy cluster is not a dead connection: clients skip an SSE comment, but their
                    # read timeout (and a proxy's) starts again
                    yield ": waiting for the cluster\n\n"
                    continue
                item, step = step.result(), None
                if item is None:
                    break
                for line in events(item):
                    yield line
            yield finish()
            if job["include_usage"]:
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(job, stats)})}\n\n"
            yield "data: [DONE]\n\n"
            done = True
        except GenerateError as e:
            error = cluster_error(e)
            body = {"error": {"message": error.message, "type": error.kind, "code": error.code}}
            yield f"data: {json.dumps(body)}\n\n"
            done = True
        finally:
            if not done:
                stats["cancelled"] = True
            with anyio.CancelScope(shield=True):
                if step is not None:  # the client left while a step ran: let it end, then close
                    await asyncio.wait({step})
                    if not step.cancelled():
                        step.exception()  # retrieved: a failure after the client left is nobody's to report
                await anyio.to_thread.run_sync(tokens.close)

    def stream(job: dict):
        stats, base = {}, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                           "created": int(time.time()), "model": model_name}
        calls = 0

        def chunk(delta: dict, finish=None, **extra) -> str:
            body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}
            return f"data: {json.dumps(body)}\n\n"

        def events(item):
            nonlocal calls
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
            return [chunk(out, **extra)] if out or extra else []

        return sse(job, stats, base, events, lambda: chunk({}, stats["finish_reason"]),
                   opening=[chunk({"role": "assistant", "content": ""})])

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ClientDisconnect:
            if request.scope.get("kimi.too_large"):
                raise ApiError(413, f"the request body is over the limit of {MAX_BODY_BYTES:,} bytes",
                               code="request_too_large") from None
            raise
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if coordinator.state != "ready":
            raise ApiError(503, f"the cluster is {coordinator.state}: {coordinator.message}", kind="server_error",
                           code="cluster_unavailable")
        return body

    async def whole_reply(make, job: dict, request: Request) -> dict:
        """Run a non-streaming generation on one of its own threads (waiting for one if all are
        busy); if the client leaves first, the generation stops and frees its caches."""
        job["cancel"] = cancel = threading.Event()

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            cancel.set()  # a generation running stops at its next token; one still waiting never starts
            tasks.cancel_scope.cancel()

        reply = refusal = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            try:
                reply = await anyio.to_thread.run_sync(make, job, limiter=whole_replies)
            except ApiError as e:  # raised out of the task group it would arrive wrapped in an ExceptionGroup
                refusal = e
            finally:
                tasks.cancel_scope.cancel()
        if refusal is not None:
            raise refusal
        return reply

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # tokenizing and rendering the template may take a while on a big prompt: off the event loop
        arrived = time.monotonic()
        job = await anyio.to_thread.run_sync(prepare, await read_body(request), arrived)
        if job["stream"]:
            return StreamingResponse(stream(job), media_type="text/event-stream")
        return await whole_reply(complete, job, request)

    def prepare_text(body: dict, arrived: float) -> dict:
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
                    stops=_stop(body), raw=True, thinking=False, logprobs=False, deadline=_deadline(body, arrived),
                    **_stream_flags(body))

    def text_completion(job: dict) -> dict:
        stats, text = {}, []
        try:
            for delta, _, _ in run(job, stats):
                text.append(delta.content)
        except GenerateError as e:
            raise cluster_error(e) from e
        choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": stats["finish_reason"]}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": usage(job, stats)}

    def stream_text(job: dict):
        stats, base = {}, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                           "created": int(time.time()), "model": model_name}

        def chunk(text: str, finish=None) -> str:
            body = {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n"

        return sse(job, stats, base, lambda item: [chunk(item[0].content)] if item[0].content else [],
                   lambda: chunk("", stats["finish_reason"]))

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
        arrived = time.monotonic()
        job = await anyio.to_thread.run_sync(prepare_text, await read_body(request), arrived)
        if job["stream"]:
            return StreamingResponse(stream_text(job), media_type="text/event-stream")
        return await whole_reply(text_completion, job, request)

    app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")  # last: /v1 and /health first

    return app
