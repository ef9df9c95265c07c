#!/usr/bin/env python3
"""2-bit recipes side by side on the trained tiny Kimi (issue 18, item 5): mean / p95 KL and perplexity
against the master on held-out text, and bytes, in one run.

    python scripts/bench_quality.py                # about 10 minutes on a loaded 2-core CPU
    python scripts/bench_quality.py --work DIR     # keep the checkpoints (default: a temporary folder)

The model is mlx_kimi/trained/ (its bf16 master written in the official bf16 layout, converted
unquantized to float32 as the reference); the text is the first --held-out-tokens of its held-out
split (mlx_kimi/trained_text.py), in windows of the context it was trained with, every checkpoint run
in float32 as stored (scales and biases upcast exactly). The budget is the
bits per weight of the 2x192 GB K2.5 recipe: 353.4 GB for 1,026,408,232,448 parameters, 2.75 bits with
scales and biases (README, `convert --fit`; ../shared/kimi-facts.md), over every parameter of the model.
Every calibrated row uses the same calibration set: the built-in one (code, prose, Chinese, a chat)
encoded with the model's tokenizer, --calibration-tokens long (nothing of the held-out text).

Rows:
  uniform 2-bit g64          every linear, embedding and head included, round to nearest
  mlx-lm mixed_2_6           mlx_lm.convert's recipe predicate, round to nearest
  mlx-lm DWQ on mixed_2_6    mlx_lm.quant.dwq.dwq_quantize: mixed_2_6's scales and biases distilled
                             from the float model on the calibration set (Adam --dwq-lr, --dwq-epochs)
  mlx-lm GPTQ 2-bit          mlx_lm.quant.gptq.gptq_quantize (the model in memory; linears 2-bit g64,
                             the rest its 6-bit g64 fallback)
  streamed GPTQ, same bits   `convert --calibrate` at exactly mlx-lm GPTQ's per-module bits
  --fit, weight proxy        `--budget` with each module's relative weight error
  --fit, in-memory calib.    recipe.calibrate (the float model loaded whole), as tests/test_convert_quality.py
  --fit, streamed            `--budget` with the streamed calibration's measured sensitivities
  --fit --calibrate          the same bits, quantized with streamed GPTQ
  in-memory bits + GPTQ      the in-memory --fit's bits quantized with streamed GPTQ (what the bit
                             allocation alone costs the streamed rows)
  --fit --calibrate at mixed_2_6's bytes
  GGUF rows                  a Q4_0-expert / Q8_0 GGUF of the master (tests/test_convert_gguf.py's
                             writer) requantized at no fewer bits than it had (4/8), with and without
                             --calibrate, and the master quantized once the same way. gguf-py cannot
                             write a 2-bit K-quant, so no GGUF row is at the 2.75-bit budget.

Targets (issue 18): --fit --calibrate at most half mixed_2_6's mean KL at equal or fewer bytes; streamed
GPTQ no worse than mlx-lm's in-memory GPTQ at equal bits; streamed --fit within 5% of the in-memory one.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # mlx-lm's GPTQ and DWQ progress bars

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optimizers  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_map_with_path  # noqa: E402
from mlx_lm.quant.dwq import dwq_quantize  # noqa: E402
from mlx_lm.quant.gptq import gptq_quantize  # noqa: E402
from mlx_lm.utils import load_model, save_config, save_model  # noqa: E402

from mlx_kimi.calibrate import Calibration  # noqa: E402
from mlx_kimi.calibration_set import calibration_ids  # noqa: E402
from mlx_kimi.checkpoint import open_checkpoint  # noqa: E402
from mlx_kimi.convert import CALIBRATION_DIR, TOKENIZER_FILES, convert, plan_targets  # noqa: E402
from mlx_kimi.gguf_source import at_least_source_bits, open_gguf  # noqa: E402
from mlx_kimi.official import write_official  # noqa: E402
from mlx_kimi.kimi_tokenizer import load_tokenizer  # noqa: E402
from mlx_kimi.quality import CALIBRATION_TEXT, compare_logprobs, windowed_log_probs  # noqa: E402
from mlx_kimi.recipe import calibrate, fit, fixed_recipe, measured_errors, mlx_lm_recipe, weighted_errors  # noqa: E402
from mlx_kimi.sources import open_source  # noqa: E402
from mlx_kimi.trained import load_trained, trained_record  # noqa: E402
from mlx_kimi.trained_text import held_out_text  # noqa: E402
from test_convert_gguf import write_gguf  # noqa: E402

RECIPE_BITS_PER_WEIGHT = 353.4e9 * 8 / 1_026_408_232_448  # the 2x192 GB K2.5 --fit recipe, scales included
NO_QUANT = lambda name, module: False  # noqa: E731


def to_dtype(model, dtype) -> None:
    """Cast floating parameters as mlx_lm.convert does: the router's correction bias stays float32."""
    keep = getattr(model, "cast_predicate", lambda _: True)
    model.update(tree_map_with_path(
        lambda k, v: v.astype(dtype) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))


