"""A checkpoint's tokenizer: Moonshot's Kimi tokenizer exactly, or a tokenizer.json through mlx-lm.

Real Kimi checkpoints ship `tiktoken.model` and `tokenization_kimi.py` (tokenizer_config
`tokenizer_class: TikTokenTokenizer`). That file is never imported or run here: `KimiTokenizer`
reads the same files and encodes as it does (Kimi's split pattern, special tokens after the
base ranks, special-token strings in text taken as the special tokens, long inputs cut the way
it cuts them), so the ids are the ones the model was trained on. transformers' generic tiktoken
conversion, which splits with another pattern, is never used.
"""

import base64
import codecs
import importlib
import json
import re
from functools import cached_property
from pathlib import Path

import mlx_lm.utils
import tiktoken
from mlx_lm.tokenizer_utils import (BPEStreamingDetokenizer, StreamingDetokenizer, TokenizerWrapper, _byte_decoder,
                                    _infer_tool_parser)
from transformers import PreTrainedConfig
from transformers.utils.chat_template_utils import render_jinja_template

KIMI_PAT_STR = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
SPECIAL_TOKEN_COUNT = 256 + 2  # ids len(ranks) .. len(ranks) + 257, as tokenization_kimi.py numbers them
MAX_ENCODE_CHARS = 400_000  # tiktoken's limit per call
MAX_RUN_CHARS = 25_000  # longest run of whitespace or of non-whitespace encoded in one piece
TIKTOKEN_FILE, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE = "tiktoken.model", "tokenizer_config.json", "chat_template.jinja"


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's BPE file: one `base64(token) rank` per line. (tiktoken.load caches files by path
    name, so a checkpoint rewritten in place would be read stale: read it directly.)"""
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}: line {number} is not `base64-token rank`: {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once; the file is damaged")
    return ranks


def special_tokens(base: int, added_tokens_decoder: dict) -> dict[str, int]:
    """The 258 special tokens after the `base` ranks: named by tokenizer_config's
    added_tokens_decoder, the others `<|reserved_token_{id}|>`."""
    named = {}
    for key, entry in added_tokens_decoder.items():
        token_id = int(key)
        if not base <= token_id < base + SPECIAL_TOKEN_COUNT:
            raise ValueError(
                f"{TOKENIZER_CONFIG} names {entry['content']!r} as id {token_id}, outside the special ids "
                f"{base}..{base + SPECIAL_TOKEN_COUNT - 1} that {TIKTOKEN_FILE}'s {base} ranks give: "
                "the two files do not belong together"
            )
        if any(entry.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
            raise ValueError(f"{TOKENIZER_CONFIG}: special token {entry['content']!r} strips or matches single "
                             "words, which Kimi's tokenizer does not do; this is not a Kimi tokenizer")
        named[token_id] = entry["content"]
    ids = range(base, base + SPECIAL_TOKEN_COUNT)
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in ids}


def split_long_text(text: str):
    """Pieces of at most MAX_ENCODE_CHARS characters, each cut again wherever a run of whitespace,
    or of non-whitespace, would pass MAX_RUN_CHARS characters (where tokenization_kimi.py cuts)."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start:start + MAX_ENCODE_CHARS]
        piece_start, run, run_is_space = 0, 0, chunk[:1].isspace()
        for i, char in enumerate(chunk):
            if char.isspace() != run_is_space:
                run, run_is_space = 1, not run_is_space
                continue
            run += 1
            if run > MAX_RUN_CHARS:
                yield chunk[piece_start:i]
                piece_start, run = i, 1
        yield chunk[piece_start:]


COUNT_PIECE_CHARS = 4096  # text counted a piece at a time by count_past
CUT_SLACK_TOKENS = 16  # tokens a cut between two pieces may add at most (a special token's text cut in two)


def count_past(tokenizer, text: str, limit: int) -> int | None:
    """A number of tokens, more than `limit`, that `text` surely has, found by encoding it a piece at
    a time and stopping there; None when it may have `limit` or fewer. The work is that of about
    `limit` tokens however long `text` is: a prompt far past the context is refused without being
    encoded whole (which for megabytes takes seconds and gigabytes)."""
    # A token holds at least one byte, and a character at most four: a text of `limit` bytes or fewer fits.
    if len(text) * 4 <= limit or (len(text) <= limit and len(text.encode()) <= limit):
        return None
    counted, start = 0, 0
    while start < len(text):
        end = start + COUNT_PIECE_CHARS
        if end < len(text):  # cut before a space where there is one: words stay whole
            end = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end), 0) or end
        counted += len(tokenizer.encode(text[start:end], add_special_tokens=False)) - CUT_SLACK_TOKENS
        if counted > limit:
            return counted
        start = end
    return None


