"""Grammar-constrained sampling with llguidance: JSON mode, JSON schemas and Kimi's tool calls.

A `Constraint` holds an llguidance matcher for one reply. Its state is a pure function of the
reply's tokens (`sync` replays them when the history is not the one it has seen), so a reply
replayed after a node loss, or continued from a reused prefix, gets exactly the masks of the
first run. `mask()` is the set of allowed next tokens packed 32 to a uint32 word (bit i of word
i // 32 is token i), the form that travels with a step; `apply_bitmask` applies such masks row by
row to a batch of logits, and `processor` makes the same thing an mlx-lm logits processor.

Grammars (`grammar_for`) are llguidance's Lark dialect with inline JSON schemas. Kimi thinks
between <think> and </think> (free text), then answers: free text, JSON (json_object /
json_schema), or a tool call section
  <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}
  <|tool_call_end|>...<|tool_calls_section_end|>
whose arguments are held to that tool's parameters schema. JSON is written in one canonical form,
`json.dumps`'s (", " and ": ", no newlines): what Kimi's chat template writes for arguments, and a
bound on what a weak model can pad with whitespace.
"""

import json
from dataclasses import dataclass
from functools import lru_cache

import llguidance
import mlx.core as mx
import numpy as np


THINK_END = "</think>"
TOOL_TOKENS = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
               "<|tool_call_argument_begin|>", "<|tool_call_end|>")
JSON_FORM = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CALL_INDEX = "/[0-9]{1,4}/"  # Kimi's running number of the call in the conversation
MAX_SCHEMA_CHARS = 64_000
# Parser limits: a hostile schema costs a bounded time to compile and per token.
LIMITS = dict(max_grammar_size=200_000, step_lexer_fuel=200_000, step_max_items=50_000, verbose_errors=False)


class ConstraintError(ValueError):
    """A response format, schema or tool set this checkpoint cannot be constrained to (-> HTTP 400)."""


def words_for(vocab_size: int) -> int:
    """uint32 words in a packed mask of `vocab_size` tokens."""
    return (vocab_size + 31) // 32


class _TokenBytes:
    """llguidance's tokenizer interface over a Kimi tokenizer: every token's bytes, which are special,
    and an encoder for plain text (special-token strings in it stay text)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list):
        known = min(len(tokenizer), vocab_size)
        self.tokens = [tokenizer.token_bytes(i) for i in range(known)]
        # Rows past the tokenizer (padding) are specials no grammar names, so never allowed.
        self.tokens += [f"<|unused_{i}|>".encode() for i in range(known, vocab_size)]
        self.special_token_ids = list(range(tokenizer.base_vocab_size, vocab_size))
        self.eos_token_id, self.bos_token_id = eos_ids[0], None
        self._encode = tokenizer.encoding.encode_ordinary

    def __call__(self, text: str) -> list:
        return self._encode(text)


def llg_tokenizer(tokenizer, vocab_size: int, eos_ids) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of a checkpoint's tokenizer (mlx-lm's TokenizerWrapper or the bare one),
    over the model's `vocab_size` logits, ending on `eos_ids`. Costs about a second for Kimi's 163k
    tokens: build it once per checkpoint (`cached_llg_tokenizer`)."""
    # Imported here: llguidance.hf brings transformers and kimi_tokenizer mlx-lm (over a second),
    # which a node or a client command that never builds a matcher should not pay at start.
    import llguidance.hf

    from .kimi_tokenizer import KimiTokenizer

    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    eos = sorted(int(i) for i in eos_ids)
    if isinstance(inner, KimiTokenizer):
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenBytes(inner, vocab_size, eos)),
                                      n_vocab=vocab_size, eos_token=eos)
    try:
        return llguidance.hf.from_tokenizer(inner, n_vocab=vocab_size, eos_token=eos)
    except ValueError as e:
        raise ConstraintError(f"constrained sampling needs Kimi's tiktoken tokenizer or a tokenizer.json; "
                              f"this checkpoint's {type(inner).__name__} is neither ({e})") from e


@lru_cache(maxsize=2)
def cached_llg_tokenizer(tokenizer, vocab_size: int, eos_ids: tuple) -> llguidance.LLTokenizer:
    return llg_tokenizer(tokenizer, vocab_size, eos_ids)


# ---- grammars -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict  # JSON schema of the arguments object


@dataclass(frozen=True)
class ConstraintSpec:
    """What one reply is held to. `json_schema` None with `json_object` means any JSON object;
    `tool_choice` is "auto", "required", "none" or a tool's name (which gets exactly one call)."""
    thinking: bool = False  # the prompt ends inside <think>: the reply reasons first
    json_object: bool = False
    json_schema: dict | None = None
    tools: tuple = ()
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True  # False: at most one call per reply

    @property
    def constrains(self) -> bool:
        return self.json_object or self.json_schema is not None or bool(self.tools)


