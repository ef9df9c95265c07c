"""Unit tests (no cluster) for how a reply's tokens become OpenAI's fields: ReplyParser
(reasoning / content / tool calls, with the tiny checkpoint's real tokenizer) and
StopMatcher (stop strings over text that arrives in pieces)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cluster.reply import RawText, ReplyParser, StopMatcher, ToolCall, prompt_ends_thinking
from mlx_kimi.kimi_tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def special(tok, text: str) -> int:
    token = tok.convert_tokens_to_ids(text)
    assert isinstance(token, int) and token >= 0 and tok.convert_ids_to_tokens(token) == text
    return token


def ids(tok, text: str) -> list:
    """Token ids of plain text (the tiny vocabulary spends about a token per character)."""
    out = tok.encode(text, add_special_tokens=False)
    assert tok.decode(out) == text
    return out


def feed_all(parser: ReplyParser, tokens: list) -> tuple:
    """Feed every token, then finish: (reasoning, content, tool calls, the deltas in order)."""
    deltas = [parser.feed(t) for t in tokens] + [parser.finish()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls]
    return reasoning, content, calls, deltas


def call_tokens(tok, name: str, index: int, arguments: str) -> list:
    return ([special(tok, "<|tool_call_begin|>")] + ids(tok, f"functions.{name}:{index}")
            + [special(tok, "<|tool_call_argument_begin|>")] + ids(tok, arguments)
            + [special(tok, "<|tool_call_end|>")])


def section(tok, *calls: list) -> list:
    return ([special(tok, "<|tool_calls_section_begin|>")] + [t for c in calls for t in c]
            + [special(tok, "<|tool_calls_section_end|>")])


# ---- reasoning and content ------------------------------------------------------------------------


def test_prompt_ends_thinking_follows_the_template(tok):
    messages = [{"role": "user", "content": "Hi"}]
    on = tok.apply_chat_template(messages, add_generation_prompt=True)
    off = tok.apply_chat_template(messages, add_generation_prompt=True, thinking=False)
    assert on[-1] == special(tok, "<think>") and off[-1] == special(tok, "</think>")
    assert prompt_ends_thinking(tok, on) is True
    assert prompt_ends_thinking(tok, off) is False
    assert prompt_ends_thinking(tok, []) is False


def test_thinking_reply_splits_at_think_end(tok):
    tokens = ids(tok, "Let me think.") + [special(tok, "</think>")] + ids(tok, "The answer is 4.")
    reasoning, content, calls, deltas = feed_all(ReplyParser(tok, thinking=True), tokens)
    assert (reasoning, content, calls) == ("Let me think.", "The answer is 4.", [])
    # nothing crosses the boundary: every delta is one kind
    assert all(not (d.reasoning and d.content) for d in deltas)
    end = tokens.index(special(tok, "</think>"))
    assert all(not d.content for d in deltas[:end]) and all(not d.reasoning for d in deltas[end + 1:])


def test_thinking_reply_without_think_end_is_all_reasoning(tok):
    reasoning, content, calls, _ = feed_all(ReplyParser(tok, thinking=True), ids(tok, "still thinking"))
    assert (reasoning, content, calls) == ("still thinking", "", [])


def test_reply_without_thinking_is_content(tok):
    reasoning, content, calls, _ = feed_all(ReplyParser(tok, thinking=False), ids(tok, "Plain answer."))
    assert (reasoning, content, calls) == ("", "Plain answer.", [])


def test_reply_without_thinking_that_thinks_anyway(tok):
    tokens = [special(tok, "<think>")] + ids(tok, "hmm") + [special(tok, "</think>")] + ids(tok, "Done.")
    reasoning, content, calls, _ = feed_all(ReplyParser(tok, thinking=False), tokens)
    assert (reasoning, content, calls) == ("hmm", "Done.", [])


@pytest.mark.parametrize("thinking", [True, False])
def test_multibyte_text_split_over_tokens_reassembles(tok, thinking):
    text = "Grüße, 日本語 — ok ✓ 🙂"
    tokens = ids(tok, text)
    assert len(tokens) > len(text), "the test needs characters whose bytes span several tokens"
    reasoning, content, calls, deltas = feed_all(ReplyParser(tok, thinking=thinking), tokens)
    assert (reasoning if thinking else content) == text
    assert (content if thinking else reasoning) == "" and calls == []
    # no delta ever carries half a character
    assert not any("\ufffd" in d.reasoning + d.content for d in deltas)


@pytest.mark.parametrize("text", [" Paris, France", "Paris", "  two spaces", " Grüße 🙂", "a\x00b\x00", " "])
def test_raw_text_is_the_tokens_decoded_leading_space_included(tok, text):
    """A raw completion continues its prompt: its text is exactly the tokens decoded (mlx-lm's BPE
    streaming detokenizer alone drops a leading space, a reply of one space, and gives a NUL byte as
    "Ā"), and no delta carries half a character."""
    parser = RawText(tok)
    deltas = [parser.feed(t) for t in ids(tok, text)] + [parser.finish()]
    assert "".join(d.content for d in deltas) == text
    assert not any("\ufffd" in d.content for d in deltas)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_raw_ids_stream_exactly_their_decoding(tok, data):
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), min_size=1, max_size=10))
    parser = RawText(tok)
    assert "".join(parser.feed(t).content for t in ids) + parser.finish().content == tok.decode(ids)


def test_a_nul_byte_is_text_in_reasoning_and_content(tok):
    tokens = ids(tok, "x\x00") + [special(tok, "</think>")] + ids(tok, "\x00y")
    reasoning, content, _, _ = feed_all(ReplyParser(tok, thinking=True), tokens)
    assert (reasoning, content) == ("x\x00", "\x00y")


def test_multibyte_text_on_both_sides_of_think_end(tok):
    tokens = ids(tok, "Überlegung…") + [special(tok, "</think>")] + ids(tok, "答え: 42 €")
    reasoning, content, _, _ = feed_all(ReplyParser(tok, thinking=True), tokens)
    assert (reasoning, content) == ("Überlegung…", "答え: 42 €")


# ---- tool calls -----------------------------------------------------------------------------------


def test_one_tool_call(tok):
    args = {"city": "Paris", "units": {"temp": "C"}, "days": [1, 2]}
    tokens = (ids(tok, "Let me check.") + section(tok, call_tokens(tok, "get_weather", 0, json.dumps(args)))
              + ids(tok, "ok"))
    parser = ReplyParser(tok, thinking=False)
    reasoning, content, calls, deltas = feed_all(parser, tokens)
    assert content == "Let me check.ok" and reasoning == ""
    assert [(c.id, c.name) for c in calls] == [("functions.get_weather:0", "get_weather")]
    assert isinstance(calls[0].arguments, str) and json.loads(calls[0].arguments) == args
    assert parser.tool_calls == calls
    # the call arrives whole, with the section's end token, and no section text leaks into content
    end = tokens.index(special(tok, "<|tool_calls_section_end|>"))
    assert deltas[end].tool_calls == calls
    assert all(not d.tool_calls for i, d in enumerate(deltas) if i != end)


def test_two_tool_calls_after_reasoning(tok):
    weather, clock = {"city": "Zürich"}, {"tz": "UTC", "24h": True}
    tokens = (ids(tok, "need tools") + [special(tok, "</think>")]
              + section(tok, call_tokens(tok, "get_weather", 0, json.dumps(weather, ensure_ascii=False)),
                        call_tokens(tok, "get_time", 1, json.dumps(clock))))
    parser = ReplyParser(tok, thinking=True)
    reasoning, content, calls, _ = feed_all(parser, tokens)
    assert (reasoning, content) == ("need tools", "")
    assert [c.id for c in calls] == ["functions.get_weather:0", "functions.get_time:1"]
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.arguments) for c in calls] == [weather, clock]
    assert all(isinstance(c, ToolCall) for c in calls) and parser.tool_calls == calls


def test_unclosed_tool_section_is_parsed_at_finish(tok):
    tokens = section(tok, call_tokens(tok, "get_weather", 0, '{"city": "Oslo"}'))[:-1]  # no section end
    parser = ReplyParser(tok, thinking=False)
    assert all(not parser.feed(t) for t in tokens)  # everything is held until the reply ends
    tail = parser.finish()
    assert [(c.id, c.name, json.loads(c.arguments)) for c in tail.tool_calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "Oslo"})]


def test_a_call_cut_inside_its_arguments_is_no_call(tok):
    """max_tokens ended the reply in the second call's arguments: the first call stands, the second is
    not reported (it has no end, and a name mlx-lm's parser would read with the begin marker in it)."""
    done = call_tokens(tok, "get_weather", 0, '{"city": "Oslo"}')
    cut = call_tokens(tok, "get_time", 1, '{"tz": "UTC"}')[:-4]
    for calls, want in (([done, cut], [("functions.get_weather:0", "get_weather")]), ([cut], [])):
        parser = ReplyParser(tok, thinking=False)
        _, content, got, _ = feed_all(parser, section(tok, *calls)[:-1])  # no section end: the reply was cut
        assert ([(c.id, c.name) for c in got], content) == (want, "")


@pytest.mark.parametrize("body", [
    "not a tool call at all",
    "functions.get_weather:0 {\"city\": \"Paris\"}",  # no call/argument markers
    "<|tool_call_begin|>functions.get_weather:0{\"city\": \"Paris\"}<|tool_call_end|>",  # no argument marker
    "<|tool_call_begin|>get_weather<|tool_call_argument_begin|>{}<|tool_call_end|>",  # no :IDX
])
def test_malformed_tool_section_gives_no_calls(tok, body):
    tokens = ids(tok, "a") + section(tok, tok.encode(body, add_special_tokens=False)) + ids(tok, "b")
    parser = ReplyParser(tok, thinking=False)
    reasoning, content, calls, _ = feed_all(parser, tokens)
    assert calls == [] and parser.tool_calls == []
    assert (reasoning, content) == ("", "ab")  # the section's text never shows up as content


# ---- stop strings ---------------------------------------------------------------------------------


def run_stops(stops: list, pieces: list) -> tuple:
    matcher = StopMatcher(stops)
    out = [matcher.push(p) for p in pieces]
    out.append(matcher.flush())
    return "".join(out), matcher.stopped, out


def test_no_stops_passes_text_through_at_once():
    matcher = StopMatcher([])
    assert [matcher.push(p) for p in ("ab", "", "c d")] == ["ab", "", "c d"]
    assert matcher.flush() == "" and not matcher.stopped


def test_stop_across_chunk_boundaries():
    text, stopped, out = run_stops(["STOP"], ["abcST", "O", "Pxyz", "more"])
    assert (text, stopped) == ("abc", True)
    assert out[-2:] == ["", ""]  # after the stop nothing more comes out, flush included


@pytest.mark.parametrize("text", ["hello world STOP tail", "STOP at the start", "ends with STOP", "SSTOPSTOP"])
def test_stop_under_every_split(text):
    """Cutting the text into 1, 2 or 3 pieces anywhere never changes where it stops."""
    expected = text[:text.index("STOP")]
    n = len(text)
    splits = [[text]] + [[text[:i], text[i:]] for i in range(n + 1)]
    splits += [[text[:i], text[i:j], text[j:]] for i in range(n + 1) for j in range(i, n + 1)]
    for pieces in splits:
        assert run_stops(["STOP"], pieces)[:2] == (expected, True), pieces


def test_partial_stop_is_held_back_then_released_at_flush():
    matcher = StopMatcher(["END"])
    assert matcher.push("hello E") == "hello"  # the last len("END") - 1 characters wait
    assert matcher.push("N") == " "            # "EN" could still become "END"
    assert matcher.flush() == "EN" and not matcher.stopped
    assert matcher.flush() == ""


def test_stop_arriving_one_character_at_a_time():
    """Pieces shorter than the held-back window: nothing may leak before the stop is whole
    (regression: a negative slice used to release the start of the stop string)."""
    matcher = StopMatcher(["STOP"])
    assert [matcher.push(c) for c in "STOP"] == ["", "", "", ""]
    assert matcher.stopped and matcher.flush() == ""
    assert run_stops(["STOP"], ["x", "S", "T", "OP!"])[:2] == ("x", True)


def test_held_text_is_released_once_it_cannot_be_a_stop():
    matcher = StopMatcher(["END"])
    out = matcher.push("abcdef")
    out += matcher.push("ghi")
    assert "abcdefghi".startswith(out) and len(out) >= len("abcdefghi") - 2
    assert out + matcher.flush() == "abcdefghi"


def test_earliest_of_several_stops_wins():
    assert run_stops(["xyz", "b"], ["abcxyz"])[:2] == ("a", True)
    assert run_stops(["st", "longer stop"], ["a longer stop"])[:2] == ("a ", True)  # by position, not order
    assert run_stops(["q", "zz"], ["no match here"])[:2] == ("no match here", False)
