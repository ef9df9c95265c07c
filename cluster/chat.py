"""Interactive terminal chat with the cluster: `kimi-cluster chat` without --prompt.

The conversation lives here, on the client: every turn sends the whole history to the
coordinator, which re-applies the chat template and reuses the nodes' KV caches for the longest
common prefix, so a turn only prefills what is new.

    you> Hi!
    ...reply...
    29 prompt tokens, 48 generated (length); TTFT 470 ms, 33.0 tok/s
    you> /think
    thinking off
"""

import argparse
import json
import signal
import sys
from pathlib import Path
from dataclasses import dataclass

import grpc
from rich.console import Console
from rich.markup import escape

from .client import map_json, print_map, read_reply

THINK_START, THINK_END = "<think>", "</think>"
PROMPT = "you> "

COMMANDS = {
    "/reset": "forget the conversation and start a new one",
    "/think": "toggle thinking (model default -> off -> on -> off ...)",
    "/map": "show the cluster's memory map",
    "/help": "show this help",
    "/quit": "leave (also /exit or Ctrl-D)",
}
HELP = "\n".join(f"  {name:<8} {what}" for name, what in COMMANDS.items()) + \
    "\n  Ctrl-C during a reply stops that reply."


@dataclass
class Command:
    """What the REPL should do with a line of input.

    kind: "message" (send `text` as the user's turn), "reset", "think", "map", "help", "quit",
    "unknown" (an unknown /command) or "empty" (nothing to do). `text` is the user message for
    "message" and what to show the user for every other kind."""

    kind: str
    text: str = ""


@dataclass
class ReplyStats:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str
    ttft_s: float
    decode_s: float

    @property
    def decode_tok_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    def line(self) -> str:
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (f"{self.prompt_tokens} prompt tokens{cached}, {self.completion_tokens} generated "
                f"({self.finish_reason}); TTFT {self.ttft_s * 1000:.0f} ms, {self.decode_tok_s:.1f} tok/s")


class ReplyCancelled(Exception):
    """Ctrl-C stopped a reply; `text` is what had streamed so far."""

    def __init__(self, text: str):
        super().__init__("reply cancelled")
        self.text = text


def split_thinking(text: str) -> tuple:
    """(reasoning, content) of a reply: the text before "</think>" is reasoning (a leading
    "<think>" dropped), the text after it the content. No "</think>": it is all content."""
    if THINK_END not in text:
        return "", text
    reasoning, content = text.split(THINK_END, 1)
    if reasoning.startswith(THINK_START):
        reasoning = reasoning[len(THINK_START):]
    return reasoning, content


