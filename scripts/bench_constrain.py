#!/usr/bin/env python3
"""What a grammar constraint costs per token, next to a decode step, measured side by side.

    python scripts/bench_constrain.py            # Kimi-sized vocabulary, 3 schemas, 2 rounds
    python scripts/bench_constrain.py --quick

Per token of a reply held to a JSON schema (and to a tool call grammar): the matcher's step
(`Constraint.sync` of one more token), the mask (`Constraint.mask`, what the coordinator computes
and sends), and applying it to a row of logits (`apply_bitmask`, what the last stage does).

Two vocabularies:
- the tiny checkpoint's (512 tokens), next to the tiny model's whole decode step (mlx-lm's
  generate_step, one token) in this process;
- a Kimi-sized one (163,840 ids: 163,584 byte-level tokens cut from this Python's standard library
  source by frequency with their prefixes, plus 256 specials; no weights or tokenizer files are
  downloaded), next to the one piece of a Kimi decode step this machine can run as is: the lm_head,
  a 4-bit quantized 7168 x 163,840 matmul for one token (every step of the real model ends with it;
  the whole step is far longer, so the ratio printed is an upper bound).
"""

import argparse
import json
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llguidance  # noqa: E402
import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

from mlx_kimi.constrain import (Constraint, ConstraintSpec, Tool, apply_bitmask, grammar_for,  # noqa: E402
                                llg_tokenizer)
from mlx_kimi.kimi_tokenizer import load_tokenizer  # noqa: E402
from mlx_kimi.tiny import TinyShape, make_tiny  # noqa: E402

KIMI_VOCAB, KIMI_BASE, KIMI_HIDDEN = 163_840, 163_584, 7168
PIECE = re.compile(rb" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+")
SCHEMAS = {
    "flat object": {"type": "object", "additionalProperties": False, "required": ["name", "age", "email"],
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                   "email": {"type": "string", "format": "email"}}},
    "nested, arrays, enums": {
        "type": "object", "required": ["items", "status"],
        "properties": {"status": {"enum": ["open", "closed", "pending"]},
                       "items": {"type": "array", "items": {
                           "type": "object", "required": ["id", "tags"],
                           "properties": {"id": {"type": "integer", "minimum": 0},
                                          "tags": {"type": "array", "items": {"type": "string"}},
                                          "price": {"type": "number"}}}}}},
}
DOCUMENTS = {
    "flat object": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org"},
    "nested, arrays, enums": {"status": "open", "items": [{"id": 1, "tags": ["red", "large"], "price": 12.5},
                                                          {"id": 22, "tags": ["blue"], "price": 3.25}]},
}
TOOL = Tool("search_code", {"type": "object", "required": ["query", "paths"],
                            "properties": {"query": {"type": "string"}, "paths": {"type": "array",
                                                                                  "items": {"type": "string"}}}})


class SyntheticKimi:
    """A tokenizer shaped like Kimi's for llguidance: token bytes, specials at the same ids, and
    its own special-token names, over KIMI_VOCAB ids."""

    def __init__(self):
        counts = Counter()
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:400]:
            for piece in PIECE.findall(path.read_bytes()):
                for end in range(2, min(len(piece), 16) + 1):
                    counts[piece[:end]] += 1
        tokens = [bytes([b]) for b in range(256)]
        tokens += [t for t, _ in counts.most_common(KIMI_BASE - 256)]
        tokens += [f"<|filler_{i}|>".encode() for i in range(KIMI_BASE - len(tokens))]
        names = {163585: "[EOS]", 163586: "<|im_end|>", 163595: "<|tool_calls_section_begin|>",
                 163596: "<|tool_calls_section_end|>", 163597: "<|tool_call_begin|>",
                 163598: "<|tool_call_argument_begin|>", 163599: "<|tool_call_end|>", 163606: "<think>",
                 163607: "</think>"}
        self.tokens = tokens + [names.get(i, f"<|reserved_token_{i}|>").encode() for i in range(KIMI_BASE, KIMI_VOCAB)]
        self.ids = {t.decode(): i for i, t in enumerate(self.tokens) if i >= KIMI_BASE}
        self.special_token_ids = list(range(KIMI_BASE, KIMI_VOCAB))
        self.eos_token_id, self.bos_token_id = 163585, None
        self.eos_token_ids = [163585, 163586]

    def __call__(self, text: str) -> list:
        raise NotImplementedError("not needed for masks")

    def convert_tokens_to_ids(self, name):
        return self.ids.get(name)


