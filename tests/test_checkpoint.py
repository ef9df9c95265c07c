"""open_checkpoint: clear errors for broken checkpoints, exact sizes from the headers, a stable model id."""

import json
import re
import shutil
import struct

import mlx.core as mx
import pytest

from mlx_kimi.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    open_checkpoint,
    read_safetensors_header,
)
from mlx_kimi.official import write_official
from mlx_kimi.tiny import TinyShape
from mlx_kimi.tokenizer import write_tokenizer

SHARD1 = "model-00001-of-00003.safetensors"
SHARD2 = "model-00002-of-00003.safetensors"
SHARD3 = "model-00003-of-00003.safetensors"


@pytest.fixture
def copy(tiny_dir, tmp_path):
    """A private copy of the tiny kimi_k25 checkpoint, free to damage."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, out)
    return out


def _open_fails(path) -> str:
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    return str(e.value)


def _raw_header(path):
    """(header length, header dict) parsed here, independently of the code under test."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --- bad checkpoints ------------------------------------------------------------------------


def test_missing_shard_file(copy):
    (copy / SHARD2).unlink()
    msg = _open_fails(copy)
    assert SHARD2 in msg
    assert "missing shard file" in msg
    assert "layers 2-3" in msg  # what the file held, read from the index


def test_truncated_file_cut_in_the_data(copy):
    shard = copy / SHARD2
    data = shard.read_bytes()
    n, _ = _raw_header(shard)
    cut = 8 + n + (len(data) - 8 - n) // 2
    shard.write_bytes(data[:cut])
    msg = _open_fails(copy)
    assert SHARD2 in msg
    assert "truncated" in msg
    assert f"holds only {cut - 8 - n} data bytes" in msg


def test_truncated_file_without_a_header(copy):
    (copy / SHARD1).write_bytes(b"\x10\x00\x00")
    msg = _open_fails(copy)
    assert SHARD1 in msg
    assert "truncated safetensors file (3 bytes, no header)" in msg


def _overwritten(copy, shard: str, at: int, raw: bytes) -> str:
    """The error opening the checkpoint once `raw` is written over the shard's bytes from `at`;
    it names the shard."""
    path = copy / shard
    data = bytearray(path.read_bytes())
    data[at:at + len(raw)] = raw
    path.write_bytes(bytes(data))
    msg = _open_fails(copy)
    assert shard in msg
    return msg


def test_garbage_at_the_start(copy):
    assert "corrupt safetensors header" in _overwritten(copy, SHARD3, 0, b"\xde\xad\xbe\xef" * 4)


def test_header_length_larger_than_file(copy):
    size = (copy / SHARD1).stat().st_size
    msg = _overwritten(copy, SHARD1, 0, struct.pack("<Q", size))  # plausible, but past the end of the file
    assert "corrupt safetensors header" in msg
    assert f"declares {size} header bytes" in msg


def test_header_invalid_json(copy):
    assert (copy / SHARD2).read_bytes()[8:9] == b"{"
    assert "corrupt safetensors header (invalid JSON" in _overwritten(copy, SHARD2, 8, b"\x00#!x")


def test_header_entry_size_mismatch(copy):
    """A well-formed header whose offsets disagree with a tensor's shape (data left as it was)."""
    shard = copy / SHARD2
    data = shard.read_bytes()
    n, header = _raw_header(shard)
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name]["shape"] = [header[name]["shape"][0] + 1] + header[name]["shape"][1:]
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    msg = _open_fails(copy)
    assert SHARD2 in msg
    assert name in msg
    assert "corrupt safetensors header" in msg


def test_index_names_tensor_missing_from_shard(copy):
    bogus = "language_model.model.layers.2.self_attn.bogus.weight"
    _edit_json(copy / INDEX_FILE, lambda d: d["weight_map"].__setitem__(bogus, SHARD2))
    msg = _open_fails(copy)
    assert SHARD2 in msg
    assert bogus in msg
    assert "does not contain it" in msg


def test_index_invalid_json(copy):
    (copy / INDEX_FILE).write_text('{"weight_map": ')
    msg = _open_fails(copy)
    assert INDEX_FILE in msg
    assert "invalid JSON" in msg


def test_unsupported_model_type(copy):
    _edit_json(copy / "config.json", lambda d: d.__setitem__("model_type", "llama"))
    msg = _open_fails(copy)
    assert "config.json" in msg
    assert "unsupported model_type 'llama'" in msg