def quantized_model_dir(model, config: dict, quantization: dict, reference: Path, out: Path) -> Path:
    """An in-memory mlx-lm model saved as a checkpoint mlx-lm loads."""
    out.mkdir(parents=True)
    save_model(out, model)
    save_config({**config, "quantization": quantization, "quantization_config": quantization}, out / "config.json")
    for file in TOKENIZER_FILES:
        if (reference / file).exists():
            shutil.copyfile(reference / file, out / file)
    return out


def mlx_lm_gptq(reference: Path, ids: mx.array, out: Path):
    model, config = load_model(reference)
    model, quantization = gptq_quantize(model, ids, bits=2, group_size=64, fallback_bits=6, fallback_group_size=64,
                                        batch_size=4)
    to_dtype(model, mx.bfloat16)  # scales and biases in bf16, as every other row's
    return quantized_model_dir(model, config, quantization, reference, out), quantization


def mlx_lm_dwq(reference: Path, student: Path, ids: mx.array, out: Path, lr: float, epochs: int):
    teacher, _ = load_model(reference)
    model, config = load_model(student)
    to_dtype(model, mx.float32)  # trained in float32 (MLX's CPU backend is many times slower in bf16), saved in bf16
    rows = [(row, 0) for row in np.array(ids).tolist()]
    dwq_quantize(model, lambda batch, i, split: teacher(batch), optimizers.Adam(learning_rate=lr, bias_correction=True),
                 rows * epochs, rows, batch_size=4, max_seq_length=ids.shape[1], seed=0, dtype=mx.float32)
    model.eval()
    to_dtype(model, mx.bfloat16)
    return quantized_model_dir(model, config, config["quantization"], reference, out)


def float32_log_probs(path: Path, ids: list, window: int) -> mx.array:
    """Next-token log probabilities of the checkpoint at `path`, its weights as stored and computed in
    float32 (scales and biases upcast exactly; MLX's CPU backend is slow and noisy in bf16)."""
    model, _ = load_model(path)
    to_dtype(model, mx.float32)
    return windowed_log_probs(model, ids, window)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, help="where the checkpoints go (default: a temporary folder, removed)")
    p.add_argument("--calibration-tokens", type=int, default=512)
    p.add_argument("--held-out-tokens", type=int, default=2048)
    p.add_argument("--dwq-lr", type=float, default=1e-4)
    p.add_argument("--dwq-epochs", type=int, default=8)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work)
    print(f"total {time.monotonic() - start:.0f} s")


