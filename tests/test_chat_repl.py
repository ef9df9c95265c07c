"""The interactive chat (cluster/chat.py): ChatSession unit tests, the REPL loop against a fake
stub (streaming, Ctrl-C, gRPC errors), and the real REPL in a subprocess against a 2-stage cluster
on loopback, checked against the mlx-lm oracle's tokenizer and greedy reply."""

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
import threading
import time

import grpc
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from cluster.chat import COMMANDS, ChatSession, ReplyStats, run_repl, split_thinking, stream_reply
from cluster.generated import kimi_cluster_pb2 as pb
from harness import LocalCluster

SYSTEM = "Be brief."
STATS = re.compile(r"(\d+) prompt tokens(?: \((\d+) cached\))?, (\d+) generated \((stop|length)\); "
                   r"TTFT \d+ ms, [\d.]+ tok/s")


# ---- ChatSession -----------------------------------------------------------------------------------


def test_commands_are_parsed():
    s = ChatSession()
    assert s.handle("/quit").kind == "quit"
    assert s.handle("/exit").kind == "quit"
    assert s.handle("  /map  ").kind == "map"
    help_ = s.handle("/help")
    assert help_.kind == "help" and all(name in help_.text for name in COMMANDS)
    unknown = s.handle("/frobnicate now")
    assert unknown.kind == "unknown"
    assert "/frobnicate" in unknown.text and all(name in unknown.text for name in COMMANDS)
    assert s.handle("").kind == "empty" and s.handle("   ").kind == "empty"
    assert s.messages == [], "commands are not messages"
    msg = s.handle("  Hi there!  ")
    assert (msg.kind, msg.text) == ("message", "Hi there!")
    assert s.messages == [{"role": "user", "content": "Hi there!"}]


def test_think_toggles_and_reports():
    s = ChatSession()
    assert s.thinking is None
    states = []
    for _ in range(3):
        c = s.handle("/think")
        assert c.kind == "think"
        states.append((s.thinking, c.text))
    assert states == [(False, "thinking off"), (True, "thinking on"), (False, "thinking off")]
    on = ChatSession(thinking=True)
    on.handle("/think")
    assert on.thinking is False
    assert on.messages == []


def test_thinking_goes_into_the_request_only_when_set():
    s = ChatSession(system=SYSTEM)
    s.handle("Hi!")
    sampling = pb.SamplingParams(temperature=0.5)
    r = s.request(sampling, 8)
    assert not r.HasField("thinking")
    assert json.loads(r.messages_json) == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}]
    assert r.max_tokens == 8 and r.sampling.temperature == 0.5
    s.handle("/think")
    r = s.request(sampling, 8)
    assert r.HasField("thinking") and r.thinking is False
    s.handle("/think")
    assert s.request(sampling, 8).thinking is True


def test_history_after_replies_splits_thinking():
    assert split_thinking("plan it</think>The answer.") == ("plan it", "The answer.")
    assert split_thinking("<think>plan</think>ok") == ("plan", "ok")
    assert split_thinking("no thinking here") == ("", "no thinking here")
    assert split_thinking("</think>") == ("", "")
    s = ChatSession()
    s.handle("Hi!")
    s.add_reply("The user greets me.</think>Hello!")
    s.handle("Again")
    s.add_reply("Hello again!")
    assert s.messages == [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Hello again!"},
    ]


def test_reset_clears_history_but_keeps_system_and_thinking():
    s = ChatSession(system=SYSTEM)
    s.handle("/think")
    s.handle("Hi!")
    s.add_reply("Hello!", ReplyStats("Hello!", 10, 2, 0, "stop", 0.1, 0.1))
    assert s.last_stats is not None
    c = s.handle("/reset")
    assert c.kind == "reset"
    assert s.messages == [{"role": "system", "content": SYSTEM}]
    assert s.last_stats is None and s.thinking is False
    plain = ChatSession()
    plain.handle("Hi!")
    plain.add_reply("Hello!")
    assert plain.handle("/reset").kind == "reset" and plain.messages == []


