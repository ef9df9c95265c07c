"""Anthropic's Messages API over the same generation loop: `POST /v1/messages` (whole or streamed
with Anthropic's events) and `POST /v1/messages/count_tokens`.

A thin adapter, as api_requests.py / api_responses.py are for OpenAI's shapes: the request's
system prompt and content blocks (text, tool_use, tool_result, thinking) become the chat
template's messages; the reply's pieces become content blocks (thinking for Kimi's reasoning,
text, tool_use with the call's arguments as `input`); errors take Anthropic's shape. Limits,
guards, sampling, the context check and the reply's end are the OpenAI endpoints' own.
"""

import json
import uuid

from .api_requests import Prompt, _number, _stop, _thinking, _typed, shaping_fields, thinking_budget
from .api_responses import ApiError, Completion, sse
from .generation import GenerationResult, Piece
from .structured import constraint_spec

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _text(content, field: str) -> str:
    """A string, or the text of a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "".join(str(b.get("text", "")) for b in content)
    raise ApiError(400, f"`{field}` must be a string or a list of text blocks", field)


def _blocks(message: dict, i: int) -> list:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise ApiError(400, f"`messages[{i}].content` must be a string or a list of content blocks",
                       f"messages[{i}].content")
    return content


def _user(blocks: list, i: int) -> list:
    """Chat template messages of a user turn: its tool results (as tool messages), then its text."""
    out, text = [], []
    for j, block in enumerate(blocks):
        field = f"messages[{i}].content[{j}]"
        if block.get("type") == "text":
            text.append(str(block.get("text", "")))
        elif block.get("type") == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise ApiError(400, f"`{field}.tool_use_id` must name the tool_use it answers", f"{field}.tool_use_id")
            result = _text(block.get("content", ""), f"{field}.content")
            if block.get("is_error"):
                result = f"Error: {result}"
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
        else:
            raise ApiError(400, f"`{field}.type` {block.get('type')!r} is not supported in a user turn here (text "
                                "and tool_result are; this model reads no images or documents)", f"{field}.type")
    if text:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _assistant(blocks: list, i: int) -> dict:
    message, text, reasoning, calls = {"role": "assistant"}, [], [], []
    for j, block in enumerate(blocks):
        field = f"messages[{i}].content[{j}]"
        kind = block.get("type")
        if kind == "text":
            text.append(str(block.get("text", "")))
        elif kind == "thinking":
            reasoning.append(str(block.get("thinking", "")))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise ApiError(400, f"`{field}` must have a `name` and an object `input`", field)
            calls.append({"id": str(block.get("id", "")), "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(block.get("input", {}))}})
        else:
            raise ApiError(400, f"`{field}.type` {kind!r} is not supported in an assistant turn", f"{field}.type")
    message["content"] = "".join(text)
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def template_messages(body: dict) -> list:
    """The chat template's messages for an Anthropic request (system, then the turns)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of messages", "messages")
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text(body["system"], "system")})
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"`messages[{i}].role` must be user or assistant", f"messages[{i}].role")
        blocks = _blocks(message, i)
        out += _user(blocks, i) if message["role"] == "user" else [_assistant(blocks, i)]
    return out


def template_tools(body: dict) -> list | None:
    """Anthropic's tools in the OpenAI form the chat template declares them in."""
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ApiError(400, "`tools` must be a list of tool definitions", "tools")
    for i, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom"):  # web_search_20250305, bash_20250124, ...: run by Anthropic
            raise ApiError(400, f"`tools[{i}]` is a tool Anthropic's servers run ({str(tool.get('type'))[:40]!r}); "
                                "none runs here: declare your own tools with a name and an input_schema", f"tools[{i}]")
    return [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                              "parameters": t.get("input_schema", {"type": "object"})}}
            for t in tools]


def messages_prompt(body: dict, tokenizer) -> Prompt:
    """Prompt of a /v1/messages body (max_tokens is required, as in Anthropic's API)."""
    max_tokens = _number(body, "max_tokens", None, low=1, integer=True)
    if max_tokens is None:
        raise ApiError(400, "`max_tokens` is required", "max_tokens")
    for name in ("mcp_servers", "container"):  # what Anthropic's servers connect to or run code in
        if body.get(name) is not None:
            raise ApiError(400, f"`{name}` is not supported here (no MCP connector or code container runs on this "
                                "cluster): drop it, and call your tools yourself", name, "unsupported_parameter")
    thinking = _thinking(body)
    tools = template_tools(body)
    if isinstance(body.get("tool_choice"), dict) and body["tool_choice"].get("type") == "none":
        tools = None
    extra = {} if thinking is None else {"thinking": thinking}
    constraint = shaping_fields(constraint_spec, body, False, True)
    messages = template_messages(body)
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **extra)
    except Exception as e:  # the template refused these messages
        raise ApiError(400, f"`messages` cannot be rendered with the model's chat template: {e}", "messages")
    return Prompt(list(ids), max_tokens, max_tokens, "messages", raw=False, constraint=constraint,
                  thinking_budget=thinking_budget(body))


