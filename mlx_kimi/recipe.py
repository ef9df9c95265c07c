"""Quantization recipes for `convert`: which bits and group size each quantizable module gets.

A recipe is a function (module name, module) -> {"bits", "group_size"} or False (keep it in
float), the predicate mlx-lm's own quantization takes.
"""

import dataclasses
import heapq
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.convert import QUANT_RECIPES, mixed_quant_predicate_builder
from mlx_lm.utils import _get_classes

from .checkpoint import tensor_nbytes
from .sources import decode_rows, native_int4, source_rows
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


# --- --fit: bits per module chosen by measured error reduction per byte --------------------------

# (bits, group size) a module may get, and None: kept in float.
CANDIDATES = ((2, 64), (2, 32), (3, 64), (3, 32), (4, 64), (4, 32), (5, 64), (6, 64), (8, 64), None)
SAMPLE_ROWS = 256  # rows of each weight (of each of a few experts) the error is measured on
SAMPLE_EXPERTS = 4


def _quant(candidate):
    return None if candidate is None else {"bits": candidate[0], "group_size": candidate[1]}


def target_bytes(target, candidate, dtype) -> int:
    outputs = dataclasses.replace(target, quant=_quant(candidate)).outputs(dtype)
    return sum(tensor_nbytes(d, shape) for _, d, shape in outputs)


def relative_error(w: mx.array, candidate) -> float:
    """||W - dequantize(quantize(W))||^2 / ||W||^2 (0 for float)."""
    if candidate is None:
        return 0.0
    bits, group = candidate
    w = w.astype(mx.float32)
    q = mx.dequantize(*mx.quantize(w, group_size=group, bits=bits), group_size=group, bits=bits)
    return float(((w - q) ** 2).sum() / mx.maximum((w ** 2).sum(), 1e-30))


