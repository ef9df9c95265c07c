"""Reading a convert source: Moonshot's official checkpoints by byte offsets, and decoding their weights.

A `Source` is a checkpoint's config and, per Hugging Face tensor name, where its bytes are; no tensor
data is read until a row block is asked for. `decode_rows` gives rows of a weight as mlx-lm's
deepseek_v3 `sanitize` leaves it: FP8 e4m3 with 128x128 block scales dequantized to bf16,
compressed-tensors INT4 as its MLX 4-bit group-32 triple (dequantized), floats as stored.
gguf_source.py builds the same `Source` from llama.cpp files.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .checkpoint import (
    INDEX_FILE,
    CheckpointError,
    TensorInfo,
    model_identity,
    read_safetensors_header,
    tensor_data_offsets,
    tensor_nbytes,
    text_config,
    weight_prefix,
)

FP8_BLOCK = 128
_NP_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F8_E4M3": np.uint8, "I32": np.int32,
              "U32": np.uint32, "U8": np.uint8}


class ConvertError(CheckpointError):
    """A source or output that cannot be converted, with the file and the problem named."""


# --- reading the source by byte offsets -----------------------------------------------------------

@dataclass(frozen=True)
class SourceTensor:
    name: str
    path: Path
    dtype: str
    shape: tuple
    offset: int  # of the first byte in the file

    def read_rows(self, start: int, end: int) -> mx.array:
        """Rows [start, end) of the first axis, as stored (F8_E4M3 as uint8, BF16 as bfloat16)."""
        row = tensor_nbytes(self.dtype, self.shape[1:])
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * row)
            data = f.read((end - start) * row)
        if len(data) != (end - start) * row:
            raise ConvertError(f"{self.path}: truncated while reading {self.name!r}; copy the file again")
        array = mx.array(np.frombuffer(data, dtype=_NP_DTYPES[self.dtype]).reshape((end - start,) + self.shape[1:]))
        return array.view(mx.bfloat16) if self.dtype == "BF16" else array

    def read(self) -> mx.array:
        return self.read_rows(0, self.shape[0]) if self.shape else self.read_rows(0, 1).reshape(())


@dataclass
class Source:
    path: Path
    config: dict
    tensors: dict  # name -> SourceTensor

    @property
    def text(self) -> dict:
        return text_config(self.config)

    @property
    def prefix(self) -> str:
        return weight_prefix(self.config)

    def identity(self) -> str:
        infos = {n: TensorInfo(n, t.path.name, t.dtype, t.shape, 0) for n, t in self.tensors.items()}
        return model_identity(self.config, infos)


def _load_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise ConvertError(f"{file}: missing model config; is {path} a checkpoint directory?")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{file}: invalid JSON ({e})") from e


def open_source(path) -> Source:
    """Read an official checkpoint's config and every shard's header; no tensor data is read."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path}: not a directory (expected an official Kimi checkpoint)")
    config = _load_config(path)
    if config.get("model_type") not in ("kimi_k2", "kimi_k25", "deepseek_v3"):
        raise ConvertError(f"{path / 'config.json'}: model_type {config.get('model_type')!r} is not a Kimi K2 model")
    index_file = path / INDEX_FILE
    if index_file.exists():
        weight_map = json.loads(index_file.read_text()).get("weight_map") or {}
    else:
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ConvertError(f"{index_file}: missing ({len(files)} safetensors files and no index)")
        weight_map = {n: files[0].name for n in read_safetensors_header(files[0])}
    tensors = {}
    for file in sorted(set(weight_map.values())):
        shard = path / file
        if not shard.exists():
            raise ConvertError(f"{shard}: missing shard file named by {INDEX_FILE}; copy it from the source")
        header = read_safetensors_header(shard)
        offsets = tensor_data_offsets(shard)
        for name, (dtype, shape, _) in header.items():
            if weight_map.get(name) == file:
                tensors[name] = SourceTensor(name, shard, dtype, shape, offsets[name])
    if missing := sorted(set(weight_map) - set(tensors)):
        raise ConvertError(f"{path / weight_map[missing[0]]}: does not contain {missing[0]!r} named by the index")
    return Source(path, config, tensors)


# --- decoding (exactly mlx-lm's sanitize, a row block at a time) ----------------------------------

def native_int4(source: Source, name: str, quant: Optional[dict]) -> bool:
    """An INT4 source tensor kept as it is: mlx-lm's 4-bit group-32 triple, lossless."""
    return name not in source.tensors and bool(quant) and (quant["bits"], quant["group_size"]) == (4, 32)


def decode_rows(source: Source, name: str, start: int, end: int) -> mx.array:
    """Rows [start, end) of a source weight as mlx-lm's sanitize leaves it (FP8 -> bf16, INT4 -> its
    MLX 4-bit triple dequantized, floats as stored)."""
    if name in source.tensors:
        st = source.tensors[name]
        w = st.read_rows(start, end)
        if st.dtype != "F8_E4M3":
            return w
        scale = source.tensors[f"{name}_scale_inv"].read_rows(start // FP8_BLOCK, -(-end // FP8_BLOCK))
        w = mx.from_fp8(w, dtype=mx.bfloat16)
        m, n = w.shape
        pm, pn = -m % FP8_BLOCK, -n % FP8_BLOCK
        w = mx.pad(w, ((0, pm), (0, pn))).reshape((m + pm) // FP8_BLOCK, FP8_BLOCK, (n + pn) // FP8_BLOCK, FP8_BLOCK)
        w = (w * scale[:, None, :, None]).reshape(m + pm, n + pn)
        return w[:m, :n].astype(mx.bfloat16)
    packed, scales, biases = int4_rows(source, name, start, end, None)
    return mx.dequantize(packed, scales, biases, group_size=32, bits=4)


def int4_rows(source: Source, name: str, start: int, end: int, dtype) -> tuple:
    """Rows [start, end) of an INT4 source weight as MLX's (packed, scales, biases), cast to `dtype`."""
    base = name[: -len("weight")]
    packed = source.tensors[base + "weight_packed"].read_rows(start, end).view(mx.uint32)
    scales = source.tensors[base + "weight_scale"].read_rows(start, end)
    biases = -8 * scales
    if dtype is not None:
        scales, biases = scales.astype(dtype), biases.astype(dtype)
    return packed, scales, biases


def source_rows(source: Source, name: str) -> int:
    if name in source.tensors:
        return source.tensors[name].shape[0]
    return source.tensors[name[: -len("weight")] + "weight_packed"].shape[0]