def test_config_says_more_layers_than_the_files_hold(copy):
    _edit_json(copy / "config.json", lambda d: d["text_config"].__setitem__("num_hidden_layers", 9))
    msg = _open_fails(copy)
    assert str(copy) in msg
    assert "layers 6-8 missing from the files" in msg
    assert "9 layers" in msg


@pytest.mark.parametrize("dropped, expected", [
    # layers 1 and 4 absent from the index (their bytes still sit in the shards)
    (r"language_model\.model\.layers\.(1|4)\.", ["layers 1, 4 missing from the files"]),
    (r"language_model\.(lm_head|model\.norm)\.", ["final norm / lm_head missing from the files"]),
    # the part check sees the final norm as "head"; the missing lm_head is still named
    (r"language_model\.lm_head\.", ["language_model.lm_head.weight", "missing from the files"]),
], ids=["layers", "head", "lm_head-but-norm-present"])
def test_tensors_dropped_from_the_index(copy, dropped, expected):
    def drop(d):
        for name in list(d["weight_map"]):
            if re.match(dropped, name):
                del d["weight_map"][name]

    _edit_json(copy / INDEX_FILE, drop)
    msg = _open_fails(copy)
    assert str(copy) in msg
    for words in expected:
        assert words in msg


def test_one_tensor_of_a_layer_missing(copy):
    """One expert tensor of one MoE layer is gone: named at open time, from the headers alone,
    because the other MoE layers hold it."""
    gone = "language_model.model.layers.3.mlp.switch_mlp.down_proj.scales"

    def drop(d):
        assert gone in d["weight_map"]
        del d["weight_map"][gone]

    _edit_json(copy / INDEX_FILE, drop)
    msg = _open_fails(copy)
    assert str(copy) in msg
    assert f"1 tensor missing from the files: {gone};" in msg


def test_a_mismatched_slice_still_fails_at_load(copy):
    """A tensor that every layer lacks passes the header check (nothing to compare it with); the
    slice load names it."""
    from mlx_kimi.slice import LayerRange, load_slice

    def drop(d):
        for name in list(d["weight_map"]):
            if name.endswith(".mlp.shared_experts.down_proj.biases"):
                del d["weight_map"][name]

    _edit_json(copy / INDEX_FILE, drop)
    with pytest.raises(CheckpointError) as e:
        load_slice(open_checkpoint(copy), LayerRange(1, 2))
    assert str(copy) in str(e.value)
    assert "shared_experts.down_proj" in str(e.value)


def test_missing_config(copy):
    (copy / "config.json").unlink()
    msg = _open_fails(copy)
    assert "config.json" in msg
    assert "missing model config" in msg