def run(args, work: Path) -> None:
    record = trained_record()
    window = record["held_out"]["window"]
    src = write_official(work / "src", "k2-instruct-bf16", mtp=False, master=load_trained())
    source = open_source(src)
    reference = convert(source, work / "float", NO_QUANT, dtype="float32").out
    params = record["parameters"]
    budget = int(RECIPE_BITS_PER_WEIGHT * params / 8)
    ids = calibration_ids(reference, args.calibration_tokens)
    held_out = load_tokenizer(reference).encode(held_out_text(12 * args.held_out_tokens))[: args.held_out_tokens]
    master_log_probs, targets = float32_log_probs(reference, held_out, window), mx.array(held_out[1:])
    parts = plan_targets(source.config, NO_QUANT)
    rows = []

    def row(name, path, seconds):
        c = compare_logprobs(master_log_probs, float32_log_probs(path, held_out, window), targets)
        size = open_checkpoint(path).sizes().total_bytes
        rows.append((name, size, c))
        print(f"{name}: {size:,} bytes, KL mean {c.kl_mean:.4f} p95 {c.kl_p95:.4f}, ppl {c.perplexity_b:.2f} "
              f"(master {c.perplexity_a:.2f}), {seconds:.0f} s", flush=True)
        return c

    def timed(make, *a, **kw):
        t = time.monotonic()
        out = make(*a, **kw)
        return out, time.monotonic() - t

    def converted(name, recipe, gptq=None, src_=source):
        """convert as the CLI does (bf16 scales and biases): a Calibration (GPTQ or not) when gptq is not None."""
        out = work / name
        calibration = None if gptq is None else Calibration(src_, ids, out / CALIBRATION_DIR, gptq=gptq)
        return convert(src_, out, recipe, calibration=calibration).out

    out, s = timed(converted, "uniform2", fixed_recipe(2, 2, 64))
    row("uniform 2-bit g64", out, s)
    mixed, s = timed(converted, "mixed_2_6", mlx_lm_recipe("mixed_2_6", source.config))
    mixed_kl = row("mlx-lm mixed_2_6", mixed, s)
    try:
        out, s = timed(mlx_lm_dwq, reference, mixed, ids, work / "dwq", args.dwq_lr, args.dwq_epochs)
        row("mlx-lm DWQ on mixed_2_6", out, s)
    except Exception as e:  # noqa: BLE001 - the table says why mlx-lm's DWQ did not run
        print(f"mlx-lm DWQ did not run: {type(e).__name__}: {e}", flush=True)
    (out, gptq_bits), s = timed(mlx_lm_gptq, reference, ids, work / "mlx-gptq")
    mlx_gptq = row("mlx-lm GPTQ 2-bit g64 (6-bit fallback)", out, s)
    same_bits = lambda name, module: gptq_bits.get(name, {"bits": 2, "group_size": 64})  # noqa: E731
    out, s = timed(converted, "streamed-gptq", same_bits, gptq=True)
    streamed_gptq = row("streamed GPTQ, mlx-lm GPTQ's bits", out, s)

    proxy, s = timed(fit, parts, budget, mx.bfloat16, weighted_errors(lambda t: measured_errors(source, t), parts))
    out, s2 = timed(converted, "fit-proxy", proxy.recipe)
    row("--fit, weight-error proxy", out, s + s2)
    table, s = timed(calibrate, source, parts, CALIBRATION_TEXT, work / "in-memory-reference")
    in_memory = fit(parts, budget, mx.bfloat16, lambda t: table[t.module])
    out, s2 = timed(converted, "fit-in-memory", in_memory.recipe)
    memory = row("--fit, in-memory calibration", out, s + s2)
    table, measure_s = timed(Calibration(source, ids, work / "measure" / CALIBRATION_DIR, gptq=False).measure,
                             parts, mx.bfloat16)
    streamed = fit(parts, budget, mx.bfloat16, lambda t: table[t.module])
    out, s = timed(converted, "fit-streamed", streamed.recipe, gptq=False)
    streamed_fit = row("--fit, streamed calibration", out, measure_s + s)
    out, s = timed(converted, "fit-calibrate", streamed.recipe, gptq=True)
    corrected = row("--fit --calibrate (streamed GPTQ)", out, measure_s + s)
    corrected_bytes = rows[-1][1]
    out, s = timed(converted, "in-memory-bits-gptq", in_memory.recipe, gptq=True)
    row("in-memory --fit's bits, streamed GPTQ", out, s)
    mixed_bytes = rows[1][1]
    at_mixed = fit(parts, mixed_bytes, mx.bfloat16, lambda t: table[t.module])
    out, s = timed(converted, "fit-calibrate-mixed-bytes", at_mixed.recipe, gptq=True)
    equal_bytes = row("--fit --calibrate at mixed_2_6's bytes", out, measure_s + s)
    equal_bytes_size = rows[-1][1]

    gguf = write_gguf(src, work / "tiny-Q4_0-Q8_0.gguf")
    gguf_source = open_gguf(gguf, tokenizer_dir=src)
    recipe = at_least_source_bits(fixed_recipe(2, 4, 64), gguf_source)
    for name, from_, gptq in (("GGUF requantized 4/8-bit", gguf_source, None),
                              ("GGUF requantized 4/8-bit --calibrate", gguf_source, True),
                              ("master quantized once 4/8-bit", source, None),
                              ("master quantized once 4/8-bit --calibrate", source, True)):
        out, s = timed(converted, name.replace(" ", "-").replace("/", "-"), recipe, gptq=gptq, src_=from_)
        row(name, out, s)

    print(f"\ntrained tiny Kimi, {params:,} parameters; held-out perplexity of the master {mixed_kl.perplexity_a:.2f} "
          f"on {mixed_kl.tokens + 1} held-out tokens (window {window}); budget {budget:,} bytes "
          f"({RECIPE_BITS_PER_WEIGHT:.2f} bits per weight); {ids.size} calibration tokens\n")
    print("| recipe | bytes | bits/weight | KL mean | KL p95 | perplexity | vs master |")
    print("|---|---|---|---|---|---|---|")
    for name, size, c in rows:
        print(f"| {name} | {size:,} | {8 * size / params:.2f} | {c.kl_mean:.5f} | {c.kl_p95:.5f} | "
              f"{c.perplexity_b:.1f} | {c.perplexity_b / c.perplexity_a - 1:+.1%} |")
    print(f"\n--fit --calibrate / mixed_2_6 mean KL (target <= 0.5 at <= its bytes): {corrected.kl_mean / mixed_kl.kl_mean:.3f} "
          f"at {corrected_bytes / mixed_bytes:.3f} of its bytes; {equal_bytes.kl_mean / mixed_kl.kl_mean:.3f} at "
          f"{equal_bytes_size / mixed_bytes:.3f}")
    print(f"streamed GPTQ / mlx-lm GPTQ mean KL at the same bits: {streamed_gptq.kl_mean / mlx_gptq.kl_mean:.3f} "
          "(target <= 1)")
    print(f"streamed --fit / in-memory --fit mean KL: {streamed_fit.kl_mean / memory.kl_mean:.3f}; "
          f"--fit --calibrate / in-memory: {corrected.kl_mean / memory.kl_mean:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
