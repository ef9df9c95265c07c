"""OpenAI's Responses API over the same generation loop: `POST /v1/responses`, whole or streamed with
its typed events (what agents such as Codex speak).

A thin adapter, as api_anthropic.py is: `instructions` and the `input` items (messages,
function_call, function_call_output, custom_tool_call, custom_tool_call_output, reasoning) become
the chat template's messages; flat function tools, `tool_choice` and `text.format` become the chat
completions' forms, so the grammar and its checks are the same; the reply's pieces become output
items (reasoning for Kimi's thinking, a message with output_text, function_call, custom_tool_call).

A custom (freeform) tool, such as Codex's apply_patch, is shown to the model as a function tool
whose one string argument `input` carries the raw text; its grammar, when it has one, is written
into that argument's description but not enforced. Nothing is stored: a conversation is sent whole
each turn, and `previous_response_id` is refused, saying so. Limits, guards, sampling, the context check
and the reply's end are the other endpoints' own.
"""

import json
import re
import uuid

from .api_requests import DEFAULT_MAX_TOKENS, IMAGE_PARTS, Prompt, _number, _thinking, _typed, too_long
from .shaping import MAX_TOP_LOGPROBS
from .api_responses import ApiError, Completion, sse
from .generation import ContextTooLong, GenerationResult, Piece, PromptTokenizer
from .structured import FieldError, constraint_spec

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text", "text")
LOGPROBS_INCLUDE = "message.output_text.logprobs"  # the `include` entry asking for the answer's logprobs
SHARED_FIELDS = ("model", "temperature", "top_p", "top_k", "min_p", "stream", "timeout", "speculate")
# Chat completions' field names in a FieldError, as this API spells them.
FIELD_NAMES = ((re.compile(r"response_format\.json_schema\.?"), "text.format."),
               (re.compile(r"response_format"), "text.format"), (re.compile(r"\.function\.parameters"), ".parameters"))


def _text(content, field: str) -> str:
    """A string, or the text of a list of text parts; an image or a file is refused by name."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"`{field}` must be a string or a list of input_text parts", field)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in IMAGE_PARTS or kind in ("input_file", "input_audio"):
            raise ApiError(400, f"`{field}[{j}]` is {kind!r}: this cluster serves the language model only (no node "
                                "loads the vision tower); send input_text parts", f"{field}[{j}]", "unsupported_content")
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ApiError(400, f"`{field}[{j}]` must be a part such as {{\"type\": \"input_text\", \"text\": \"...\"}}",
                           f"{field}[{j}]")
        out.append(part["text"])
    return "".join(out)


def _assistant(messages: list) -> dict:
    """The assistant message an assistant item adds to: the last one, or a new one."""
    if not messages or messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": ""})
    return messages[-1]


def template_messages(body: dict) -> list:
    """The chat template's messages for a Responses request (instructions, then the input items)."""
    out = []
    instructions = _typed(body, "instructions", str, "a string")
    if instructions:
        out.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str) and items:
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "`input` must be a non-empty string or a non-empty list of items", "input")
    for i, item in enumerate(items):
        field = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = ROLES.get(item.get("role"))
            if role is None:
                raise ApiError(400, f"`{field}.role` must be one of {', '.join(ROLES)}, got {item.get('role')!r}",
                               f"{field}.role")
            text = _text(item.get("content"), f"{field}.content")
            if role == "assistant":
                _assistant(out)["content"] += text
            else:
                out.append({"role": role, "content": text})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise ApiError(400, f"`{field}` must have string `call_id`, `name` and `arguments`", field)
            _assistant(out).setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif kind == "custom_tool_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "input")):
                raise ApiError(400, f"`{field}` must have string `call_id`, `name` and `input`", field)
            _assistant(out).setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": custom_arguments(item["input"])}})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            if not isinstance(item.get("call_id"), str):
                raise ApiError(400, f"`{field}.call_id` must name the function_call it answers", f"{field}.call_id")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _text(item.get("output", ""), f"{field}.output")})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            texts = [p.get("text") for p in parts if isinstance(p, dict)] if isinstance(parts, list) else [None]
            if not all(isinstance(t, str) for t in texts):
                raise ApiError(400, f"`{field}.content` must be a list of reasoning_text parts", f"{field}.content")
            message = _assistant(out)
            message["reasoning_content"] = message.get("reasoning_content", "") + "".join(texts)
        else:
            raise ApiError(400, f"`{field}.type` {kind!r} is not supported here (message, function_call, "
                                "function_call_output, custom_tool_call, custom_tool_call_output and reasoning "
                                "are)", f"{field}.type")
    return out