def per_token_costs(llg_tok, grammar: str, vocab: int, reply: list) -> dict:
    """Median microseconds per token of the matcher's step, the mask, and its application."""
    constraint = Constraint(llg_tok, grammar, vocab)
    logits = mx.zeros((1, vocab))
    steps, masks, applies = [], [], []
    for i in range(len(reply) + 1):
        t0 = time.perf_counter()
        constraint.sync(reply[:i])
        t1 = time.perf_counter()
        packed = constraint.mask()
        t2 = time.perf_counter()
        mx.eval(apply_bitmask(logits, packed[None]))
        t3 = time.perf_counter()
        steps.append(t1 - t0), masks.append(t2 - t1), applies.append(t3 - t2)
    med = lambda xs: statistics.median(xs) * 1e6  # noqa: E731
    return {"step": med(steps), "mask": med(masks), "apply": med(applies),
            "total": med([a + b + c for a, b, c in zip(steps, masks, applies)])}


def kimi_reply(llg_tok, text: str, specials: list = ()) -> list:
    """Token ids of `text` (greedy over the synthetic vocabulary), special-token names as themselves."""
    ids = []
    for part in re.split("(<[^>]+>)", text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids += llg_tok.greedy_tokenize(part)
    return ids


def head_step_s(rounds: int) -> float:
    """Seconds for one token through a 4-bit Kimi-sized lm_head (median), float32 activations as
    MLX's CPU backend runs fastest (built in row blocks to keep the float weights small)."""
    blocks = [mx.quantize(mx.random.normal((8192, KIMI_HIDDEN)), group_size=64, bits=4)
              for _ in range(KIMI_VOCAB // 8192)]
    w, scales, biases = (mx.concatenate(parts) for parts in zip(*blocks))
    x = mx.random.normal((1, KIMI_HIDDEN))
    mx.eval(w, scales, biases, x)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        mx.eval(mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=4))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tiny_decode_s(model_dir: Path, tokens: int) -> float:
    model, _ = load_model(model_dir)
    stamps = []
    for _ in generate_step(mx.array([1, 2, 3, 4]), model, max_tokens=tokens):
        stamps.append(time.perf_counter())
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else 10
    print(f"llguidance {llguidance.__version__}; medians per token, microseconds")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / "tiny", TinyShape(layers=4))
        tokenizer = load_tokenizer(model_dir)
        tiny_llg = llg_tokenizer(tokenizer, 512, tokenizer.eos_token_ids)
        decode = tiny_decode_s(model_dir, 12 if args.quick else 40)
        for name, schema in SCHEMAS.items():
            reply = tokenizer.encode(json.dumps(DOCUMENTS[name]), add_special_tokens=False)
            costs = per_token_costs(tiny_llg, grammar_for(ConstraintSpec(json_schema=schema), tokenizer,
                                                          tokenizer.eos_token_ids), 512, reply)
            print(f"tiny vocab 512, {name}: matcher step {costs['step']:.0f}, mask {costs['mask']:.0f}, "
                  f"apply {costs['apply']:.0f}, total {costs['total']:.0f}; tiny decode step "
                  f"{decode * 1e6:.0f}; ratio {costs['total'] / (decode * 1e6):.3f}")

    t0 = time.perf_counter()
    kimi = SyntheticKimi()
    kimi_llg = llguidance.LLTokenizer(llguidance.TokenizerWrapper(kimi), n_vocab=KIMI_VOCAB, eos_token=kimi.eos_token_ids)
    print(f"Kimi-sized vocabulary {KIMI_VOCAB}: built in {time.perf_counter() - t0:.1f} s")
    head = head_step_s(rounds) * 1e6
    cases = [(name, ConstraintSpec(json_schema=schema), json.dumps(DOCUMENTS[name])) for name, schema in SCHEMAS.items()]
    call = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.search_code:0<|tool_call_argument_begin|>'
            '{"query": "def make_sampler", "paths": ["mlx_lm/sample_utils.py", "cluster/"]}<|tool_call_end|>'
            '<|tool_calls_section_end|>')
    cases.append(("thinking + tool call", ConstraintSpec(thinking=True, tools=(TOOL,)),
                  "I should search the code first.</think>" + call))
    for name, spec, text in cases:
        grammar = grammar_for(spec, kimi, kimi.eos_token_ids)
        reply = kimi_reply(kimi_llg, text, kimi.ids)
        costs = per_token_costs(kimi_llg, grammar, KIMI_VOCAB, reply)
        print(f"Kimi vocab, {name} ({len(reply)} tokens): matcher step {costs['step']:.0f}, mask {costs['mask']:.0f}, "
              f"apply {costs['apply']:.0f}, total {costs['total']:.0f}; 4-bit lm_head alone {head:.0f}; "
              f"ratio to the head {costs['total'] / head:.5f}; to a 47 ms step (21 tok/s, one M3 Ultra) "
              f"{costs['total'] / 47_000:.4f}")


if __name__ == "__main__":
    main()
