"""The quantization scheme kimi-cluster targets, and exact sizes of the built-in real models.

Sizes of the real models come from mlx-lm's own modules built lazily and quantized lazily:
an array's nbytes is known from its shape and dtype without evaluating (allocating) it.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .checkpoint import SizeReport
from .slice import (
    LayerRange,
    build_slice_module,
    checkpoint_name,
    layer_nbytes,
    model_args,
    quantize_slice,
)

QUANT_BITS = (2, 3, 4, 5, 6, 8)
FLOAT_BITS = 16  # "16-bit": left unquantized, in the checkpoint's float dtype (bf16 for the real models)
GROUP_SIZES = (32, 64, 128)
# Modes other than affine allow one (bits, group size) each.
FLOAT_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


@dataclass(frozen=True)
class QuantScheme:
    """MLX quantization: routed experts at `expert_bits`, every other linear (the embedding and
    lm_head too) at `other_bits`; 16 bits means left unquantized. `mode` is MLX's affine (scales
    and biases per group) or one of its float formats (mxfp4, nvfp4, mxfp8)."""

    expert_bits: int = 2
    other_bits: int = 4
    group_size: int = 64
    mode: str = "affine"

    def __post_init__(self):
        if self.expert_bits not in QUANT_BITS:
            raise ValueError(f"{self.expert_bits} bits is not an MLX quantization width for the routed experts "
                             f"({', '.join(map(str, QUANT_BITS))})")
        if self.other_bits not in QUANT_BITS + (FLOAT_BITS,):
            raise ValueError(f"{self.other_bits} bits is not an MLX quantization width "
                             f"({', '.join(map(str, QUANT_BITS))}, or 16: unquantized)")
        if self.mode == "affine":
            if self.group_size not in GROUP_SIZES:
                sizes = ", ".join(map(str, GROUP_SIZES))
                raise ValueError(f"group size {self.group_size} is not one of MLX's ({sizes})")
        elif self.mode not in FLOAT_MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r} (affine, {', '.join(FLOAT_MODES)})")
        elif {self.expert_bits, self.other_bits} - {FLOAT_BITS} != {FLOAT_MODES[self.mode][0]} or (
                self.group_size != FLOAT_MODES[self.mode][1]):
            bits, group = FLOAT_MODES[self.mode]
            raise ValueError(f"{self.mode} is {bits}-bit with group size {group} only")

    def params(self, name: str, module: nn.Module):
        """Quantization parameters for the module at checkpoint name `name`, or False to keep it."""
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % self.group_size:
            return False
        bits = self.expert_bits if ".switch_mlp." in name else self.other_bits
        if bits == FLOAT_BITS:
            return False
        params = {"group_size": self.group_size, "bits": bits}
        return params if self.mode == "affine" else {**params, "mode": self.mode}

    def __str__(self):
        other = "16-bit (unquantized)" if self.other_bits == FLOAT_BITS else f"{self.other_bits}-bit"
        mode = "" if self.mode == "affine" else f", {self.mode}"
        return f"experts {self.expert_bits}-bit, rest {other}, group {self.group_size}{mode}"


# Schemes of the checkpoints people download (see ../shared/kimi-facts.md), by name.
PRESETS = {
    "native-int4": QuantScheme(4, FLOAT_BITS, 32),  # K2-Thinking / K2.5 / K2.6 as published, mlx-lm kept
    "4bit": QuantScheme(4, 4, 64),  # mlx-community uniform 4-bit
    "3bit": QuantScheme(3, 3, 64),
    "experts2-rest4": QuantScheme(2, 4, 64),  # this project's default 2-bit recipe
    "experts2-rest8": QuantScheme(2, 8, 64),
    "experts3-rest6": QuantScheme(3, 6, 64),
}


def cast_unquantized(module: nn.Module, dtype=mx.bfloat16) -> None:
    """Cast float parameters the way mlx-lm's convert does (the router's bias stays float32)."""

    def cast(path, x):
        if mx.issubdtype(x.dtype, mx.floating) and "e_score_correction_bias" not in path:
            return x.astype(dtype)
        return x

    module.update(tree_map_with_path(cast, module.parameters()))


def describe_sizes(config: dict, scheme: QuantScheme) -> SizeReport:
    """Exact bytes per part of a model under `scheme`, computed without allocating any weights."""
    layers = LayerRange(0, model_args(config).num_hidden_layers)
    module = build_slice_module(config, layers)
    quantize_slice(module, layers, scheme.params)
    cast_unquantized(module)
    parts = layer_nbytes(module, layers)
    return SizeReport([parts[i] for i in range(layers.end)], parts["embed"], parts["head"])


def quantization_config(module: nn.Module, layers: LayerRange, scheme: QuantScheme) -> dict:
    """The `quantization` entry of config.json, naming every quantized module like mlx-lm does."""
    bits = scheme.expert_bits if scheme.other_bits == FLOAT_BITS else scheme.other_bits
    config = {"group_size": scheme.group_size, "bits": bits}
    if scheme.mode != "affine":
        config["mode"] = scheme.mode
    for path, m in tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module):
        if hasattr(m, "bits") and hasattr(m, "group_size"):
            entry = {"group_size": m.group_size, "bits": m.bits}
            config[checkpoint_name(path, layers)] = entry if m.mode == "affine" else {**entry, "mode": m.mode}
    return config
