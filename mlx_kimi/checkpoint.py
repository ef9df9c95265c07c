"""Open and validate an MLX-format Kimi checkpoint from its safetensors headers alone."""

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .hub import repo_name, resolve_model_dir

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3", "kimi_k25")
INDEX_FILE = "model.safetensors.index.json"
# Larger than any real header (Kimi's biggest shard header is a few hundred KB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(Exception):
    """A checkpoint directory that cannot be used, with the file and the problem named."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str
    shape: tuple
    nbytes: int


@dataclass(frozen=True)
class SizeReport:
    """Exact bytes of the parts a pipeline places: decoder layers, embedding, final norm + lm_head."""

    layer_bytes: list
    embed_bytes: int
    head_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.head_bytes

    def range_bytes(self, start: int, end: int) -> int:
        """Bytes a slice [start, end) holds, with the embedding and head where they belong."""
        total = sum(self.layer_bytes[start:end])
        if start == 0:
            total += self.embed_bytes
        if end == len(self.layer_bytes):
            total += self.head_bytes
        return total

    def to_json(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "embed_bytes": self.embed_bytes,
            "head_bytes": self.head_bytes,
            "layers": [{"index": i, "bytes": b} for i, b in enumerate(self.layer_bytes)],
        }


def text_config(config: dict) -> dict:
    """The decoder's config: kimi_k25 wraps it in `text_config`."""
    return config["text_config"] if config.get("model_type") == "kimi_k25" else config


def weight_prefix(config: dict) -> str:
    """kimi_k25 checkpoints keep the text model under `language_model.`."""
    return "language_model." if config.get("model_type") == "kimi_k25" else ""


def tensor_part(name: str, prefix: str) -> Optional[object]:
    """Which pipeline part a tensor belongs to: a layer index, "embed", "head", or None (e.g. vision)."""
    if not name.startswith(prefix):
        return None
    name = name[len(prefix):]
    if m := _LAYER_NAME.match(name):
        return int(m.group(1))
    if name.startswith("model.embed_tokens."):
        return "embed"
    if name.startswith("model.norm.") or name.startswith("lm_head."):
        return "head"
    return None


def tensor_data_offsets(path: Path) -> dict:
    """Absolute file offset of each tensor's data in a safetensors file (its header already checked
    by read_safetensors_header)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return {name: 8 + header_len + entry["data_offsets"][0]
            for name, entry in header.items() if name != "__metadata__"}


def tensor_nbytes(dtype: str, shape) -> int:
    return math.prod(shape) * DTYPE_BYTES[dtype]


def safetensors_header(entries, metadata: Optional[dict] = None) -> tuple:
    """The header (length prefix included) of a safetensors file holding `entries`, (name, dtype,
    shape) in file order, and each tensor's data offset after it: the one writer of headers (convert's
    shards, the slice cache's parts, the official-layout generator)."""
    table, offsets, offset = {"__metadata__": metadata} if metadata else {}, [], 0
    for name, dtype, shape in entries:
        nbytes = tensor_nbytes(dtype, shape)
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offsets.append(offset)
        offset += nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def read_safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file, checked against the file's length."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares {header_len} header bytes, "
                    f"file has {size}); the file is truncated or not safetensors: copy it again"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (invalid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from e
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if end - begin != tensor_nbytes(dtype, shape):
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name!r} {dtype}{list(shape)} "
                f"declares {end - begin} bytes"
            )
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data but the file "
                f"holds only {data_len} data bytes; copy the file again"
            )
        tensors[name] = (dtype, shape, end - begin)
    return tensors


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict
    tensors: dict  # name -> TensorInfo
    model_id: str

    @property
    def num_layers(self) -> int:
        return text_config(self.config)["num_hidden_layers"]

    @property
    def prefix(self) -> str:
        return weight_prefix(self.config)

    @property
    def name(self) -> str:
        return repo_name(self.path)

    @property
    def activation_itemsize(self) -> int:
        """Bytes per value of hidden states and KV caches: the dtype of the (unquantized) norms."""
        t = self.tensors[f"{self.prefix}model.layers.0.input_layernorm.weight"]
        return DTYPE_BYTES[t.dtype]

    def sizes(self) -> SizeReport:
        layer_bytes = [0] * self.num_layers
        embed = head = 0
        for t in self.tensors.values():
            part = tensor_part(t.name, self.prefix)
            if part == "embed":
                embed += t.nbytes
            elif part == "head":
                head += t.nbytes
            elif isinstance(part, int) and part < self.num_layers:
                layer_bytes[part] += t.nbytes
        return SizeReport(layer_bytes, embed, head)

    def unused_bytes(self) -> dict:
        """Bytes of the tensors no slice loads, by what they are: a vision tower and projector
        (kimi_k25), a multi-token-prediction layer after the last decoder layer."""
        out = {}
        for t in self.tensors.values():
            part = tensor_part(t.name, self.prefix)
            if isinstance(part, int) and part >= self.num_layers:
                what = f"layer {part} (multi-token prediction)"
            elif part is None:
                what = t.name.split(".")[0]
            else:
                continue
            out[what] = out.get(what, 0) + t.nbytes
        return dict(sorted(out.items()))

    def slice_tensors(self, start: int, end: int) -> list:
        """The tensors a slice [start, end) holds."""
        wanted = set(range(start, end))
        if start == 0:
            wanted.add("embed")
        if end == self.num_layers:
            wanted.add("head")
        return [t for t in self.tensors.values() if tensor_part(t.name, self.prefix) in wanted]


