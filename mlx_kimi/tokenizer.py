"""Small, deterministic Kimi tokenizers for tiny test checkpoints, in two layouts.

- `write_tokenizer`: a tokenizer.json (byte-level BPE) with Kimi's special tokens and chat
  template, which mlx-lm and transformers load as they are.
- `write_tiktoken_tokenizer`: the layout of the real checkpoints: tiktoken.model (tiktoken's BPE
  file), tokenizer_config.json naming TikTokenTokenizer and the special tokens at the real offsets
  after the base ranks, chat_template.jinja, generation_config.json and a stand-in
  tokenization_kimi.py. It is read by `mlx_kimi.kimi_tokenizer`, never by running that file.
"""

import base64
import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

KIMI_SPECIAL_TOKENS = [
    "[BOS]",
    "[EOS]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<think>",
    "</think>",
    "[PAD]",
]

# `thinking` is Kimi's own switch. mlx-lm's TokenizerWrapper always passes
# `enable_thinking` (True when the vocabulary has <think>), so that is honoured
# only when `thinking` is not given.
KIMI_CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}
{{- content -}}
{%- elif content is defined and content is not none -%}
{%- for part in content -%}
{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if thinking is defined -%}
{%- set think = thinking -%}
{%- elif enable_thinking is defined -%}
{%- set think = enable_thinking -%}
{%- else -%}
{%- set think = true -%}
{%- endif -%}
{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- if not messages or messages[0].role != 'system' -%}
<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}
{%- set ns = namespace(call_idx=0) -%}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
<|im_system|>system<|im_middle|>{{ render_content(message.content) }}
{%- elif message.role == 'user' -%}
<|im_user|>user<|im_middle|>{{ render_content(message.content) }}
{%- elif message.role == 'assistant' -%}
<|im_assistant|>assistant<|im_middle|><think>{{ message.reasoning_content or '' }}</think>{{ render_content(message.content) }}
{%- if message.tool_calls -%}
<|tool_calls_section_begin|>
{%- for call in message.tool_calls -%}
{%- set args = call.function.arguments -%}
<|tool_call_begin|>functions.{{ call.function.name }}:{{ ns.call_idx }}<|tool_call_argument_begin|>
{%- if args is string -%}{{ args }}{%- else -%}{{ args | tojson }}{%- endif -%}
<|tool_call_end|>
{%- set ns.call_idx = ns.call_idx + 1 -%}
{%- endfor -%}
<|tool_calls_section_end|>
{%- endif -%}
{%- elif message.role == 'tool' -%}
<|im_system|>tool<|im_middle|>## Return of {{ message.tool_call_id }}
{{ render_content(message.content) }}
{%- endif -%}
<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|>
{%- if think -%}<think>{%- else -%}<think></think>{%- endif -%}
{%- endif -%}
"""

_CORPUS = '''\
The quick brown fox jumps over the lazy dog. A small model is still a model:
it reads tokens, mixes them through attention, and routes each one to a few
experts before predicting the next token. You are Kimi, an AI assistant
created by Moonshot AI. The user asks a question and the assistant answers it.
The system prompt sets the rules; the tool returns a result; the assistant
thinks, then calls a function, then writes the final answer for the user.

Hello! How are you today? I am fine, thank you. What is the weather like in
Paris? It is sunny and warm, about 24 degrees. Please summarize this article
in three sentences. Translate the following text into French. Write a short
poem about the sea. Explain how a mixture of experts works, step by step.
There are 7 days in a week, 24 hours in a day, and 60 minutes in an hour.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192.

Machines in a cluster share the work. Each machine holds some of the layers,
sends its hidden state to the next machine, and waits for the answer. When
the last machine finishes, it samples a token and sends it back to the first.
Latency matters, bandwidth matters, and memory matters most of all.

def get_weather(city: str, unit: str = "celsius") -> dict:
    """Return the current weather for a city."""
    if not city:
        raise ValueError("city must not be empty")
    return {"city": city, "temperature": 24, "unit": unit}


class Router:
    def __init__(self, num_experts, top_k=8):
        self.num_experts = num_experts
        self.top_k = top_k

    def __call__(self, x):
        scores = x @ self.weight.T
        indices = scores.argsort(axis=-1)[..., -self.top_k:]
        return indices, scores


for i in range(len(tokens)):
    print(f"token {i}: {tokens[i]!r}")

import json
data = json.loads('{"name": "get_weather", "arguments": {"city": "Paris"}}')
result = [x * 2 for x in data.get("values", []) if x is not None]

{"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}

$ pip install -e ".[test]" && pytest -q
if (x > 0 && y < 10) { return x + y; } else { return -1; }
'''


def write_tokenizer(out_dir: Path, vocab_size: int = 512) -> list[int]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(KIMI_SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        # All 256 byte symbols, so any UTF-8 text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([_CORPUS], trainer=trainer)
    # Added after training so they sit at the top of the vocabulary, as in Kimi.
    tokenizer.add_special_tokens(KIMI_SPECIAL_TOKENS)
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than {vocab_size}"
        )
    tokenizer.save(str(out_dir / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 131072,
        "chat_template": KIMI_CHAT_TEMPLATE,
    }
    special_tokens_map = {
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special_tokens_map, indent=2) + "\n"
    )
    (out_dir / "chat_template.jinja").write_text(KIMI_CHAT_TEMPLATE)

    return [tokenizer.token_to_id("[EOS]"), tokenizer.token_to_id("<|im_end|>")]


# Mixed text for the tiktoken vocabulary, so its merges include multi-byte pieces of Chinese
# characters and emoji (a character then often spans several tokens, as in the real vocabulary).
_MULTILINGUAL_CORPUS = """\
你好！我是Kimi，由月之暗面科技有限公司开发的人工智能助手。我可以回答问题、写代码、翻译文本。
今天天气很好，我们去公园散步吧。北京、上海、深圳和杭州都是中国的大城市。
模型把每一层放在不同的机器上，隐藏状态从一台机器传到下一台机器。请用中文回答这个问题。
这个集群有三台电脑，每台电脑有一百九十二GB的内存。中文English混排test测试123，很常见。
日本語のテキストです。한국어 텍스트입니다. Русский текст. Ελληνικά γράμματα. naïve café résumé.
Emoji: 🚀 🔥 👍🏽 😀 🎉 ✅ ❤️ 🤖 🌏 — done! 你好 🚀 世界 🔥 HelloWorld CamelCaseWord getHTTPResponse.
"""

# tokenizer_config's named special tokens, at their offsets after the base ranks in Kimi K2's
# files (163584 + offset); the other offsets are <|reserved_token_{id}|>.
KIMI_SPECIAL_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12, "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15, "<|im_middle|>": 17,
    "<|media_begin|>": 18, "<|media_content|>": 19, "<|media_end|>": 20, "<|media_pad|>": 21,
    "<think>": 22, "</think>": 23, "[UNK]": 254, "[PAD]": 255,
}
# Embedding rows past the base ranks: 256, while the tokenizer numbers 258 specials (as in K2,
# whose last two reserved ids lie past vocab_size).
EMBEDDED_SPECIALS = 256

_STAND_IN_TOKENIZATION_KIMI = '''\
# Stand-in for Moonshot's tokenization_kimi.py, so this tiny checkpoint has the real layout.
# kimi-cluster never imports or runs it: it reads tiktoken.model and tokenizer_config.json itself.
raise ImportError("tokenization_kimi.py of a kimi-cluster tiny checkpoint is a stand-in, not a tokenizer")
'''


@lru_cache(maxsize=4)  # tests write many tiny checkpoints with the same vocabulary
def train_byte_bpe(text: str, num_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then the most frequent adjacent pair merged until there
    are `num_ranks`. Pairs are counted within whitespace-delimited words, coarser pieces than Kimi's
    split gives, so that some tokens span its boundaries (' 你', 'oW') as in real vocabularies: a
    tokenizer splitting any other way then gives other ids."""
    words = Counter(tuple(bytes([b]) for b in word.encode()) for word in re.findall(r" ?\S+|\s+", text))
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < num_ranks:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            raise ValueError(f"the corpus gives only {len(ranks)} ranks, fewer than {num_ranks}")
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        words = Counter({_merge(word, best, merged): count for word, count in words.items()})
    return ranks


