#!/usr/bin/env python3
"""MLA's two forms side by side, one run: one layer of Kimi's attention (random weights, float32)
running a prefill chunk of C positions after N cached ones, in mlx-lm's prefill form (the whole
cache up-projected into per-head keys and values) and in the absorbed form (mlx_kimi/mla.py), and
the form a slice picks for that chunk (mla.absorbed_pays: the absorbed one where it needs at most
half the FLOPs). An agent's next turn is a short chunk after a long context.

    python scripts/bench_mla.py                       # N 0,1024,4096; C 16,64,256; 16 heads
    python scripts/bench_mla.py --heads 64 --cached 0,16384

Every FLOP count of either form is proportional to the heads, so a run with fewer heads than
Kimi's 64 gives the same ratios sooner (the times are for those heads). Then the same for a whole
model, the trained tiny Kimi (`make-tiny --trained`, float32, 4 layers): a turn of C tokens after N
cached ones, in mlx-lm's form against the form its slice picks. Each time is the median of three
calls, the forms alternating.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from mlx_lm.models.base import create_attention_mask  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402
from mlx_lm.models.deepseek_v3 import ModelArgs  # noqa: E402

from mlx_kimi.builtin import BUILTIN_MODELS  # noqa: E402
from mlx_kimi.checkpoint import open_checkpoint  # noqa: E402
from mlx_kimi.mla import Attention, absorbed_pays, attention_flops  # noqa: E402
from mlx_kimi.slice import LayerRange, load_slice  # noqa: E402

KIMI = str(Path(sys.executable).parent / "kimi-cluster")


def ints(text: str) -> list:
    return [int(v) for v in text.split(",")]


def median_ms(run, forms: tuple) -> dict:
    """form -> the median ms of three calls of run(form), the forms alternating."""
    times = {form: [] for form in forms}
    for r in range(3):
        for form in forms if r % 2 == 0 else forms[::-1]:
            began = time.perf_counter()
            run(form)
            times[form].append((time.perf_counter() - began) * 1e3)
    return {form: statistics.median(t) for form, t in times.items()}


def whole_model(cached_list: list, chunks: list):
    """Turns of the trained tiny model, whole: mlx-lm's form against the slice's choice (None)."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "trained"
        subprocess.run([KIMI, "make-tiny", str(out), "--trained"], check=True, capture_output=True)
        checkpoint = open_checkpoint(out)
        model = load_slice(checkpoint, LayerRange(0, checkpoint.num_layers))
        print(f"the trained tiny Kimi, whole ({checkpoint.num_layers} layers), a turn of C tokens after N cached")
        print(f"{'cached N':>8} {'chunk C':>7} {'mlx-lm form ms':>14} {'slice picks ms':>14} {'ratio':>6} {'picks':>9}")
        for cached in cached_list:
            caches = model.make_caches()
            context = mx.random.randint(0, model.args.vocab_size, (1, cached))
            for start in range(0, cached, 256):  # in 256-position chunks, as the cluster sends a prompt
                mx.eval(model.forward(context[:, start:start + 256], caches, absorbed=False))
            for chunk in chunks:
                turn = mx.random.randint(0, model.args.vocab_size, (1, chunk))

                def run(form):
                    mx.eval(model.forward(turn, caches, form))
                    for c in caches:
                        c.trim(chunk)
                ms = median_ms(run, (False, None))
                picks = "absorbed" if absorbed_pays(model.args, chunk, cached) else "mlx-lm"
                print(f"{cached:8d} {chunk:7d} {ms[False]:14.1f} {ms[None]:14.1f} {ms[None] / ms[False]:6.2f} "
                      f"{picks:>9}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cached", type=ints, default=[0, 1024, 4096], help="N: positions already cached")
    p.add_argument("--chunk", type=ints, default=[16, 64, 256], help="C: positions in the step")
    p.add_argument("--heads", type=int, default=16, help="attention heads (Kimi: 64)")
    args = p.parse_args()
    config = BUILTIN_MODELS["kimi-k2"]
    kimi = ModelArgs.from_dict({**config, "num_attention_heads": args.heads, "num_hidden_layers": 1})
    mx.random.seed(0)
    attention = Attention(kimi)
    mx.eval(attention.parameters())
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} {platform.system()}, "
          f"{len(os.sched_getaffinity(0))} cores, MLX {mx.__version__} ({mx.default_device()}), load average "
          f"{os.getloadavg()[0]:.1f}; one layer of Kimi's attention, {args.heads} heads, float32")
    print(f"{'cached N':>8} {'chunk C':>7} {'mlx-lm form ms':>14} {'absorbed ms':>11} {'ratio':>6} "
          f"{'FLOP ratio':>10} {'slice picks':>11}")
    for cached in args.cached:
        for chunk in args.chunk:
            cache = KVCache()
            if cached:
                cache.update_and_fetch(mx.random.normal((1, 1, cached, kimi.kv_lora_rank)),
                                       mx.random.normal((1, 1, cached, kimi.qk_rope_head_dim)))
            x = mx.random.normal((1, chunk, kimi.hidden_size)) * 0.1
            mx.eval(x, cache.state if cached else [])

            def run(absorbed):
                mx.eval(attention(x, create_attention_mask(x, cache, return_array=True), cache, absorbed))
                cache.trim(chunk)
            ms = median_ms(run, (False, True))
            plain, absorbed = ms[False], ms[True]
            flops = attention_flops(kimi, chunk, cached, True) / attention_flops(kimi, chunk, cached, False)
            picks = "absorbed" if absorbed_pays(kimi, chunk, cached) else "mlx-lm"
            print(f"{cached:8d} {chunk:7d} {plain:14.1f} {absorbed:11.1f} {absorbed / plain:6.2f} "
                  f"{flops:10.2f} {picks:>11}", flush=True)
    whole_model(args.cached, args.chunk)


if __name__ == "__main__":
    main()
