"""A tiny checkpoint whose greedy decoding emits a given script, for end-to-end tests.

Random tiny weights say nothing that a test could read: no tool call, no thinking block, no
chosen word. A scripted checkpoint is the tiny model (same architecture, same quantization, same
files) with weights set so that the model is a bigram table:

- every layer's output projections (attention o_proj, the MLPs' down_proj) dequantize to zero, so
  the residual stream carries the current token's embedding unchanged through every layer;
- the embedding of each token of the script is one-hot on a dimension of its own (every other
  token shares one "off script" dimension);
- the head row of a token is 1 on the dimensions of the tokens it follows in the script, so the
  final norm scales the one-hot to sqrt(hidden) and that successor wins by that margin (16 logits
  at hidden 256); tokens off the script, and the script's last token, are followed by [EOS].

The script's first token is its trigger: a prompt ending with it starts the script (the chat
template's generation prompt ends with <think>, or </think> in instant mode). Every token has one
successor, so the script is tokenized to make that true: text between special tokens is cut into
chunks, each encoded by the checkpoint's own tokenizer, searching for cuts under which no token is
followed by two different tokens.
"""

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_tokenizer

from .checkpoint import INDEX_FILE, open_checkpoint, weight_prefix
from .tiny import TinyShape, make_tiny

MAX_CHUNK_CHARS = 12
MAX_SEARCH_STEPS = 200_000
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj", "shared_experts.down_proj", "switch_mlp.down_proj")


class ScriptError(ValueError):
    pass


def _pieces(tokenizer, script: str) -> list:
    """The script as [(text, is_special)]: special token strings stand alone."""
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.added_tokens_encoder), key=len, reverse=True)
    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    return [(p, p in specials) for p in re.split(pattern, script) if p]


def script_ids(tokenizer, script: str) -> list:
    """Token ids that decode to `script` and in which every token has one successor."""
    pieces = _pieces(tokenizer, script)
    if not pieces:
        raise ScriptError("the script is empty")
    successor: dict = {}
    encoded: dict = {}  # chunk -> its ids: the search tries the same chunks again and again
    steps = 0

    def chain(prev, ids):
        """Bind the successors along prev -> ids; returns the bindings made (None on a clash)."""
        made = []
        for token in ids:
            if prev is not None:
                bound = successor.get(prev)
                if bound is None:
                    successor[prev] = token
                    made.append(prev)
                elif bound != token:
                    for t in made:
                        del successor[t]
                    return None
            prev = token
        return made

    def search(piece: int, pos: int, prev, out: list):
        nonlocal steps
        steps += 1
        if steps > MAX_SEARCH_STEPS:
            raise ScriptError("the script repeats too many tokens with different successors; shorten it or vary "
                              "its wording (a bigram model emits one successor per token)")
        if piece == len(pieces):
            return out
        text, special = pieces[piece]
        ends = [len(text)] if special else range(min(len(text), pos + MAX_CHUNK_CHARS), pos, -1)
        for end in ends:
            chunk = text if special else text[pos:end]
            if chunk not in encoded:
                encoded[chunk] = tokenizer.encode(chunk, add_special_tokens=False)
            ids = encoded[chunk]
            made = chain(prev, ids)
            if made is None:
                continue
            next_piece, next_pos = (piece + 1, 0) if special or end == len(text) else (piece, end)
            found = search(next_piece, next_pos, ids[-1], out + ids)
            if found is not None:
                return found
            for t in made:
                del successor[t]
        return None

    ids = search(0, 0, None, [])
    if ids is None:
        raise ScriptError(f"no tokenization of {script!r} gives every token a single successor, so a bigram model "
                          f"cannot emit it (in the plain tokenization {_first_clash(tokenizer, script)}): vary the wording there")
    if tokenizer.decode(ids) != script:
        raise ScriptError(f"the tokenizer cannot reproduce {script!r} exactly (it decodes to {tokenizer.decode(ids)!r})")
    return ids


def _first_clash(tokenizer, script: str) -> str:
    ids = tokenizer.encode(script, add_special_tokens=False)
    seen = {}
    for token, after in zip(ids, ids[1:]):
        if seen.setdefault(token, after) != after:
            words = [repr(tokenizer.decode([t])) for t in (token, seen[token], after)]
            return f"{words[0]} is followed by both {words[1]} and {words[2]}"
    return "every cut tried repeats a token with two successors"


def bigram_weights(ids: list, vocab_size: int, hidden_size: int, eos_id: int) -> tuple:
    """(embedding, head) float matrices making greedy decoding follow `ids` from ids[0]."""
    states = list(dict.fromkeys(ids))  # one dimension per distinct token, in order
    if len(states) >= hidden_size:
        raise ScriptError(f"the script has {len(states)} distinct tokens; this model's hidden size "
                          f"{hidden_size} holds at most {hidden_size - 1}")
    off_script = len(states)
    embed = np.zeros((vocab_size, hidden_size), np.float32)
    head = np.zeros((vocab_size, hidden_size), np.float32)
    embed[:, off_script] = 1.0
    head[eos_id, off_script] = 1.0
    following = dict(zip(ids, ids[1:]))
    for dim, token in enumerate(states):
        embed[token, off_script] = 0.0
        embed[token, dim] = 1.0
        head[following.get(token, eos_id), dim] = 1.0
    return mx.array(embed), mx.array(head)


def make_scripted(out_dir, script: str, shape: TinyShape = TinyShape(), model_type: str = "kimi_k25",
                  dtype: str = "float32") -> Path:
    """Write a tiny checkpoint (see make_tiny) whose greedy decoding after the script's first token
    emits the rest of `script`, then [EOS]."""
    out = make_tiny(out_dir, shape, model_type=model_type, dtype=dtype)
    tokenizer = load_tokenizer(out)
    ids = script_ids(tokenizer, script)
    config = json.loads((out / "config.json").read_text())
    embed, head = bigram_weights(ids, shape.vocab_size, shape.hidden_size, tokenizer.eos_token_id)
    prefix = weight_prefix(config)
    quant = config["quantization"]
    replaced = {}
    for name, matrix in ((f"{prefix}model.embed_tokens", embed), (f"{prefix}lm_head", head)):
        params = quant.get(name, quant)
        w, scales, biases = mx.quantize(matrix.astype(getattr(mx, dtype)), group_size=params["group_size"],
                                        bits=params["bits"])
        replaced.update({f"{name}.weight": w, f"{name}.scales": scales, f"{name}.biases": biases})
    replaced[f"{prefix}model.norm.weight"] = mx.ones((shape.hidden_size,), dtype=getattr(mx, dtype))

    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    for file in sorted(set(weight_map.values())):
        tensors = mx.load(str(out / file))
        for name, value in tensors.items():
            if name in replaced:
                tensors[name] = replaced[name]
            elif name.endswith((".scales", ".biases")) and any(f".{p}." in name for p in OUTPUT_PROJECTIONS):
                tensors[name] = mx.zeros_like(value)
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "mlx"})
    # The script is part of the model: a different script is a different model id.
    config["kimi_cluster_script"] = {"text": script, "token_ids": ids}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    open_checkpoint(out)
    return out
