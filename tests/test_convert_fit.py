"""`convert --fit`: bits chosen per module by measured error per byte, sized by the planner."""

import re
import subprocess

from cluster.convert_cli import fit_to_cluster
from cluster.model_cli import mac_nodes
from cluster.planner import plan_partition, sizes_for_model
from harness import KIMI
from mlx_kimi.builtin import BUILTIN_MODELS
from mlx_kimi.checkpoint import text_config
from mlx_kimi.convert import OUTPUT_DTYPES, plan_targets
from mlx_kimi.recipe import synthetic_errors, weighted_errors
from mlx_kimi.slice import LayerRange, build_slice_module, layer_nbytes, quantize_slice
from mlx_kimi.spec import cast_unquantized

WIRED_MB = 180000


def test_fit_dry_run_on_builtin_k25_fits_two_192gb_macs():
    run = subprocess.run([KIMI, "convert", "kimi-k2.5", "--fit", "2x192GB", "--wired-limit-mb", str(WIRED_MB),
                          "--context", "32768", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    predicted = int(re.search(r"predicted size: ([\d,]+) bytes", run.stdout).group(1).replace(",", ""))
    assert 330e9 < predicted < 377e9  # more than the 2-bit 323.9 GB, less than 2 x 180000 MiB
    assert "fits 2x192GB at iogpu.wired_limit_mb=180000 with 32,768 tokens of context" in run.stdout
    assert len(re.findall(r"mac\d: layers \d+-\d+", run.stdout)) == 2
    run = subprocess.run([KIMI, "convert", "kimi-k2.5", "--fit", "2x192GB", "--dry-run"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "iogpu.wired_limit_mb" in run.stderr  # the default limit is too low


def test_fit_recipe_sizes_confirmed_by_mlx_and_the_planner():
    """The recipe's sizes recomputed independently (mlx-lm's modules quantized by nn.quantize with
    the recipe, bytes counted lazily) are what the planner places on the two Macs."""
    config = BUILTIN_MODELS["kimi-k2.5"]
    dtype = OUTPUT_DTYPES["bfloat16"]
    table = synthetic_errors()
    parts = plan_targets(config, lambda n, m: False)
    result, _ = fit_to_cluster(parts, config, mac_nodes([192 * 2**30] * 2, WIRED_MB), 32768, dtype,
                               weighted_errors(lambda t: table, parts))

    layers = LayerRange(0, 61)
    module = build_slice_module(config, layers)
    quantize_slice(module, layers, result.recipe)
    cast_unquantized(module)
    nbytes = layer_nbytes(module, layers)
    assert abs(sum(nbytes.values()) - result.total_bytes) < 1e-4 * result.total_bytes
    sizes = sizes_for_model([nbytes[i] for i in range(61)], nbytes["embed"], nbytes["head"], text_config(config))
    assert plan_partition(sizes, mac_nodes([192 * 2**30] * 2, WIRED_MB), context=32768).feasible
    assert not plan_partition(sizes, mac_nodes([192 * 2**30] * 2), context=32768).feasible  # default limit: no

    bits = {name: q["bits"] for name, q in result.choice.items() if q}
    experts = [b for n, b in bits.items() if ".switch_mlp." in n]
    attention = [b for n, b in bits.items() if ".self_attn." in n]
    assert max(experts) <= 3 and min(attention) >= 6  # the sensitive, small parts get the spare bytes
    assert all(result.choice[n] is None or result.choice[n]["bits"] >= 4
               for n in result.choice if ".shared_experts." in n)