def custom_arguments(text: str) -> str:
    """A custom tool's input as the arguments of the function call the model writes for it (see
    custom_input): its text as `{"input": ...}`, unless the model wrote a JSON object of its own."""
    try:
        if isinstance(json.loads(text), dict):
            return text
    except ValueError:
        pass
    return json.dumps({"input": text}, ensure_ascii=False)


def custom_input(arguments: str) -> str:
    """The input of a custom tool's call from the arguments the model wrote: the `input` string, or,
    when it wrote some other JSON, that text as it is (a freeform tool takes any text)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and set(value) == {"input"} and isinstance(value["input"], str):
        return value["input"]
    return arguments


def custom_tool_names(body: dict) -> frozenset:
    """The names of the request's custom tools: their calls come back as custom_tool_call items."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return frozenset()  # responses_prompt says what is wrong with it
    return frozenset(t["name"] for t in tools if isinstance(t, dict) and t.get("type") == "custom"
                     and isinstance(t.get("name"), str))


def custom_as_function(tool: dict, field: str) -> dict:
    """A custom tool as the function tool the chat template renders: one string argument, `input`."""
    if not isinstance(tool.get("name"), str):
        raise ApiError(400, f"`{field}.name` must be a string", f"{field}.name")
    fmt = tool.get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "grammar"):
        raise ApiError(400, f"`{field}.format` must be {{\"type\": \"text\"}} or {{\"type\": \"grammar\", ...}}",
                       f"{field}.format")
    about = "The tool's raw input text."
    if fmt["type"] == "grammar":
        if not isinstance(fmt.get("definition"), str) or fmt.get("syntax") not in ("lark", "regex"):
            raise ApiError(400, f"`{field}.format` must have a `syntax` (lark or regex) and a string `definition`",
                           f"{field}.format")
        about += f" It must match this {fmt['syntax']} grammar:\n{fmt['definition']}"
    function = {"name": tool["name"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    function["parameters"] = {"type": "object", "properties": {"input": {"type": "string", "description": about}},
                              "required": ["input"]}
    return {"type": "function", "function": function}


def chat_tools(body: dict) -> list | None:
    """The flat function and custom tools in the chat completions' form; a hosted tool is refused."""
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "`tools` must be a list of tool definitions", "tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "custom":
            out.append(custom_as_function(tool, f"tools[{i}]"))
            continue
        if kind != "function":
            raise ApiError(400, f"`tools[{i}]` is a {kind!r} tool: this server runs function and custom tools only "
                                "(hosted tools such as web_search or file_search are OpenAI's)", f"tools[{i}]")
        # as a chat completions tool: the template renders what is there, so nothing is added
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict")
                                                     if k in tool}})
    return out


