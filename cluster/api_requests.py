"""Reading an OpenAI request body into a GenerationRequest (generation.py): each field checked,
and a refusal (400) that names the field and what to send instead. Chat completions render
`messages` with the model's chat template; text completions take a raw `prompt`. What they share
(model, sampling, stop strings, deadline, streaming) is read once, in `read_request`."""

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Callable

from fastapi import Request
from starlette.requests import ClientDisconnect

from .api_guards import MAX_BODY_BYTES
from .api_responses import ApiError
from mlx_kimi.constrain import ConstraintSpec

from .generated import kimi_cluster_pb2 as pb
from .generation import ContextTooLong, Generation, GenerationLoop, GenerationRequest, PromptTokenizer
from .scheduler import GenerateError
from .shaping import MAX_TOP_LOGPROBS, put_penalties
from .structured import FieldError, constraint_spec, penalties

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4
MAX_CHOICES = 8                  # `n`: replies to one prompt, generated one after another on its one prefill
DEFAULT_MAX_TOKENS = 1024        # a chat reply that names no max_tokens: up to this, as the context allows
DEFAULT_COMPLETION_TOKENS = 16   # OpenAI's default for /v1/completions
MAX_TIMEOUT_S = 7 * 86400        # a `timeout` longer than a week is a mistake, not a deadline
IMAGE_PARTS = ("image_url", "image", "input_image")


# Accepted by OpenAI, not done here: a request that asks for them is refused rather than ignored.
UNSUPPORTED = {  # asked for when the function says so; a reply without them would be a wrong one
    "best_of": lambda v: v not in (None, 1),
    "suffix": bool,
    "audio": lambda v: v is not None,  # Kimi reads and writes text only
    "modalities": lambda v: v not in (None, ["text"]),
    "web_search_options": lambda v: v is not None,  # no search runs here
}


@dataclass
class ApiRequest:
    """A checked request: what to generate and how the reply is wanted."""

    generation: GenerationRequest
    prompt_field: str   # the body's field the prompt came from, named when it does not fit the context
    stream: bool
    include_usage: bool
    logprobs: bool = False
    n: int = 1  # replies wanted; each draws with seed + its index when a seed is given
    echo: bool = False        # the reply's text (and logprobs) begin with the prompt's
    keep_reply: bool = True   # False: max_tokens 0, the prompt is only scored (the one token drawn is dropped)


@dataclass
class Prompt:
    """What an endpoint reads from its own fields."""

    ids: list
    max_tokens: int | None
    default_max_tokens: int
    field: str
    raw: bool
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives reported beside each token (with logprobs)
    constraint: ConstraintSpec | None = None
    prediction: list = dataclasses.field(default_factory=list)  # token ids the reply is expected to be
    thinking_budget: int | None = None  # reasoning tokens, at most
    echo: bool = False
    keep_reply: bool = True


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


def read_request(body: dict, arrived: float, model_name: str, loop: GenerationLoop, prompt: Callable) -> ApiRequest:
    """`prompt(body, tokenizer)` reads the endpoint's own fields (chat_prompt, text_prompt); its
    tokenizer refuses a prompt that cannot fit the context before encoding it whole."""
    check_model(body, model_name)
    p = prompt(body, PromptTokenizer(loop.tokenizer, loop.context))
    params = sampling(body)
    params.top_logprobs = p.top_logprobs
    generation = GenerationRequest(p.ids, p.max_tokens, params, default_max_tokens=p.default_max_tokens,
                                   stops=_stop(body), raw=p.raw, deadline=_deadline(body, arrived), arrived=arrived,
                                   constraint=p.constraint, speculate=_speculate(body), prediction=p.prediction,
                                   thinking_budget=p.thinking_budget, score_prompt=p.echo and p.logprobs)
    flags = _stream_flags(body)
    n = _number(body, "n", 1, low=1, high=MAX_CHOICES, integer=True)
    if n > 1 and flags["stream"]:
        raise ApiError(400, "`n` > 1 is not streamed here: ask for the replies whole, or send one request per reply",
                       "n", "unsupported_parameter")
    if p.echo and flags["stream"]:
        raise ApiError(400, "`echo` is not streamed here: ask for the reply whole", "echo", "unsupported_parameter")
    return ApiRequest(generation, p.field, logprobs=p.logprobs, n=n, echo=p.echo, keep_reply=p.keep_reply, **flags)


def start(loop: GenerationLoop, request: ApiRequest) -> list:
    """The request's generations (n of them), each checked before any token."""
    generations = []
    for i in range(request.n):
        generation = request.generation
        if i and generation.sampling.HasField("seed"):  # another draw per reply, each reproducible
            sampling = pb.SamplingParams()
            sampling.CopyFrom(generation.sampling)
            sampling.seed = (sampling.seed + i) % 2**64
            generation = dataclasses.replace(generation, sampling=sampling)
        generations.append(_start(loop, request, generation))
    return generations


