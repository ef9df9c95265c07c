"""mlx_kimi.kimi_tokenizer against an independent reference of Moonshot's tokenizer.

The reference is written here from the description in kimi-facts.md, sharing no code with the
project: the split pattern compiled by the `regex` module (V1, which has the `&&` set operations),
tiktoken's byte-pair merge in pure Python, the special-token rule, the long-input cuts, and a chat
template rendered by jinja2 as transformers renders it. Both read the tiny tiktoken files the
project writes in the real format. Over 2,000 generated strings, Hypothesis-drawn strings and 50+
chat transcripts, the ids must be equal.
"""

import base64
import itertools
import json
import random

import jinja2.ext
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlx_kimi.kimi_tokenizer import load_tokenizer
from mlx_kimi.tokenizer import write_tiktoken_tokenizer

VOCAB = 1024

# ---- the reference ---------------------------------------------------------------------------------

FACTS_SPLIT = regex.compile("|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
]), regex.V1)


class Reference:
    def __init__(self, path):
        self.ranks = {}
        for line in (path / "tiktoken.model").read_text().splitlines():
            token, rank = line.split(" ")
            self.ranks[base64.b64decode(token)] = int(rank)
        base = len(self.ranks)
        names = {int(k): v["content"] for k, v in
                 json.loads((path / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
        self.specials = {names.get(i, "<|reserved_token_%d|>" % i): i for i in range(base, base + 256 + 2)}
        longest_first = sorted(self.specials, key=len, reverse=True)
        self.special_re = regex.compile("|".join(regex.escape(s) for s in longest_first))

    def encode(self, text: str) -> list:
        ids, at = [], 0
        for m in self.special_re.finditer(text):
            ids += self.ordinary(text[at:m.start()]) + [self.specials[m.group()]]
            at = m.end()
        return ids + self.ordinary(text[at:])

    def ordinary(self, text: str) -> list:
        ids = []
        for chunk in (text[i:i + 400_000] for i in range(0, len(text), 400_000)):
            cuts, at = [0], 0
            for _, run in itertools.groupby(chunk, key=str.isspace):
                n = len(list(run))
                cuts += range(at + 25_000, at + n, 25_000)
                at += n
            for a, b in zip(cuts, cuts[1:] + [len(chunk)]):
                for word in FACTS_SPLIT.findall(chunk[a:b]):
                    ids += self.bpe(word.encode())
        return ids

    def bpe(self, word: bytes) -> list:
        if word in self.ranks:
            return [self.ranks[word]]
        parts = [word[i:i + 1] for i in range(len(word))]
        while True:
            ranked = [(self.ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            ranked = [r for r in ranked if r[0] is not None]
            if not ranked:
                return [self.ranks[p] for p in parts]
            _, i = min(ranked)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]


def reference_chat(path, messages, tools, **template_vars) -> str:
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def sort_deep(x):
        if isinstance(x, dict):
            return {k: sort_deep(x[k]) for k in sorted(x)}
        return [sort_deep(v) for v in x] if isinstance(x, list) else x

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    template = env.from_string((path / "chat_template.jinja").read_text())
    return template.render(messages=messages, tools=sort_deep(tools) if tools else None, documents=None,
                           add_generation_prompt=True, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                           unk_token="[UNK]", **template_vars)


@pytest.fixture(scope="module")
def tik_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiktoken-ref")
    write_tiktoken_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="module")
def tok(tik_dir):
    return load_tokenizer(tik_dir)


@pytest.fixture(scope="module")
def ref(tik_dir):
    return Reference(tik_dir)


# ---- generated strings -------------------------------------------------------------------------------

FRAGMENTS = {
    "english": ["The quick brown fox", "hello", "world", "it's", "they'RE", "we'll", "I'M", "don't", "you'Ve",
                "Shouldn'T", "o'clock", "rock'n'roll", "a", "I", "cafe"],
    "cased": ["HelloWorld", "getHTTPResponse", "XMLHttpRequest", "iPhone", "CamelCaseWord", "ALLCAPS", "McDonald's",
              "snake_case_name", "ǅungla", "ǈubav", "ʰello", "ᴬᴮ", "DŽEMAL", "ΣΊΣΥΦΟΣ", "İstanbul", "straße", "ﬁne"],
    "chinese": ["你好", "世界", "中文English混排test测试123", "今天天气很好", "月之暗面", "我是Kimi", "人工智能", "《红楼梦》",
                "第123章", "请问", "漢字", "〇", "𠀀𠀁", "一二三"],
    "other": ["日本語のテキストです", "カタカナ", "한국어 텍스트", "Русский текст", "Ελληνικά", "עברית", "العربية", "ไทย",
              "हिन्दी", "naïve", "café", "e\u0301", "\u0301x", "a\u0308\u0304", "ḁ", "Ꭰ", "ᚠᛇᚻ"],
    "emoji": ["🚀", "👍🏽", "👨\u200d👩\u200d👧", "❤️", "🇫🇷", "😀😀", "🤖", "✅", "🎉🎉🎉", "#️⃣"],
    "numbers": ["1", "12", "123", "1234", "12345678", "3.14159", "٣٤٥", "½", "Ⅻ", "2026-11-27", "0x1A2B", "1e-6",
                "①②", "１２３"],
    "space": [" ", "  ", "\n", "\r\n", "\t", "   \n\n  ", "\u00a0", "\u3000", "\n\n\n", " \t ", "\r", "\x0b", "\x1c",
              "\u2028", "    "],
    "code": ["def f(x):", "    return {'a': x ** 2}", "if (x > 0 && y < 10) {", 'print(f"{i}")', '<div class="x">',
             "$ pip install -e '.[test]'", "// comment", "#!/bin/bash", "x=[1,2,3];", "a->b", "::", "...", "@@ -1,2 +1 @@"],
    "special": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<think>", "</think>", "[EOS]", "[BOS]",
                "<|reserved_token_800|>", "<|reserved_token_1025|>", "<|reserved_token_1026|>", "<|im_end",
                "<think", "<|tool_call_begin|>", "<|im_middle|>", "[PAD]", "<|reserved_token_5|>"],
    "punct": [".", ",", "!", "?", "...", "——", "。", "，", "！", "'s", "'", '"', "(", ")", "«»", "'S", "''"],
}
SEPARATORS = ["", "", " ", " ", "  ", "\n", "\t", " \n"]


def generated_strings(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    kinds = sorted(FRAGMENTS)
    out = []
    for _ in range(n):
        parts = [rng.choice(FRAGMENTS[rng.choice(kinds)]) for _ in range(rng.randint(1, 12))]
        out.append("".join(p + rng.choice(SEPARATORS) for p in parts))
    return out


EDGE_CASES = ["", " ", "a", "\n", "  \n", "x  ", "  x", "你", " 你好", "Hello 你好 World", "A 中文", "ABCdef", "abcDEF",
              "1234567", "a1b2c3", "'s", "x's's", "\r\n\r\n", "<|im_end|><|im_end|>", "<<|im_end|>>"]


def test_two_thousand_strings_equal_the_reference(tok, ref):
    strings = EDGE_CASES + generated_strings(2_400)
    assert len(set(strings)) >= 2_000
    for text in strings:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.sampled_from(sum(FRAGMENTS.values(), [])), st.text(max_size=8)), max_size=10))
