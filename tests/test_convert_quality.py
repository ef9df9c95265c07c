"""Quality is measured: `compare` reports KL and perplexity, and `convert --budget --calibrate` (the
calibration set streamed one layer at a time: measured sensitivities, then GPTQ) beats uniform
quantization of the same size and is no worse than the in-memory calibration (the float model loaded
whole) on a tiny model with structure."""

import dataclasses
import json
import subprocess

import mlx.core as mx

from harness import KIMI
from mlx_kimi.checkpoint import open_checkpoint
from mlx_kimi.convert import convert, plan_targets
from mlx_kimi.official import OFFICIAL_TINY_SHAPE, write_official
from mlx_kimi.quality import CALIBRATION_TEXT, compare_checkpoints
from mlx_kimi.recipe import calibrate, fit
from mlx_kimi.sources import open_source
from mlx_kimi.spec import QuantScheme

# Every expert active for every token: a random router would otherwise flip experts on the
# slightest weight change and make any KL a coin toss (trained routers are far more decisive).
SHAPE = dataclasses.replace(OFFICIAL_TINY_SHAPE, layers=4, routed_experts=8, experts_per_token=8)


def test_streamed_calibration_beats_uniform_and_the_in_memory_one(tmp_path):
    src = write_official(tmp_path / "src", "k2.5-bf16", SHAPE)  # outlier channels, bf16 like the real one
    reference = convert(src, tmp_path / "float", lambda name, module: False, dtype="float32").out
    uniform = convert(src, tmp_path / "uniform3", QuantScheme(3, 3, 64).params, dtype="float32").out
    budget = open_checkpoint(uniform).sizes().total_bytes

    run = subprocess.run([KIMI, "convert", str(src), str(tmp_path / "fit"), "--budget", str(budget), "--calibrate",
                          "--calibration-tokens", "256", "--dtype", "float32"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "predicted size" in run.stdout and "quality card" in run.stdout
    assert open_checkpoint(tmp_path / "fit").sizes().total_bytes <= budget

    run = subprocess.run([KIMI, "compare", str(reference), str(tmp_path / "fit"), "--json", "--max-tokens", "96"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    streamed = json.loads(run.stdout)
    uni = compare_checkpoints(reference, uniform, max_tokens=96)

    source = open_source(src)
    parts = plan_targets(source.config, lambda name, module: False)
    table = calibrate(source, parts, CALIBRATION_TEXT, tmp_path / "in-memory-reference")
    in_memory = fit(parts, budget, mx.float32, lambda t: table[t.module])
    memory = compare_checkpoints(reference, convert(src, tmp_path / "in-memory", in_memory.recipe, dtype="float32").out,
                                 max_tokens=96)
    print(f"uniform 3-bit: KL mean {uni.kl_mean:.4f} p95 {uni.kl_p95:.4f}; in-memory --fit: KL mean "
          f"{memory.kl_mean:.4f} p95 {memory.kl_p95:.4f}; streamed --fit --calibrate: KL mean "
          f"{streamed['kl_mean']:.4f} p95 {streamed['kl_p95']:.4f}; float ppl {uni.perplexity_a:.1f}; budget {budget:,} bytes")
    assert streamed["tokens"] == uni.tokens == 95 and streamed["perplexity_a"] == uni.perplexity_a
    assert streamed["kl_mean"] < 0.85 * uni.kl_mean
    assert streamed["kl_mean"] <= 1.05 * memory.kl_mean
