"""Streamed calibration (`convert --calibrate`): the calibration set flows through one layer at a time,
GPTQ corrects rounding errors on the inputs each module actually sees, every conversion writes its
quality card, and bad calibration input or a source at odds with its config is named."""

import dataclasses
import json
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

from harness import KIMI, LocalCluster, convert_killed_after, oracle_reply
from mlx_kimi.calibrate import Calibration
from mlx_kimi.calibration_set import CalibrationError, calibration_ids
from mlx_kimi.convert import CALIBRATION_DIR, ConvertError, convert, plan_targets
from mlx_kimi.gptq import ModuleInputs, gptq_quantize, inverse_hessian_factor, pack, rtn_quantize
from mlx_kimi.kimi_tokenizer import load_tokenizer
from mlx_kimi.official import OFFICIAL_TINY_SHAPE, write_official
from mlx_kimi.quality_card import CARD_FILE
from mlx_kimi.recipe import draw_weight
from mlx_kimi.sources import open_source
from mlx_kimi.spec import QuantScheme

SHAPE = dataclasses.replace(OFFICIAL_TINY_SHAPE, layers=3, routed_experts=8, experts_per_token=2)
NEVER = (1, 5)  # (layer, expert) the router can never choose: its correction bias is -1e4


def source_with_a_dead_expert(path, layout="k2-instruct"):
    src = write_official(path, layout, SHAPE)
    layer, expert = NEVER
    name = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
    tensor = open_source(src).tensors[name]
    bias = np.frombuffer(open(tensor.path, "rb").read()[tensor.offset: tensor.offset + 4 * SHAPE.routed_experts],
                         dtype=np.float32).copy()
    bias[expert] = -1e4
    with open(tensor.path, "r+b") as f:
        f.seek(tensor.offset)
        f.write(bias.tobytes())
    return src


def output_error(x, w, q, bits, group):
    d = x @ (w - mx.dequantize(*q, group_size=group, bits=bits)).T
    return float((d * d).sum())


def test_gptq_reduces_output_error_at_equal_bits():
    rng = np.random.default_rng(0)
    w = mx.array(draw_weight("w", (128, 256), rng, 1.0))
    # inputs as activations are: correlated channels (a 32-dimensional signal spread over 256), some much larger
    mixing = rng.standard_normal((32, 256)) * (1 + 8 * (rng.random(256) < 0.03))

    def inputs(n):
        return mx.array(rng.standard_normal((n, 32)) @ mixing + 0.1 * rng.standard_normal((n, 256)), dtype=mx.float32)

    seen, held_out = inputs(512), inputs(256)
    shared = ModuleInputs(seen)  # what a calibrated conversion hands GPTQ: one factor for each distinct input
    factor = shared.factor()
    assert mx.array_equal(factor, inverse_hessian_factor(seen.T @ seen)).item()
    assert shared.factor() is factor  # gate and up (and every row block of the lm_head) reuse it
    for bits in (2, 3, 4, 5, 6, 8):
        packed, scales, biases = mx.quantize(w, group_size=64, bits=bits)
        codes = mx.round((mx.dequantize(packed, scales, biases, group_size=64, bits=bits).reshape(128, 4, 64)
                          - biases[..., None]) / scales[..., None]).reshape(128, 256).astype(mx.uint32)
        assert mx.array_equal(pack(codes, bits), packed).item(), bits  # mx.quantize's own bit layout
    for bits in (2, 3, 4):
        gptq, rtn = gptq_quantize(w, factor, bits, 64), rtn_quantize(w, bits, 64)
        print(f"{bits}-bit: output error on held-out inputs GPTQ {output_error(held_out, w, gptq, bits, 64):.1f}, "
              f"round to nearest {output_error(held_out, w, rtn, bits, 64):.1f}")
        assert output_error(held_out, w, gptq, bits, 64) < 0.9 * output_error(held_out, w, rtn, bits, 64)


