"""A contiguous range of decoder layers built from mlx-lm's deepseek_v3 modules.

A slice holds layers [start, end) of the text model, plus the embedding when it starts at
layer 0 and the final norm + lm_head when it ends at the last layer. Its parameter names are
the checkpoint's names, so only the slice's own tensors are read from the shards.
"""

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.deepseek_v3 import ModelArgs
from mlx_lm.utils import infer_quant_config

from .checkpoint import Checkpoint, CheckpointError, tensor_part, text_config, weight_prefix
from .mla import DecoderLayer, absorbed_pays

_LAYER_PATH = re.compile(r"^(.*?model\.layers\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class LayerRange:
    start: int
    end: int

    def __post_init__(self):
        if not 0 <= self.start < self.end:
            raise ValueError(f"empty or negative layer range [{self.start}, {self.end})")

    def __len__(self):
        return self.end - self.start

    def __str__(self):
        return f"[{self.start}, {self.end})"


class _Backbone(nn.Module):
    """The part of DeepseekV3Model a slice holds, with the same parameter names."""

    def __init__(self, args: ModelArgs, layers: LayerRange):
        super().__init__()
        if layers.start == 0:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(layers.start, layers.end)]
        if layers.end == args.num_hidden_layers:
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class _TextSlice(nn.Module):
    def __init__(self, args: ModelArgs, layers: LayerRange):
        super().__init__()
        self.model = _Backbone(args, layers)
        if layers.end == args.num_hidden_layers:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)


class _WrappedSlice(nn.Module):
    """kimi_k25 keeps the text model under `language_model`."""

    def __init__(self, args: ModelArgs, layers: LayerRange):
        super().__init__()
        self.language_model = _TextSlice(args, layers)


def model_args(config: dict) -> ModelArgs:
    return ModelArgs.from_dict(text_config(config))


def build_slice_module(config: dict, layers: LayerRange) -> nn.Module:
    """Unquantized, unevaluated modules for a slice: building them allocates nothing."""
    args = model_args(config)
    if layers.end > args.num_hidden_layers:
        raise ValueError(f"layer range {layers} beyond the model's {args.num_hidden_layers} layers")
    cls = _WrappedSlice if weight_prefix(config) else _TextSlice
    return cls(args, layers)


def checkpoint_name(module_path: str, layers: LayerRange) -> str:
    """Module path -> checkpoint tensor name (module layer lists start at 0, the model's at `start`)."""
    if m := _LAYER_PATH.match(module_path):
        return f"{m.group(1)}{int(m.group(2)) + layers.start}{m.group(3)}"
    return module_path


def module_path(name: str, layers: LayerRange) -> str:
    if m := _LAYER_PATH.match(name):
        return f"{m.group(1)}{int(m.group(2)) - layers.start}{m.group(3)}"
    return name


def _layer_of(module_path_: str, layers: LayerRange):
    m = _LAYER_PATH.match(module_path_)
    return int(m.group(2)) + layers.start if m else None


class ModelSlice:
    """Layers [start, end) of a Kimi model, ready to run."""

    def __init__(self, module: nn.Module, args: ModelArgs, layers: LayerRange):
        self.module = module
        self.args = args
        self.layers = layers
        text = module.language_model if isinstance(module, _WrappedSlice) else module
        self._backbone = text.model
        self._lm_head = getattr(text, "lm_head", None)

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.end == self.args.num_hidden_layers

    def make_caches(self) -> list:
        return [KVCache() for _ in range(len(self.layers))]

    def kv_bytes(self, positions: int) -> int:
        """KV cache bytes of this slice's layers at `positions` tokens, as mlx-lm allocates them
        (in steps of KVCache.step). MLA caches the latent and the rope key per layer."""
        allocated = -(-positions // KVCache.step) * KVCache.step
        width = self.args.kv_lora_rank + self.args.qk_rope_head_dim
        itemsize = self._backbone.layers[0].input_layernorm.weight.dtype.size
        return len(self.layers) * allocated * width * itemsize

    def forward(self, x: mx.array, caches: list, absorbed: bool | None = None) -> mx.array:
        """Token ids (B, L) on the first slice or a hidden state (B, L, D) on the others; returns
        the hidden state, or logits (B, L, vocab) from the last slice. Mirrors DeepseekV3Model.
        `absorbed`: attend as a one-position step does at any width (a speculative step; mla.py);
        None: where that saves half the attention's work (mla.absorbed_pays; one row only)."""
        if absorbed is None:
            absorbed = x.shape[0] == 1 and absorbed_pays(self.args, x.shape[1], caches[0].offset)
        h = self._backbone.embed_tokens(x) if self.is_first else x
        mask = create_attention_mask(h, caches[0], return_array=True)
        for layer, cache in zip(self._backbone.layers, caches):
            h = layer(h, mask, cache=cache, absorbed=absorbed)
            # Start computing this layer while Python builds the next one's graph. A stage cannot
            # overlap building with the previous token's compute the way mlx-lm's generate does
            # (its input comes over the network), but it can overlap them layer by layer.
            mx.async_eval(h)
        if self.is_last:
            return self._lm_head(self._backbone.norm(h))
        return h

    def parts(self) -> list:
        """The slice's modules in pipeline order (embedding, layers, norm, head)."""
        backbone = self._backbone
        first = [backbone.embed_tokens] if self.is_first else []
        last = [backbone.norm, self._lm_head] if self.is_last else []
        return first + list(backbone.layers) + last

    def nbytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.module.parameters()))