def openai_fields(body: dict) -> dict:
    """The fields the shared reader knows, under OpenAI's names (stop_sequences -> stop)."""
    _typed(body, "stop_sequences", list, "a list of strings")
    out = {k: v for k, v in body.items() if k in ("model", "temperature", "top_p", "top_k", "stream", "timeout")}
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
        _stop(out)
    return out


def count_tokens(body: dict, tokenizer) -> dict:
    """POST /v1/messages/count_tokens: the prompt's tokens as /v1/messages would send them."""
    return {"input_tokens": len(messages_prompt({**body, "max_tokens": 1}, tokenizer).ids)}


class AnthropicMessage(Completion):
    """A reply as an Anthropic message: content blocks, stop_reason, usage with cache reads;
    streamed as message_start, content_block_start / _delta / _stop per block, message_delta,
    message_stop."""

    def __init__(self, model: str, tokenizer, logprobs: bool = False):
        super().__init__(model, tokenizer, logprobs)
        self.id = f"msg_{uuid.uuid4().hex}"
        self.block = None  # the open block's type while streaming
        self.index = -1

    # ---- whole ----

    def whole(self, pieces: list, result: GenerationResult) -> dict:
        blocks = []
        for piece in pieces:
            for kind, value in _parts(piece):
                if kind == "tool_use":
                    blocks.append(_tool_use(value))
                elif blocks and blocks[-1]["type"] == kind:
                    blocks[-1][_TEXT_FIELD[kind]] += value
                else:
                    blocks.append(_empty_block(kind))
                    blocks[-1][_TEXT_FIELD[kind]] = value
        return {**self._message(result), "content": blocks, "usage": self.usage(result)}

    def _message(self, result: GenerationResult | None) -> dict:
        reason = STOP_REASONS.get(result.finish_reason) if result else None
        sequence = getattr(result, "stop_sequence", None) if result else None
        if sequence:
            reason = "stop_sequence"
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": reason, "stop_sequence": sequence}

    @staticmethod
    def usage(result: GenerationResult) -> dict:
        return {"input_tokens": result.prompt_tokens - result.cached_tokens, "output_tokens": result.completion_tokens,
                "cache_read_input_tokens": result.cached_tokens, "cache_creation_input_tokens": 0}

    # ---- streamed ----

    def opening(self) -> list:
        usage = {"input_tokens": self.prompt_tokens, "output_tokens": 0, "cache_read_input_tokens": 0,
                 "cache_creation_input_tokens": 0}
        return [_event("message_start", {"message": {**self._message(None), "usage": usage}})]

    def events(self, piece: Piece) -> list:
        lines = []
        for kind, value in _parts(piece):
            if kind == "tool_use":
                lines += self._close()
                self.index += 1
                block = {**_tool_use(value), "input": {}}
                lines.append(_event("content_block_start", {"index": self.index, "content_block": block}))
                lines.append(_event("content_block_delta", {"index": self.index, "delta": {
                    "type": "input_json_delta", "partial_json": value.arguments}}))
                lines.append(_event("content_block_stop", {"index": self.index}))
                continue
            if self.block != kind:
                lines += self._close()
                self.index += 1
                self.block = kind
                lines.append(_event("content_block_start", {"index": self.index, "content_block": _empty_block(kind)}))
            delta = {"type": f"{kind}_delta", _TEXT_FIELD[kind]: value}
            lines.append(_event("content_block_delta", {"index": self.index, "delta": delta}))
        return lines

    def _close(self) -> list:
        if self.block is None:
            return []
        lines = []
        if self.block == "thinking":  # Kimi's reasoning carries no signature
            lines.append(_event("content_block_delta", {"index": self.index, "delta": {
                "type": "signature_delta", "signature": ""}}))
        self.block = None
        return lines + [_event("content_block_stop", {"index": self.index})]

    def closing(self, result: GenerationResult, include_usage: bool) -> list:
        message = self._message(result)
        delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
        return self._close() + [_event("message_delta", {"delta": delta, "usage": self.usage(result)}),
                                _event("message_stop", {})]

    def error_event(self, error: ApiError) -> str:
        return f"event: error\n{sse(error.anthropic_json())}"


_TEXT_FIELD = {"thinking": "thinking", "text": "text"}


def _empty_block(kind: str) -> dict:
    return {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""}


def _parts(piece: Piece):
    """(block type, value) of what a piece adds: reasoning, text, and whole tool calls."""
    if piece.delta.reasoning:
        yield "thinking", piece.delta.reasoning
    if piece.delta.content:
        yield "text", piece.delta.content
    for call in piece.delta.tool_calls:
        yield "tool_use", call


def _tool_use(call) -> dict:
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        arguments = {}
    return {"type": "tool_use", "id": call.id, "name": call.name,
            "input": arguments if isinstance(arguments, dict) else {"value": arguments}}


def _event(kind: str, body: dict) -> str:
    return f"event: {kind}\n{sse({'type': kind, **body})}"
