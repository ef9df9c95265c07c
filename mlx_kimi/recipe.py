"""Quantization recipes for `convert`: which bits and group size each quantizable module gets.

A recipe is a function (module name, module) -> {"bits", "group_size"} or False (keep it in
float), the predicate mlx-lm's own quantization takes.
"""

from collections import Counter

import mlx.nn as nn
from mlx_lm.convert import QUANT_RECIPES, mixed_quant_predicate_builder
from mlx_lm.utils import _get_classes

from .spec import QuantScheme


def fixed_recipe(expert_bits: int, other_bits: int, group_size: int):
    """Routed experts at expert_bits, every other linear (embedding and head too) at other_bits."""
    return QuantScheme(expert_bits, other_bits, group_size).params


def mlx_lm_recipe(name: str, config: dict, group_size: int = 64):
    """One of mlx-lm's mixed recipes (mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6), applied to mlx-lm's
    own model built from `config` (lazily: nothing is allocated)."""
    if name not in QUANT_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; mlx-lm's recipes are {', '.join(QUANT_RECIPES)}")
    model_class, args_class = _get_classes(config)
    predicate = mixed_quant_predicate_builder(name, model_class(args_class.from_dict(config)), group_size)

    def recipe(path: str, module: nn.Module):
        if module.weight.shape[-1] % group_size:
            return False
        params = predicate(path, module)
        return {"group_size": params["group_size"], "bits": params["bits"]}

    return recipe


def bits_histogram(targets: list) -> dict:
    """{"4-bit g64": parameter count, ..., "float": count} over plan targets."""
    counts = Counter()
    for t in targets:
        n = 1
        for d in t.shape:
            n *= d
        counts[f"{t.quant['bits']}-bit g{t.quant['group_size']}" if t.quant else "float"] += n
    return dict(sorted(counts.items()))
