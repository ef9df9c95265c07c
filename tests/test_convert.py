"""`convert`: official FP8 / INT4 sources -> MLX, bit for bit what mlx-lm's own conversion gives,
one shard per pipeline part, run by the cluster, resumable, and clear about bad sources."""

import json
import shutil
import subprocess

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import dequantize_model, load_model, quantize_model

from harness import LocalCluster, convert_killed_after, oracle_reply
from mlx_kimi.checkpoint import CheckpointError, open_checkpoint, read_safetensors_header
from mlx_kimi.convert import ConvertError, convert
from mlx_kimi.kimi_tokenizer import load_tokenizer
from mlx_kimi.official import write_official
from mlx_kimi.spec import QuantScheme
from mlx_kimi.tiny import make_tiny


def mlx_lm_conversion(src, scheme: QuantScheme, dtype) -> dict:
    """mlx-lm's own conversion, as mlx_lm.convert does it: load (its sanitize dequantizes FP8 and keeps
    INT4 as 4-bit g32), cast, quantize with the predicate. INT4 experts requantized to other bits go
    through mlx-lm's dequantize_model first (`mlx_lm.convert -d`, then `-q`)."""
    model, config = load_model(src, lazy=True)
    cast = model.cast_predicate
    model.update(tree_map_with_path(
        lambda k, v: v.astype(dtype) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))
    if config.get("quantization") and (scheme.expert_bits, scheme.group_size) != (4, 32):
        model = dequantize_model(model)
        config.pop("quantization")
    quantize_model(model, config, scheme.group_size, scheme.other_bits, quant_predicate=scheme.params)
    return dict(tree_flatten(model.parameters()))


def converted_tensors(out) -> dict:
    tensors = {}
    for file in sorted(out.glob("model-*.safetensors")):
        tensors.update(mx.load(str(file)))
    return tensors


@pytest.mark.parametrize("layout, scheme", [
    ("k2-instruct-0905", QuantScheme(2, 4, 64)),  # FP8 blocks dequantized, requantized
    ("k2.5", QuantScheme(4, 6, 32)),  # native INT4 experts kept lossless
    ("k2-thinking", QuantScheme(3, 8, 64)),  # INT4 experts dequantized, requantized
])
def test_bit_identical_to_mlx_lm(tmp_path, layout, scheme):
    src = write_official(tmp_path / "src", layout)
    # mlx-lm drops only a layer numbered 61, so its reference reads the same weights without the MTP layer
    reference_src = write_official(tmp_path / "reference_src", layout, mtp=False)
    convert(src, tmp_path / "out", scheme.params, chunk_bytes=64 * 1024)  # many row blocks, partial FP8 blocks
    got = converted_tensors(tmp_path / "out")
    want = mlx_lm_conversion(reference_src, scheme, mx.bfloat16)
    assert set(got) == set(want)
    differ = [n for n in want if got[n].dtype != want[n].dtype or got[n].shape != want[n].shape
              or not mx.array_equal(got[n], want[n]).item()]
    assert not differ, differ[:5]


def test_output_layout_and_cluster_tokens(tmp_path):
    src = write_official(tmp_path / "src", "k2.6")
    out = tmp_path / "out"
    convert(src, out, QuantScheme(2, 4, 64).params, dtype="float32")  # float32 runs fastest on CPU
    checkpoint = open_checkpoint(out)
    files = {t.file for t in checkpoint.tensors.values()}
    assert len(files) == checkpoint.num_layers + 2  # one shard per decoder layer, embedding, norm + head
    for i in range(checkpoint.num_layers):
        assert len({checkpoint.tensors[n].file for n in checkpoint.tensors if f".layers.{i}." in n}) == 1
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization"]
    assert quantization["language_model.model.layers.3.mlp.switch_mlp.down_proj"] == {"group_size": 64, "bits": 2}
    assert quantization["language_model.model.layers.0.self_attn.embed_q"] == {"group_size": 64, "bits": 4}
    assert quantization["language_model.lm_head"] == {"group_size": 64, "bits": 4}
    assert "quantization_config" not in config["text_config"] and "vision_config" not in config
    assert not any(n.startswith(("vision_tower", "mm_projector")) or "rotary_emb" in n for n in checkpoint.tensors)
    for file in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / file).read_bytes() == (src / file).read_bytes()

    model, _ = load_model(out)
    prompt = [5, 300, 17, 42, 8]
    want = oracle_reply((model, load_tokenizer(out)), prompt, max_tokens=12)
    with LocalCluster(tmp_path, out, stages=2) as cluster:
        tokens, _ = cluster.generate(prompt_tokens=prompt, max_tokens=12)
    assert list(tokens) == want and len(want) > 3


