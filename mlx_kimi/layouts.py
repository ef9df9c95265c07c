"""Tiny checkpoints in the layouts of the Kimi checkpoints people download, for `make-tiny --layout`.

MLX layouts (what kimi-cluster runs), each at the tiny shape with real-format tokenizer files
(tiktoken.model; tokenizer_config.json naming TikTokenTokenizer, its auto_map naming the source repo
as transformers writes it when mlx-lm saves the tokenizer again; chat_template.jinja,
generation_config.json), bfloat16 like the published files, mlx-lm tensor names, and
`model-0000N-of-0000M.safetensors` shards with an index, as mlx-lm's conversion writes them (config's
`quantization` holds only the default where mlx-lm writes only that: uniform, native INT4, float modes):

- k2-instruct-4bit: mlx-community Kimi-K2-Instruct-4bit: top-level `model_type: kimi_k2`,
  `architectures: [DeepseekV3ForCausalLM]`, every linear (embedding and lm_head too) 4-bit group 64
  (K2-Instruct-0905's conversion is the same but for yarn factor 64 and 262144 positions).
- k2-instruct-3bit, k2-instruct-2bit, k2-instruct-8bit: the same, uniform 3, 2 and 8-bit.
- k2-thinking: mlx-community Kimi-K2-Thinking: kimi_k2, native INT4 as mlx-lm keeps it (routed
  experts 4-bit group 32), everything else unquantized bf16; K2-Thinking's long-context text config
  (262144 positions, yarn factor 64, rms_norm_eps 1e-5), as k2.5 and k2.6-3bit have.
- k2.5: mlx-community Kimi-K2.5 / K2.6: top-level `kimi_k25` whose `text_config` says kimi_k2, the
  text model under `language_model.`, `vision_tower.*` / `mm_projector.*` tensors left in the
  shards, native INT4 experts + bf16.
- k2.6-3bit: K2.5/K2.6 wrapped like k2.5, uniform 3-bit.
- k2-mixed_2_6: mlx-lm's `--quant-predicate mixed_2_6` recipe (per-module bits in config's
  `quantization`).
- k2-overrides: a hand-written per-module `quantization`: default 4-bit group 64, routed experts
  3-bit group 32, lm_head 8-bit group 128, one attention projection left bf16 (`false`).
- k2-mxfp4, k2-nvfp4: MLX's float formats (`--q-mode mxfp4` / `nvfp4`) on every linear.
- k2-mtp: k2-instruct-4bit plus the multi-token-prediction layer after the last decoder layer left
  in the shards (layer 61 of the real model, which mlx-lm drops by that number); kimi-cluster
  ignores every layer past the last.

Official layouts (Moonshot's own releases, which `kimi-cluster convert` turns into an MLX layout;
see mlx_kimi/official.py): k2-instruct-fp8, k2-instruct-0905-fp8, k2-thinking-int4, k2.5-int4,
k2.6-int4, and `OFFICIAL-bf16` of each.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

from .checkpoint import text_config
from .official import OFFICIAL_LAYOUTS, OFFICIAL_TINY_SHAPE, write_official
from .spec import FLOAT_BITS, QuantScheme
from .tiny import Master, TinyShape, make_tiny


@dataclass(frozen=True)
class MlxLayout:
    model_type: str  # "kimi_k2" or "kimi_k25"
    scheme: QuantScheme = QuantScheme(4, 4, 64)
    recipe: str = ""  # an mlx-lm recipe name, or "overrides"; else `scheme`
    mtp: bool = False
    source: str = "moonshotai/Kimi-K2-Instruct"  # the repo the conversion's tokenizer auto_map names
    long_context: bool = False  # K2-Thinking / K2.5 / K2.6's text config (262144 positions, yarn factor 64)


# What K2-Thinking, K2.5 and K2.6 configs say where K2-Instruct (0711) differs (../shared/kimi-facts.md).
LONG_CONTEXT_TEXT = {
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-5,
    "rope_scaling": {"type": "yarn", "factor": 64.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
}


MLX_LAYOUTS = {
    "k2-instruct-4bit": MlxLayout("kimi_k2"),
    "k2-instruct-3bit": MlxLayout("kimi_k2", QuantScheme(3, 3, 64)),
    "k2-instruct-2bit": MlxLayout("kimi_k2", QuantScheme(2, 2, 64)),
    "k2-instruct-8bit": MlxLayout("kimi_k2", QuantScheme(8, 8, 64)),
    "k2-thinking": MlxLayout("kimi_k2", QuantScheme(4, FLOAT_BITS, 32), source="moonshotai/Kimi-K2-Thinking",
                             long_context=True),
    "k2.5": MlxLayout("kimi_k25", QuantScheme(4, FLOAT_BITS, 32), source="moonshotai/Kimi-K2.5", long_context=True),
    "k2.6-3bit": MlxLayout("kimi_k25", QuantScheme(3, 3, 64), source="moonshotai/Kimi-K2.6", long_context=True),
    "k2-mixed_2_6": MlxLayout("kimi_k2", recipe="mixed_2_6"),
    "k2-overrides": MlxLayout("kimi_k2", recipe="overrides"),
    "k2-mxfp4": MlxLayout("kimi_k2", QuantScheme(4, 4, 32, "mxfp4")),
    "k2-nvfp4": MlxLayout("kimi_k2", QuantScheme(4, 4, 16, "nvfp4")),
    "k2-mtp": MlxLayout("kimi_k2", mtp=True),
}
# make-tiny's names for the official layouts: the weight format says which they are.
OFFICIAL_NAMES = {
    f"{name}-{spec.weights}" if spec.weights != "bf16" else name: name for name, spec in OFFICIAL_LAYOUTS.items()
}
LAYOUTS = [*MLX_LAYOUTS, *OFFICIAL_NAMES]


def write_layout(out_dir, layout: str, shape: TinyShape = OFFICIAL_TINY_SHAPE, seed: int = 0,
                 dtype: str = "bfloat16", master: Master = None) -> Path:
    """Write a tiny checkpoint in `layout` (one of LAYOUTS; see the module docstring), with random
    weights or a trained model's (`master`, whose shape replaces `shape`)."""
    # Kimi's tokenizer files need room for 256 specials after the base ranks.
    shape = replace(shape, vocab_size=max(shape.vocab_size, OFFICIAL_TINY_SHAPE.vocab_size))
    if layout in OFFICIAL_NAMES:
        return write_official(out_dir, OFFICIAL_NAMES[layout], shape, seed, master=master)
    if layout not in MLX_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    spec = MLX_LAYOUTS[layout]
    out = make_tiny(out_dir, shape, seed=seed, model_type=spec.model_type, dtype=dtype, scheme=spec.scheme,
                    recipe=spec.recipe, tokenizer="tiktoken", vision=spec.model_type == "kimi_k25", mtp=spec.mtp,
                    master=master)
    # mlx-lm saves the tokenizer again through transformers, whose auto_map then names the source repo.
    _edit_json(out / "tokenizer_config.json", lambda config: config.update(
        auto_map={"AutoTokenizer": [f"{spec.source}--tokenization_kimi.TikTokenTokenizer", None]}))
    if spec.long_context:  # the weights do not depend on these
        _edit_json(out / "config.json", lambda config: text_config(config).update(LONG_CONTEXT_TEXT))
    if not spec.recipe:
        # mlx-lm's uniform `-q` (and its native INT4 conversion) writes only the default; the loader
        # tells quantized modules from float ones by their scales.
        _edit_json(out / "config.json", lambda config: config.update(
            quantization=_uniform_quantization(spec.scheme), quantization_config=_uniform_quantization(spec.scheme)))
    return out


def _uniform_quantization(scheme: QuantScheme) -> dict:
    return {"group_size": scheme.group_size, "bits": scheme.expert_bits, "mode": scheme.mode}


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2) + "\n")
