"""llama.cpp GGUF files of Kimi (architecture `deepseek2`) as a convert source.

Tensors are mapped back to the Hugging Face names convert reads (`blk.N.ffn_up_exps` -> every
`model.layers.N.mlp.experts.E.up_proj.weight`; split MLA `attn_k_b` / `attn_v_b` -> `kv_b_proj`)
and dequantized to float32 with the `gguf` package, a block of rows at a time from byte
offsets. A GGUF is already quantized: converting it quantizes a second time, which loses quality
beyond the GGUF's own (measured in tests/test_convert_gguf.py).
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .builtin import KIMI_BOS_ID, KIMI_EOS_IDS
from .sources import ConvertError, Source

ARCH = "deepseek2"
# Bits of each value in the GGUF types (block scales aside), for "no fewer bits than it had".
GGUF_VALUE_BITS = {"F32": 16, "F16": 16, "BF16": 16, "Q8_0": 8, "Q8_1": 8, "Q8_K": 8, "Q6_K": 6, "Q5_0": 5, "Q5_1": 5,
                   "Q5_K": 5, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "IQ4_NL": 4, "IQ4_XS": 4, "Q3_K": 3, "IQ3_XXS": 3,
                   "IQ3_S": 3, "Q2_K": 2, "IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 2, "IQ1_S": 2, "IQ1_M": 2,
                   "TQ1_0": 2, "TQ2_0": 2}
MLX_BITS = (2, 3, 4, 5, 6, 8)

_NAMES = {  # Hugging Face suffix -> GGUF suffix, per layer
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


@dataclass(frozen=True)
class GGUFTensor:
    """A Hugging Face tensor read from a GGUF tensor (one expert of a stacked one, or kv_b_proj
    rebuilt from the split attn_k_b / attn_v_b): float32 rows, like SourceTensor.read_rows."""

    name: str
    path: Path
    shape: tuple
    parts: tuple  # ReaderTensor(s) it comes from
    expert: int = -1
    dtype: str = "F32"

    @property
    def type_name(self) -> str:
        return self.parts[0].tensor_type.name

    def _rows(self, tensor, start: int, end: int, lead: int = 0) -> np.ndarray:
        from gguf.quants import dequantize

        rows = int(np.prod(tensor.data.shape[:-1]))
        row_bytes = tensor.n_bytes // rows
        first = lead * tensor.data.shape[-2] + start if tensor.data.ndim == 3 else start
        with open(self.path, "rb") as f:
            f.seek(tensor.data_offset + first * row_bytes)
            raw = f.read((end - start) * row_bytes)
        if tensor.tensor_type.name in ("F32", "F16"):
            data = np.frombuffer(raw, dtype=np.float32 if tensor.tensor_type.name == "F32" else np.float16)
            return data.reshape(end - start, -1).astype(np.float32)
        return dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(end - start, -1), tensor.tensor_type)

    def read_rows(self, start: int, end: int) -> mx.array:
        if len(self.parts) == 2:  # kv_b_proj from attn_k_b (heads, kv_lora, nope) and attn_v_b (heads, v, kv_lora)
            k_b, v_b = self.parts
            heads = k_b.data.shape[0]
            k = np.stack([self._rows(k_b, 0, k_b.data.shape[1], h) for h in range(heads)])
            v = np.stack([self._rows(v_b, 0, v_b.data.shape[1], h) for h in range(heads)])
            whole = np.concatenate([k.swapaxes(-1, -2), v], axis=1).reshape(self.shape)
            return mx.array(whole[start:end])
        tensor = self.parts[0]
        if len(self.shape) == 1:
            return mx.array(self._rows(tensor, 0, 1).reshape(-1)[start:end])
        return mx.array(self._rows(tensor, start, end, max(self.expert, 0)))

    def read(self) -> mx.array:
        return self.read_rows(0, self.shape[0])


def _field(reader, key: str, default=None):
    field = reader.fields.get(f"{ARCH}.{key}")
    return default if field is None else field.contents()


def gguf_files(path: Path) -> list:
    """The file, or every file of a split set (NAME-00001-of-00003.gguf)."""
    path = Path(path)
    if "-of-" in path.stem:
        base = path.stem.rsplit("-", 3)[0]
        return sorted(path.parent.glob(f"{base}-*-of-*.gguf")) or [path]
    return [path]


def open_gguf(path, tokenizer_dir=None):
    """A convert Source for a GGUF file or split set; the config comes from its metadata and its
    tensor shapes, the tokenizer files from `tokenizer_dir` (the official checkpoint's)."""
    from gguf import GGUFReader

    files = gguf_files(path)
    if "-of-" in Path(path).stem:
        count = int(Path(path).stem.rsplit("-of-", 1)[1])
        stem = Path(path).stem.rsplit("-", 3)[0]
        expected = [Path(path).parent / f"{stem}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
        if missing := [f for f in expected if not f.exists()]:
            raise ConvertError(f"{missing[0]}: missing file of the split GGUF set ({len(missing)} of {count} missing)")
    tensors, reader0 = {}, None
    for file in files:
        if not file.exists():
            raise ConvertError(f"{file}: no such GGUF file" + (" (a file of the split set is missing)" if len(files) > 1 else ""))
        try:
            reader = GGUFReader(file)
        except (ValueError, OSError) as e:
            raise ConvertError(f"{file}: not a readable GGUF file ({e})") from e
        reader0 = reader0 or reader
        for t in reader.tensors:
            tensors[t.name] = (file, t)
    arch = reader0.fields.get("general.architecture")
    if arch is None or arch.contents() != ARCH:
        raise ConvertError(f"{files[0]}: architecture {arch.contents() if arch else None!r}; Kimi GGUFs are {ARCH}")

    def shape(name):
        return tuple(reversed([int(d) for d in tensors[name][1].shape]))

    layers = int(_field(reader0, "block_count"))
    heads = int(_field(reader0, "attention.head_count"))
    rope = int(_field(reader0, "rope.dimension_count"))
    vocab, hidden = shape("token_embd.weight")
    moe_layer = next(i for i in range(layers) if f"blk.{i}.ffn_up_exps.weight" in tensors)
    experts, moe_inter, _ = shape(f"blk.{moe_layer}.ffn_up_exps.weight")
    q_lora = shape("blk.0.attn_q_a.weight")[0]
    kv_lora = shape("blk.0.attn_kv_a_norm.weight")[0]
    if "blk.0.attn_kv_b.weight" in tensors:
        nope_v = shape("blk.0.attn_kv_b.weight")[0] // heads
        v_dim = nope_v - (shape("blk.0.attn_q_b.weight")[0] // heads - rope)
    else:
        v_dim = shape("blk.0.attn_v_b.weight")[1]
    nope = shape("blk.0.attn_q_b.weight")[0] // heads - rope
    text = {
        "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": shape("blk.0.ffn_up.weight")[0], "moe_intermediate_size": moe_inter,
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "n_routed_experts": experts, "num_experts_per_tok": int(_field(reader0, "expert_used_count")),
        "n_shared_experts": shape(f"blk.{moe_layer}.ffn_up_shexp.weight")[0] // moe_inter,
        "routed_scaling_factor": float(_field(reader0, "expert_weights_scale", 1.0)),
        "q_lora_rank": q_lora, "kv_lora_rank": kv_lora, "qk_rope_head_dim": rope, "qk_nope_head_dim": nope,
        "v_head_dim": v_dim, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid" if int(_field(reader0, "expert_gating_func", 2)) == 2 else "softmax",
        "norm_topk_prob": bool(_field(reader0, "expert_weights_norm", True)), "n_group": 1, "topk_group": 1,
        "first_k_dense_replace": int(_field(reader0, "leading_dense_block_count", 1)), "moe_layer_freq": 1,
        "max_position_embeddings": int(_field(reader0, "context_length", 131072)),
        "rms_norm_eps": float(_field(reader0, "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader0, "rope.freq_base", 50000.0)),
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": KIMI_BOS_ID, "eos_token_id": KIMI_EOS_IDS,
    }
    if (factor := _field(reader0, "rope.scaling.factor")) is not None:
        mscale = float(_field(reader0, "rope.scaling.yarn_log_multiplier", 0.1)) / 0.1
        text["rope_scaling"] = {
            "type": "yarn", "factor": float(factor), "mscale": mscale, "mscale_all_dim": mscale,
            "beta_fast": float(_field(reader0, "rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(_field(reader0, "rope.scaling.yarn_beta_slow", 1.0)),
            "original_max_position_embeddings": int(_field(reader0, "rope.scaling.original_context_length", 4096)),
        }

    mapped = {}

    def add(hf, gg, expert=-1):
        if gg in tensors:
            file, t = tensors[gg]
            full = shape(gg)
            mapped[hf] = GGUFTensor(hf, file, full[1:] if expert >= 0 else full, (t,), expert)

    for hf, gg in _GLOBAL.items():
        add(hf, gg)
    for i in range(layers):
        for hf, gg in _NAMES.items():
            add(f"model.layers.{i}.{hf}", f"blk.{i}.{gg}")
        kv_b = f"model.layers.{i}.self_attn.kv_b_proj.weight"
        if kv_b not in mapped and f"blk.{i}.attn_k_b.weight" in tensors:
            (file, k_b), (_, v_b) = tensors[f"blk.{i}.attn_k_b.weight"], tensors[f"blk.{i}.attn_v_b.weight"]
            mapped[kv_b] = GGUFTensor(kv_b, file, (heads * (nope + v_dim), kv_lora), (k_b, v_b))
        for proj in ("gate", "up", "down"):
            for e in range(experts if f"blk.{i}.ffn_{proj}_exps.weight" in tensors else 0):
                add(f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight", f"blk.{i}.ffn_{proj}_exps.weight", e)
    source = Source(Path(tokenizer_dir) if tokenizer_dir else files[0].parent, text, mapped)
    return source


def at_least_source_bits(recipe, source):
    """`recipe` with every module kept at no fewer bits than the GGUF stored it in (float stays float)."""
    def bits_had(module):
        names = [n for n in source.tensors if n.startswith(module.replace(".switch_mlp.", ".experts.0.")
                                                            .replace(".embed_q", ".kv_b_proj")
                                                            .replace(".unembed_out", ".kv_b_proj") + ".")]
        return max((GGUF_VALUE_BITS.get(source.tensors[n].type_name, 16) for n in names), default=16)

    def raised(name, module):
        quant = recipe(name, module)
        had = bits_had(name)
        if had >= 16:
            return False
        if not quant or quant["bits"] >= had:
            return quant
        return {**quant, "bits": min(b for b in MLX_BITS if b >= had)}

    return raised
