"""A tiny, deterministic Kimi-architecture checkpoint for tests, demos and benchmarks.

Same architecture as Kimi K2 (layer 0 dense, the rest MoE with a shared expert, MLA attention,
yarn rope, sigmoid noaux_tc routing) and the same quantization as the real target (routed experts
2-bit, the rest 4-bit, group 64), at a size a laptop CPU runs in milliseconds per token.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from .builtin import KIMI_ROUTING
from .checkpoint import INDEX_FILE, tensor_part, weight_prefix
from .slice import LayerRange, build_slice_module, checkpoint_name, quantize_slice
from .spec import QuantScheme, cast_unquantized, quantization_config
from .tokenizer import write_tiktoken_tokenizer, write_tokenizer


@dataclass(frozen=True)
class TinyShape:
    layers: int = 6
    hidden_size: int = 256
    intermediate_size: int = 512
    moe_intermediate_size: int = 128
    routed_experts: int = 16
    experts_per_token: int = 4
    attention_heads: int = 4
    q_lora_rank: int = 128
    kv_lora_rank: int = 64
    vocab_size: int = 512
    shard_files: int = 3


@dataclass(frozen=True)
class Master:
    """Given weights for a tiny checkpoint (a trained model) instead of random ones: mlx-lm tensor
    names without a layout's prefix (`model.layers.N...`, `lm_head.weight`), and the tiktoken ranks
    of the tokenizer they were trained with."""
    shape: TinyShape
    weights: dict
    ranks: dict


def tiny_text_config(shape: TinyShape, eos_ids: list, bos_id: int, dtype: str) -> dict:
    return {
        "model_type": "deepseek_v3",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "moe_intermediate_size": shape.moe_intermediate_size,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.attention_heads,
        "num_key_value_heads": shape.attention_heads,
        "n_shared_experts": 1,
        "n_routed_experts": shape.routed_experts,
        "num_experts_per_tok": shape.experts_per_token,
        "routed_scaling_factor": 2.827,
        "kv_lora_rank": shape.kv_lora_rank,
        "q_lora_rank": shape.q_lora_rank,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        **KIMI_ROUTING,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
        },
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
    }


def _randomize_routers(module) -> None:
    """mlx-lm initialises router weights to zero, which would tie every expert score."""
    def init(path, x):
        if path.endswith("mlp.gate.weight"):
            return mx.random.normal(x.shape) * (x.shape[-1] ** -0.5)
        if path.endswith("e_score_correction_bias"):
            return mx.random.uniform(0.0, 0.1, x.shape)
        return x

    module.update(tree_map_with_path(init, module.parameters()))


def _shard_of(part, num_layers: int, num_files: int) -> int:
    if part == "embed":
        return 0
    if part == "head":
        return num_files - 1
    return part * num_files // num_layers


TINY_MODEL_TYPES = ("kimi_k25", "deepseek_v3", "kimi_k2")
# The Hugging Face remote-code classes the published kimi_k2 configs name (nothing here runs them).
_DEEPSEEK_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                      "AutoModel": "modeling_deepseek.DeepseekV3Model",
                      "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
# The project's own target: routed experts 2-bit, the rest 4-bit.
DEFAULT_SCHEME = QuantScheme(expert_bits=2, other_bits=4, group_size=64)


def _hand_written_overrides(scheme_config: dict, layers: LayerRange, prefix: str) -> dict:
    """A `quantization` as people write it by hand: the default, then only the modules that differ
    (one of them `false`: left unquantized)."""
    default = {"group_size": scheme_config["group_size"], "bits": scheme_config["bits"]}
    out = dict(default)
    out.update({name: q for name, q in scheme_config.items() if isinstance(q, dict) and q != default})
    out[f"{prefix}model.layers.{layers.end - 1}.self_attn.q_a_proj"] = False
    return out


def _override_recipe(prefix: str, last_layer: int):
    def recipe(name, module):
        if not hasattr(module, "to_quantized"):
            return False
        if name == f"{prefix}model.layers.{last_layer}.self_attn.q_a_proj":
            return False
        if ".switch_mlp." in name:
            return {"group_size": 32, "bits": 3}
        if name.endswith("lm_head"):
            return {"group_size": 128, "bits": 8}
        return {"group_size": 64, "bits": 4}

    return recipe


def _mtp_tensors(shard: dict, prefix: str, last: int) -> dict:
    """DeepSeek-V3's multi-token-prediction layer after the last decoder layer, as conversions that
    keep it hold it: a copy of a MoE layer plus its own norms, projection and head."""
    layer = f"{prefix}model.layers.{last}."
    mtp = f"{prefix}model.layers.{last + 1}."
    out = {mtp + n[len(layer):]: v for n, v in shard.items() if n.startswith(layer)}
    norm = shard[f"{layer}input_layernorm.weight"]
    hidden = norm.shape[0]
    out[f"{mtp}enorm.weight"] = norm
    out[f"{mtp}hnorm.weight"] = norm
    out[f"{mtp}eh_proj.weight"] = mx.random.normal((hidden, 2 * hidden)).astype(norm.dtype) * (2 * hidden) ** -0.5
    out[f"{mtp}shared_head.norm.weight"] = norm
    return out


def vision_tensors(rng: np.random.Generator, text_hidden: int) -> dict:
    """A stand-in vision tower and projector under the official names (convert drops them)."""
    v = 64
    shapes = {
        "vision_tower.patch_embed.proj.weight": (v, 3, 14, 14),
        "vision_tower.patch_embed.proj.bias": (v,),
        "vision_tower.encoder.blocks.0.wqkv.weight": (3 * v, v),
        "vision_tower.encoder.blocks.0.wo.weight": (v, v),
        "vision_tower.encoder.final_layernorm.weight": (v,),
        "mm_projector.pre_norm.weight": (4 * v,),
        "mm_projector.proj.0.weight": (text_hidden, 4 * v),
        "mm_projector.proj.2.weight": (text_hidden, text_hidden),
    }
    return {n: mx.array(rng.standard_normal(s).astype(np.float32) * 0.05).astype(mx.bfloat16) for n, s in shapes.items()}


def make_tiny(out_dir, shape: TinyShape = TinyShape(), seed: int = 0, model_type: str = "kimi_k25",
              dtype: str = "float32", scheme: QuantScheme = DEFAULT_SCHEME, recipe: str = "",
              tokenizer: str = "json", vision: bool = False, mtp: bool = False, master: Master = None) -> Path:
    """Write a tiny Kimi checkpoint (weights over `shape.shard_files` files, index, tokenizer).

    The real models run in bfloat16; the tiny one defaults to float32 because MLX's CPU backend
    runs bf16 quantized matmuls about 10x slower (90 ms per prompt token here), which would make
    tests and the demo crawl. `dtype="bfloat16"` gives the real target's dtype.

    kimi_k25 is the K2.5/K2.6 layout (text model under `language_model.`, config in `text_config`);
    kimi_k2 the top-level layout of K2 / K2-Thinking and their MLX conversions; deepseek_v3 the same
    with the model type mlx-lm maps kimi_k2 to. Quantization: `scheme`, or `recipe` (one of mlx-lm's
    mixed recipes, or "overrides": a hand-written per-module `quantization`). `tokenizer`: "json"
    (a tokenizer.json) or "tiktoken" (Kimi's real tokenizer files). `vision` adds stand-ins of
    K2.5's vision tower and projector (kimi_k25 only), `mtp` the multi-token-prediction layer after
    the last decoder layer; kimi-cluster ignores both. mlx_kimi.layouts names the published layouts.
    `master`: the weights and tokenizer of a trained model (its shape replaces `shape`); `scheme=None`
    leaves every module unquantized.
    """
    if master is not None:
        if tokenizer != "tiktoken":
            raise ValueError("a trained model's tokenizer is Kimi's tiktoken one: pass tokenizer='tiktoken'")
        shape = master.shape
    if shape.layers < 2:
        raise ValueError("a Kimi-architecture model needs at least 2 layers (one dense, one MoE)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    if model_type not in TINY_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(TINY_MODEL_TYPES)}, not {model_type!r}")
    if vision and model_type != "kimi_k25":
        raise ValueError("only the kimi_k25 layout carries a vision tower")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "tiktoken":
        eos_ids = write_tiktoken_tokenizer(out, shape.vocab_size, master.ranks if master else None)
        # [BOS] sits just before [EOS]; <|im_end|> is in generation_config.json, as in the real files
        bos_id, config_eos = eos_ids[0] - 1, eos_ids[0]
    else:
        eos_ids = write_tokenizer(out, vocab_size=shape.vocab_size)
        added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
        bos_id, config_eos = next(t["id"] for t in added if t["content"] == "[BOS]"), eos_ids

    text = tiny_text_config(shape, config_eos, bos_id, dtype)
    if model_type == "kimi_k25":
        if tokenizer == "tiktoken":
            text["model_type"] = "kimi_k2"  # as in the published K2.5 / K2.6 configs
        config = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
                  "text_config": text, "eos_token_id": config_eos}
    else:
        config = {**text, "architectures": ["DeepseekV3ForCausalLM"], "model_type": model_type}
        if model_type == "kimi_k2":
            config["auto_map"] = _DEEPSEEK_AUTO_MAP

    mx.random.seed(seed)
    layers = LayerRange(0, shape.layers)
    prefix = weight_prefix(config)
    module = build_slice_module(config, layers)
    if master is None:
        _randomize_routers(module)
    else:
        module.load_weights([(prefix + name, value.astype(mx.float32)) for name, value in master.weights.items()])
    if recipe == "overrides":
        predicate = _override_recipe(prefix, shape.layers - 1)
    elif recipe:
        from .recipe import mlx_lm_recipe

        mixed = mlx_lm_recipe(recipe, config, scheme.group_size)
        predicate = lambda name, m: hasattr(m, "to_quantized") and mixed(name, m)  # noqa: E731
    else:
        predicate = scheme.params if scheme else lambda name, m: False
    quantize_slice(module, layers, predicate)
    cast_unquantized(module, getattr(mx, dtype))
    if scheme or recipe:
        config["quantization"] = quantization_config(module, layers, scheme or DEFAULT_SCHEME)
        if recipe == "overrides":
            config["quantization"] = _hand_written_overrides(config["quantization"], layers, prefix)
        config["quantization_config"] = config["quantization"]

    shards = [dict() for _ in range(shape.shard_files)]
    for path, value in tree_flatten(module.parameters()):
        name = checkpoint_name(path, layers)
        shards[_shard_of(tensor_part(name, prefix), shape.layers, shape.shard_files)][name] = value
    if mtp:
        shards[-1].update(_mtp_tensors(shards[-1], prefix, shape.layers - 1))
    if vision:
        shards[0].update(vision_tensors(np.random.default_rng(seed), shape.hidden_size))
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / file), shard, metadata={"format": "mlx"})
        weight_map.update({name: file for name in shard})
    index = {
        "metadata": {"total_size": sum(v.nbytes for s in shards for v in s.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tiny_shape.json").write_text(json.dumps({**asdict(shape), "seed": seed}, indent=2))
    return out