def quantize_slice(module: nn.Module, layers: LayerRange, predicate) -> None:
    """nn.quantize with a predicate over checkpoint names (not module paths)."""
    nn.quantize(module, class_predicate=lambda p, m: predicate(checkpoint_name(p, layers), m))


def load_slice(checkpoint: Checkpoint, layers: LayerRange, progress=None,
               reuse: ModelSlice | None = None, ready=None) -> ModelSlice:
    """Read only the slice's tensors, file by file in pipeline order, reusing mlx-lm's modules.
    `progress(bytes_done, bytes_total)` is called as files of the slice become resident.
    `reuse`: a slice of the same model already in memory, whose tensors the new one shares
    instead of reading them again (a stage that grows by a neighbour's layers reads only those).
    `ready(file)`: returns once that file of the checkpoint is in place, for a slice still being
    received (each part loads as soon as it arrives)."""
    if layers.end > checkpoint.num_layers:
        raise CheckpointError(
            f"{checkpoint.path}: layer range {layers} beyond the model's {checkpoint.num_layers} layers"
        )
    wanted = checkpoint.slice_tensors(layers.start, layers.end)
    weights = {}
    if reuse is not None:
        names = {t.name for t in wanted}
        held = ((checkpoint_name(path, reuse.layers), array) for path, array in tree_flatten(reuse.module.parameters()))
        weights.update((name, array) for name, array in held if name in names)
    total = sum(t.nbytes for t in wanted)
    done = sum(t.nbytes for t in wanted if t.name in weights)
    for file in _pipeline_order(checkpoint, [t for t in wanted if t.name not in weights]):
        if ready:
            ready(file)
        try:
            arrays = mx.load(str(checkpoint.path / file))
        except (RuntimeError, ValueError, OSError) as e:
            raise CheckpointError(f"{checkpoint.path / file}: cannot load ({e})") from e
        read = {t.name: arrays[t.name] for t in wanted if t.file == file and t.name not in weights}
        mx.eval(list(read.values()))
        weights.update(read)
        done += sum(t.nbytes for t in wanted if t.name in read)
        if progress:
            progress(done, total)

    module = build_slice_module(checkpoint.config, layers)
    quantization = checkpoint.config.get("quantization") or {}

    def predicate(name, m):
        if name in quantization:
            return quantization[name]
        if not hasattr(m, "to_quantized") or f"{name}.scales" not in weights:
            return False
        return infer_quant_config(name, m, weights)

    if quantization:
        quantize_slice(module, layers, predicate)
    module.eval()
    try:
        module.load_weights([(module_path(n, layers), w) for n, w in weights.items()], strict=True)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint.path}: weights of layers {layers} do not fit the model: {e}") from e
    return ModelSlice(module, model_args(checkpoint.config), layers)


def _pipeline_order(checkpoint: Checkpoint, tensors: list) -> list:
    """The files holding `tensors`, by the first pipeline part each holds (embedding, layers, head)."""
    first = {}
    for t in tensors:
        part = tensor_part(t.name, checkpoint.prefix)
        position = -1 if part == "embed" else float("inf") if part == "head" else part
        first[t.file] = min(first.get(t.file, position), position)
    return sorted(first, key=lambda f: (first[f], f))


def layer_nbytes(module: nn.Module, layers: LayerRange) -> dict:
    """Bytes per part of an (evaluated or lazy) slice module: layer index, "embed" or "head"."""
    out = {}
    for path, v in tree_flatten(module.parameters()):
        layer = _layer_of(path, layers)
        part = layer if layer is not None else ("embed" if "embed_tokens" in path else "head")
        out[part] = out.get(part, 0) + v.nbytes
    return out
