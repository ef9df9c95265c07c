#!/usr/bin/env python3
"""MLA's two forms side by side, one run: one layer of Kimi's attention (random weights, float32)
running a prefill chunk of C positions after N cached ones, in mlx-lm's prefill form (the whole
cache up-projected into per-head keys and values) and in the absorbed form (mlx_kimi/mla.py), and
the form a slice picks for that chunk (mla.absorbed_pays: the absorbed one where it needs at most
half the FLOPs). An agent's next turn is a short chunk after a long context.

    python scripts/bench_mla.py                       # N 0,1024,4096; C 16,64,256; 16 heads
    python scripts/bench_mla.py --heads 64 --cached 0,16384

Every FLOP count of either form is proportional to the heads, so a run with fewer heads than
Kimi's 64 gives the same ratios sooner (the times are for those heads). Each time is the median of
three calls, the forms alternating.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from mlx_lm.models.base import create_attention_mask  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402
from mlx_lm.models.deepseek_v3 import ModelArgs  # noqa: E402

from mlx_kimi.builtin import BUILTIN_MODELS  # noqa: E402
from mlx_kimi.mla import Attention, absorbed_pays, attention_flops  # noqa: E402


def ints(text: str) -> list:
    return [int(v) for v in text.split(",")]


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
            times = {False: [], True: []}
            for r in range(3):
                for absorbed in (False, True) if r % 2 == 0 else (True, False):
                    mask = create_attention_mask(x, cache, return_array=True)
                    began = time.perf_counter()
                    mx.eval(attention(x, mask, cache, absorbed))
                    times[absorbed].append((time.perf_counter() - began) * 1e3)
                    cache.trim(chunk)
            plain, absorbed = statistics.median(times[False]), statistics.median(times[True])
            flops = attention_flops(kimi, chunk, cached, True) / attention_flops(kimi, chunk, cached, False)
            picks = "absorbed" if absorbed_pays(kimi, chunk, cached) else "mlx-lm"
            print(f"{cached:8d} {chunk:7d} {plain:14.1f} {absorbed:11.1f} {absorbed / plain:6.2f} "
                  f"{flops:10.2f} {picks:>11}", flush=True)


if __name__ == "__main__":
    main()
