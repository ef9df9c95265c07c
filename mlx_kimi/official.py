"""Tiny checkpoints in Moonshot's official source layouts, as published (see ../shared/kimi-facts.md).

Hugging Face tensor names (`mlp.experts.N.*`, `self_attn.kv_b_proj`, per-layer
`rotary_emb.inv_freq`, the MTP layer after the last decoder layer), and the published weight
formats:
- K2-Instruct / 0905: FP8 e4m3 linear weights with an F32 `weight_scale_inv` per 128x128 block;
  router, embeddings, head and norms bf16.
- K2-Thinking, K2.5, K2.6: routed experts compressed-tensors pack-quantized INT4 (group 32,
  symmetric; `weight_packed` int32 of 8 nibbles holding value + 8, bf16 `weight_scale`, int32
  `weight_shape`), bf16 elsewhere. K2.5/K2.6 wrap the text model (`language_model.`, config in
  `text_config`) beside a vision tower and projector.
- `*-bf16`: the same models already dequantized to bf16.

Weights are drawn with structure (a few outlier input channels per matrix, like trained LLM
weights), so that quantization recipes differ measurably on them. These files are the input of
`kimi-cluster convert`; kimi-cluster itself does not run them.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint import safetensors_header
from .recipe import draw_weight
from .sources import FP8_BLOCK
from .tiny import Master, TinyShape, tiny_text_config, vision_tensors
from .tokenizer import write_tiktoken_tokenizer

INT4_GROUP = 32
SAFETENSORS_DTYPES = {
    mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint8: "U8",
    mx.int32: "I32", mx.uint32: "U32", mx.int8: "I8", mx.uint16: "U16",
}


@dataclass(frozen=True)
class OfficialLayout:
    name: str
    weights: str  # "fp8", "int4" or "bf16"
    wrapped: bool  # kimi_k25: text model under `language_model.`, a vision tower beside it
    shard_name: str  # format of the shard file names, given index (from 1) and count

    def shard_file(self, index: int, count: int) -> str:
        return self.shard_name.format(i=index, n=count)


_K2_0711 = "model-{i}-of-{n}.safetensors"
_PADDED = "model-{i:05d}-of-{n:06d}.safetensors"
OFFICIAL_LAYOUTS = {
    "k2-instruct": OfficialLayout("k2-instruct", "fp8", False, _K2_0711),
    "k2-instruct-0905": OfficialLayout("k2-instruct-0905", "fp8", False, _PADDED),
    "k2-thinking": OfficialLayout("k2-thinking", "int4", False, _PADDED),
    "k2.5": OfficialLayout("k2.5", "int4", True, _PADDED),
    "k2.6": OfficialLayout("k2.6", "int4", True, _PADDED),
}
OFFICIAL_LAYOUTS.update({
    f"{name}-bf16": replace(layout, name=f"{name}-bf16", weights="bf16") for name, layout in list(OFFICIAL_LAYOUTS.items())
})

# The real tokenizer files need at least 576 embedding rows.
OFFICIAL_TINY_SHAPE = TinyShape(vocab_size=1024)


# --- safetensors with the dtypes MLX cannot hold (F8_E4M3) -------------------------------------

def write_safetensors(path: Path, tensors: dict, metadata: dict = None) -> None:
    """Write `name -> (dtype string, shape, bytes)` or `name -> mx.array` as one safetensors file."""
    raw = {name: value if isinstance(value, tuple) else _raw(value) for name, value in tensors.items()}
    header, _ = safetensors_header([(name, dtype, shape) for name, (dtype, shape, _) in raw.items()], metadata)
    with open(path, "wb") as f:
        f.write(header)
        for _, _, data in raw.values():
            f.write(data)


def _raw(array: mx.array) -> tuple:
    array = mx.contiguous(array)
    mx.eval(array)
    return SAFETENSORS_DTYPES[array.dtype], array.shape, bytes(memoryview(array))


# --- the official formats -------------------------------------------------------------------------

def fp8_blocks(weight: mx.array) -> tuple:
    """DeepSeek-V3 FP8: e4m3 values and an F32 scale per 128x128 block (dequantized = fp8 * scale)."""
    m, n = weight.shape
    pm, pn = -m % FP8_BLOCK, -n % FP8_BLOCK
    w = mx.pad(weight.astype(mx.float32), ((0, pm), (0, pn)))
    blocks = w.reshape((m + pm) // FP8_BLOCK, FP8_BLOCK, (n + pn) // FP8_BLOCK, FP8_BLOCK)
    scale = mx.maximum(mx.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0
    values = (blocks / scale[:, None, :, None]).reshape(m + pm, n + pn)[:m, :n]
    return mx.to_fp8(values), scale


def int4_pack(weight: mx.array) -> tuple:
    """compressed-tensors pack-quantized INT4, symmetric, group 32: (packed int32, bf16 scale)."""
    out, inp = weight.shape
    groups = weight.astype(mx.float32).reshape(out, inp // INT4_GROUP, INT4_GROUP)
    scale = (mx.maximum(mx.abs(groups).max(axis=-1), 1e-12) / 7.0).astype(mx.bfloat16)
    q = mx.clip(mx.round(groups / scale.astype(mx.float32)[..., None]), -8, 7).astype(mx.uint32) + 8
    q = q.reshape(out, inp // 8, 8)
    packed = mx.zeros((out, inp // 8), dtype=mx.uint32)
    for i in range(8):
        packed = packed | (q[..., i] << (4 * i))
    return packed.view(mx.int32), scale


def _compressed_tensors_config(ignore: list) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "output_activations": None,
                "weights": {
                    "num_bits": 4, "type": "int", "symmetric": True, "group_size": INT4_GROUP,
                    "strategy": "group", "dynamic": False, "observer": "minmax", "actorder": None,
                },
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


_FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
               "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


# --- the tensors ----------------------------------------------------------------------------------

def hf_tensor_shapes(text: dict, mtp: bool = True) -> dict:
    """Every tensor of the official text model: Hugging Face name -> shape, in file order."""
    h, heads = text["hidden_size"], text["num_attention_heads"]
    nope, rope, v = text["qk_nope_head_dim"], text["qk_rope_head_dim"], text["v_head_dim"]
    q_lora, kv_lora = text["q_lora_rank"], text["kv_lora_rank"]
    moe, experts = text["moe_intermediate_size"], text["n_routed_experts"]
    layers = text["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (text["vocab_size"], h)}

    def mlp(prefix, inter):
        shapes[f"{prefix}.gate_proj.weight"] = (inter, h)
        shapes[f"{prefix}.up_proj.weight"] = (inter, h)
        shapes[f"{prefix}.down_proj.weight"] = (h, inter)

    for i in range(layers + (1 if mtp else 0)):
        p = f"model.layers.{i}"
        if i == layers:  # DeepSeek-V3's multi-token-prediction layer
            shapes[f"{p}.embed_tokens.weight"] = (text["vocab_size"], h)
            shapes[f"{p}.enorm.weight"] = (h,)
            shapes[f"{p}.hnorm.weight"] = (h,)
            shapes[f"{p}.eh_proj.weight"] = (h, 2 * h)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.self_attn.q_a_proj.weight"] = (q_lora, h)
        shapes[f"{p}.self_attn.q_a_layernorm.weight"] = (q_lora,)
        shapes[f"{p}.self_attn.q_b_proj.weight"] = (heads * (nope + rope), q_lora)
        shapes[f"{p}.self_attn.kv_a_proj_with_mqa.weight"] = (kv_lora + rope, h)
        shapes[f"{p}.self_attn.kv_a_layernorm.weight"] = (kv_lora,)
        shapes[f"{p}.self_attn.kv_b_proj.weight"] = (heads * (nope + v), kv_lora)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, heads * v)
        shapes[f"{p}.self_attn.rotary_emb.inv_freq"] = (rope // 2,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if i < text["first_k_dense_replace"]:
            mlp(f"{p}.mlp", text["intermediate_size"])
            continue
        shapes[f"{p}.mlp.gate.weight"] = (experts, h)
        shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (experts,)
        for e in range(experts):
            mlp(f"{p}.mlp.experts.{e}", moe)
        mlp(f"{p}.mlp.shared_experts", moe * text["n_shared_experts"])
        if i == layers:
            shapes[f"{p}.shared_head.norm.weight"] = (h,)
            shapes[f"{p}.shared_head.head.weight"] = (text["vocab_size"], h)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (text["vocab_size"], h)
    return shapes


def official_names(weights: dict, text: dict) -> dict:
    """mlx-lm's tensors of a text model under the official names: routed experts unstacked
    (`mlp.experts.N.*`), MLA's `embed_q` / `unembed_out` joined back into `kv_b_proj` (the inverse of
    mlx-lm's deepseek_v3 sanitize)."""
    out = {}
    nope, heads = text["qk_nope_head_dim"], text["num_attention_heads"]
    for name, value in weights.items():
        if ".mlp.switch_mlp." in name:
            for e in range(value.shape[0]):
                out[name.replace(".switch_mlp.", f".experts.{e}.")] = value[e]
        elif name.endswith(".self_attn.embed_q.weight"):
            unembed = weights[name.replace("embed_q", "unembed_out")]
            kv_b = mx.concatenate([value.swapaxes(-1, -2), unembed], axis=1)
            out[name.replace("embed_q", "kv_b_proj")] = kv_b.reshape(heads * (nope + text["v_head_dim"]), -1)
        elif not name.endswith(".self_attn.unembed_out.weight"):
            out[name] = value
    return out