def sort_keys_deep(value):
    """Dicts with their keys sorted at every depth, as Kimi's apply_chat_template sorts tools."""
    if isinstance(value, dict):
        return {k: sort_keys_deep(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [sort_keys_deep(v) for v in value]
    return value


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, the form Kimi's get_vocab gives tokens in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


class KimiTokenizer:
    """Moonshot's TikTokenTokenizer, read from a checkpoint's files, with the part of the Hugging Face
    tokenizer interface mlx-lm's TokenizerWrapper and this project use."""

    def __init__(self, path):
        path = Path(path)
        config = json.loads((path / TOKENIZER_CONFIG).read_text())
        ranks = read_tiktoken_ranks(path / TIKTOKEN_FILE)
        self.special_tokens = special_tokens(len(ranks), config.get("added_tokens_decoder", {}))
        self.encoding = tiktoken.Encoding(name=path.name or "kimi", pat_str=KIMI_PAT_STR,
                                          mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.base_vocab_size = len(ranks)
        # Moonshot's encode goes through transformers' added-token split first: the named specials.
        named = sorted((e["content"] for e in config.get("added_tokens_decoder", {}).values()), key=len, reverse=True)
        self._named_specials = re.compile("(" + ("|".join(map(re.escape, named)) or "(?!)") + ")")
        self._token_bytes = [self.encoding.decode_single_token_bytes(i) for i in range(self.encoding.n_vocab)]
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and token not in self.special_tokens:
                raise ValueError(f"{TOKENIZER_CONFIG}: {name} {token!r} is not one of the special tokens")
            setattr(self, name, token)
        self.chat_template = self._read_chat_template(path, config)
        self.init_kwargs = config

    @staticmethod
    def _read_chat_template(path: Path, config: dict) -> str | None:
        if (path / CHAT_TEMPLATE_FILE).is_file():  # transformers prefers it to tokenizer_config's
            return (path / CHAT_TEMPLATE_FILE).read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates
            template = {t["name"]: t["template"] for t in template}.get("default")
        return template

    # ---- the Hugging Face tokenizer interface ------------------------------------------------

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def _id(self, token):
        return None if token is None else self.special_tokens[token]

    @property
    def bos_token_id(self):
        return self._id(self.bos_token)

    @property
    def eos_token_id(self):
        return self._id(self.eos_token)

    @property
    def special_tokens_map(self) -> dict:
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def encode(self, text: str, add_special_tokens: bool = True, **_) -> list[int]:
        """Special-token strings anywhere in `text` become the special tokens. Kimi never adds a BOS."""
        ids = []
        for i, part in enumerate(self._named_specials.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
                continue
            for piece in split_long_text(part):
                ids += self.encoding.encode(piece, allowed_special="all")
        return ids

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        if isinstance(ids, int):
            ids = [ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.base_vocab_size]
        return b"".join(self._token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes[token_id]

    @cached_property
    def _vocab(self) -> dict[str, int]:
        alphabet = byte_level_alphabet()
        base = self._token_bytes[:self.base_vocab_size]
        return {**{"".join(alphabet[b] for b in t): i for i, t in enumerate(base)}, **self.special_tokens}

    @cached_property
    def _tokens(self) -> list[str]:
        return sorted(self._vocab, key=self._vocab.get)

    def get_vocab(self) -> dict[str, int]:
        """Tokens as Kimi's get_vocab names them: byte-level strings, specials as themselves."""
        return dict(self._vocab)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._vocab.get(tokens)
        return [self._vocab.get(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        return self._tokens[ids] if isinstance(ids, int) else [self._tokens[i] for i in ids]

    def apply_chat_template(self, conversation, tools=None, tokenize=True, add_generation_prompt=False,
                            return_dict=False, **kwargs):
        """Rendered as transformers renders a chat template (same jinja environment and variables),
        with the tools' keys sorted at every depth first, as Kimi's own apply_chat_template does."""
        if self.chat_template is None:
            raise ValueError(f"this checkpoint has no chat template ({CHAT_TEMPLATE_FILE}, or chat_template "
                             f"in {TOKENIZER_CONFIG}): give the prompt as token ids")
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in conversation]
        rendered, _ = render_jinja_template(
            conversations=[messages], tools=sort_keys_deep(tools), chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs},
        )
        return self.encode(rendered[0]) if tokenize else rendered[0]


class ByteStreamingDetokenizer(StreamingDetokenizer):
    """Streams exactly `tokenizer.decode(all ids)`: token bytes through an incremental UTF-8
    decoder, so a character whose bytes are split across tokens appears once it is complete."""

    def __init__(self, tokenizer):
        self._token_bytes = tokenizer.token_bytes
        self.reset()

    def reset(self):
        self.offset = 0
        self.text = ""
        self.tokens = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_token(self, token):
        self.tokens.append(token)
        self.text += self._utf8.decode(self._token_bytes(token))

    def finalize(self):
        self.text += self._utf8.decode(b"", final=True)
        self._utf8.reset()


class ExactBPEStreamingDetokenizer(BPEStreamingDetokenizer):
    """mlx-lm's streaming detokenizer for byte-level BPE (a tokenizer.json), but a token holding the
    byte 0 gives "\x00": mlx-lm's takes byte 0 for "not a byte" and gives "Ā", the byte's stand-in
    in the vocabulary (mlx-lm 0.32.2)."""

    def _decode_bytes(self, seq):
        byte_decoder = _byte_decoder()
        out = bytearray()
        for c in seq:
            byte = byte_decoder.get(c)
            out.extend(c.encode() if byte is None else (byte,))
        return out.decode("utf-8", "replace")


def _kimi_wrapper(path: Path, eos_token_ids: list) -> TokenizerWrapper:
    tokenizer = KimiTokenizer(path)
    parser = tokenizer.init_kwargs.get("tool_parser_type") or _infer_tool_parser(tokenizer)
    tools = importlib.import_module(f"mlx_lm.tool_parsers.{parser}") if parser else None
    return TokenizerWrapper(
        tokenizer, ByteStreamingDetokenizer, eos_token_ids=eos_token_ids,
        tool_parser=tools and tools.parse_tool_call,
        tool_call_start=tools and tools.tool_call_start, tool_call_end=tools and tools.tool_call_end,
    )


def _as_list(ids) -> list:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def checkpoint_eos_ids(path: Path) -> list[int]:
    """The end-of-sequence ids config.json (or its text_config) and generation_config.json name:
    mlx-lm reads both (and the tokenizer's own eos token, which TokenizerWrapper adds)."""
    ids = []
    for name in ("config.json", "generation_config.json"):
        if (path / name).is_file():
            config = json.loads((path / name).read_text())
            ids += _as_list(config.get("eos_token_id")) + _as_list(config.get("text_config", {}).get("eos_token_id"))
    return ids


def _is_kimi_tiktoken(path: Path, config: dict) -> bool:
    # A tokenizer saved again by transformers (as in MLX conversions) names the source repository
    # in auto_map: "moonshotai/Kimi-K2-Instruct--tokenization_kimi.TikTokenTokenizer".
    auto_map = config.get("auto_map", {}).get("AutoTokenizer") or []
    return (config.get("tokenizer_class") == "TikTokenTokenizer" and (path / TIKTOKEN_FILE).is_file()
            and any(ref and ref.split("--")[-1].startswith("tokenization_kimi.") for ref in auto_map))


def load_tokenizer(path, eos_token_ids=None) -> TokenizerWrapper:
    """The checkpoint's tokenizer in mlx-lm's TokenizerWrapper: Kimi's tiktoken files read by
    `KimiTokenizer`, or a tokenizer.json loaded by mlx-lm; anything else is refused. No code from
    the checkpoint runs and nothing asks a question. The stop ids are the checkpoint's (see
    `checkpoint_eos_ids`) together with `eos_token_ids`."""
    path = Path(path)
    eos = checkpoint_eos_ids(path) + _as_list(eos_token_ids)
    config_file = path / TOKENIZER_CONFIG
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if _is_kimi_tiktoken(path, config):
        return _kimi_wrapper(path, eos)
    if (path / "tokenizer.json").is_file():
        # An empty model config, so transformers never reads config.json (it does not know kimi_k2).
        extra = {"config": PreTrainedConfig(), "trust_remote_code": False}
        wrapper = mlx_lm.utils.load_tokenizer(path, extra, eos_token_ids=eos)
        # a private field of mlx-lm's wrapper: where a later mlx-lm has none, its own detokenizer stays
        if type(getattr(wrapper, "_detokenizer", None)) is BPEStreamingDetokenizer:
            wrapper._detokenizer = ExactBPEStreamingDetokenizer(wrapper._tokenizer)
        return wrapper
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".json", ".model", ".py", ".jinja", ".tiktoken"))
    raise ValueError(
        f"{path}: no tokenizer this project can load without running the checkpoint's code. Supported: Kimi's "
        f"{TIKTOKEN_FILE} with a {TOKENIZER_CONFIG} naming tokenizer_class TikTokenTokenizer (auto_map to "
        f"tokenization_kimi.py), or a tokenizer.json. Found: {', '.join(found) or 'no tokenizer files'} "
        f"(tokenizer_class: {config.get('tokenizer_class')}). Copy the tokenizer files of the model's original "
        "release into this directory."
    )
