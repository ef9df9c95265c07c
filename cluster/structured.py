"""The request fields that shape a reply, read from OpenAI's and Anthropic's spellings into one
form: a ConstraintSpec (response_format, tools, tool_choice; mlx_kimi/constrain.py) and Penalties
(presence, frequency, repetition, logit_bias; mlx_kimi/penalties.py). Every malformed or
unsupported value is a FieldError naming the field (the APIs answer it with a 400).
"""

import json
import math
import re

from mlx_kimi.constrain import ConstraintSpec, Tool
from mlx_kimi.penalties import DEFAULT_CONTEXT, Penalties

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule, plus '.' (Kimi writes functions.NAME)
MAX_TOOLS = 128


class FieldError(ValueError):
    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.message, self.field = message, field


def _schema(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise FieldError(f"`{field}` must be a JSON schema (an object), got {json.dumps(value)[:80]}", field)
    return value


def _tool(i: int, tool, anthropic: bool) -> Tool:
    field = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise FieldError(f"`{field}` must be a tool definition (an object)", field)
    if anthropic:
        name, schema, where = tool.get("name"), tool.get("input_schema"), f"{field}.input_schema"
    else:
        if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise FieldError(f"`{field}` must be {{\"type\": \"function\", \"function\": {{...}}}}", field)
        function = tool["function"]
        name, where = function.get("name"), f"{field}.function.parameters"
        schema = function.get("parameters", {"type": "object"})
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise FieldError(f"`{field}` needs a name of 1 to 64 letters, digits, '_', '-' or '.', got {name!r}", field)
    return Tool(name, _schema(schema, where))


def _tools(body: dict, anthropic: bool) -> tuple:
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise FieldError(f"`tools` must be a list of at most {MAX_TOOLS} tool definitions", "tools")
    out = tuple(_tool(i, t, anthropic) for i, t in enumerate(tools))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise FieldError(f"`tools` names a function twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))})",
                         "tools")
    return out


def _openai_choice(body: dict) -> str:
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "required", "none"):
        return choice or "auto"
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        return choice["function"]["name"]
    raise FieldError("`tool_choice` must be \"auto\", \"required\", \"none\" or "
                     "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")


def _anthropic_choice(body: dict) -> tuple[str, bool]:
    """(choice, parallel) from Anthropic's tool_choice: auto, any, tool (with name), none."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto", True
    kinds = {"auto": "auto", "any": "required", "none": "none"}
    if not isinstance(choice, dict) or choice.get("type") not in (*kinds, "tool"):
        raise FieldError("`tool_choice` must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} or "
                         "{\"type\": \"tool\", \"name\": ...}", "tool_choice")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if choice["type"] == "tool":
        if not isinstance(choice.get("name"), str):
            raise FieldError("`tool_choice.name` must name one of the tools", "tool_choice.name")
        return choice["name"], parallel
    return kinds[choice["type"]], parallel


def _response_format(body: dict) -> dict:
    """ConstraintSpec fields of OpenAI's response_format."""
    fmt = body.get("response_format")
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise FieldError("`response_format.json_schema` must be {\"name\": ..., \"schema\": {...}, \"strict\": ...}",
                             "response_format.json_schema")
        if not isinstance(spec.get("strict", False), bool):
            raise FieldError("`response_format.json_schema.strict` must be true or false",
                             "response_format.json_schema.strict")
        return {"json_schema": _schema(spec["schema"], "response_format.json_schema.schema")}
    raise FieldError("`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"", "response_format")


def constraint_spec(body: dict, thinking: bool, anthropic: bool = False) -> ConstraintSpec:
    """The reply's grammar from a request body (OpenAI's chat completions, or Anthropic's messages)."""
    tools = _tools(body, anthropic)
    if anthropic:
        choice, parallel = _anthropic_choice(body)
        formats = {}
    else:
        choice, formats = _openai_choice(body), _response_format(body)
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise FieldError("`parallel_tool_calls` must be true or false", "parallel_tool_calls")
    if choice not in ("auto", "required", "none") and choice not in {t.name for t in tools}:
        raise FieldError(f"`tool_choice` names {choice!r}, which is not among the tools", "tool_choice")
    if choice == "required" and not tools:
        raise FieldError("`tool_choice` asks for a tool call but no `tools` are given", "tool_choice")
    return ConstraintSpec(thinking=thinking, tools=tools, tool_choice=choice, parallel_tool_calls=parallel, **formats)


def _finite(value) -> bool:
    """Whether a JSON number is a finite float (an integer past a float's range is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(body: dict, name: str, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise FieldError(f"`{name}` must be a finite number, got {json.dumps(value)[:40]}", name)
    return value


def penalties(body: dict, vocab_size: int | None = None) -> Penalties:
    """Penalties and logit bias from a request body (OpenAI's names, with mlx-lm's repetition
    penalty and context sizes); the bias's token ids are checked against `vocab_size` when given
    (the generation loop checks them anyway)."""
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise FieldError("`logit_bias` must map token ids (as strings) to numbers from -100 to 100", "logit_bias")
    try:
        logit_bias = {int(k): float(v) for k, v in bias.items()
                      if not isinstance(v, bool) and isinstance(v, (int, float)) and _finite(v)}
    except ValueError:
        logit_bias = {}
    if len(logit_bias) != len(bias):
        raise FieldError("`logit_bias` must map token ids (as strings) to numbers from -100 to 100, e.g. "
                         "{\"1234\": -100}", "logit_bias")
    sizes = {}
    for name in ("presence_context_size", "frequency_context_size", "repetition_context_size"):
        value = _number(body, name, DEFAULT_CONTEXT)
        if not isinstance(value, int):
            raise FieldError(f"`{name}` must be an integer", name)
        sizes[name] = value
    values = {name: float(_number(body, name, 0.0))
              for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")}
    try:
        out = Penalties(logit_bias=logit_bias, **values, **sizes)
        if vocab_size is not None:
            out.check_vocab(vocab_size)
    except ValueError as e:
        field = str(e).split(" ")[0]
        raise FieldError(str(e), field if field.isidentifier() else "logit_bias") from None
    return out
