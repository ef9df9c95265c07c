"""Quality is measured: `compare` reports KL and perplexity, and the calibrated --fit recipe beats
uniform quantization of the same size on a tiny model with structure."""

import dataclasses
import json
import subprocess

from harness import KIMI
from mlx_kimi.checkpoint import open_checkpoint
from mlx_kimi.convert import convert
from mlx_kimi.official import OFFICIAL_TINY_SHAPE, write_official
from mlx_kimi.quality import compare_checkpoints
from mlx_kimi.spec import QuantScheme

# Every expert active for every token: a random router would otherwise flip experts on the
# slightest weight change and make any KL a coin toss (trained routers are far more decisive).
SHAPE = dataclasses.replace(OFFICIAL_TINY_SHAPE, layers=4, routed_experts=8, experts_per_token=8)


def test_calibrated_fit_beats_uniform_at_the_same_size(tmp_path):
    src = write_official(tmp_path / "src", "k2.5-bf16", SHAPE)  # outlier channels, bf16 like the real one
    reference = convert(src, tmp_path / "float", lambda name, module: False, dtype="float32").out
    uniform = convert(src, tmp_path / "uniform3", QuantScheme(3, 3, 64).params, dtype="float32").out
    budget = open_checkpoint(uniform).sizes().total_bytes

    run = subprocess.run([KIMI, "convert", str(src), str(tmp_path / "fit"), "--budget", str(budget), "--calibrate",
                          "--dtype", "float32"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "predicted size" in run.stdout and not list(tmp_path.glob(".float-reference-*"))
    assert open_checkpoint(tmp_path / "fit").sizes().total_bytes <= budget

    run = subprocess.run([KIMI, "compare", str(reference), str(tmp_path / "fit"), "--json", "--max-tokens", "96"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    fit = json.loads(run.stdout)
    uni = compare_checkpoints(reference, uniform, max_tokens=96)
    print(f"uniform 3-bit: KL mean {uni.kl_mean:.4f} p95 {uni.kl_p95:.4f} ppl {uni.perplexity_b:.1f}; "
          f"fit: KL mean {fit['kl_mean']:.4f} p95 {fit['kl_p95']:.4f} ppl {fit['perplexity_b']:.1f}; "
          f"float ppl {uni.perplexity_a:.1f}; budget {budget:,} bytes")
    assert fit["tokens"] == uni.tokens == 95 and fit["perplexity_a"] == uni.perplexity_a
    assert fit["kl_mean"] < 0.85 * uni.kl_mean