# Keywords with values that constrain nothing, which llguidance refuses as unimplemented; schema
# generators (zod, pydantic) write them, and agents send every tool's schema with every request.
NO_OPS = {"uniqueItems": (False,), "propertyNames": ({}, {"type": "string"})}
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
VALUES = ("enum", "const", "default", "examples")  # JSON values, not schemas


def without_no_ops(schema):
    """`schema` with the NO_OPS keywords dropped wherever a schema may hold them."""
    if isinstance(schema, list):
        return [without_no_ops(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in NO_OPS and value in NO_OPS[key]:
            continue
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: without_no_ops(s) for name, s in value.items()}
        else:
            out[key] = value if key in VALUES else without_no_ops(value)
    return out


def _schema_text(schema, where: str) -> str:
    """The schema as inline JSON in canonical form, refused with what is wrong when it is not one
    llguidance can enforce (an unimplemented keyword, an unknown format or type)."""
    if not isinstance(schema, dict):
        raise ConstraintError(f"{where}: a JSON schema is an object, got {type(schema).__name__}")
    schema = {k: v for k, v in without_no_ops(schema).items() if k != "x-guidance"}
    try:
        text = json.dumps({**schema, "x-guidance": JSON_FORM})
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"{where}: not a JSON schema ({e})") from e
    if len(text) > MAX_SCHEMA_CHARS:
        raise ConstraintError(f"{where}: the schema is {len(text)} characters; at most {MAX_SCHEMA_CHARS}")
    error = _guarded(lambda: llguidance.LLMatcher.validate_grammar(grammar, None, limits=_limits()))
    if error:
        raise ConstraintError(f"{where}: this server cannot enforce this schema: {error.splitlines()[0]}"
                              " (llguidance's JSON schema support; remove or rewrite that part)")
    return text


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS)


