"""Streamed text of Kimi's tiktoken tokenizer: characters whose bytes are split across tokens come
out whole, and what streams out is exactly `decode(all ids)`: unit level (the detokenizer, the
reply parser behind the API) and end to end (CLI, API stream and non-stream on a 2-stage cluster
of a tiny checkpoint with Kimi's tokenizer files)."""

import json

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.utils import load_model

from cluster.reply import ReplyParser
from harness import ApiCluster, oracle_reply
from mlx_kimi.kimi_tokenizer import load_tokenizer
from mlx_kimi.tiny import TinyShape, make_tiny
from mlx_kimi.tokenizer import write_tiktoken_tokenizer

VOCAB = 1024
TEXT = "你好，世界！🚀🎉 naïve 月之暗面 👍🏽 𠀀 done"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiktoken-stream")
    write_tiktoken_tokenizer(path, VOCAB)
    return load_tokenizer(path)


def stream(tok, ids) -> list:
    """The segments a caller sees: last_segment after each token, then the finalized tail."""
    detokenizer = tok.detokenizer
    segments = []
    for t in ids:
        detokenizer.add_token(t)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    return segments + [detokenizer.last_segment]


def splits_characters(tok, ids) -> bool:
    return any(tok.token_bytes(t).decode(errors="replace") != tok.token_bytes(t).decode(errors="ignore")
               for t in ids)


def test_split_characters_stream_whole(tok):
    ids = tok.encode(TEXT)
    assert splits_characters(tok, ids)  # the vocabulary cuts some of these characters
    assert "".join(tok.decode([t]) for t in ids) != TEXT  # so token-by-token decoding would be wrong
    segments = stream(tok, ids)
    assert "".join(segments) == TEXT
    assert not any("\ufffd" in s for s in segments)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, VOCAB + 1), max_size=40))
def test_any_ids_stream_exactly_their_decoding(tok, ids):
    """Even ids that are not valid UTF-8 together: every prefix streamed is a prefix of the whole."""
    whole = tok.decode(ids)
    so_far = ""
    for segment in stream(tok, ids):
        so_far += segment
        assert whole.startswith(so_far)
    assert so_far == whole


def test_detokenizers_are_independent(tok):
    a, b = tok.detokenizer, tok.detokenizer
    ids = tok.encode("🚀")
    assert len(ids) > 1
    a.add_token(ids[0])
    for t in ids:
        b.add_token(t)
    b.finalize()
    assert b.text == "🚀" and a.text == ""


def test_reply_parser_splits_reasoning_and_content_exactly(tok):
    reasoning, content = "想一想🤖：先查天气", "答案：巴黎 24°C 🌞"
    ids = tok.encode(f"<think>{reasoning}</think>{content}")
    assert splits_characters(tok, ids)
    parser = ReplyParser(tok, thinking=False)
    got = {"reasoning": "", "content": ""}
    for delta in [*map(parser.feed, ids), parser.finish()]:
        got["reasoning"] += delta.reasoning
        got["content"] += delta.content
    assert got == {"reasoning": reasoning, "content": content}


# ---- end to end ---------------------------------------------------------------------------------------

API_KEY = "sk-stream"
PROMPT = "你好"  # this tiny model's greedy reply joins bytes of one character from two tokens


@pytest.fixture(scope="module")
def tiktoken_ckpt(tmp_path_factory):
    """The tiny checkpoint with Kimi's tokenizer files."""
    return make_tiny(tmp_path_factory.mktemp("tiktoken-ckpt") / "ckpt", TinyShape(layers=2, vocab_size=VOCAB),
                     tokenizer="tiktoken")


@pytest.fixture(scope="module")
def expected(tiktoken_ckpt):
    tokenizer = load_tokenizer(tiktoken_ckpt)
    model, _ = load_model(tiktoken_ckpt)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           thinking=False)
    ids = oracle_reply((model, tokenizer), prompt, 32)
    assert not set(ids) & {tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}
    text = tokenizer.decode(ids)
    assert "".join(tokenizer.decode([t]) for t in ids) != text  # a character's bytes span tokens
    return ids, text


def test_cli_and_api_stream_and_non_stream_equal_decoding_all_ids(tmp_path, tiktoken_ckpt, expected):
    ids, text = expected
    with ApiCluster(tmp_path, tiktoken_ckpt, stages=2,
                    coordinator_extra=["--api-port", "0", "--api-key", API_KEY, "--context", "512"]) as c:
        done = c.cli("chat", "--coordinator", c.coordinator.address, "--prompt", PROMPT, "--no-thinking",
                     "--max-tokens", "32", "--json")
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert (reply["token_ids"], reply["text"]) == (ids, text)

        with openai.OpenAI(base_url=c.api_url, api_key=API_KEY, max_retries=0, timeout=60) as client:
            args = dict(model=c.model_name, messages=[{"role": "user", "content": PROMPT}], max_tokens=32,
                        temperature=0, extra_body={"thinking": False})
            choice = client.chat.completions.create(logprobs=True, **args).choices[0]
            assert choice.message.content == text
            raw = b"".join(bytes(entry.bytes) for entry in choice.logprobs.content)
            assert raw.decode(errors="replace") == text  # each token's own bytes, joined
            chunks = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **args)
                      if ch.choices]
            assert "".join(chunks) == text