class ChatSession:
    """The conversation and the chat settings; no I/O, so every method is unit-testable."""

    def __init__(self, system: str | None = None, thinking: bool | None = None, response_format: str = "",
                 tools: str = "", thinking_budget: int | None = None):
        self.system = system
        self.thinking: bool | None = thinking  # None: the chat template's default
        self.thinking_budget = thinking_budget  # a reply thinks at most this many tokens (None: as long as it does)
        self.response_format, self.tools = response_format, tools  # JSON text (--json-schema, --tools)
        self.messages: list = []
        self.last_stats: ReplyStats | None = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last_stats = None

    def thinking_label(self) -> str:
        return {None: "model default", True: "on", False: "off"}[self.thinking]

    def toggle_thinking(self) -> bool:
        """None (model default) or True -> False; False -> True."""
        self.thinking = self.thinking is False
        return self.thinking

    def handle(self, line: str) -> Command:
        """Parse one line of input. /reset and /think take effect here; a message is appended
        to the history (take it back with `drop_pending` when its reply fails)."""
        text = line.strip()
        if not text:
            return Command("empty")
        if not text.startswith("/"):
            self.messages.append({"role": "user", "content": text})
            return Command("message", text)
        name = text.split()[0].lower()
        if name == "/reset":
            self.reset()
            return Command("reset", "conversation cleared")
        if name == "/think":
            self.toggle_thinking()
            return Command("think", f"thinking {self.thinking_label()}")
        if name == "/map":
            return Command("map")
        if name in ("/quit", "/exit"):
            return Command("quit")
        if name in ("/help", "/?"):
            return Command("help", HELP)
        return Command("unknown", f"unknown command {name}; commands are:\n{HELP}")

    def add_reply(self, text: str, stats: ReplyStats | None = None) -> dict:
        """Append the assistant's reply to the history, its thinking as `reasoning_content`
        (the Kimi template renders that back into <think>...</think>)."""
        reasoning, content = split_thinking(text)
        message = {"role": "assistant", "content": content}
        if reasoning:
            message["reasoning_content"] = reasoning
        self.messages.append(message)
        self.last_stats = stats
        return message

    def drop_pending(self) -> None:
        """Take back the user message whose reply was cancelled or failed."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def request(self, sampling, max_tokens: int):
        from .generated import kimi_cluster_pb2 as pb

        request = pb.GenerateRequest(messages_json=json.dumps(self.messages), max_tokens=max_tokens,
                                     response_format_json=self.response_format, tools_json=self.tools)
        if sampling is not None:
            request.sampling.CopyFrom(sampling)
        if self.thinking is not None:
            request.thinking = self.thinking
        if self.thinking_budget is not None:
            request.thinking_budget = self.thinking_budget
        return request


def stream_reply(stub, session: ChatSession, sampling, max_tokens: int, out=None,
                 timeout: float | None = None) -> ReplyStats:
    """Send the conversation, write the reply to `out` as it streams and return its stats.
    The history is not changed (see ChatSession.add_reply). Ctrl-C cancels the gRPC call and
    raises ReplyCancelled; a failed call raises grpc.RpcError."""
    out = out or sys.stdout
    call = stub.Generate(session.request(sampling, max_tokens), timeout=timeout)
    text = []

    def show(token):
        if token.text:
            text.append(token.text)
            out.write(token.text)
            out.flush()

    try:
        reply = read_reply(call, show)
    except KeyboardInterrupt:
        call.cancel()
        raise ReplyCancelled("".join(text)) from None
    done = reply.done
    return ReplyStats(reply.text, done.prompt_tokens, done.completion_tokens, done.cached_tokens,
                      done.finish_reason, done.ttft_s, done.decode_s)


def rpc_error_line(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{code.name if code else 'error'}: {details}"


class _LineTracker:
    """A text stream that remembers whether its output ends at the start of a line."""

    def __init__(self, file):
        self.file, self.at_line_start = file, True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()

    def isatty(self) -> bool:
        return getattr(self.file, "isatty", lambda: False)()

    def end_line(self) -> None:
        if not self.at_line_start:
            self.write("\n")


def run_repl(stub, sampling, max_tokens: int, input_fn=input, out=None, show_map=None,
             session: ChatSession | None = None, timeout: float | None = None) -> ChatSession:
    """Read lines until /quit or EOF; returns the session. `show_map()` prints the memory map."""
    out = _LineTracker(out or sys.stdout)
    console = Console(file=out, highlight=False, soft_wrap=True)
    session = session or ChatSession()

    def note(message: str, style: str = "dim"):
        out.end_line()
        console.print(f"[{style}]{escape(message)}[/]")

    note(f"chatting with the cluster; thinking {session.thinking_label()}; /help for commands, Ctrl-D to leave")
    while True:
        try:
            line = input_fn(PROMPT)
        except EOFError:
            out.write("\n")
            out.flush()
            return session
        except KeyboardInterrupt:
            out.write("\n")
            note("(Ctrl-D or /quit to leave)")
            continue
        out.at_line_start = True  # the user's Enter ended the prompt's line
        command = session.handle(line)
        if command.kind == "quit":
            return session
        if command.kind == "empty":
            continue
        if command.kind == "map":
            try:
                if show_map is None:
                    note("no memory map here", "yellow")
                else:
                    show_map()
            except grpc.RpcError as e:
                note(f"error: {rpc_error_line(e)}", "bold red")
            except KeyboardInterrupt:
                note("cancelled", "yellow")
            continue
        if command.kind != "message":
            note(command.text, "yellow" if command.kind == "unknown" else "dim")
            continue
        try:
            stats = stream_reply(stub, session, sampling, max_tokens, out, timeout=timeout)
        except (ReplyCancelled, KeyboardInterrupt):  # KeyboardInterrupt: before the stream began
            session.drop_pending()
            note("reply cancelled", "yellow")
            continue
        except grpc.RpcError as e:
            session.drop_pending()
            note(f"error: {rpc_error_line(e)}", "bold red")
            continue
        session.add_reply(stats.text, stats)
        note(stats.line())


# ---- entry points -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The REPL's options beyond those `kimi-cluster chat` already has."""
    p.add_argument("--system", help="system message (default: the chat template's)")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--thinking", dest="thinking", action="store_const", const=True,
                       help="start with thinking on (toggle with /think)")
    think.add_argument("--no-thinking", dest="thinking", action="store_const", const=False,
                       help="start with thinking off")
    p.add_argument("--thinking-budget", metavar="N", type=_budget,
                   help="a reply thinks at most N tokens: then </think> is its next one, and it answers")
    p.add_argument("--json-schema", metavar="FILE", type=json_file,
                   help="a JSON schema every reply must match (after the thinking); the cluster refuses one it "
                        "cannot enforce, naming the keyword")
    p.add_argument("--tools", metavar="FILE", type=json_file,
                   help="tools the model may call (OpenAI's list of {\"type\": \"function\", ...}); each call's "
                        "arguments are held to its schema and shown as they arrive")


def _budget(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"the thinking budget is a number of tokens (0 or more), not {text!r}")
    return int(text)


def json_file(path: str) -> str:
    """The JSON text of `path`, checked to parse (argparse reports the error)."""
    try:
        text = Path(path).read_text()
        json.loads(text)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{path}: {e}") from e
    return text


def response_format(args) -> str:
    """GenerateRequest.response_format_json for --json-schema (empty: free text)."""
    if not args.json_schema:
        return ""
    return json.dumps({"type": "json_schema", "json_schema": {"name": "cli", "schema": json.loads(args.json_schema)}})


def session_from_args(args) -> ChatSession:
    """A conversation with the settings `kimi-cluster chat`'s flags give (REPL and --prompt alike)."""
    return ChatSession(system=args.system, thinking=args.thinking, response_format=response_format(args),
                       tools=args.tools or "", thinking_budget=args.thinking_budget)


def run_from_args(args, stub, sampling) -> None:
    """Run the REPL for parsed `kimi-cluster chat` arguments against a connected coordinator."""
    from .generated import kimi_cluster_pb2 as pb

    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    console = Console(soft_wrap=True)

    def show_map():
        print_map(map_json(stub.MemoryMap(pb.MemoryMapRequest(), timeout=30)), console)

    session = session_from_args(args)
    # Ctrl-C cancels a reply even when this process was started with SIGINT ignored (a shell's
    # background job without job control passes it on so, and Python then keeps it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_repl(stub, sampling, args.max_tokens, show_map=show_map, session=session, timeout=args.timeout)
