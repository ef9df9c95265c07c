"""Split a Kimi reply, token by token, into reasoning, content and tool calls.

Kimi thinks between <think> and </think> (K2.5/K2.6 prompts already end inside <think>), and
calls tools as
  <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}
  <|tool_call_end|>...<|tool_calls_section_end|>
The section's text is parsed with mlx-lm's Kimi tool parser; a call the reply never finished (cut
by max_tokens inside its arguments) is not a call. StopMatcher ends the content at a client's stop
string.
"""

import json
from dataclasses import dataclass, field

from mlx_lm.tool_parsers.kimi_k2 import parse_tool_call

THINK_START, THINK_END = "<think>", "</think>"
TOOLS_START, TOOLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_end|>"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it


@dataclass
class ReplyDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list = field(default_factory=list)

    def __bool__(self):
        return bool(self.reasoning or self.content or self.tool_calls)


def prompt_ends_thinking(tokenizer, prompt: list) -> bool:
    """Whether generation starts inside a <think> block (the prompt's last token is <think>)."""
    think = tokenizer.convert_tokens_to_ids(THINK_START)
    return bool(prompt) and prompt[-1] == think


class RawText:
    """The ReplyParser interface for a raw completion: every token is text, special ones included."""

    tool_calls: list = []
    reasoning_tokens = 0

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.detokenizer = tokenizer.detokenizer
        self.detokenizer.reset()
        self.streamed = ""  # the text given out so far

    def feed(self, token: int) -> ReplyDelta:
        self.detokenizer.add_token(token)
        return ReplyDelta(content=self._out(self.detokenizer.last_segment))

    def finish(self) -> ReplyDelta:
        self.detokenizer.finalize()
        text = self._out(self.detokenizer.last_segment)
        whole = self.tokenizer.decode(self.detokenizer.tokens)
        if len(whole) > len(self.streamed) and whole.startswith(self.streamed):
            # mlx-lm's BPE detokenizer holds a lone space back for the next token, and drops it at the end
            text += whole[len(self.streamed):]
            self.streamed = whole
        return ReplyDelta(content=text)

    def _out(self, segment: str) -> str:
        """mlx-lm's BPE detokenizer drops the text's leading space (right for a chat turn); a raw
        completion continues its prompt, so there the space is the reply's."""
        if segment and not self.streamed and self.tokenizer.decode(self.detokenizer.tokens) == " " + segment:
            segment = " " + segment
        self.streamed += segment
        return segment


class ReplyParser:
    def __init__(self, tokenizer, thinking: bool):
        self.tokenizer = tokenizer
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (THINK_START, THINK_END, TOOLS_START, TOOLS_END)}
        self.think_start, self.think_end = ids[THINK_START], ids[THINK_END]
        self.tools_start, self.tools_end = ids[TOOLS_START], ids[TOOLS_END]
        self.mode = "reasoning" if thinking else "content"
        self.detokenizer = tokenizer.detokenizer
        self.tool_tokens: list = []
        self.tool_calls: list = []
        self.reasoning_tokens = 0  # inside the thinking block, </think> included (<think> where the reply opens it)

    def _flush(self) -> ReplyDelta:
        self.detokenizer.finalize()
        text = self.detokenizer.last_segment
        self.detokenizer.reset()
        return ReplyDelta(**{self.mode: text}) if text and self.mode != "tools" else ReplyDelta()

    def feed(self, token: int) -> ReplyDelta:
        if self.mode == "tools":
            if token != self.tools_end:
                self.tool_tokens.append(token)
                return ReplyDelta()
            self.mode = "content"
            return ReplyDelta(tool_calls=self._parse_tools())
        if self.mode == "reasoning" or token == self.think_start:
            self.reasoning_tokens += 1
        if token == self.think_start:
            delta, self.mode = self._flush(), "reasoning"
            return delta
        if token == self.think_end:
            delta, self.mode = self._flush(), "content"
            return delta
        if token == self.tools_start:
            delta, self.mode = self._flush(), "tools"
            return delta
        self.detokenizer.add_token(token)
        return ReplyDelta(**{self.mode: self.detokenizer.last_segment})

    def finish(self) -> ReplyDelta:
        """Whatever is still held: trailing bytes, or a tool section the reply never closed."""
        if self.mode == "tools":
            self.mode = "content"
            return ReplyDelta(tool_calls=self._parse_tools())
        return self._flush()

    def _parse_tools(self) -> list:
        text = self.tokenizer.decode(self.tool_tokens, skip_special_tokens=False)
        self.tool_tokens = []
        finished = text.rfind(CALL_END)
        if text.find(CALL_BEGIN, finished + 1) >= 0:  # the last call has no end: drop it
            text = text[:finished + len(CALL_END)] if finished >= 0 else ""
        try:
            parsed = parse_tool_call(text)
        except ValueError:
            return []  # not a well-formed call: nothing to run
        calls = []
        for call in parsed:
            args = call["arguments"]
            calls.append(ToolCall(call["id"], call["name"], args if isinstance(args, str) else json.dumps(args)))
        self.tool_calls += calls
        return calls


class StopMatcher:
    """Cuts content at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list):
        self.stops, self.held, self.stopped = stops, "", False
        self.matched = None  # the stop string found
        self.keep = max((len(s) for s in stops), default=1) - 1

    def push(self, text: str) -> str:
        if not self.stops or self.stopped:
            return "" if self.stopped else text
        self.held += text
        found = [(i, s) for s in self.stops if (i := self.held.find(s)) >= 0]
        if found:
            cut, self.matched = min(found)
            self.stopped = True
            out, self.held = self.held[:cut], ""
            return out
        out = self.held[:max(0, len(self.held) - self.keep)]  # hold the last `keep` characters
        self.held = self.held[len(out):]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out