def test_calibrated_conversion_card_and_cluster_tokens(tmp_path):
    src = source_with_a_dead_expert(tmp_path / "src")
    out = tmp_path / "out"
    run = subprocess.run([KIMI, "convert", str(src), str(out), "--calibrate", "--calibration-tokens", "128",
                          "--expert-bits", "3", "--other-bits", "4", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "quality card" in run.stdout and f"never routed: {NEVER[1]}" in run.stdout
    card = json.loads((out / CARD_FILE).read_text())
    layers = {e["part"]: e for e in card["parts"] if isinstance(e["part"], int)}
    assert card["calibration"] == {"tokens": 128, "sequences": 1, "gptq": True, "gptq_min_tokens": 32}
    assert layers[NEVER[0]]["never_routed"] == [NEVER[1]] and card["summary"]["never_routed"] == {"1": [5]}
    assert layers[0]["bits"] == {"attention": ["4-bit g64"], "mlp": ["4-bit g64"]}
    assert layers[1]["bits"]["experts"] == ["3-bit g64"] and card["summary"]["gptq_modules"] > 0
    assert not list((out / CALIBRATION_DIR / "quantize").glob("*.npy"))  # hidden states dropped when done

    # the same bits without error correction: the card's output errors are larger
    rtn = Calibration(open_source(src), calibration_ids(src, 128), tmp_path / "rtn" / CALIBRATION_DIR, gptq=False)
    plain = convert(src, tmp_path / "rtn", QuantScheme(3, 4, 64).params, dtype="float32", calibration=rtn)
    rtn_layers = {e["part"]: e for e in plain.card["parts"] if isinstance(e["part"], int)}
    for i, entry in layers.items():
        print(f"layer {i}: output error GPTQ {entry['output_error']['layer']:.4f}, "
              f"round to nearest {rtn_layers[i]['output_error']['layer']:.4f}")
        assert entry["output_error"]["layer"] < 0.9 * rtn_layers[i]["output_error"]["layer"]

    model, _ = load_model(out)  # plain MLX affine quantization: mlx-lm reads it strictly
    prompt = [5, 300, 17, 42, 8]
    want = oracle_reply((model, load_tokenizer(out)), prompt, max_tokens=10)
    with LocalCluster(tmp_path, out, stages=2) as cluster:
        tokens, _ = cluster.generate(prompt_tokens=prompt, max_tokens=10)
    assert list(tokens) == want and len(want) > 3


def test_calibrated_conversion_resumes(tmp_path):
    src = write_official(tmp_path / "src", "k2.5", SHAPE)  # INT4 experts, requantized to 3 bits with GPTQ
    source, ids = open_source(src), calibration_ids(src, 64)
    recipe = QuantScheme(3, 4, 64).params

    def calibration(out):
        return Calibration(source, ids, out / CALIBRATION_DIR, gptq=True)

    fresh = convert(src, tmp_path / "fresh", recipe, calibration=calibration(tmp_path / "fresh"))

    out = tmp_path / "out"
    convert_killed_after(3, src, out, recipe, calibration=calibration(out))
    report = convert(src, out, recipe, calibration=calibration(out))
    assert len(report.reused) == 3 and report.model_id == fresh.model_id
    for file in fresh.out.glob("model*"):
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name
    assert json.loads((out / CARD_FILE).read_text()) == json.loads((fresh.out / CARD_FILE).read_text())
    with pytest.raises(ConvertError, match="calibration"):  # GPTQ'd shards are not mixed with other ones
        convert(src, out, recipe, calibration=Calibration(source, ids, out / CALIBRATION_DIR, gptq=False))

    # --fit's measuring pass resumes from the last part it saved
    parts = plan_targets(source.config, lambda name, module: False)
    measured = calibration(tmp_path / "fit").measure(parts, mx.bfloat16)
    saved = tmp_path / "fit" / CALIBRATION_DIR / "measure"
    for part in (SHAPE.layers - 1, "head"):
        for file in saved.glob(f"after-{part}[.-]*"):  # hidden states, card and amplification streams
            file.unlink()
    assert calibration(tmp_path / "fit").measure(parts, mx.bfloat16) == measured


def test_bad_calibration_input_and_layers_at_odds_with_the_config(tmp_path):
    src = write_official(tmp_path / "src", "k2-instruct", SHAPE)
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x + 1\n")
    have = len(load_tokenizer(src).encode(short.read_text()))
    with pytest.raises(CalibrationError, match=f"short.txt: {have} tokens .* needs 512"):
        calibration_ids(src, 512, short)
    run = subprocess.run([KIMI, "convert", str(src), str(tmp_path / "out"), "--calibrate", "--calibration-text",
                          str(short), "--calibration-tokens", "512"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and f"{have} tokens" in run.stderr and "Traceback" not in run.stderr

    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = SHAPE.layers - 1
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match=f"layers 0-{SHAPE.layers}, but config.json says num_hidden_layers "
                                           f"{SHAPE.layers - 1}"):
        convert(src, tmp_path / "out2", QuantScheme(3, 4, 64).params)
