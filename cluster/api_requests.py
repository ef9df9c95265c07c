"""Reading an OpenAI request body into a GenerationRequest (generation.py): each field checked,
and a refusal (400) that names the field and what to send instead. Chat completions render
`messages` with the model's chat template; text completions take a raw `prompt`. What they share
(model, sampling, stop strings, deadline, streaming) is read once, in `read_request`."""

import json
import math
from dataclasses import dataclass
from typing import Callable

from fastapi import Request
from starlette.requests import ClientDisconnect

from .api_guards import MAX_BODY_BYTES
from .api_responses import ApiError
from .generated import kimi_cluster_pb2 as pb
from .generation import ContextTooLong, Generation, GenerationLoop, GenerationRequest
from .scheduler import GenerateError

ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4
DEFAULT_MAX_TOKENS = 1024        # a chat reply that names no max_tokens: up to this, as the context allows
DEFAULT_COMPLETION_TOKENS = 16   # OpenAI's default for /v1/completions


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


@dataclass
class ApiRequest:
    """A checked request: what to generate and how the reply is wanted."""

    generation: GenerationRequest
    prompt_field: str   # the body's field the prompt came from, named when it does not fit the context
    stream: bool
    include_usage: bool
    logprobs: bool = False


@dataclass
class Prompt:
    """What an endpoint reads from its own fields."""

    ids: list
    max_tokens: int | None
    default_max_tokens: int
    field: str
    raw: bool
    logprobs: bool = False


async def read_body(request: Request, coordinator) -> dict:
    """The body as a JSON object, once the cluster is ready to generate."""
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


def read_request(body: dict, arrived: float, model_name: str, tokenizer, prompt: Callable) -> ApiRequest:
    """`prompt(body, tokenizer)` reads the endpoint's own fields (chat_prompt, text_prompt)."""
    check_model(body, model_name)
    p = prompt(body, tokenizer)
    generation = GenerationRequest(p.ids, p.max_tokens, sampling(body), default_max_tokens=p.default_max_tokens,
                                   stops=_stop(body), raw=p.raw, deadline=_deadline(body, arrived), arrived=arrived,
                                   speculate=_speculate(body))
    return ApiRequest(generation, p.field, logprobs=p.logprobs, **_stream_flags(body))


def start(loop: GenerationLoop, request: ApiRequest) -> Generation:
    try:
        return loop.start(request.generation)
    except ContextTooLong as e:
        message = e.explain(f"`{request.prompt_field}`", "`max_tokens`")
        raise ApiError(400, message, request.prompt_field, "context_length_exceeded") from e
    except GenerateError as e:  # sampling the checkpoint's generation_config.json makes invalid
        raise ApiError(400, e.message) from e


def chat_prompt(body: dict, tokenizer) -> Prompt:
    messages = _messages(body)
    thinking = _thinking(body)
    max_tokens = _number(body, "max_completion_tokens", None, low=1, integer=True)
    max_tokens = _number(body, "max_tokens", max_tokens, low=1, integer=True)
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ApiError(400, "`tools` must be a list of tool definitions", "tools")
    logprobs = _typed(body, "logprobs", bool, "true or false")
    if body.get("tool_choice") == "none":
        tools = None
    extra = {} if thinking is None else {"thinking": thinking}
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, **extra)
    except Exception as e:  # the template refused these messages
        raise ApiError(400, f"`messages` cannot be rendered with the model's chat template: {e}", "messages")
    return Prompt(ids, max_tokens, DEFAULT_MAX_TOKENS, "messages", raw=False, logprobs=bool(logprobs))


def text_prompt(body: dict, tokenizer) -> Prompt:
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
    return Prompt(ids, max_tokens, max_tokens, "prompt", raw=True)


def check_model(body: dict, model_name: str) -> None:
    if body.get("model") not in (None, model_name):
        raise ApiError(404, f"model {body.get('model')!r} is not served here; this cluster serves {model_name!r}",
                       "model", "model_not_found")


def sampling(body: dict) -> pb.SamplingParams:
    """The sampling fields the client set; the generation loop fills the rest from the checkpoint's
    defaults (a top_p of 1 and of 0 both leave it off)."""
    _refuse_unsupported(body)
    temperature = _number(body, "temperature", None, low=0, high=2)
    top_p = _number(body, "top_p", None, low=0, high=1, low_open=True)
    seed = _number(body, "seed", None, integer=True)
    params = pb.SamplingParams()
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if seed is not None:
        params.seed = seed % 2**64
    return params


def _refuse_unsupported(body: dict) -> None:
    bad = [name for name, asked in UNSUPPORTED.items() if asked(body.get(name))]
    if bad:
        names = ", ".join(f"`{name}`" for name in bad)
        raise ApiError(400, f"not supported by kimi-cluster: {names} (one choice per request, plain text, no "
                            "penalties or logit bias); drop them from the request", bad[0], "unsupported_parameter")


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


def _speculate(body: dict) -> bool | None:
    """`speculate`: true forces speculative decoding, false disables it; absent: the cluster's --speculate."""
    value = body.get("speculate")
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"`speculate` must be true or false, got {value!r}", "speculate")
    return value


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