def _merge(word: tuple, pair: tuple, merged: bytes) -> tuple:
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_kimi_bpe(texts, num_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE ranks learned from `texts` (an iterable of strings) with Hugging Face
    `tokenizers`, the text split by Kimi's own pattern first: the 256 bytes (rank = byte value),
    then each merge's token in the order it was learned, as tiktoken ranks them."""
    from .kimi_tokenizer import KIMI_PAT_STR, byte_level_alphabet

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(KIMI_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=num_ranks, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    byte_of = {char: bytes([b]) for b, char in enumerate(byte_level_alphabet())}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(tokenizer.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        ranks.setdefault(b"".join(byte_of[c] for c in left + right), len(ranks))
    if len(ranks) != num_ranks:
        raise ValueError(f"the text gives {len(ranks)} ranks, not {num_ranks}: give more text or ask for fewer")
    return ranks


def write_tiktoken_tokenizer(out_dir: Path, vocab_size: int = 1024, ranks: dict = None) -> list[int]:
    """Kimi's tokenizer files for a model of `vocab_size` embedding rows (vocab_size - 256 base
    ranks, then the specials); returns the stop ids ([EOS], <|im_end|>). `ranks` (token bytes ->
    rank) gives a vocabulary learned elsewhere, else one is learned from a built-in text."""
    num_ranks = vocab_size - EMBEDDED_SPECIALS
    if num_ranks < 256 + 64:
        raise ValueError(f"vocab_size {vocab_size} is too small for a tiktoken vocabulary: it needs the 256 "
                         f"byte ranks, some merges and {EMBEDDED_SPECIALS} specials (at least {256 + 64 + 256})")
    if ranks is not None and len(ranks) != num_ranks:
        raise ValueError(f"{len(ranks)} ranks given for vocab_size {vocab_size}, which holds {num_ranks}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = ranks or train_byte_bpe(_CORPUS + _MULTILINGUAL_CORPUS, num_ranks)
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()]
    (out_dir / "tiktoken.model").write_text("".join(lines))

    ids = {name: num_ranks + offset for name, offset in KIMI_SPECIAL_OFFSETS.items()}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {str(i): {"content": name, **flags} for name, i in sorted(ids.items(), key=lambda x: x[1])},
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(KIMI_CHAT_TEMPLATE)
    (out_dir / "tokenization_kimi.py").write_text(_STAND_IN_TOKENIZATION_KIMI)
    generation = {"eos_token_id": ids["<|im_end|>"], "max_length": 131072}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return [ids["[EOS]"], ids["<|im_end|>"]]