def _guarded(call):
    """call(), with a panic inside llguidance (pyo3 raises it as a BaseException, seen on some
    fuzzed schemas) turned into the error text of a schema it cannot take."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - pyo3_runtime.PanicException is not importable
        return f"llguidance failed on it ({type(e).__name__}: {str(e)[:200]})"


def _token_id(tokenizer, name: str) -> int:
    token = tokenizer.convert_tokens_to_ids(name)
    if not isinstance(token, int) or token < 0:
        raise ConstraintError(f"this checkpoint's tokenizer has no {name} token, so it cannot hold a reply to "
                              "Kimi's reasoning or tool call format")
    return token


def grammar_for(spec: ConstraintSpec, tokenizer, eos_ids) -> str:
    """The llguidance grammar (Lark) of `spec` for this tokenizer; ConstraintError names what cannot be."""
    if spec.json_schema is not None and not isinstance(spec.json_schema, dict):
        raise ConstraintError(f"json_schema: a JSON schema is an object, got {type(spec.json_schema).__name__}")
    names = [t.name for t in spec.tools]
    if spec.tool_choice not in ("auto", "required", "none") and spec.tool_choice not in names:
        raise ConstraintError(f"tool_choice names {spec.tool_choice!r}, which is not among the tools "
                              f"({', '.join(names) or 'none given'})")
    if spec.tool_choice == "required" and not spec.tools:
        raise ConstraintError("tool_choice 'required' needs at least one tool")
    stops = sorted(int(i) for i in eos_ids)
    if spec.tools:
        tools = [_token_id(tokenizer, t) for t in TOOL_TOKENS]
    else:  # no call may start where no tool is declared
        tools = [i for i in map(tokenizer.convert_tokens_to_ids, TOOL_TOKENS) if isinstance(i, int) and i >= 0]
    think_end = _token_id(tokenizer, THINK_END) if spec.thinking else None

    def any_token_but(excluded) -> str:
        return f"<[^{','.join(str(i) for i in sorted(set(excluded)))}]>*"

    rules = []
    if spec.json_schema is not None:
        content = "json"
        rules.append(f"json: %json {_schema_text(spec.json_schema, 'json_schema')}")
    elif spec.json_object:
        content = "json"
        rules.append(f"json: %json {_schema_text({'type': 'object'}, 'json_object')}")
    else:
        content = "text"
        rules.append(f"text: {any_token_but(stops + tools)}")
    if spec.tools and spec.tool_choice != "none":
        section_start, section_end, call_start, arguments_start, call_end = (f"<[{i}]>" for i in tools)
        chosen = [t for t in spec.tools if spec.tool_choice in ("auto", "required") or t.name == spec.tool_choice]
        for i, tool in enumerate(chosen):
            head = json.dumps(f"functions.{tool.name}:")
            rules.append(f"call_{i}: {call_start} {head} {CALL_INDEX} {arguments_start} args_{i} {call_end}")
            where = f"tools[{names.index(tool.name)}] ({tool.name}).parameters"
            rules.append(f"args_{i}: %json {_schema_text(tool.parameters, where)}")
        calls = "(" + " | ".join(f"call_{i}" for i in range(len(chosen))) + ")"
        one_or_more = calls + "+" if spec.parallel_tool_calls and spec.tool_choice in ("auto", "required") else calls
        rules.append(f"calls: {section_start} {one_or_more} {section_end}")
        if spec.tool_choice != "auto":
            answer = "calls"
        elif content == "text":
            answer = "text calls?"  # free text cannot hold the section's start token: unambiguous
        else:
            answer = f"{content} | calls"
    else:
        answer = content
    rules.insert(0, f"answer: {answer}")
    if think_end is not None:
        reasoning = f"{any_token_but(stops + tools + [think_end])} <[{think_end}]>"
        rules.insert(0, f"start: reasoning answer\nreasoning: {reasoning}")
    else:
        rules.insert(0, "start: answer")
    # no_forcing: where the grammar fixes the next bytes, every tokenization of them stays allowed,
    # not only the canonical one, so a reply that already fits passes unchanged.
    return "\n".join(['%llguidance {"no_forcing": true}', *rules])


# ---- one reply's matcher --------------------------------------------------------------------

class Constraint:
    """The grammar's state over one reply. Build one per reply (`for_spec`), then before each step
    `sync(reply tokens so far)` and send or apply `mask()`."""

    def __init__(self, llg_tok: llguidance.LLTokenizer, grammar: str, vocab_size: int):
        self.matcher = _guarded(lambda: llguidance.LLMatcher(llg_tok, grammar, limits=_limits()))
        if isinstance(self.matcher, str):
            raise ConstraintError(f"the grammar cannot be built: {self.matcher}")
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar cannot be built: {self.matcher.get_error().splitlines()[0]}")
        self.vocab_size = vocab_size
        self.consumed: list = []

    @classmethod
    def for_spec(cls, spec: ConstraintSpec, tokenizer, vocab_size: int, eos_ids) -> "Constraint":
        eos = tuple(sorted(int(i) for i in eos_ids))
        return cls(cached_llg_tokenizer(tokenizer, vocab_size, eos), grammar_for(spec, tokenizer, eos), vocab_size)

    def sync(self, reply: list) -> None:
        """Bring the matcher to the state after `reply` (replaying from the start when `reply` does
        not continue what it has consumed)."""
        reply = [int(t) for t in reply]
        seen = len(self.consumed)
        if reply[:seen] != self.consumed:
            self.matcher.reset()
            self.consumed, seen = [], 0
        for token in reply[seen:]:
            if not self.matcher.consume_token(token):
                raise ConstraintError(f"token {token} breaks the grammar after {len(self.consumed)} reply tokens: "
                                      f"{self.matcher.get_error().splitlines()[0]}")
            self.consumed.append(token)

    def mask(self) -> np.ndarray:
        """The allowed next tokens, packed: uint32[words_for(vocab_size)]."""
        packed = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32)
        out = np.zeros(words_for(self.vocab_size), dtype=np.uint32)
        n = min(len(packed), len(out))
        out[:n] = packed[:n]
        return out

    @property
    def accepting(self) -> bool:
        """The reply so far is complete under the grammar (a stop token may come now)."""
        return self.matcher.is_accepting()

    def processor(self, prompt_length: int):
        """This constraint as an mlx-lm logits processor: `tokens` is prompt + reply so far."""
        def constrain(tokens: mx.array, logits: mx.array) -> mx.array:
            self.sync(tokens[prompt_length:].tolist())
            return apply_bitmask(logits, self.mask()[None])
        return constrain


def apply_bitmask(logits: mx.array, packed: np.ndarray) -> mx.array:
    """logits[rows, vocab] with every token a row's packed mask (uint32[rows, words]) leaves out
    set to -inf. Unpacked in MLX, where the logits are."""
    words = mx.array(np.ascontiguousarray(packed, dtype=np.uint32))
    bits = (words[:, :, None] >> mx.arange(32, dtype=mx.uint32)) & 1
    allowed = bits.reshape(words.shape[0], -1)[:, :logits.shape[-1]].astype(mx.bool_)
    return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))
