"""Convert Moonshot's official Kimi checkpoints to MLX, streaming, one shard per pipeline part.

Sources (Hugging Face layout): FP8 e4m3 with 128x128 block scales (K2-Instruct), compressed-tensors
INT4 routed experts (K2-Thinking, K2.5, K2.6), or bf16. The output is what mlx-lm's own conversion
gives (its deepseek_v3 `sanitize`: FP8 dequantized to bf16, native INT4 kept as MLX 4-bit group 32
with biases = -8 x scale, experts stacked, kv_b_proj split into embed_q / unembed_out, the MTP
layer and rotary tables dropped; then cast and quantized per module), bit for bit, but computed a
row block at a time from byte offsets in the source files, so memory stays flat whatever the
model's size. Every part (embedding, each decoder layer, final norm + head) is its own shard,
written to a temporary file and renamed when complete, and recorded with its digest so that an
interrupted conversion resumes where it stopped.
"""

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import INDEX_FILE, open_checkpoint, safetensors_header, tensor_nbytes, text_config, weight_prefix
from .slice import LayerRange, build_slice_module
from .sources import FP8_BLOCK, ConvertError, Source, decode_rows, int4_rows, native_int4, open_source, source_rows

STATE_FILE = "convert-state.json"
CALIBRATION_DIR = ".calibration"  # a calibrated conversion's hidden states between parts, kept until it ends
# Rows of a weight are read, dequantized and quantized this many f32 bytes at a time.
DEFAULT_CHUNK_BYTES = 256 * 2**20
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenization_kimi.py", "generation_config.json")
_MX_NAMES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32"}
OUTPUT_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


# --- what each output tensor is made of -----------------------------------------------------------

