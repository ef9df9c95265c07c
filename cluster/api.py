"""An OpenAI-compatible HTTP API in front of the coordinator: /v1/models, /v1/chat/completions,
/v1/completions (a raw prompt), OpenAI's Responses API /v1/responses (api_openai_responses.py), and
/health for load balancers; and Anthropic's /v1/messages and /v1/messages/count_tokens
(api_anthropic.py) over the same loop.

Sampling runs on the cluster's last stage and a reply ends in the generation loop
(generation.py); this file holds the app and its routes. A request is read by api_requests.py,
shaped by api_responses.py (reasoning_content, content and tool_calls: Kimi's formats, see
reply.py; usage with prompt_tokens_details.cached_tokens; SSE streaming), and guarded by
api_guards.py. A client that disconnects mid-stream stops the generation and frees its caches
on every node. A request runs until it is done however busy the cluster is, unless it names a
deadline: `timeout` (seconds, from its arrival); a stream that waits sends SSE comments
meanwhile, so no client or proxy takes the wait for a dead connection.
"""

import time
from functools import partial
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.routing import Match

from .api_anthropic import AnthropicMessage, count_tokens, messages_prompt, openai_fields
from .api_guards import Guard, RequireKey
from .api_openai_responses import ResponseObject, custom_tool_names, responses_prompt, shared_fields
from .api_requests import chat_prompt, read_body, read_request, start, text_prompt
from .api_responses import ApiError, ChatCompletion, TextCompletion, stream_reply, whole_reply

WEB_DIR = Path(__file__).parent / "web"
MAX_WHOLE_REPLIES = 8            # non-streaming generations at once; more wait their turn
MAX_STREAM_THREADS = 64          # threads stepping streaming generations (apart from the above)
MAX_PREPARING = 4                # requests tokenized at once (CPU-bound anyway): bounds their memory together


def build_app(coordinator, model_name: str, api_key: str | None = None, hosts: set | None = None,
              origins=()) -> FastAPI:
    """`hosts`: the Host names it answers to (None: any, see allowed_hosts); `origins`: browser
    origins besides its own that may call it."""
    app = FastAPI(title="kimi-cluster", docs_url=None, redoc_url=None)
    tokenizer, loop = coordinator.tokenizer, coordinator.generation
    created = int((Path(coordinator.checkpoint.path) / "config.json").stat().st_mtime)
    # Whole (non-streaming) replies hold a thread each for the whole generation: they get their own
    # few, and queue for them, so they never take the threads that streams and requests need.
    whole_replies = anyio.CapacityLimiter(MAX_WHOLE_REPLIES)
    stream_steps = anyio.CapacityLimiter(MAX_STREAM_THREADS)
    preparing = anyio.CapacityLimiter(MAX_PREPARING)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)
    app.add_middleware(Guard, hosts=hosts, origins=set(origins))  # outermost: runs first

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error.response(request.url.path)

    @app.exception_handler(HTTPException)  # no such path or method (routes, the web view's files): our shape
    async def http_error(request, error: HTTPException):
        where = f"{request.scope['method']} {request.scope['path'][:200]}"
        routes = [r for r in app.routes if isinstance(r, APIRoute)]
        # an endpoint's path with another method: the web view's files may have answered it instead
        if methods := sorted(m for r in routes if r.matches(request.scope)[0] == Match.PARTIAL for m in r.methods):
            return ApiError(405, f"{where}: use {', '.join(methods)}", code="method_not_allowed").response()
        if request.url.path.startswith("/v1/"):
            served = ", ".join(f"{method} {r.path_format}" for r in routes if r.path.startswith("/v1/")
                               for method in r.methods)
            return ApiError(404, f"{where}: no such endpoint here; this API serves {served}",
                            code="not_found").response()
        return ApiError(error.status_code, f"{where}: {error.detail}",
                        code="not_found" if error.status_code == 404 else None).response()

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

    @app.get("/v1/cluster")
    def cluster():
        """The cluster at a glance, for the web view."""
        from .client import map_json

        return {**map_json(coordinator.memory_map()), "context": coordinator.context,
                "requests_in_flight": loop.in_flight, "requests_served": loop.served,
                "cached_conversations": len(coordinator.sessions.cached),
                "last_decode_tok_s": loop.last_decode_tok_s}

    def prepare(prompt, body: dict, arrived: float):
        request = read_request(body, arrived, model_name, loop, prompt)
        return request, start(loop, request)

    async def reply(request: Request, prompt, shape, body: dict | None = None):
        """One endpoint: `prompt` reads its own fields, `shape` (a Completion) writes its reply."""
        arrived = time.monotonic()
        body = body if body is not None else await read_body(request, coordinator)
        # tokenizing and rendering the template may take a while on a big prompt: off the event loop
        job, generations = await anyio.to_thread.run_sync(prepare, prompt, body, arrived, limiter=preparing)
        out = shape(model_name, tokenizer, job.logprobs)
        out.prompt_tokens = len(job.generation.prompt)
        if job.echo:  # /v1/completions
            out.echoed, out.keep_reply = job.generation.prompt, job.keep_reply
        if job.stream:
            return StreamingResponse(stream_reply(generations[0], out, job.include_usage, stream_steps),
                                     media_type="text/event-stream")
        return await whole_reply(generations, out, request, whole_replies)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await reply(request, chat_prompt, ChatCompletion)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await reply(request, text_prompt, TextCompletion)

    @app.post("/v1/responses")
    async def responses(request: Request):
        """OpenAI's Responses API (api_openai_responses.py): stateless, over the same loop, limits and guards."""
        body = await read_body(request, coordinator)
        shape = partial(ResponseObject, custom_tools=custom_tool_names(body))
        return await reply(request, lambda _, tok: responses_prompt(body, tok), shape, shared_fields(body))

    @app.post("/v1/messages")
    async def messages(request: Request):
        """Anthropic's Messages API (api_anthropic.py) over the same loop, limits and guards."""
        body = await read_body(request, coordinator)
        return await reply(request, lambda _, tok: messages_prompt(body, tok), AnthropicMessage, openai_fields(body))

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(request: Request):
        body = await read_body(request, coordinator)
        return await anyio.to_thread.run_sync(count_tokens, body, tokenizer)

    app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")  # last: /v1 and /health first

    return app