def draw_weight(name: str, shape: tuple, rng: np.random.Generator, rope_theta: float) -> np.ndarray:
    """Values with the structure of trained weights: unit-ish norms, linear weights scaled by fan-in
    with ~2% outlier input channels 8x larger, and the projections that write to the residual
    stream (o_proj, down_proj) 4x smaller, so that each layer refines the stream rather than
    replacing it (a random model is otherwise chaotic: any weight error flips its output)."""
    if name.endswith("inv_freq"):
        dim = 2 * shape[0]
        return (1.0 / rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)
    if name.endswith("e_score_correction_bias"):
        return rng.uniform(0.0, 0.1, shape).astype(np.float32)
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if "embed_tokens" in name:
        return rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32) * shape[-1] ** -0.5
    outliers = rng.choice(shape[-1], max(1, shape[-1] // 50), replace=False)
    w[:, outliers] *= 8.0
    if name.endswith(("o_proj.weight", "down_proj.weight", "q_b_proj.weight")):
        w *= 0.25
    return w


def synthetic_errors() -> dict:
    """Relative error per candidate on weights drawn like trained ones (draw_weight: fan-in scaled,
    2% outlier channels): the estimate when there are no weights to measure."""
    w = mx.array(draw_weight("w", (SAMPLE_ROWS, 2048), np.random.default_rng(0), 1.0))
    return {c: relative_error(w, c) for c in CANDIDATES}


def measured_errors(source, target) -> dict:
    """Relative error per candidate on the target's own weights (a sample of rows and experts);
    a native INT4 source is exact at 4-bit group 32 and gains nothing above it."""
    experts = target.sources
    if len(experts) > SAMPLE_EXPERTS:
        experts = [experts[i] for i in np.linspace(0, len(experts) - 1, SAMPLE_EXPERTS).astype(int)]
    if target.split:
        w = decode_rows(source, experts[0], 0, source_rows(source, experts[0]))
    else:
        w = mx.concatenate([decode_rows(source, n, 0, min(SAMPLE_ROWS, source_rows(source, n))) for n in experts])
    if native_int4(source, experts[0], {"bits": 4, "group_size": 32}):
        return {c: (0.0 if c == (4, 32) else relative_error(w, c)) for c in CANDIDATES
                if c is not None and c[0] <= 4}
    return {c: relative_error(w, c) for c in CANDIDATES}


def importance(name: str, num_layers: int) -> float:
    """Weight of a module's error: mlx-lm's mixed recipes keep the first and last eighth of the
    layers and lm_head higher; we count their errors twice."""
    if name.endswith("lm_head.weight"):
        return 2.0
    parts = name.split(".layers.")
    if len(parts) == 2:
        layer = int(parts[1].split(".")[0])
        if layer < num_layers // 8 or layer >= 7 * num_layers // 8:
            return 2.0
    return 1.0


def weighted_errors(relative: Callable, parts: dict) -> Callable:
    """errors(target) for fit from relative weight errors (`relative(target)`), times importance."""
    num_layers = sum(1 for p in parts if isinstance(p, int))
    return lambda t: {c: importance(t.name, num_layers) * e for c, e in relative(t).items()}


@dataclass
class FitResult:
    choice: dict  # module name -> {"bits", "group_size"} or None
    total_bytes: int
    error: float  # the sum of the modules' errors

    def recipe(self, name, module):
        return self.choice.get(name) or False


def fit(parts: dict, budget_bytes: int, dtype, errors: Callable) -> FitResult:
    """Start every quantizable module at its cheapest candidate, then repeatedly take the upgrade
    with the largest error reduction per added byte that still fits the budget. `errors(target)`
    gives {candidate: error} (weighted_errors or calibrated_errors)."""
    fixed, options = 0, {}
    for targets in parts.values():
        for t in targets:
            if not t.quantizable:
                fixed += target_bytes(t, None, dtype)
                continue
            cands = [(target_bytes(t, c, dtype), e, c) for c, e in errors(t).items()
                     if c is None or t.shape[-1] % c[1] == 0]
            options[t.module] = sorted(cands, key=lambda x: (x[0], x[1]))
    current = {m: 0 for m in options}
    total = fixed + sum(opts[0][0] for opts in options.values())
    if total > budget_bytes:
        raise ValueError(f"even every module at its fewest bits needs {total:,} bytes, over the budget of "
                         f"{budget_bytes:,}")

    def best_upgrade(m):
        opts, i = options[m], current[m]
        best = None
        for j in range(i + 1, len(opts)):
            added, gain = opts[j][0] - opts[i][0], opts[i][1] - opts[j][1]
            if gain > 0 and added > 0 and total + added <= budget_bytes:
                if best is None or gain / added > best[0]:
                    best = (gain / added, j)
        return best

    heap = [(-b[0], m, b[1]) for m in options if (b := best_upgrade(m))]
    heapq.heapify(heap)
    while heap:
        _, m, j = heapq.heappop(heap)
        added = options[m][j][0] - options[m][current[m]][0]
        if total + added > budget_bytes:
            if b := best_upgrade(m):
                heapq.heappush(heap, (-b[0], m, b[1]))
            continue
        total += added
        current[m] = j
        if b := best_upgrade(m):
            heapq.heappush(heap, (-b[0], m, b[1]))
    choice = {m: _quant(options[m][i][2]) for m, i in current.items()}
    return FitResult(choice, total, sum(options[m][i][1] for m, i in current.items()))


def apply_choice(parts: dict, choice: dict) -> dict:
    """The plan's targets with each quantizable module's bits from `choice` (module -> quant or None)."""
    return {part: [dataclasses.replace(t, quant=choice.get(t.module)) if t.quantizable else t for t in targets]
            for part, targets in parts.items()}


def calibrated_errors(reference, source, parts: dict, ids: list, reference_candidate=(3, 64)) -> dict:
    """module -> {candidate: error}: the KL divergence (mean over the positions of `ids`) that the
    module alone, at `reference_candidate`, adds to the next-token distributions of `reference`
    (the float model, mlx-lm's, in memory), scaled to the other candidates by their measured
    relative weight errors. The model's own sensitivity replaces the fixed importance weights;
    it needs the float model in one machine's memory."""
    from .quality import next_token_log_probs

    ids = mx.array(ids)[None]
    base = next_token_log_probs(reference, ids)
    modules = dict(reference.named_modules())
    out = {}
    for targets in parts.values():
        for t in targets:
            if not t.quantizable:
                continue
            weights = measured_errors(source, t)
            valid = [c for c in weights if c is not None and t.shape[-1] % c[1] == 0]
            c = reference_candidate if reference_candidate in valid else valid[0]
            module = modules[t.module]
            original = module.weight
            module.weight = mx.dequantize(*mx.quantize(original, group_size=c[1], bits=c[0]), group_size=c[1],
                                          bits=c[0]).astype(original.dtype)
            log_q = next_token_log_probs(reference, ids)
            module.weight = original
            sensitivity = float((mx.exp(base) * (base - log_q)).sum(-1).mean())
            scale = sensitivity / max(weights[c], 1e-12)
            out[t.module] = {k: scale * e for k, e in weights.items()}
    return out


def calibrate(source, parts: dict, text: str, work_dir, tokens: int = 32) -> dict:
    """calibrated_errors on the float model: the source converted unquantized (float32) into
    `work_dir`, loaded whole, run on the first `tokens` tokens of `text`. Only for models whose float
    copy fits one machine: the yardstick the streamed calibration (mlx_kimi/calibrate.py) is measured by."""
    from mlx_lm.utils import load_model

    from .convert import convert
    from .kimi_tokenizer import load_tokenizer

    reference = convert(source.path, work_dir, lambda name, module: False, dtype="float32").out
    ids = load_tokenizer(reference).encode(text)[:tokens]
    model, _ = load_model(reference)
    return calibrated_errors(model, source, parts, ids)