def is_fp8_target(name: str) -> bool:
    """Linear weights Moonshot ships in FP8: every projection of the decoder layers."""
    return name.startswith("model.layers.") and name.endswith(("proj.weight", "proj_with_mqa.weight"))


def is_int4_target(name: str) -> bool:
    return ".mlp.experts." in name


def _encode(name: str, value: mx.array, weights: str) -> dict:
    """One bf16-master tensor as the official files hold it (possibly several tensors)."""
    if weights == "fp8" and is_fp8_target(name):
        values, scale = fp8_blocks(value)
        mx.eval(values)
        return {name: ("F8_E4M3", values.shape, bytes(memoryview(values))), f"{name}_scale_inv": scale}
    if weights == "int4" and is_int4_target(name):
        packed, scale = int4_pack(value)
        base = name[: -len("weight")]
        return {f"{base}weight_packed": packed, f"{base}weight_scale": scale,
                f"{base}weight_shape": mx.array(value.shape, dtype=mx.int32)}
    return {name: value}


def official_config(layout: OfficialLayout, text: dict) -> dict:
    ignore = [n[: -len(".weight")] for n in hf_tensor_shapes(text, mtp=False)
              if n.endswith("proj.weight") or n.endswith("proj_with_mqa.weight") or n == "lm_head.weight"]
    ignore = [n for n in ignore if not is_int4_target(n)]
    text = {**text, "model_type": "kimi_k2", "torch_dtype": "bfloat16", "num_nextn_predict_layers": 1}
    text.pop("quantization", None)
    if layout.weights == "fp8":
        text["quantization_config"] = _FP8_CONFIG
    if layout.weights == "int4":
        prefix = "language_model." if layout.wrapped else ""
        text["quantization_config"] = _compressed_tensors_config([prefix + n for n in ignore])
    if not layout.wrapped:
        return {"architectures": ["DeepseekV3ForCausalLM"],
                "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                             "AutoModel": "modeling_deepseek.DeepseekV3Model",
                             "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
                **text}
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config",
                     "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration"},
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": {"model_type": "moonvit", "hidden_size": 64, "patch_size": 14,
                          "mm_hidden_size": 256, "text_hidden_size": text["hidden_size"]},
        "bos_token_id": text["bos_token_id"],
        "eos_token_id": text["eos_token_id"],
        "pad_token_id": text["vocab_size"] - 1,
        "torch_dtype": "bfloat16",
    }