def test_drop_pending_takes_back_only_an_unanswered_message():
    s = ChatSession()
    s.handle("Hi!")
    s.add_reply("Hello!")
    s.drop_pending()
    assert len(s.messages) == 2
    s.handle("Again")
    s.drop_pending()
    assert [m["content"] for m in s.messages] == ["Hi!", "Hello!"]


# ---- the REPL loop against a fake coordinator ------------------------------------------------------


class FakeError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "cluster is degraded: node peer1 is lost"


class FakeCall:
    """What stub.Generate returns: an iterator of events with cancel()."""

    def __init__(self, events):
        self.events, self.cancelled = iter(events), False

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.events)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


def token(text, i=1):
    return pb.GenerateEvent(token=pb.TokenEvent(id=i, text=text))


def done(prompt=12, completion=3, finish="stop", cached=0):
    return pb.GenerateEvent(done=pb.DoneEvent(finish_reason=finish, prompt_tokens=prompt, completion_tokens=completion,
                                              cached_tokens=cached, ttft_s=0.25, decode_s=0.5))


class FakeStub:
    def __init__(self, replies):
        self.replies, self.requests, self.calls = list(replies), [], []

    def Generate(self, request, timeout=None):
        self.requests.append(request)
        self.calls.append(FakeCall(self.replies.pop(0)))
        return self.calls[-1]


def lines(*items):
    it = iter(items)

    def input_fn(prompt):
        item = next(it, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    return input_fn


def test_stream_reply_writes_tokens_and_returns_stats():
    stub, out = FakeStub([[token("Hel"), token(""), token("lo"), token("!", -1), done(completion=4)]]), io.StringIO()
    s = ChatSession(thinking=False)
    s.handle("Hi!")
    stats = stream_reply(stub, s, pb.SamplingParams(), 8, out)
    assert out.getvalue() == "Hello!"
    assert (stats.text, stats.prompt_tokens, stats.completion_tokens, stats.finish_reason) == ("Hello!", 12, 4, "stop")
    assert stats.decode_tok_s == pytest.approx(3 / 0.5)
    assert stats.line() == "12 prompt tokens, 4 generated (stop); TTFT 250 ms, 6.0 tok/s"
    assert stub.requests[0].thinking is False and stub.requests[0].max_tokens == 8
    assert len(s.messages) == 1, "stream_reply leaves the history to the caller"


def test_repl_keeps_history_survives_ctrl_c_and_errors():
    shown = []
    stub = FakeStub([
        [token("thinking"), token("</think>"), token("Hello!"), done(completion=3)],
        [token("a long"), KeyboardInterrupt()],       # Ctrl-C mid-reply
        [FakeError()],                                  # the cluster is degraded
        [token("Sure."), done(prompt=30, completion=2, cached=20)],
    ])
    out = io.StringIO()
    session = run_repl(stub, pb.SamplingParams(), 8, lines("Hi!", "Tell me a story", "/map", "/nope", "Still there?",
                                                           KeyboardInterrupt(), "Again", "/quit", "never read"),
                       out=out, show_map=lambda: shown.append(1))
    text = out.getvalue()
    assert stub.calls[1].cancelled and "reply cancelled" in text
    assert "UNAVAILABLE: cluster is degraded: node peer1 is lost" in text
    assert "unknown command /nope" in text and shown == [1]
    assert STATS.findall(text) == [("12", "", "3", "stop"), ("30", "20", "2", "stop")]
    assert session.messages == [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "thinking"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Sure."},
    ]
    # what each request carried: the cancelled and the failed turns were taken back
    sent = [[m["content"] for m in json.loads(r.messages_json)] for r in stub.requests]
    assert sent == [["Hi!"], ["Hi!", "Hello!", "Tell me a story"], ["Hi!", "Hello!", "Still there?"],
                    ["Hi!", "Hello!", "Again"]]
    assert session.last_stats.completion_tokens == 2


def test_repl_leaves_on_eof():
    out = io.StringIO()
    session = run_repl(FakeStub([]), pb.SamplingParams(), 8, lines("/think"), out=out)
    assert session.thinking is False and "thinking off" in out.getvalue()


# ---- the real REPL against a real cluster -----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory, tiny_dir):
    with LocalCluster(tmp_path_factory.mktemp("chat2"), tiny_dir, stages=2) as cluster:
        yield cluster


def repl_command(cluster, *extra):
    return [str(Path(sys.executable).parent / "kimi-cluster"), "chat",
            "--coordinator", cluster.coordinator.address, "--system", SYSTEM, *extra]


def greedy_text(oracle, messages, max_tokens, **template) -> str:
    model, tokenizer = oracle
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template)
    ids = []
    for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        if int(t) in tokenizer.eos_token_ids:
            break
        ids.append(int(t))
    return tokenizer.decode(ids)


