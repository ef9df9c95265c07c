"""What the HTTP API sends back: errors, OpenAI's chat.completion and text_completion shapes
(whole and as SSE chunks), and the two ways a generation is delivered: a whole reply on a
thread of its own, or a stream of server-sent events with keepalive comments."""

import asyncio
import dataclasses
import json
import time
import uuid

import anyio
import grpc
from fastapi import Request
from fastapi.responses import JSONResponse

from .generation import Generation, GenerationResult, Piece
from .scheduler import GenerateError

KEEPALIVE_S = 1.0  # a stream waiting this long for its next token sends an SSE comment
ANTHROPIC_PATH = "/v1/messages"  # Anthropic's Messages API (api_anthropic.py): its own error shape
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def json(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def anthropic_json(self) -> dict:
        kind = ANTHROPIC_ERRORS.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str = "") -> JSONResponse:
        """The error in the shape of the API `path` belongs to (OpenAI's, or Anthropic's)."""
        body = self.anthropic_json() if path.startswith(ANTHROPIC_PATH) else self.json()
        return JSONResponse(body, status_code=self.status)


def cluster_error(e: GenerateError) -> ApiError:
    if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, e.message, "timeout", "deadline_exceeded", kind="server_error")
    return ApiError(503, e.message, kind="server_error", code="cluster_unavailable")


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": result.reasoning_tokens,
                                          "accepted_prediction_tokens": result.accepted_prediction_tokens,
                                          "rejected_prediction_tokens": result.rejected_prediction_tokens}}


class Completion:
    """One reply in an OpenAI shape: `whole` for a complete one, `opening`, `events` per piece
    and `closing` for a stream. Subclasses give the choice and the chunks."""

    id_prefix = whole_object = chunk_object = ""

    def __init__(self, model: str, tokenizer, logprobs: bool = False):
        self.tokenizer, self.logprobs = tokenizer, logprobs
        self.id, self.created, self.model = f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time()), model
        self.prompt_tokens = 0  # set once the prompt is read (Anthropic's stream opens with it)

    def envelope(self, kind: str, choices: list) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, pieces: list, result: GenerationResult) -> dict:
        return {**self.envelope(self.whole_object, [self.choice(pieces, result)]), "usage": usage(result)}

    def chunk(self, choice: dict) -> str:
        return sse(self.envelope(self.chunk_object, [{"index": 0, **choice}]))

    def opening(self) -> list:
        return []

    def closing(self, result: GenerationResult, include_usage: bool) -> list:
        lines = [self.chunk(self.last_choice(result))]
        if include_usage:
            lines.append(sse({**self.envelope(self.chunk_object, []), "usage": usage(result)}))
        return lines + ["data: [DONE]\n\n"]

    def error_event(self, error: ApiError) -> str:
        return sse({"error": {"message": error.message, "type": error.kind, "code": error.code}})

    def logprob_json(self, piece: Piece) -> dict:
        """A token's logprob entry, as chat completions and the Responses API give it."""
        top = zip(piece.top.tokens, piece.top.logprobs) if piece.top is not None else ()
        return {**self.token_json(piece.token, piece.logprob),
                "top_logprobs": [self.token_json(token, logprob) for token, logprob in top]}

    def token_json(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token])
        # A token may hold part of a character: its own bytes let clients join them (Kimi's tokenizer).
        raw = self.tokenizer.token_bytes(token) if hasattr(self.tokenizer, "token_bytes") else text.encode()
        return {"token": text, "logprob": logprob, "bytes": list(raw)}


class ChatCompletion(Completion):
    id_prefix, whole_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, tokenizer, logprobs: bool = False):
        super().__init__(model, tokenizer, logprobs)
        self.calls_sent = 0  # a streamed tool call's index counts the calls before it

    def choice(self, pieces: list, result: GenerationResult) -> dict:
        deltas = [p.delta for p in pieces]
        message = {"role": "assistant", "content": "".join(d.content for d in deltas)}
        if reasoning := "".join(d.reasoning for d in deltas):
            message["reasoning_content"] = reasoning
        if calls := [c for d in deltas for c in d.tool_calls]:
            message["tool_calls"] = [tool_call_json(c) for c in calls]
        logprobs = {"content": [self.logprob_json(p) for p in pieces if p.token is not None]} if self.logprobs else None
        return {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": logprobs}

    def opening(self) -> list:
        return [self.chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})]

    def events(self, piece: Piece) -> list:
        delta, out = piece.delta, {}
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.content:
            out["content"] = delta.content
        if delta.tool_calls:
            out["tool_calls"] = [tool_call_json(c, self.calls_sent + i) for i, c in enumerate(delta.tool_calls)]
            self.calls_sent += len(delta.tool_calls)
        extra = {}
        if self.logprobs and piece.token is not None:
            extra["logprobs"] = {"content": [self.logprob_json(piece)]}
        return [self.chunk({"delta": out, "finish_reason": None, **extra})] if out or extra else []

    def last_choice(self, result: GenerationResult) -> dict:
        return {"delta": {}, "finish_reason": result.finish_reason}