def write_official(out_dir, layout: str, shape: TinyShape = OFFICIAL_TINY_SHAPE, seed: int = 0,
                   mtp: bool = True, master: Master = None) -> Path:
    """Write a tiny checkpoint in the official `layout` (a key of OFFICIAL_LAYOUTS): one shard
    per decoder layer (the MTP layer included; the embedding in the first, norm and head in the
    last), the index, config.json and Kimi's tokenizer files. The same seed gives the same
    bf16 master weights in every layout; `mtp=False` leaves out the MTP layer (mlx-lm drops
    only a layer numbered 61, so its own conversion of a tiny source needs this). `master`: a trained
    model's weights and tokenizer (its shape replaces `shape`); what it lacks (the MTP layer, the
    vision tower) is drawn as without it."""
    if layout not in OFFICIAL_LAYOUTS:
        raise ValueError(f"unknown official layout {layout!r}; choose one of {', '.join(OFFICIAL_LAYOUTS)}")
    spec = OFFICIAL_LAYOUTS[layout]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = master.shape if master else shape
    eos_ids = write_tiktoken_tokenizer(out, shape.vocab_size, master.ranks if master else None)
    text = tiny_text_config(shape, eos_ids, eos_ids[0] - 1, "bfloat16")  # [BOS] sits just before [EOS]
    config = official_config(spec, text)
    given = official_names(master.weights, text) if master else {}
    prefix = "language_model." if spec.wrapped else ""

    rng = np.random.default_rng(seed)
    shapes = hf_tensor_shapes(text, mtp=True)
    groups = [[] for _ in range(text["num_hidden_layers"] + (1 if mtp else 0))]
    for name in shapes:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        # Draw every tensor (the MTP layer's too) so that the weights do not depend on `mtp`.
        value = mx.array(draw_weight(name, shapes[name], rng, text["rope_theta"]))
        value = given.get(name, value)
        if layer is not None and layer >= len(groups):
            continue
        if not name.endswith(("inv_freq", "e_score_correction_bias")):
            value = value.astype(mx.bfloat16)
        index = layer if layer is not None else (0 if "embed_tokens" in name else len(groups) - 1)
        groups[index].append((name, value))
    if spec.wrapped:
        groups[0] = [(n, v) for n, v in vision_tensors(rng, text["hidden_size"]).items()] + groups[0]

    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = spec.shard_file(i + 1, len(groups))
        tensors = {}
        for name, value in group:
            for n, v in _encode(name, value, spec.weights).items():
                tensors[n if n.startswith(("vision_tower.", "mm_projector.")) else prefix + n] = v
        write_safetensors(out / file, tensors, metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
        total += (out / file).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out