def chat_shaping(body: dict, tools: list | None) -> dict:
    """tool_choice, parallel_tool_calls and text.format under the chat completions' names."""
    parallel = body.get("parallel_tool_calls")
    out = {"tools": tools, "parallel_tool_calls": True if parallel is None else parallel}
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") not in ("function", "custom") or not isinstance(choice.get("name"), str):
            raise ApiError(400, "`tool_choice` must be \"auto\", \"required\", \"none\" or "
                                "{\"type\": \"function\" or \"custom\", \"name\": ...}", "tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        out["tool_choice"] = choice
    text = _typed(body, "text", dict, "an object such as {\"format\": {\"type\": \"text\"}}") or {}
    fmt = text.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    if fmt is not None:
        out["response_format"] = fmt
    return out


def responses_prompt(body: dict, tokenizer) -> Prompt:
    """Prompt of a /v1/responses body."""
    if body.get("background"):
        raise ApiError(400, "`background`: responses run while the request is open here; drop it, or stream",
                       "background", "unsupported_parameter")
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            raise ApiError(400, f"`{name}`: this server stores no responses; send the whole conversation in `input` "
                                "(with `store: false`, as stateless clients do)", name, "unsupported_parameter")
    max_tokens = _number(body, "max_output_tokens", None, low=1, integer=True)
    thinking = _thinking(body)
    reasoning = _typed(body, "reasoning", dict, "an object such as {\"effort\": \"medium\"}") or {}
    if thinking is None and reasoning.get("effort") == "none":
        thinking = False
    tools = chat_tools(body)
    shaping = chat_shaping(body, tools)
    try:
        constraint = constraint_spec(shaping, False)
    except FieldError as e:
        field = e.field
        for pattern, name in FIELD_NAMES:
            field = pattern.sub(name, field)
        raise ApiError(400, e.message.replace(f"`{e.field}`", f"`{field.rstrip('.')}`"), field.rstrip(".")) from e
    if shaping.get("tool_choice") == "none":
        tools = None
    extra = {} if thinking is None else {"thinking": thinking}
    messages = template_messages(body)
    truncation = body.get("truncation")
    if truncation not in (None, "auto", "disabled"):
        raise ApiError(400, '`truncation` must be "auto" or "disabled"', "truncation")
    if truncation == "auto":  # the oldest turns go until the rest fits with room for max_output_tokens
        tokenizer = PromptTokenizer(tokenizer.tokenizer, tokenizer.context, max_tokens or 1)
    try:
        ids = _rendered(messages, truncation == "auto",
                        lambda kept: tokenizer.apply_chat_template(kept, tools=tools, add_generation_prompt=True,
                                                                   **extra))
    except ContextTooLong as e:
        raise too_long(e, "input") from e
    except Exception as e:  # the template refused these messages
        raise ApiError(400, f"`input` cannot be rendered with the model's chat template: {e}", "input")
    top_logprobs = _number(body, "top_logprobs", 0, low=0, high=MAX_TOP_LOGPROBS, integer=True)
    return Prompt(list(ids), max_tokens, DEFAULT_MAX_TOKENS, "input", raw=False, constraint=constraint,
                  logprobs=LOGPROBS_INCLUDE in _include(body) or top_logprobs > 0, top_logprobs=top_logprobs)


def _rendered(messages: list, truncate: bool, render) -> list:
    """render(messages); where they do not fit the context (ContextTooLong) and `truncate`, the
    fewest of the oldest turns are left out that let the rest fit: a cut falls before a user
    message (a turn's tool calls and results stay together), the leading system messages (the
    instructions) are kept, and so is the last user turn (if it alone does not fit, the refusal
    stands)."""
    try:
        return render(messages)
    except ContextTooLong:
        if not truncate:
            raise
    head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    cuts = [i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"]
    fitted, low, high = None, 0, len(cuts) - 1
    while low <= high:  # the first cut that fits (leaving out more only makes it shorter)
        mid = (low + high) // 2
        try:
            fitted, high = render(messages[:head] + messages[cuts[mid]:]), mid - 1
        except ContextTooLong:
            low = mid + 1
    if fitted is None:
        return render(messages[:head] + messages[cuts[-1]:] if cuts else messages)  # raises the refusal
    return fitted


def _include(body: dict) -> list:
    include = body.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(i, str) for i in include)):
        raise ApiError(400, "`include` must be a list of strings", "include")
    return include or []


def shared_fields(body: dict) -> dict:
    """The fields the shared reader knows (sampling, streaming, deadline), under their common names."""
    return {k: v for k, v in body.items() if k in SHARED_FIELDS}