def test_repl_end_to_end(cluster2, oracle):
    tokenizer = oracle[1]
    stdin = "Hi!\n/think\nAgain\n/map\n/reset\n/think\nHi!\n/bogus\n/quit\n"
    proc = subprocess.run(repl_command(cluster2, "--max-tokens", "8"), input=stdin, capture_output=True,
                          text=True, env=cluster2.env, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    stats = STATS.findall(proc.stdout)
    assert len(stats) == 3, output
    prompt_tokens = [int(s[0]) for s in stats]
    assert all(s[2] == "8" for s in stats), stats  # the tiny model rambles past 8 tokens
    assert prompt_tokens[1] > prompt_tokens[0], "the second turn carries the first one"
    assert prompt_tokens[2] == prompt_tokens[0], "after /reset (and thinking back on) the prompt starts over"
    assert "thinking off" in proc.stdout and "thinking on" in proc.stdout
    assert "conversation cleared" in proc.stdout and "unknown command /bogus" in proc.stdout
    for node in cluster2.nodes:
        assert node.name in proc.stdout, f"map lacks {node.name}:\n{output}"
    assert "Traceback" not in output

    # exact prompt lengths: the coordinator templated exactly the history the REPL kept
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}]
    assert prompt_tokens[0] == len(tokenizer.apply_chat_template(first, add_generation_prompt=True))
    reply = greedy_text(oracle, first, 8)
    assert reply in proc.stdout
    history = ChatSession(system=SYSTEM)
    history.handle("Hi!")
    history.add_reply(reply)
    history.handle("Again")
    assert prompt_tokens[1] == len(tokenizer.apply_chat_template(history.messages, add_generation_prompt=True,
                                                                 thinking=False))
    assert greedy_text(oracle, history.messages, 8, thinking=False) in proc.stdout
    # the reused caches: the second turn prefilled only what followed the first turn
    assert int(stats[1][1] or 0) > 0


def test_ctrl_c_cancels_a_reply_and_the_repl_goes_on(cluster2):
    proc = subprocess.Popen(repl_command(cluster2, "--max-tokens", "2000"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=cluster2.env)
    chunks, lock = [], threading.Lock()

    def pump():
        while data := os.read(proc.stdout.fileno(), 4096):
            with lock:
                chunks.append(data)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def output():
        with lock:
            return b"".join(chunks).decode(errors="replace")

    def wait_for(predicate, what, timeout=60):
        deadline = time.monotonic() + timeout
        while not predicate(output()):
            assert proc.poll() is None and time.monotonic() < deadline, f"no {what}; output:\n{output()}"
            time.sleep(0.05)  # pacing between looks at the output; the text is what we wait on

    try:
        wait_for(lambda o: "you> " in o, "prompt")
        proc.stdin.write(b"Hi!\n")
        proc.stdin.flush()
        # the reply is streaming: text after the prompt (2000 tokens would take minutes)
        wait_for(lambda o: len(o.split("you> ", 1)[1]) > 8, "reply")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda o: "reply cancelled" in o and o.count("you> ") == 2, "cancel")
        proc.stdin.write(b"/map\n/quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0, output()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    text = output()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "coord" in text and "peer1" in text, text
    assert not STATS.search(text), "a cancelled reply has no stats"