def _start(loop: GenerationLoop, request: ApiRequest, generation: GenerationRequest) -> Generation:
    try:
        return loop.start(generation)
    except ContextTooLong as e:
        raise too_long(e, request.prompt_field) from e
    except GenerateError as e:  # a top_k past the vocabulary (the client's, or generation_config.json's)
        raise ApiError(400, e.message) from e


def too_long(e: ContextTooLong, field: str) -> ApiError:
    """The refusal naming the prompt's `field`, or max_tokens where that alone cannot fit."""
    param = "max_tokens" if e.counted_all and e.max_tokens > e.context else field
    return ApiError(400, e.explain(f"`{field}`", "`max_tokens`"), param, "context_length_exceeded")


def chat_prompt(body: dict, tokenizer) -> Prompt:
    if body.get("echo"):
        raise ApiError(400, "not supported by kimi-cluster: `echo` on chat completions (it is /v1/completions' field: "
                            "send the raw prompt there)", "echo", "unsupported_parameter")
    for name in ("functions", "function_call"):  # a reply without the call asked for would be a wrong one
        if body.get(name) is not None:
            raise ApiError(400, f"not supported by kimi-cluster: `{name}` (OpenAI's deprecated function calling): "
                                "send `tools` and `tool_choice`", name, "unsupported_parameter")
    messages = _messages(body)
    thinking = _thinking(body)
    if thinking is None and _typed(body, "reasoning_effort", str, 'a string such as "none" or "high"') == "none":
        thinking = False  # OpenAI's way to ask for no reasoning: Kimi's instant mode
    max_tokens = _number(body, "max_completion_tokens", None, low=1, integer=True)
    max_tokens = _number(body, "max_tokens", max_tokens, low=1, integer=True)
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ApiError(400, "`tools` must be a list of tool definitions", "tools")
    logprobs = _typed(body, "logprobs", bool, "true or false")
    top_logprobs = _number(body, "top_logprobs", 0, low=0, high=MAX_TOP_LOGPROBS, integer=True)
    if top_logprobs and not logprobs:
        raise ApiError(400, "`top_logprobs` needs `logprobs` set to true", "top_logprobs")
    if body.get("tool_choice") == "none":
        tools = None
    extra = {} if thinking is None else {"thinking": thinking}
    constraint = shaping_fields(constraint_spec, body, False)  # its thinking is read from the prompt
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, **extra)
    except ContextTooLong as e:
        raise too_long(e, "messages") from e
    except Exception as e:  # the template refused these messages
        raise ApiError(400, f"`messages` cannot be rendered with the model's chat template: {e}", "messages")
    return Prompt(ids, max_tokens, DEFAULT_MAX_TOKENS, "messages", raw=False, logprobs=bool(logprobs),
                  top_logprobs=top_logprobs, constraint=constraint, prediction=_prediction(body, tokenizer),
                  thinking_budget=thinking_budget(body))


def _prediction(body: dict, tokenizer) -> list:
    """OpenAI's predicted outputs (`{"type": "content", "content": TEXT or text parts}`: what the
    client expects the reply to be, e.g. a file it asks to have edited) as token ids, drafted
    first when the reply is decoded speculatively; it never changes the reply, only its speed."""
    prediction = body.get("prediction")
    if prediction is None:
        return []
    if not isinstance(prediction, dict) or prediction.get("type") != "content":
        raise ApiError(400, '`prediction` must be {"type": "content", "content": "the text you expect"}', "prediction")
    content = prediction.get("content")
    if not isinstance(content, (str, list)):
        raise ApiError(400, "`prediction.content` must be a string or a list of text parts", "prediction.content")
    for j, part in enumerate(content if isinstance(content, list) else []):
        _check_part(part, f"prediction.content[{j}]")
    if isinstance(content, list):
        content = "".join(part["text"] for part in content)
    try:
        return tokenizer.encode(content)
    except ContextTooLong as e:
        raise ApiError(400, f"`prediction` is longer than any reply can be: past the planned context of {e.context} "
                            "tokens", "prediction") from e


def shaping_fields(read: Callable, *args):
    """read(*args) (structured.py), with a malformed field answered by a 400 naming it."""
    try:
        return read(*args)
    except FieldError as e:
        raise ApiError(400, e.message, e.field) from e