class ResponseObject(Completion):
    """A reply as a Responses API `response`: output items (reasoning, message, function_call) and
    usage; streamed as response.created, then per item output_item.added, its deltas and its
    .done events, then response.completed (response.incomplete when max_output_tokens ended it)."""

    def __init__(self, model: str, tokenizer, logprobs: bool = False, custom_tools: frozenset = frozenset()):
        super().__init__(model, tokenizer, logprobs)
        self.custom_tools = custom_tools  # calls of these tools are custom_tool_call items
        self.id = f"resp_{uuid.uuid4().hex}"
        self.output = []            # the items so far
        self.item = None            # the reasoning or message item text is being added to
        self.sequence = 0
        self.unsent = []  # logprobs of tokens whose text is not out yet (with `logprobs`)

    # ---- whole ----

    def whole(self, pieces: list, result: GenerationResult) -> dict:
        for piece in pieces:
            self._add(piece)  # the items only: no event is rendered
        self._close()
        return self._response(result)

    def _response(self, result: GenerationResult | None) -> dict:
        status = "in_progress" if result is None else "incomplete" if result.finish_reason == "length" else "completed"
        body = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": self.output if result else [], "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "usage": None}
        if result is not None:
            body["usage"] = {"input_tokens": result.prompt_tokens,
                             "input_tokens_details": {"cached_tokens": result.cached_tokens},
                             "output_tokens": result.completion_tokens,
                             "output_tokens_details": {"reasoning_tokens": result.reasoning_tokens},
                             "total_tokens": result.prompt_tokens + result.completion_tokens}
        return body

    # ---- streamed ----

    def opening(self) -> list:
        response = self._response(None)
        return self._render([self._event("response.created", response=response),
                             self._event("response.in_progress", response=response)])

    def events(self, piece: Piece) -> list:
        return self._render(self._add(piece))

    def _add(self, piece: Piece) -> list:
        """The piece added to the output items; the (type, body) of the events that say so."""
        lines = []
        if self.logprobs and piece.token is not None:
            self.unsent.append(self.logprob_json(piece))
        for kind, text in (("reasoning", piece.delta.reasoning), ("message", piece.delta.content)):
            if text:
                if self.item is None or self.item["type"] != kind:
                    lines += self._close() + self._open(kind)
                part = self.item["content"][0]
                part["text"] += text
                index = len(self.output) - 1
                # the answer's tokens' logprobs come with the text they end in (reasoning has none)
                entries, self.unsent = self.unsent, []
                extra = {}
                if kind == "message":
                    extra = {"logprobs": entries}
                    part["logprobs"] += entries
                lines.append(self._event(f"response.{part['type']}.delta", item_id=self.item["id"],
                                         output_index=index, content_index=0, delta=text, **extra))
        for call in piece.delta.tool_calls:
            lines += self._close() + self._call(call)
        return lines

    def _call(self, call) -> list:
        """A tool call's item: a function_call, or a custom_tool_call for a custom tool."""
        custom = call.name in self.custom_tools
        kind, field, prefix = ("custom_tool_call", "input", "ctc") if custom else ("function_call", "arguments", "fc")
        value = custom_input(call.arguments) if custom else call.arguments
        item = {"type": kind, "id": f"{prefix}_{uuid.uuid4().hex}", "call_id": call.id, "name": call.name,
                field: value, "status": "completed"}
        done = {field: value} if custom else {"name": call.name, field: value}
        self.output.append(item)
        index, events = len(self.output) - 1, f"response.{kind}_{field}"
        return [self._event("response.output_item.added", output_index=index,
                            item={**item, field: "", "status": "in_progress"}),
                self._event(f"{events}.delta", item_id=item["id"], output_index=index, delta=value),
                self._event(f"{events}.done", item_id=item["id"], output_index=index, **done),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _open(self, kind: str) -> list:
        if kind == "reasoning":
            self.item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
                         "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
        else:
            self.item = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant", "status": "in_progress",
                         "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        self.output.append(self.item)
        index, part = len(self.output) - 1, self.item["content"][0]
        return [self._event("response.output_item.added", output_index=index, item={**self.item, "content": []}),
                self._event("response.content_part.added", item_id=self.item["id"], output_index=index,
                            content_index=0, part=dict(part))]

    def _close(self) -> list:
        if self.item is None:
            return []
        item, self.item = self.item, None
        item["status"] = "completed"
        index, part = len(self.output) - 1, item["content"][0]  # the open item is always the last
        return [self._event(f"response.{part['type']}.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], **({"logprobs": part["logprobs"]} if item["type"] == "message" else {})),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def closing(self, result: GenerationResult, include_usage: bool) -> list:
        lines = self._close()
        response = self._response(result)
        return self._render(lines + [self._event(f"response.{response['status']}", response=response)])

    def error_event(self, error: ApiError) -> str:
        return self._render([self._event("error", code=error.code or error.kind, message=error.message,
                                          param=error.param)])[0]

    @staticmethod
    def _event(kind: str, **body) -> tuple:
        return kind, body

    def _render(self, events: list) -> list:
        """SSE lines of (type, body) events, numbered in the order they are sent."""
        lines = []
        for kind, body in events:
            self.sequence += 1
            lines.append(f"event: {kind}\n{sse({'type': kind, 'sequence_number': self.sequence, **body})}")
        return lines
