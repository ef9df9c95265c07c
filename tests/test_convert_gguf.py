"""GGUF sources: a tiny deepseek2 GGUF (written with the gguf package's writer, split MLA
attn_k_b / attn_v_b, Q4_0 experts, Q8_0 elsewhere) converts to the MLX layout, each tensor the
MLX quantization of gguf's own dequantization, no tensor below the bits it had; what the second
quantization costs is measured against the bf16 model."""

import json
import subprocess

import gguf
import mlx.core as mx
import numpy as np
from gguf.quants import dequantize, quantize
from mlx_lm.utils import load_model

from harness import KIMI
from mlx_kimi.convert import convert
from mlx_kimi.gguf_source import at_least_source_bits, open_gguf
from mlx_kimi.official import write_official
from mlx_kimi.quality import compare_checkpoints
from mlx_kimi.sources import decode_rows, open_source
from mlx_kimi.spec import QuantScheme

Q = gguf.GGMLQuantizationType
HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight", "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight", "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias", "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight", "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}


def write_gguf(src, path):
    """The bf16 source as llama.cpp's deepseek2 GGUF: experts stacked, kv_b split, quantized."""
    source = open_source(src)
    text = source.text

    def value(name):
        return np.array(decode_rows(source, name, 0, source.tensors[name].shape[0]).astype(mx.float32))

    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(text["num_hidden_layers"])
    w.add_head_count(text["num_attention_heads"])
    w.add_rope_dimension_count(text["qk_rope_head_dim"])
    w.add_expert_count(text["n_routed_experts"])
    w.add_expert_used_count(text["num_experts_per_tok"])
    w.add_expert_weights_scale(text["routed_scaling_factor"])
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(1)
    w.add_context_length(text["max_position_embeddings"])
    w.add_layer_norm_rms_eps(text["rms_norm_eps"])
    w.add_rope_freq_base(text["rope_theta"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(text["rope_scaling"]["factor"])
    w.add_rope_scaling_orig_ctx_len(4096)
    w.add_rope_scaling_yarn_log_mul(0.1)
    w.add_rope_scaling_yarn_beta_fast(text["rope_scaling"]["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(text["rope_scaling"]["beta_slow"])

    def put(name, x, qtype):
        if qtype == Q.F32 or x.ndim == 1:
            w.add_tensor(name, x.astype(np.float32))
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)

    put("token_embd.weight", value("model.embed_tokens.weight"), Q.Q8_0)
    put("output_norm.weight", value("model.norm.weight"), Q.F32)
    put("output.weight", value("lm_head.weight"), Q.Q8_0)
    heads, nope = text["num_attention_heads"], text["qk_nope_head_dim"]
    for i in range(text["num_hidden_layers"]):
        for hf, gg in HF_TO_GGUF.items():
            if f"model.layers.{i}.{hf}" in source.tensors:
                put(f"blk.{i}.{gg}", value(f"model.layers.{i}.{hf}"), Q.F32 if "gate.weight" in hf else Q.Q8_0)
        kv_b = value(f"model.layers.{i}.self_attn.kv_b_proj.weight").reshape(heads, -1, text["kv_lora_rank"])
        put(f"blk.{i}.attn_k_b.weight", np.ascontiguousarray(kv_b[:, :nope].swapaxes(-1, -2)), Q.Q8_0)
        put(f"blk.{i}.attn_v_b.weight", np.ascontiguousarray(kv_b[:, nope:]), Q.Q8_0)
        if i >= 1:
            for proj in ("gate", "up", "down"):
                stacked = np.stack([value(f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight")
                                    for e in range(text["n_routed_experts"])])
                put(f"blk.{i}.ffn_{proj}_exps.weight", stacked, Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_source(tmp_path):
    src = write_official(tmp_path / "src", "k2-instruct-bf16", mtp=False)
    path = write_gguf(src, tmp_path / "tiny-Q4.gguf")
    out = tmp_path / "out"
    run = subprocess.run([KIMI, "convert", str(path), str(out), "--tokenizer", str(src), "--dtype", "float32"],
                         capture_output=True, text=True, timeout=300)  # asks experts 2-bit, the rest 4-bit
    assert run.returncode == 0, run.stderr
    assert "quantizes a second time" in run.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["model.layers.2.mlp.switch_mlp.up_proj"]["bits"] == 4  # Q4_0: 4 bits kept
    assert config["quantization"]["model.layers.2.self_attn.o_proj"]["bits"] == 8  # Q8_0: 8 bits kept

    got = {}
    for file in sorted(out.glob("model-*.safetensors")):
        got.update(mx.load(str(file)))
    reader = gguf.GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    experts = mx.array(dequantize(raw["blk.2.ffn_up_exps.weight"].data, Q.Q4_0))
    want = mx.quantize(experts, group_size=64, bits=4)
    assert mx.array_equal(got["model.layers.2.mlp.switch_mlp.up_proj.weight"], want[0]).item()
    attn = mx.array(dequantize(raw["blk.3.attn_q_b.weight"].data, Q.Q8_0))
    assert mx.array_equal(got["model.layers.3.self_attn.q_b_proj.weight"], mx.quantize(attn, group_size=64, bits=8)[0]).item()
    k_b = mx.array(dequantize(raw["blk.1.attn_k_b.weight"].data, Q.Q8_0))
    assert mx.array_equal(got["model.layers.1.self_attn.embed_q.weight"], mx.quantize(k_b, group_size=64, bits=8)[0]).item()
    assert got["model.layers.1.mlp.gate.weight"].dtype == mx.float32  # the router stays float

    reference = convert(src, tmp_path / "float", lambda n, m: False, dtype="float32").out
    load_model(out)  # mlx-lm reads the result (strictly: every tensor in place)
    twice = compare_checkpoints(reference, out, max_tokens=64)
    recipe = at_least_source_bits(QuantScheme(2, 4, 64).params, open_gguf(path, tokenizer_dir=src))
    once = compare_checkpoints(reference, convert(src, tmp_path / "once", recipe, dtype="float32").out, max_tokens=64)
    print(f"GGUF Q4_0/Q8_0 requantized 4/8-bit: KL mean {twice.kl_mean:.4f} p95 {twice.kl_p95:.4f}; "
          f"the bf16 source quantized once the same way: KL mean {once.kl_mean:.4f} p95 {once.kl_p95:.4f}")
    assert once.kl_mean < twice.kl_mean
