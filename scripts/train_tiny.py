#!/usr/bin/env python
"""Train the tiny Kimi shipped in mlx_kimi/trained/: mlx-lm's own deepseek_v3 model class (what
kimi_k2 / kimi_k25 load as), configured as mlx_kimi/tiny.py configures it (MLA attention, a dense
first layer, shared + routed experts with sigmoid routing and e_score_correction_bias), trained in MLX
on the Python standard library and license prose (mlx_kimi/trained_text.py), with a Kimi tokenizer
(tiktoken.model, Kimi's split pattern and specials) learned from the same text.

The router's correction bias is not trained by gradient: as in DeepSeek-V3's aux-loss-free balancing,
after each step every MoE layer's bias moves by `--bias-rate` towards its under-used experts (the sign
of mean load minus each expert's load).

Same seed, same machine and MLX version: the same weights bit for bit (the script prints their
sha256). Writes a bf16 checkpoint (kimi_k2 layout, unquantized) and trained.json with the held-out
perplexity, a uniform guess's and the untrained model's.

    nice python scripts/train_tiny.py mlx_kimi/trained
"""

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import deepseek_v3
from mlx_lm.utils import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_kimi import trained_text  # noqa: E402
from mlx_kimi.checkpoint import INDEX_FILE  # noqa: E402
from mlx_kimi.kimi_tokenizer import load_tokenizer  # noqa: E402
from mlx_kimi.quality import perplexity  # noqa: E402
from mlx_kimi.spec import cast_unquantized  # noqa: E402
from mlx_kimi.tiny import TinyShape, tiny_text_config  # noqa: E402
from mlx_kimi.tokenizer import EMBEDDED_SPECIALS, train_kimi_bpe, write_tiktoken_tokenizer  # noqa: E402

SHAPE = TinyShape(layers=4, hidden_size=128, intermediate_size=384, moe_intermediate_size=128, routed_experts=8,
                  experts_per_token=2, attention_heads=4, q_lora_rank=128, kv_lora_rank=64, vocab_size=2048,
                  shard_files=1)
WEIGHTS_FILE = "model-00001-of-00001.safetensors"


class CountingGate(deepseek_v3.MoEGate):
    """mlx-lm's router, also noting which experts it chose (read back by the training step)."""
    chosen: list = []

    def __call__(self, x):
        inds, scores = super().__call__(x)
        CountingGate.chosen.append(inds)
        return inds, scores


def build_model(config: dict, seed: int):
    mx.random.seed(seed)
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config))
    gates = [layer.mlp.gate for layer in model.layers if isinstance(layer.mlp, deepseek_v3.DeepseekV3MoE)]
    for gate in gates:
        gate.__class__ = CountingGate
        # mlx-lm starts routers at zero, which ties every expert's score
        gate.weight = mx.random.normal(gate.weight.shape) * 0.02
    model.freeze(keys=["e_score_correction_bias"])
    mx.eval(model.parameters())
    return model, gates


def make_step(model, optimizer, experts: int):
    def loss_fn(model, x, y):
        CountingGate.chosen.clear()
        loss = nn.losses.cross_entropy(model(x).astype(mx.float32), y).mean()
        loads = mx.stack([(inds[..., None] == mx.arange(experts)).sum(axis=(0, 1, 2)) for inds in CountingGate.chosen])
        return loss, loads

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(x, y):
        (loss, loads), grads = value_and_grad(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss, loads

    return mx.compile(step, inputs=state, outputs=state), state


def balance(gates, loads: mx.array, rate: float) -> None:
    """Aux-loss-free load balancing: raise the bias of experts below the mean load, lower the others."""
    for gate, load in zip(gates, loads):
        load = load.astype(mx.float32)
        gate.e_score_correction_bias = gate.e_score_correction_bias + rate * mx.sign(load.mean() - load)


def batches(tokens: np.ndarray, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
        rows = np.stack([tokens[s:s + seq + 1] for s in starts])
        yield mx.array(rows[:, :-1]), mx.array(rows[:, 1:])


def write_checkpoint(out: Path, model, config: dict) -> str:
    cast_unquantized(model, mx.bfloat16)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": {name: WEIGHTS_FILE for name in sorted(weights)}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.array(weights[name].astype(mx.float32)).tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--bias-rate", type=float, default=1e-2)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens the perplexity is measured on")
    args = parser.parse_args()
    started = time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    train_docs, held_docs = trained_text.split(trained_text.documents())
    ranks = train_kimi_bpe([text for _, text in train_docs], SHAPE.vocab_size - EMBEDDED_SPECIALS)
    eos_ids = write_tiktoken_tokenizer(out, SHAPE.vocab_size, ranks)
    tokenizer = load_tokenizer(out)
    train_tokens = np.array(tokenizer.encode(trained_text.joined(train_docs)), dtype=np.int32)
    held_tokens = tokenizer.encode(trained_text.joined(held_docs))[:args.eval_tokens]
    print(f"tokenizer {time.time() - started:.0f} s: {len(train_tokens)} training tokens, "
          f"{len(held_tokens)} held-out tokens measured", flush=True)

    text = tiny_text_config(SHAPE, eos_ids[0], eos_ids[0] - 1, "bfloat16")
    config = {**text, "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]}
    model, gates = build_model(config, args.seed)
    untrained_ppl = perplexity(model, held_tokens, args.seq)
    warmup = max(1, min(20, args.steps // 5))
    schedule = optim.join_schedules([optim.linear_schedule(args.lr / 20, args.lr, warmup),
                                     optim.cosine_decay(args.lr, args.steps - warmup, args.lr / 20)], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    step, state = make_step(model, optimizer, SHAPE.routed_experts)

    train_started = time.time()
    data = batches(train_tokens, args.batch, args.seq, args.seed)
    for i in range(1, args.steps + 1):
        x, y = next(data)
        loss, loads = step(x, y)
        mx.eval(state, loss, loads)
        balance(gates, loads, args.bias_rate)
        if i % 10 == 0 or i == 1:
            share = np.array(loads) / loads[0].sum().item()
            print(f"step {i}/{args.steps} loss {loss.item():.3f} {(time.time() - train_started) / i:.2f} s/step "
                  f"expert share min {share.min():.3f} max {share.max():.3f}", flush=True)
    train_seconds = time.time() - train_started

    for gate in gates:
        gate.__class__ = deepseek_v3.MoEGate
    digest = write_checkpoint(out, model, config)
    shipped, _ = load_model(out)
    shipped.set_dtype(mx.float32)  # MLX's CPU backend gathers experts in float32 only
    held_ppl = perplexity(shipped, held_tokens, args.seq)
    record = {
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
        "bias_rate": args.bias_rate, "shape": asdict(SHAPE),
        "parameters": sum(v.size for _, v in tree_flatten(shipped.parameters())),
        "training_tokens_seen": args.steps * args.batch * args.seq, "corpus_tokens": int(len(train_tokens)),
        "train_seconds": round(train_seconds, 1),
        "held_out": {"tokens": len(held_tokens), "window": args.seq, "perplexity": round(held_ppl, 3),
                     "untrained_perplexity": round(untrained_ppl, 3), "uniform_perplexity": SHAPE.vocab_size},
        "weights_sha256": digest, "python": platform.python_version(), "mlx": mx.__version__,
    }
    (out / "trained.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