@dataclass
class Target:
    """One output weight (or a module's weight to quantize): its MLX name and where it comes from."""

    name: str  # MLX parameter name, e.g. model.layers.3.mlp.switch_mlp.up_proj.weight
    shape: tuple  # dequantized shape
    sources: list  # source tensor names, one per stacked expert
    quant: Optional[dict] = None  # {"bits", "group_size"} or None to keep it in float
    split: Optional[str] = None  # "k" / "v": half of kv_b_proj
    quantizable: bool = False  # the weight of a module mlx-lm can quantize

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")]

    def outputs(self, dtype) -> list:
        """(name, safetensors dtype, shape) of the tensors this target writes."""
        if self.name.endswith("e_score_correction_bias"):
            return [(self.name, "F32", self.shape)]
        if not self.quant:
            return [(self.name, _MX_NAMES[dtype], self.shape)]
        bits, group = self.quant["bits"], self.quant["group_size"]
        lead, cols = self.shape[:-1], self.shape[-1]
        return [(self.name, "U32", lead + (cols * bits // 32,)),
                (f"{self.module}.scales", _MX_NAMES[dtype], lead + (cols // group,)),
                (f"{self.module}.biases", _MX_NAMES[dtype], lead + (cols // group,))]


def plan_targets(config: dict, recipe: Callable) -> dict:
    """part ("embed", layer index, "head") -> its Targets, from mlx-lm's own modules built (lazily)
    from `config`; `recipe(name, module)` gives each quantizable module's {"bits", "group_size"}
    or False."""
    text = text_config(config)
    layers = LayerRange(0, text["num_hidden_layers"])
    module = build_slice_module(config, layers)
    prefix = weight_prefix(config)
    modules = dict(tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module))
    parts = {}
    for name, value in tree_flatten(module.parameters()):
        owner = name.rsplit(".", 1)[0]
        m = modules.get(owner)
        quantizable = m is not None and hasattr(m, "to_quantized") and name.endswith(".weight")
        quant = (recipe(owner, m) or None) if quantizable else None
        if quant and quant.get("mode", "affine") != "affine":
            raise ValueError(f"convert writes MLX's affine quantization only, not {quant['mode']} ({owner})")
        target = Target(name, tuple(value.shape), [name], quant, quantizable=quantizable)
        rest = name[len(prefix):]
        if ".mlp.switch_mlp." in rest:
            base = name.replace(".switch_mlp.", ".experts.{}.")
            target.sources = [base.format(e) for e in range(text["n_routed_experts"])]
        elif rest.endswith(("self_attn.embed_q.weight", "self_attn.unembed_out.weight")):
            target.sources = [name.rsplit(".", 2)[0] + ".kv_b_proj.weight"]
            target.split = "k" if ".embed_q." in name else "v"
        parts.setdefault(_part_of(rest), []).append(target)
    return parts


def _part_of(name: str):
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return "embed" if name.startswith("model.embed_tokens.") else "head"


_LAYER_OR_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp\.experts\.(\d+)\.)?")


def check_layers_match_config(source: Source) -> None:
    """No decoder layer (beyond the MTP layers) or routed expert in the shards that config.json does not
    count: the converter would drop them without a word."""
    text = source.text
    layers = text["num_hidden_layers"] + text.get("num_nextn_predict_layers", 0)
    experts = text.get("n_routed_experts") or 0
    found_layer, found_expert = -1, -1
    for name in source.tensors:
        if m := _LAYER_OR_EXPERT.search(name):
            found_layer = max(found_layer, int(m.group(1)))
            found_expert = max(found_expert, int(m.group(2) or -1))
    if found_layer >= layers or found_expert >= experts:
        counted = f"layers 0-{found_layer}" if found_layer >= layers else f"routed experts 0-{found_expert}"
        said = (f"num_hidden_layers {text['num_hidden_layers']} (+{text.get('num_nextn_predict_layers', 0)} MTP)"
                if found_layer >= layers else f"n_routed_experts {experts}")
        raise ConvertError(f"{source.path}: the shards hold {counted}, but config.json says {said}; the shards and "
                           "config come from different models")


def check_source(source: Source, parts: dict) -> None:
    """Every tensor the output needs is in the files, in a dtype the converter decodes and the shape
    the config implies."""
    if any(".switch_mlp." in name for name in source.tensors):
        raise ConvertError(f"{source.path}: already in MLX layout (stacked switch_mlp experts); it needs no "
                           "conversion: point kimi-cluster at it")
    check_layers_match_config(source)
    for targets in parts.values():
        for t in targets:
            for name in t.sources:
                if name in source.tensors:
                    st = source.tensors[name]
                    expected = t.shape[1:] if len(t.sources) > 1 else t.shape
                    if not t.split and st.shape != expected:
                        raise ConvertError(f"{st.path}: tensor {name!r} has shape {list(st.shape)}, but config.json "
                                           f"implies {list(expected)}; the shards and config come from different models")
                    if st.dtype == "F8_E4M3":
                        scale = source.tensors.get(f"{name}_scale_inv")
                        if scale is None or scale.dtype != "F32":
                            raise ConvertError(f"{st.path}: FP8 tensor {name!r} needs an F32 `{name}_scale_inv`"
                                               f" ({'missing' if scale is None else scale.dtype})")
                    elif st.dtype not in ("BF16", "F16", "F32"):
                        raise ConvertError(f"{st.path}: tensor {name!r} has dtype {st.dtype}; expected BF16, F16, "
                                           "F32 or F8_E4M3 (with weight_scale_inv)")
                    continue
                base = name[: -len("weight")]
                packed, scale = source.tensors.get(base + "weight_packed"), source.tensors.get(base + "weight_scale")
                if packed is None:
                    raise ConvertError(f"{source.path}: tensor {name!r} is in none of the shards (nor as INT4 "
                                       "weight_packed); the checkpoint is incomplete")
                if packed.dtype != "I32" or scale is None or scale.dtype not in ("BF16", "F16", "F32"):
                    raise ConvertError(f"{packed.path}: INT4 tensor {base}weight_packed must be I32 with a float "
                                       f"weight_scale (found {packed.dtype}, {scale.dtype if scale else 'no scale'})")


# --- producing each target (the decoded source rows, cast and quantized a row block at a time) ---

def row_step(rows: int, cols: int, chunk_bytes: int) -> int:
    """Rows per block: a multiple of the FP8 block, holding about chunk_bytes in f32."""
    step = max(FP8_BLOCK, chunk_bytes // max(1, 4 * cols) // FP8_BLOCK * FP8_BLOCK)
    return min(rows, step)


def produce(source: Source, target: Target, dtype, chunk_bytes: int):
    """Yield (row offset in the output's leading rows, [arrays, one per output tensor]) blocks."""
    text = source.text
    if target.split:
        w = decode_rows(source, target.sources[0], 0, source_rows(source, target.sources[0])).astype(dtype)
        heads, nope = text["num_attention_heads"], text["qk_nope_head_dim"]
        w = w.reshape(heads, nope + text["v_head_dim"], -1)
        w = mx.contiguous(w[:, :nope, :].swapaxes(-1, -2) if target.split == "k" else w[:, nope:, :])
        yield 0, quantized_arrays(w, target, dtype)
        return
    if target.name.endswith("e_score_correction_bias"):
        yield 0, [source.tensors[target.sources[0]].read().astype(mx.float32)]
        return
    rows_per = target.shape[-2] if len(target.shape) >= 2 else target.shape[0]
    for e, name in enumerate(target.sources):
        base = e * rows_per
        if len(target.shape) < 2:
            yield base, quantized_arrays(decode_rows(source, name, 0, rows_per).astype(dtype), target, dtype)
            continue
        step = row_step(rows_per, target.shape[-1], chunk_bytes)
        for r in range(0, rows_per, step):
            end = min(rows_per, r + step)
            if native_int4(source, name, target.quant):
                yield base + r, list(int4_rows(source, name, r, end, dtype))
            else:
                yield base + r, quantized_arrays(decode_rows(source, name, r, end).astype(dtype), target, dtype)


def quantized_arrays(w: mx.array, target: Target, dtype) -> list:
    if not target.quant:
        return [w]
    return list(mx.quantize(w, group_size=target.quant["group_size"], bits=target.quant["bits"]))


# --- writing shards -------------------------------------------------------------------------------

_SHARD_METADATA = {"format": "mlx"}


def shard_bytes(targets: list, dtype) -> int:
    entries = [o for t in targets for o in t.outputs(dtype)]
    return len(safetensors_header(entries, _SHARD_METADATA)[0]) + sum(tensor_nbytes(d, s) for _, d, s in entries)


def write_shard(path: Path, source: Source, targets: list, dtype, chunk_bytes: int, on_bytes=None,
                blocks=None) -> str:
    """Write the part's tensors to `path` (via path.tmp, renamed when complete); returns its sha256.
    `blocks` yields (target index, row, arrays) in any order (default: each target's `produce`)."""
    entries = [o for t in targets for o in t.outputs(dtype)]
    header, offsets = safetensors_header(entries, _SHARD_METADATA)
    firsts = list(accumulate((len(t.outputs(dtype)) for t in targets), initial=0))
    if blocks is None:
        blocks = ((k, row, arrays) for k, t in enumerate(targets)
                  for row, arrays in produce(source, t, dtype, chunk_bytes))
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = False
    try:
        os.write(fd, header)
        for k, row, arrays in blocks:
            outs = targets[k].outputs(dtype)
            starts = offsets[firsts[k]: firsts[k] + len(outs)]
            for (_, _, shape), start, a in zip(outs, starts, arrays):
                a = mx.contiguous(a)
                mx.eval(a)
                row_bytes = a.nbytes // a.shape[0] if a.ndim and len(shape) >= 2 else 0
                os.pwrite(fd, bytes(memoryview(a)), len(header) + start + row * row_bytes)
                if on_bytes:
                    on_bytes(a.nbytes)
            del arrays
            mx.clear_cache()  # keep freed blocks from piling up in MLX's allocator cache
        os.fsync(fd)
        written = True
    finally:
        os.close(fd)
        if not written:
            tmp.unlink()  # a half-written shard is redone on resume; its space is better freed now
    digest = file_digest(tmp)
    os.replace(tmp, path)
    return digest


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 2**20):
            h.update(block)
    return h.hexdigest()


# --- the conversion -------------------------------------------------------------------------------

def shard_names(parts: dict) -> dict:
    order = ["embed"] + sorted(p for p in parts if isinstance(p, int)) + ["head"]
    return {part: f"model-{i + 1:05d}-of-{len(order):05d}.safetensors" for i, part in enumerate(order)}


def output_config(source: Source, parts: dict, dtype_name: str) -> dict:
    """The source config without its source quantization and vision parts, with mlx-lm's
    per-module `quantization` naming every quantizable module's bits and group size (or false)."""
    config = json.loads(json.dumps(source.config))
    for c in (config, text_config(config)):
        c.pop("quantization_config", None)
        c.pop("quantization", None)
    config.pop("vision_config", None)
    entries = {}
    for targets in parts.values():
        for t in targets:
            if t.quantizable:
                entries[t.module] = {"group_size": t.quant["group_size"], "bits": t.quant["bits"]} if t.quant else False
    counts = {}
    for e in filter(None, entries.values()):
        counts[(e["group_size"], e["bits"])] = counts.get((e["group_size"], e["bits"]), 0) + 1
    group, bits = max(counts, key=counts.get) if counts else (64, 4)
    quantization = {"group_size": group, "bits": bits, **dict(sorted(entries.items()))}
    config["quantization"] = quantization
    config["quantization_config"] = quantization
    text_config(config)["torch_dtype"] = dtype_name
    return config


@dataclass
class ConvertReport:
    out: Path
    model_id: str
    total_bytes: int
    written: list = field(default_factory=list)  # shard files written by this run
    reused: list = field(default_factory=list)  # shard files a previous run had completed
    card: Optional[dict] = None  # the quality card (quality.json) of a calibrated conversion


def _state(out: Path) -> Optional[dict]:
    file = out / STATE_FILE
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        return None  # written atomically, so only a foreign file can be corrupt: start afresh


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def convert(src, out, recipe: Callable, dtype: str = "bfloat16", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            progress: Callable = None, calibration=None) -> ConvertReport:
    """Convert the checkpoint at `src` into `out`, resuming a conversion a previous run left there.
    `recipe(module_name, module)` gives {"bits", "group_size"} or False per quantizable module;
    `progress(event, part, shard_file, nbytes)` reports ("skip" | "bytes" | "done"). With a
    `calibration` (mlx_kimi.calibrate.Calibration) the calibration set streams through the parts
    as they are written: each module quantized by it (GPTQ when it says so), and its quality card
    written to OUT/quality.json."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")
    mx_dtype = OUTPUT_DTYPES[dtype]
    source = src if isinstance(src, Source) else open_source(src)
    parts = plan_targets(source.config, recipe)
    check_source(source, parts)
    names = shard_names(parts)
    config = output_config(source, parts, dtype)
    job = {"source": source.identity(), "config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
           "calibration": calibration.key if calibration else None, "shards": {}}

    out = Path(out)
    state = _state(out)
    if state is None and out.exists() and any(p.name != CALIBRATION_DIR for p in out.iterdir()):
        raise ConvertError(f"{out}: exists and holds no conversion to resume; choose an empty or new directory")
    if state is not None and [state.get(k) for k in ("source", "config", "calibration")] != \
            [job[k] for k in ("source", "config", "calibration")]:
        raise ConvertError(f"{out}: holds a conversion of another source or recipe, or with another calibration; "
                           "choose another directory or delete it to start over")
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    for file, digest in (state or {}).get("shards", {}).items():
        if (out / file).exists() and file_digest(out / file) == digest:
            done[file] = digest
    sizes = {part: shard_bytes(targets, mx_dtype) for part, targets in parts.items()}
    needed = sum(sizes[p] for p, f in names.items() if f not in done)
    free = shutil.disk_usage(out).free
    if needed > free:
        raise ConvertError(f"{out}: needs {needed:,} bytes ({needed / 1e9:.1f} GB) of disk space for the shards "
                           f"still to write, but only {free:,} bytes are free; free space or choose another disk")

    report = ConvertReport(out, "", sum(sizes.values()))
    job["shards"] = dict(done)
    _write_json(out / STATE_FILE, job)
    if calibration:
        calibration.start(parts)
    for part, file in names.items():
        if file in done:
            report.reused.append(file)
            if progress:
                progress("skip", part, file, sizes[part])
            continue
        on_bytes = (lambda n, p=part, f=file: progress("bytes", p, f, n)) if progress else None
        blocks = calibration.blocks(part, parts[part], mx_dtype) if calibration else None
        try:
            job["shards"][file] = write_shard(out / file, source, parts[part], mx_dtype, chunk_bytes, on_bytes,
                                              blocks)
            _write_json(out / STATE_FILE, job)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise ConvertError(f"{out}: writing {file} ({f'layer {part}' if isinstance(part, int) else part}) "
                               f"failed: {e.strerror}. {len(job['shards'])} of {len(names)} shards are complete "
                               f"and kept; free space and run the same command again: it resumes at {file}") from e
        report.written.append(file)
        if progress:
            progress("done", part, file, sizes[part])

    weight_map = {name: names[part] for part, targets in parts.items()
                  for t in targets for name, _, _ in t.outputs(mx_dtype)}
    index = {"metadata": {"total_size": report.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / INDEX_FILE, index)
    for file in TOKENIZER_FILES:
        if (source.path / file).exists():
            shutil.copyfile(source.path / file, out / file)
    _write_json(out / "config.json", config)
    report.model_id = open_checkpoint(out).model_id
    if calibration:
        report.card = calibration.finish(out)
    return report