def test_resume_after_interruption(tmp_path):
    src = write_official(tmp_path / "src", "k2-instruct")
    recipe = QuantScheme(2, 4, 64).params
    fresh = convert(src, tmp_path / "fresh", recipe)

    out = tmp_path / "out"
    convert_killed_after(3, src, out, recipe)
    assert not (out / "config.json").exists()
    # a later crash left a half-written shard, and a finished one was damaged since
    (out / "model-00004-of-00008.safetensors.tmp").write_bytes(b"partial")
    damaged = out / "model-00002-of-00008.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")
    report = convert(src, out, recipe)
    assert report.reused == ["model-00001-of-00008.safetensors", "model-00003-of-00008.safetensors"]
    assert "model-00002-of-00008.safetensors" in report.written and len(report.written) == 6
    assert report.model_id == fresh.model_id
    for file in fresh.out.glob("model*"):
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name

    with pytest.raises(ConvertError, match="another source or recipe"):
        convert(src, out, QuantScheme(3, 4, 64).params)


def test_bad_sources_name_the_file(tmp_path):
    """(ConvertError is a CheckpointError; header checks are checkpoint.py's.)"""
    src = write_official(tmp_path / "src", "k2-instruct")
    recipe = QuantScheme(2, 4, 64).params
    shard = src / "model-3-of-7.safetensors"

    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    data = (truncated / shard.name).read_bytes()
    (truncated / shard.name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-3-of-7\.safetensors.*truncated"):
        convert(truncated, tmp_path / "o1", recipe)

    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    (missing / shard.name).unlink()
    with pytest.raises(CheckpointError, match=r"model-3-of-7\.safetensors: missing shard"):
        convert(missing, tmp_path / "o2", recipe)

    wrong = tmp_path / "wrong"
    shutil.copytree(src, wrong)
    from mlx_kimi.official import write_safetensors

    tensors = mx.load(str(shard))
    name = "model.layers.2.self_attn.o_proj.weight_scale_inv"
    tensors[name] = tensors[name].astype(mx.float16)
    write_safetensors(wrong / shard.name, {n: ("F8_E4M3", v.shape, bytes(memoryview(v))) if v.dtype == mx.uint8 else v
                                           for n, v in tensors.items()})
    assert read_safetensors_header(wrong / shard.name)[name][0] == "F16"
    with pytest.raises(CheckpointError, match=r"model-3-of-7\.safetensors: FP8 tensor .*o_proj.weight.*F16"):
        convert(wrong, tmp_path / "o3", recipe)

    with pytest.raises(CheckpointError, match="already in MLX layout"):
        convert(make_tiny(tmp_path / "mlx"), tmp_path / "o4", recipe)


def test_disk_space_checked_up_front(tmp_path):
    src = write_official(tmp_path / "src", "k2-instruct")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        with pytest.raises(ConvertError, match=r"small/out: needs [\d,]+ bytes .* only [\d,]+ bytes are free"):
            convert(src, small / "out", QuantScheme(2, 4, 64).params)
        assert not list((small / "out").glob("model-*"))
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_mlx_lm_mixed_recipe_by_name(tmp_path):
    """`--recipe mixed_3_6` is mlx-lm's own predicate, applied to mlx-lm's own model of the source."""
    from mlx_kimi.recipe import mlx_lm_recipe

    src = write_official(tmp_path / "src", "k2-instruct-0905")
    report = convert(src, tmp_path / "out", mlx_lm_recipe("mixed_3_6", json.loads((src / "config.json").read_text())))
    quantization = json.loads((report.out / "config.json").read_text())["quantization"]
    assert quantization["lm_head"] == {"group_size": 64, "bits": 6}
    # of 6 layers, mlx-lm's rule gives layers 2 and 5 the more bits on down_proj
    assert quantization["model.layers.2.mlp.switch_mlp.down_proj"]["bits"] == 6
    assert quantization["model.layers.1.mlp.switch_mlp.down_proj"]["bits"] == 3
    assert quantization["model.layers.1.self_attn.q_a_proj"]["bits"] == 3
    assert {q["bits"] for n, q in quantization.items() if isinstance(q, dict)} == {3, 6}