def test_drawn_strings_equal_the_reference(tok, ref, parts):
    text = "".join(parts)
    assert tok.encode(text) == ref.encode(text)


@pytest.mark.parametrize("text", [
    "1234567890" * 3_000 + " tail",  # 30,000 non-whitespace characters: cut after 25,000
    "ab 你好 " * 70_000,  # 420,000 characters: cut at 400,000
])
def test_long_inputs_are_cut_as_kimi_cuts_them(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert ids != tok.encoding.encode(text)  # the cuts matter for this text


# ---- chat transcripts ----------------------------------------------------------------------------------

def random_tools(rng) -> list:
    tools = []
    for name in rng.sample(["get_weather", "search", "run_code", "计算", "send_mail"], rng.randint(1, 3)):
        props = {key: {"type": rng.choice(["string", "number"]), "description": rng.choice(FRAGMENTS["chinese"])}
                 for key in rng.sample(["zeta", "city", "alpha", "query", "Unit", "_x"], rng.randint(1, 4))}
        tools.append({"type": "function", "function": {
            "parameters": {"type": "object", "required": sorted(props)[:1], "properties": props},
            "name": name, "description": " ".join(generated_strings(1, rng.random()))}})
    return tools


def random_chat(rng) -> tuple:
    text = lambda: generated_strings(1, rng.random())[0]  # noqa: E731
    messages = [{"role": "system", "content": text()}] if rng.random() < 0.6 else []
    calls = 0
    for _ in range(rng.randint(1, 4)):
        content = text() if rng.random() < 0.8 else [{"type": "text", "text": text()}, {"type": "text", "text": text()}]
        messages.append({"role": "user", "content": content})
        reply = {"role": "assistant", "content": text()}
        if rng.random() < 0.5:
            reply["reasoning_content"] = text()
        if rng.random() < 0.5:
            reply["tool_calls"] = []
            for _ in range(rng.randint(1, 2)):
                args = {"city": text(), "b": [1, 2], "a": {"y": 1, "x": "中"}}
                reply["tool_calls"].append({"id": f"functions.get_weather:{calls}", "type": "function", "function": {
                    "name": "get_weather", "arguments": json.dumps(args, ensure_ascii=False) if calls % 2 else args}})
                calls += 1
        messages.append(reply)
        for call in reply.get("tool_calls", []):
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": text()})
    messages.append({"role": "user", "content": text()})
    tools = random_tools(rng) if rng.random() < 0.7 else None
    thinking = rng.choice([{}, {"thinking": True}, {"thinking": False}])
    return messages, tools, thinking


def test_chat_transcripts_equal_the_reference(tok, ref, tik_dir):
    rng = random.Random(7)
    chats = [random_chat(rng) for _ in range(60)]
    assert sum(bool(t) for _, t, _ in chats) >= 20 and sum("reasoning_content" in str(m) for m, _, _ in chats) >= 20
    for messages, tools, thinking in chats:
        expected = ref.encode(reference_chat(tik_dir, messages, tools, **thinking))
        assert tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **thinking) == expected


# ---- the risk is real ------------------------------------------------------------------------------------


def test_transformers_generic_conversion_gives_other_ids(tok, tik_dir, monkeypatch):
    """transformers' generic tiktoken conversion (what it builds without Kimi's code) splits with a
    cl100k-style pattern: on the same tiktoken.model it gives other ids than Kimi's tokenizer."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would cache the file by its path
    generic = TikTokenConverter(vocab_file=str(tik_dir / "tiktoken.model")).converted()
    texts = EDGE_CASES + generated_strings(300, seed=1)
    texts = [t for t in texts if not any(s in t for s in ("<|", "<think", "</think>", "[EOS]", "[BOS]", "[PAD]"))]
    differ = [t for t in texts if generic.encode(t, add_special_tokens=False).ids != tok.encode(t)]
    assert {" 你好", "Hello 你好 World", "A 中文"} <= set(differ)  # Chinese after a space
    assert len(differ) >= 10