def test_not_a_directory(tmp_path):
    msg = _open_fails(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg
    assert "not a directory" in msg


def test_hugging_face_layout_detected(copy):
    """An unconverted HF checkpoint carries kv_b_proj (MLX splits it) and per-expert weights."""
    weights = mx.load(str(copy / SHARD2))
    kv_b = "language_model.model.layers.2.self_attn.kv_b_proj.weight"
    weights[kv_b] = mx.zeros((64, 32), dtype=mx.bfloat16)
    mx.save_safetensors(str(copy / SHARD2), weights, metadata={"format": "pt"})
    _edit_json(copy / INDEX_FILE, lambda d: d["weight_map"].__setitem__(kv_b, SHARD2))
    msg = _open_fails(copy)
    assert str(copy) in msg
    assert "Hugging Face layout" in msg
    assert f"kimi-cluster convert {copy} OUT" in msg


def test_pristine_checkpoint_opens(tiny_dir):
    ckpt = open_checkpoint(tiny_dir)
    assert ckpt.num_layers == 6
    assert ckpt.prefix == "language_model."
    assert {t.file for t in ckpt.tensors.values()} == {SHARD1, SHARD2, SHARD3}


# --- sizes ----------------------------------------------------------------------------------


def _independent_sizes(path, prefix):
    """Per-part data bytes straight from the safetensors headers' offsets."""
    layer = re.compile(re.escape(prefix) + r"model\.layers\.(\d+)\.")
    layers, embed, head, data_bytes, tensor_bytes = {}, 0, 0, 0, 0
    for shard in sorted(path.glob("*.safetensors")):
        n, header = _raw_header(shard)
        header.pop("__metadata__", None)
        data_bytes += shard.stat().st_size - 8 - n
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            tensor_bytes += end - begin
            if m := layer.match(name):
                layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + end - begin
            elif name.startswith(prefix + "model.embed_tokens."):
                embed += end - begin
            elif name.startswith(prefix + "model.norm.") or name.startswith(prefix + "lm_head."):
                head += end - begin
            else:
                raise AssertionError(f"unexpected tensor {name}")
    return [layers[i] for i in range(len(layers))], embed, head, data_bytes, tensor_bytes


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_dsv3_dir"])
def test_sizes_match_the_headers(which, request):
    path = request.getfixturevalue(which)
    ckpt = open_checkpoint(path)
    layers, embed, head, data_bytes, tensor_bytes = _independent_sizes(path, ckpt.prefix)
    sizes = ckpt.sizes()
    assert sizes.layer_bytes == layers
    assert len(layers) == ckpt.num_layers
    assert sizes.embed_bytes == embed > 0
    assert sizes.head_bytes == head > 0
    assert sizes.total_bytes == tensor_bytes == data_bytes
    assert sizes.layer_bytes[0] != sizes.layer_bytes[1]  # dense layer 0 vs MoE layers
    n = ckpt.num_layers
    assert sizes.range_bytes(0, n) == sizes.total_bytes
    assert sizes.range_bytes(1, n - 1) == sum(layers[1 : n - 1])
    assert sizes.range_bytes(0, 1) == layers[0] + embed
    assert sizes.range_bytes(n - 1, n) == layers[-1] + head
    report = sizes.to_json()
    assert report["total_bytes"] == tensor_bytes
    assert [entry["bytes"] for entry in report["layers"]] == layers
    assert [entry["index"] for entry in report["layers"]] == list(range(n))


def test_read_safetensors_header_matches_raw(tiny_dir):
    for shard in sorted(tiny_dir.glob("*.safetensors")):
        _, raw = _raw_header(shard)
        raw.pop("__metadata__", None)
        parsed = read_safetensors_header(shard)
        assert set(parsed) == set(raw)
        for name, (dtype, shape, nbytes) in parsed.items():
            begin, end = raw[name]["data_offsets"]
            assert (dtype, list(shape), nbytes) == (raw[name]["dtype"], raw[name]["shape"], end - begin)


# --- model identity -------------------------------------------------------------------------


def _reshard(src, dst, files: int):
    """The same tensors saved over a different number of files, with a new index."""
    dst.mkdir()
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(mx.load(str(shard)))
    names = sorted(tensors, reverse=True)  # a different order and split than make_tiny's
    chunk = -(-len(names) // files)
    weight_map = {}
    for i in range(files):
        file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * chunk : (i + 1) * chunk]}
        mx.save_safetensors(str(dst / file), part, metadata={"format": "mlx"})
        weight_map.update({n: file for n in part})
    (dst / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    for extra in src.iterdir():
        if extra.suffix != ".safetensors" and extra.name != INDEX_FILE:
            shutil.copy(extra, dst / extra.name)
    return dst


def test_model_id_stable_and_independent_of_sharding(tiny_dir, tmp_path):
    first = open_checkpoint(tiny_dir)
    again = open_checkpoint(tiny_dir)
    assert first.model_id == again.model_id
    assert re.fullmatch(r"[0-9a-f]{64}", first.model_id)

    resharded = _reshard(tiny_dir, tmp_path / "two_files", files=2)
    other = open_checkpoint(resharded)
    assert len({t.file for t in other.tensors.values()}) == 2
    assert {t.file for t in other.tensors.values()} != {t.file for t in first.tensors.values()}
    assert other.model_id == first.model_id
    assert other.sizes() == first.sizes()


def test_model_id_changes_with_config(copy, tiny_dir):
    base = open_checkpoint(tiny_dir).model_id
    _edit_json(copy / "config.json", lambda d: d["text_config"].__setitem__("rope_theta", 10000.0))
    assert open_checkpoint(copy).model_id != base


def test_model_id_changes_with_quantization(copy, tiny_dir):
    """Same config, one tensor stored in another dtype: a different model."""
    base = open_checkpoint(tiny_dir).model_id
    weights = mx.load(str(copy / SHARD3))
    name = "language_model.model.norm.weight"
    new_dtype, tag = (mx.float16, "F16") if weights[name].dtype != mx.float16 else (mx.float32, "F32")
    weights[name] = weights[name].astype(new_dtype)
    mx.save_safetensors(str(copy / SHARD3), weights, metadata={"format": "mlx"})
    changed = open_checkpoint(copy)
    assert changed.tensors[name].dtype == tag != open_checkpoint(tiny_dir).tensors[name].dtype
    assert changed.model_id != base


def test_model_id_differs_between_models(tiny_dir, tiny_dsv3_dir):
    assert open_checkpoint(tiny_dir).model_id != open_checkpoint(tiny_dsv3_dir).model_id


@pytest.mark.parametrize("layout, what, size", [
    ("k2-instruct", "Moonshot's FP8 release", "-q --q-bits 4 --q-group-size 64"),
    ("k2-thinking", "Moonshot's INT4 release", "without -q keeps the native INT4 experts lossless"),
    ("k2.5", "Moonshot's INT4 release", "without -q keeps the native INT4 experts lossless"),
])
def test_official_layouts_refused_naming_the_conversion(layout, what, size, tmp_path):
    """Moonshot's own releases are not MLX checkpoints: the error names `kimi-cluster convert` and,
    for that very model type, the mlx-lm recipe that works (kimi_k2 needs its config to say
    deepseek_v3 for transformers; kimi_k25 converts as it is)."""
    src = write_official(tmp_path / layout, layout, TinyShape(layers=2, vocab_size=1024))
    msg = _open_fails(src)
    assert what in msg and size in msg
    assert f"`kimi-cluster convert {src} OUT`" in msg
    assert f"mlx_lm.convert --hf-path {src} --mlx-path OUT --trust-remote-code" in msg
    assert ("model_type deepseek_v3" in msg) == (layout != "k2.5")
    assert "tiktoken.model" in msg


def test_kimi_k2_recipe_of_the_error_converts_native_int4_losslessly(tmp_path):
    """The mlx-lm route the error gives for a kimi_k2 INT4 release, followed to the letter (with a
    tokenizer.json: the stand-in tokenization_kimi.py is no tokenizer): config says deepseek_v3,
    mlx_lm.convert without -q; the routed experts come out 4-bit group 32 and kimi-cluster opens it."""
    from mlx_lm.convert import convert

    src = write_official(tmp_path / "src", "k2-thinking", TinyShape(layers=2, vocab_size=1024), mtp=False)
    for name in ("tiktoken.model", "tokenization_kimi.py", "tokenizer_config.json"):
        (src / name).unlink()
    write_tokenizer(src, 1024)
    _edit_json(src / "config.json", lambda c: c.__setitem__("model_type", "deepseek_v3"))
    convert(str(src), str(tmp_path / "out"))
    ckpt = open_checkpoint(tmp_path / "out")
    experts = ckpt.tensors["model.layers.1.mlp.switch_mlp.up_proj.weight"]
    assert experts.dtype == "U32" and experts.shape[-1] * 8 == 256  # 4 bits per value of 256 inputs
    assert ckpt.tensors["model.layers.1.mlp.switch_mlp.up_proj.scales"].shape[-1] == 256 // 32  # group 32
    assert ckpt.tensors["model.layers.1.self_attn.q_a_proj.weight"].dtype == "BF16"  # rest unquantized


@pytest.mark.parametrize("layout, unused", [
    ("k2.5", {"mm_projector", "vision_tower"}),
    ("k2-mtp", {"layer 2 (multi-token prediction)"}),
])
def test_inspect_accounts_for_every_byte_of_the_files(layout, unused, tmp_path, capsys):
    """What no slice loads (a vision tower, an MTP layer) is named with its bytes, so the model's
    bytes plus those equal every tensor's bytes in the safetensors headers."""
    from cluster.cli import main
    from mlx_kimi.layouts import write_layout

    path = write_layout(tmp_path / layout, layout, TinyShape(layers=2, shard_files=2, vocab_size=1024))
    header_bytes = 0
    for shard in path.glob("*.safetensors"):
        header = _raw_header(shard)[1]
        header.pop("__metadata__", None)
        header_bytes += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    main(["inspect", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["unused_bytes"]) == unused and all(report["unused_bytes"].values())
    assert report["total_bytes"] + sum(report["unused_bytes"].values()) == header_bytes
