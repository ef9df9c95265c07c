"""Tiny checkpoints in Moonshot's official layouts: file names, dtypes, and mlx-lm reads them."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.utils import load_model

from mlx_kimi.checkpoint import read_safetensors_header
from mlx_kimi.official import int4_pack, write_official


def _headers(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        out.update(read_safetensors_header(path / file))
    assert set(out) == set(index)
    return out


def _logits(path):
    model, _ = load_model(path)
    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    return model(mx.array([[5, 6, 7, 300]]))[0]


def test_fp8_layout_as_published(tmp_path):
    src = write_official(tmp_path / "k2", "k2-instruct")
    assert (src / "model-1-of-7.safetensors").exists() and (src / "model-7-of-7.safetensors").exists()
    config = json.loads((src / "config.json").read_text())
    assert config["model_type"] == "kimi_k2" and config["quantization_config"]["weight_block_size"] == [128, 128]
    h = _headers(src)
    assert h["model.layers.1.mlp.experts.3.down_proj.weight"][0] == "F8_E4M3"
    # kv_a_proj_with_mqa is 96 x 256: one partial row block, two column blocks
    assert h["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"][:2] == ("F32", (1, 2))
    assert h["model.layers.1.mlp.gate.weight"][0] == "BF16"
    assert h["model.layers.1.mlp.gate.e_score_correction_bias"][0] == "F32"
    assert h["model.layers.3.self_attn.rotary_emb.inv_freq"][0] == "F32"
    assert "model.layers.6.eh_proj.weight" in h  # the MTP layer after the 6 decoder layers
    assert (src / "tiktoken.model").exists() and (src / "tokenizer_config.json").exists()


def test_int4_pack_is_value_plus_8_nibbles():
    w = mx.array(np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64))
    packed, scale = int4_pack(w)
    assert packed.dtype == mx.int32 and packed.shape == (1, 8) and scale.shape == (1, 2)
    words = np.array(packed.view(mx.uint32)).astype(np.int64)
    nibbles = ((words[..., None] >> (4 * np.arange(8))) & 15).reshape(1, 64).astype(np.int64) - 8
    assert nibbles.min() == -7 and nibbles.max() == 7
    back = nibbles.reshape(1, 2, 32) * np.array(scale.astype(mx.float32))[..., None]
    assert np.abs(back.reshape(1, 64) - np.array(w)).max() <= np.array(scale.astype(mx.float32)).max() / 2 + 1e-6


def test_official_layouts_load_in_mlx_lm(tmp_path):
    """Without the MTP layer (mlx-lm drops only a layer numbered 61), mlx-lm reads every layout,
    and the quantized ones stay near the bf16 master they were made from."""
    reference = _logits(write_official(tmp_path / "bf16", "k2.5-bf16", mtp=False))
    for layout in ("k2-instruct-0905", "k2.5"):
        src = write_official(tmp_path / layout, layout, mtp=False)
        logits = _logits(src)
        # a random 6-layer MoE amplifies small weight errors (routing flips), hence the loose bound
        cosine = (logits * reference).sum(-1) / mx.linalg.norm(logits, axis=-1) / mx.linalg.norm(reference, axis=-1)
        assert 0.7 < float(cosine.mean()) < 1 - 1e-4, (layout, cosine)
    config = json.loads((tmp_path / "k2.5" / "config.json").read_text())
    assert config["model_type"] == "kimi_k25" and "quantization_config" in config["text_config"]
    h = _headers(tmp_path / "k2.5")
    assert h["language_model.model.layers.2.mlp.experts.0.up_proj.weight_packed"][:2] == ("I32", (128, 32))
    assert h["language_model.model.layers.2.mlp.experts.0.up_proj.weight_scale"][:2] == ("BF16", (128, 8))
    assert h["language_model.model.layers.2.mlp.experts.0.up_proj.weight_shape"][:2] == ("I32", (2,))
    assert h["language_model.model.layers.2.mlp.shared_experts.up_proj.weight"][0] == "BF16"
    assert any(n.startswith("vision_tower.") for n in h) and any(n.startswith("mm_projector.") for n in h)
    with pytest.raises(ValueError, match="unknown official layout"):
        write_official(tmp_path / "x", "k3")