class TextCompletion(Completion):
    id_prefix, whole_object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, model: str, tokenizer, logprobs: bool = False):
        super().__init__(model, tokenizer, logprobs)
        self.streamed_text = 0  # characters of token text streamed so far (the next text_offset)
        self.echoed: list | None = None  # `echo`: the prompt's ids, which the reply's text begins with
        self.keep_reply = True  # False: max_tokens 0 (the prompt scored alone; the token drawn is dropped)

    def whole(self, pieces: list, result: GenerationResult) -> dict:
        if not self.keep_reply:
            pieces, result = [], dataclasses.replace(result, completion_tokens=0)
        return super().whole(pieces, result)

    def choice(self, pieces: list, result: GenerationResult) -> dict:
        text = "".join(p.delta.content for p in pieces)
        entries = [(p.token, p.logprob, p.top) for p in pieces if p.token is not None]
        if self.echoed is not None:
            text = self.tokenizer.decode(self.echoed) + text
            scores = result.prompt_logprobs or [(None, None)] * (len(self.echoed) - 1)
            entries = [(self.echoed[0], None, None)] + [(token, logprob, top) for token, (logprob, top)
                                                         in zip(self.echoed[1:], scores)] + entries
        logprobs = self.legacy_logprobs(entries, 0)[0] if self.logprobs else None
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason}

    def events(self, piece: Piece) -> list:
        logprobs = None
        if self.logprobs and piece.token is not None:
            logprobs, self.streamed_text = self.legacy_logprobs([(piece.token, piece.logprob, piece.top)],
                                                                self.streamed_text)
        return [self.chunk({"text": piece.delta.content, "logprobs": logprobs, "finish_reason": None})] \
            if piece.delta.content or logprobs else []

    def legacy_logprobs(self, entries: list, offset: int) -> tuple:
        """(tokens in the legacy completions shape, the offset after them) for `entries` of (token,
        logprob, TopLogprobs or None): each token's text and logprob, its alternatives by text (the
        token itself always among them, as OpenAI gives it), and where its text starts (`offset`
        for the first). An echoed prompt's first token has no logprob: null, and no alternatives."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top in entries:
            text = self.tokenizer.decode([token])
            alternatives = None
            if logprob is not None:
                alternatives = {}
                for other, other_logprob in zip(top.tokens, top.logprobs) if top is not None else ():
                    alternatives.setdefault(self.tokenizer.decode([other]), other_logprob)
                alternatives.setdefault(text, logprob)
            for key, value in (("tokens", text), ("token_logprobs", logprob), ("top_logprobs", alternatives),
                               ("text_offset", offset)):
                out[key].append(value)
            offset += len(text)
        return out, offset

    def last_choice(self, result: GenerationResult) -> dict:
        return {"text": "", "logprobs": None, "finish_reason": result.finish_reason}


def tool_call_json(call, index=None) -> dict:
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


def whole(generations: list, reply: Completion) -> dict:
    """Run the generations to their ends, one after another (on a thread): the later ones reuse
    the first one's prefill of the prompt (its cached session), and shape them as one reply with
    a choice each."""
    bodies = []
    for generation in generations:
        try:
            pieces = list(generation)
        except GenerateError as e:
            raise cluster_error(e) from e
        bodies.append(reply.whole(pieces, generation.result))
    if len(bodies) == 1:
        return bodies[0]
    out = bodies[0]
    out["choices"] = [{**body["choices"][0], "index": i} for i, body in enumerate(bodies)]
    usages = [body["usage"] for body in bodies]
    completion = sum(u["completion_tokens"] for u in usages)
    details = {key: sum(u["completion_tokens_details"][key] for u in usages)
               for key in usages[0]["completion_tokens_details"]}
    out["usage"] = {**usages[0], "completion_tokens": completion, "completion_tokens_details": details,
                    "total_tokens": usages[0]["prompt_tokens"] + completion}
    return out


async def whole_reply(generations: list, reply: Completion, request: Request, limiter) -> dict:
    """Run non-streaming generations on one of `limiter`'s threads (waiting for one if all are
    busy); if the client leaves first, they stop and free their caches."""

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for generation in generations:  # a generation running stops at its next token; one waiting never starts
            generation.cancel()
        tasks.cancel_scope.cancel()

    body = refusal = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        try:
            body = await anyio.to_thread.run_sync(whole, generations, reply, limiter=limiter)
        except ApiError as e:  # raised out of the task group it would arrive wrapped in an ExceptionGroup
            refusal = e
        finally:
            tasks.cancel_scope.cancel()
    if refusal is not None:
        raise refusal
    return body


async def stream_reply(generation: Generation, reply: Completion, include_usage: bool, limiter):
    """A streamed reply: its opening, the events of each piece, its closing (the usage when
    asked, [DONE]); a cluster error as an error event. A client that goes away stops the
    generation and frees its session on every node."""
    done, step = False, None  # step: the thread computing the next piece, while one runs
    try:
        for line in reply.opening():
            yield line
        while True:
            step = step or asyncio.ensure_future(anyio.to_thread.run_sync(next, generation, None, limiter=limiter))
            if not (await asyncio.wait({step}, timeout=KEEPALIVE_S))[0]:
                # a busy cluster is not a dead connection: clients skip an SSE comment, but their
                # read timeout (and a proxy's) starts again
                yield ": waiting for the cluster\n\n"
                continue
            piece, step = step.result(), None
            if piece is None:
                break
            for line in reply.events(piece):
                yield line
        for line in reply.closing(generation.result, include_usage):
            yield line
        done = True
    except GenerateError as e:
        yield reply.error_event(cluster_error(e))
        done = True
    finally:
        if not done:
            generation.cancel()
        with anyio.CancelScope(shield=True):
            if step is not None:  # the client left while a step ran: let it end, then close
                await asyncio.wait({step})
                if not step.cancelled():
                    step.exception()  # retrieved: a failure after the client left is nobody's to report
            await anyio.to_thread.run_sync(generation.close)