def text_prompt(body: dict, tokenizer) -> Prompt:
    """A raw prompt: text, or token ids (as evaluation harnesses send them). `echo` puts the prompt
    before the reply; with `logprobs`, every prompt token after the first is scored (lm-eval's
    loglikelihood requests), and `max_tokens` 0 scores the prompt alone."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if _token_ids(prompt):
        ids = list(prompt)  # the generation loop checks them against the vocabulary and the context
    elif isinstance(prompt, str) and prompt:
        try:
            ids = tokenizer.encode(prompt)
        except ContextTooLong as e:
            raise too_long(e, "prompt") from e
    else:
        raise ApiError(400, "`prompt` must be a non-empty string or a list of token ids (one prompt per request)",
                       "prompt")
    echo = bool(_typed(body, "echo", bool, "true or false"))
    max_tokens = _number(body, "max_tokens", DEFAULT_COMPLETION_TOKENS, low=0 if echo else 1, integer=True)
    # the legacy field: how many alternatives to report beside each token (0: the token's own only)
    top = None if body.get("logprobs") is None or body.get("logprobs") is False else \
        _number(body, "logprobs", None, low=0, high=MAX_TOP_LOGPROBS, integer=True)
    for name in ("response_format", "tools"):
        if body.get(name) is not None:
            raise ApiError(400, f"`{name}` is a chat completions field: send it to /v1/chat/completions", name,
                           "unsupported_parameter")
    return Prompt(ids, max(max_tokens, 1), max(max_tokens, 1), "prompt", raw=True, logprobs=top is not None,
                  top_logprobs=top or 0, echo=echo, keep_reply=max_tokens > 0)


def _token_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and \
        all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)


def check_model(body: dict, model_name: str) -> None:
    if body.get("model") not in (None, model_name):
        raise ApiError(404, f"model {body.get('model')!r} is not served here; this cluster serves {model_name!r}",
                       "model", "model_not_found")


def sampling(body: dict) -> pb.SamplingParams:
    """The sampling fields the client set; the generation loop fills the rest from the checkpoint's
    defaults (a top_p of 1 and of 0 both leave it off; so does a top_k or a min_p of 0). top_k and
    min_p are not OpenAI's, but the servers people use (mlx-lm's, vLLM, llama.cpp) read them, and
    Anthropic's API has top_k; the generation loop refuses a top_k past the vocabulary."""
    _refuse_unsupported(body)
    temperature = _number(body, "temperature", None, low=0, high=2)
    top_p = _number(body, "top_p", None, low=0, high=1, low_open=True)
    top_k = _number(body, "top_k", None, low=0, high=2**31 - 1, integer=True)
    min_p = _number(body, "min_p", None, low=0, high=1)
    seed = _number(body, "seed", None, low=-2**63, high=2**64 - 1, integer=True)
    params = pb.SamplingParams()
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if top_k is not None:
        params.top_k = top_k
    if min_p is not None:
        params.min_p = min_p
    if seed is not None:
        params.seed = seed % 2**64
    put_penalties(params, shaping_fields(penalties, body))
    return params


def _refuse_unsupported(body: dict) -> None:
    bad = [name for name, asked in UNSUPPORTED.items() if asked(body.get(name))]
    if bad:
        names = ", ".join(f"`{name}`" for name in bad)
        raise ApiError(400, f"not supported by kimi-cluster: {names}; drop them from the request", bad[0],
                       "unsupported_parameter")


def _number(body: dict, name: str, default, low=None, high=None, low_open=False, integer=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"`{name}` must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if isinstance(value, float) and not math.isfinite(value):  # math.isfinite(10**400) overflows: ints are finite
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
        for j, part in enumerate(content if isinstance(content, list) else []):
            _check_part(part, f"messages[{i}].content[{j}]")
        if m["role"] == "tool" and not m.get("tool_call_id"):
            raise ApiError(400, f"`messages[{i}].tool_call_id` is required for tool messages",
                           f"messages[{i}].tool_call_id")
    # "developer" is OpenAI's newer name for the system message (its clients send it to reasoning
    # models); Kimi's chat template knows only "system" and would drop it
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


def _check_part(part, where: str) -> None:
    """A content part must be {"type": "text", "text": "..."}: the chat template renders text parts
    in order, and would drop anything else without a word."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in IMAGE_PARTS:
        raise ApiError(400, f"`{where}` is an image ({kind!r}): this cluster serves the language model only (no "
                            "node loads the vision tower); send text parts", where, "unsupported_content")
    if kind != "text" or not isinstance(part.get("text"), str):
        got = json.dumps(part)[:80]
        raise ApiError(400, f"`{where}` must be a text part such as {{\"type\": \"text\", \"text\": \"...\"}}, got {got}",
                       where)


def _deadline(body: dict, arrived: float) -> float | None:
    """The client's deadline (time.monotonic()) from `timeout`, seconds from the request's arrival.
    The official client's own timeout is an HTTP setting it never sends: when it gives up it
    disconnects, which stops the generation too."""
    timeout = _number(body, "timeout", None, low=0, high=MAX_TIMEOUT_S, low_open=True)
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


def thinking_budget(body: dict) -> int | None:
    """Anthropic's `thinking: {"type": "enabled", "budget_tokens": N}` (read on chat completions too):
    the reply thinks at most N tokens, then </think> is its next one."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") == "disabled" or thinking.get("budget_tokens") is None:
        return None
    budget = thinking["budget_tokens"]
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ApiError(400, f"`thinking.budget_tokens` must be an integer >= 0, got {budget!r}", "thinking.budget_tokens")
    return budget


def _thinking(body: dict):
    """K2.5-style templates think unless told not to: `thinking: false` (or in chat_template_kwargs)."""
    kwargs = _typed(body, "chat_template_kwargs", dict, "an object") or {}
    value = body.get("thinking", kwargs.get("thinking", kwargs.get("enable_thinking")))
    if isinstance(value, dict):  # {"type": "disabled"} as some clients send it
        value = value.get("type") != "disabled"
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, "`thinking` must be true or false", "thinking")
    return value