def shards_for_slice(weight_map: dict, config: dict, start: int, end: int) -> list:
    """The shard files of an index's `weight_map` that hold layers [start, end), with the embedding
    when the slice starts the model and the final norm / lm_head when it ends it."""
    prefix, num_layers = weight_prefix(config), text_config(config)["num_hidden_layers"]
    wanted = set(range(start, end)) | ({"embed"} if start == 0 else set()) | ({"head"} if end == num_layers else set())
    return sorted({file for name, file in weight_map.items() if tensor_part(name, prefix) in wanted})


def _load_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: missing {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON in {what} ({e})") from e


def _weight_map(path: Path) -> dict:
    """tensor name -> shard file, from the index, or from a lone model.safetensors."""
    index_path = path / INDEX_FILE
    if index_path.exists():
        weight_map = _load_json(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no `weight_map` in the index")
        return weight_map
    shards = sorted(path.glob("model*.safetensors"))
    if len(shards) == 1:
        return {name: shards[0].name for name in read_safetensors_header(shards[0])}
    if not shards:
        raise CheckpointError(f"{path}: no model*.safetensors files: is this an MLX checkpoint directory?")
    raise CheckpointError(f"{index_path}: missing; {len(shards)} shards need an index to be read")


def _describe_parts(names: list, prefix: str) -> str:
    parts = {tensor_part(n, prefix) for n in names}
    layers = sorted(p for p in parts if isinstance(p, int))
    words = [f"layers {_ranges(layers)}"] if layers else []
    words += sorted(p for p in parts if isinstance(p, str))
    return ", ".join(words) or "other tensors"


def model_identity(config: dict, tensors: dict) -> str:
    """A digest over the config and every tensor's name, dtype and shape: the same model gives the
    same id however it is sharded, and any change to its architecture or quantization changes it."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{','.join(map(str, t.shape))}\n".encode())
    return h.hexdigest()


def open_checkpoint(path) -> Checkpoint:
    """Validate a checkpoint (a directory, or a Hugging Face repo id in the local cache) and read its
    tensor table; no tensor data is read."""
    try:
        path = resolve_model_dir(path)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected an MLX checkpoint directory, or a Hugging Face "
                              "repo id such as mlx-community/Kimi-K2-Thinking in the local cache)")
    config = _load_json(path / "config.json", "model config")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path / 'config.json'}: unsupported model_type {model_type!r}; "
            f"kimi-cluster runs {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "kimi_k25" and not isinstance(config.get("text_config"), dict):
        raise CheckpointError(f"{path / 'config.json'}: kimi_k25 config has no `text_config`")
    prefix = weight_prefix(config)
    num_layers = text_config(config).get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise CheckpointError(f"{path / 'config.json'}: `num_hidden_layers` missing or invalid")

    weight_map = _weight_map(path)
    by_file = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)

    tensors = {}
    for file, names in sorted(by_file.items()):
        shard = path / file
        if not shard.exists():
            raise CheckpointError(
                f"{shard}: missing shard file (holds {_describe_parts(names, prefix)}); "
                "copy it from the source checkpoint"
            )
        header = read_safetensors_header(shard)
        for name in names:
            if name not in header:
                raise CheckpointError(
                    f"{shard}: the index names tensor {name!r} in this file but the file does not "
                    "contain it; the index and shards come from different checkpoints"
                )
            dtype, shape, nbytes = header[name]
            tensors[name] = TensorInfo(name, file, dtype, shape, nbytes)

    # The multi-token-prediction layer some checkpoints keep after the last decoder layer (layer 61
    # of the real model) is not part of the text model: mlx-lm drops it, and so does every check here.
    decoder = {n: t for n, t in tensors.items()
               if not (isinstance(part := tensor_part(n, prefix), int) and part >= num_layers)}
    if any(".mlp.experts.0." in n or ".self_attn.kv_b_proj." in n for n in decoder):
        raise CheckpointError(source_layout_advice(path, config))
    parts = {tensor_part(n, prefix) for n in tensors}
    missing = [i for i in range(num_layers) if i not in parts]
    if missing:
        raise CheckpointError(
            f"{path}: layers {_ranges(missing)} missing from the files (config.json says "
            f"{num_layers} layers); the checkpoint is incomplete"
        )
    for part, what in (("embed", "embedding (model.embed_tokens)"), ("head", "final norm / lm_head")):
        if part not in parts:
            raise CheckpointError(f"{path}: {what} missing from the files; the checkpoint is incomplete")
    if missing := missing_tensors(text_config(config), decoder, prefix):
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(
            f"{path}: {len(missing)} tensor{'s' * (len(missing) != 1)} missing from the files: {shown}; the "
            "checkpoint is incomplete (or its index comes from another conversion): copy it again"
        )

    return Checkpoint(path, config, tensors, model_identity(config, tensors))


def source_layout_advice(path: Path, config: dict) -> str:
    """What to do with weights in Hugging Face layout (Moonshot's releases): convert them, and how."""
    quant = text_config(config).get("quantization_config") or config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method == "fp8":
        what = "Moonshot's FP8 release (e4m3 weights with a weight_scale_inv per 128x128 block, e.g. Kimi-K2-Instruct)"
        size = ("mlx-lm turns FP8 into bf16 (about 2.05 TB for the full model) unless it quantizes: add "
                "`-q --q-bits 4 --q-group-size 64` (about 578 GB)")
    elif method == "compressed-tensors":
        what = ("Moonshot's INT4 release (compressed-tensors pack-quantized routed experts, e.g. K2-Thinking, "
                "K2.5, K2.6)")
        size = ("converting without -q keeps the native INT4 experts lossless (MLX 4-bit group 32, the rest bf16: "
                "about 658 GB for the full model; here: `kimi-cluster convert "
                f"{path} OUT --expert-bits 4 --group-size 32 --other-bits 16`); -q re-quantizes them")
    else:
        what = "Hugging Face layout (per-expert tensors, kv_b_proj), not MLX layout"
        size = "converting without -q keeps the weights' precision; -q quantizes them"
    mlx_lm = f"`mlx_lm.convert --hf-path {path} --mlx-path OUT --trust-remote-code`"
    if config.get("model_type") == "kimi_k2":
        # transformers' config loader does not know kimi_k2, so mlx_lm.convert fails on it as it is.
        mlx_lm = (f"a copy of {path} whose config.json says model_type deepseek_v3 (transformers does not know "
                  f"kimi_k2), then {mlx_lm} on the copy")
    return (
        f"{path}: weights are {what}; kimi-cluster runs MLX checkpoints. Convert once with "
        f"`kimi-cluster convert {path} OUT` (--fit NxSIZE or --expert-bits/--other-bits choose the size) and "
        f"pass --model OUT. mlx-lm can convert it too: {mlx_lm} (--trust-remote-code runs the checkpoint's "
        f"tokenizer code, which needs tiktoken); {size}; then copy the original tokenizer files "
        "(tiktoken.model, tokenizer_config.json, tokenization_kimi.py, chat_template.jinja) into OUT."
    )


def missing_tensors(text: dict, tensors: dict, prefix: str) -> list:
    """Tensors a complete checkpoint would also hold: the embedding, final norm and lm_head
    weights, and in every decoder layer each tensor that the other layers of its kind (dense or
    MoE) hold, except the scales and biases of a module a per-module quantization left in float
    (its weight is not packed). Header-only: what an incomplete copy lacks shows before any node loads."""
    names = set(tensors)
    required = [f"{prefix}model.embed_tokens.weight", f"{prefix}model.norm.weight"]
    if not text.get("tie_word_embeddings", False):
        required.append(f"{prefix}lm_head.weight")
    missing = [n for n in required if n not in names]
    dense, freq = text.get("first_k_dense_replace", 0), text.get("moe_layer_freq", 1) or 1
    by_layer = {}
    for name in names:
        part = tensor_part(name, prefix)
        if isinstance(part, int):
            by_layer.setdefault(part, set()).add(name[len(f"{prefix}model.layers.{part}."):])
    kinds = {}  # kind -> every tensor suffix some layer of that kind holds
    for layer, suffixes in by_layer.items():
        kinds.setdefault(layer >= dense and layer % freq == 0, set()).update(suffixes)
    for layer in sorted(by_layer):
        expected = kinds[layer >= dense and layer % freq == 0]
        for suffix in sorted(expected - by_layer[layer]):
            name = f"{prefix}model.layers.{layer}.{suffix}"
            module, _, kind = name.rpartition(".")
            weight = tensors.get(f"{module}.weight")
            if kind in ("scales", "biases") and weight is not None and weight.dtype != "U32":
                continue
            missing.append(name)
    return missing


def _ranges(indices: list) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    spans, start, prev = [], indices[0], indices[0]
    for cur in indices[1:] + [None]:
        if cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
        prev = cur
    return ", ".join(spans)
