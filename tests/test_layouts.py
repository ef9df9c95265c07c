"""Every published Kimi layout, as `make-tiny --layout` writes it: the MLX ones open with exact sizes
(equal to the safetensors headers' byte counts) and a 2-stage cluster's tokens equal mlx-lm's own
generation on the same files (kimi_k2 through the deepseek_v3 model mlx-lm maps it to); the
official ones are refused with the command that converts them."""

import json
import re
import struct

import pytest
from mlx_lm.utils import load_model

from harness import LocalCluster, node_env, oracle_reply, start_node
from mlx_kimi.checkpoint import CheckpointError, open_checkpoint
from mlx_kimi.kimi_tokenizer import load_tokenizer
from mlx_kimi.layouts import MLX_LAYOUTS, OFFICIAL_NAMES, write_layout
from mlx_kimi.tiny import TinyShape

SHAPE = TinyShape(layers=3, shard_files=2, vocab_size=1024)
# Official layouts are only opened (refused), so the smallest model that has them all.
OFFICIAL_SHAPE = TinyShape(layers=2, vocab_size=1024, routed_experts=4, experts_per_token=2)
PROMPT = [5, 300, 17, 42, 8, 99]
MAX_TOKENS = 6


def _headers(path) -> dict:
    """name -> (dtype, data bytes) of every tensor in every shard, parsed here independently."""
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out.update({k: (v["dtype"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()})
    return out


@pytest.fixture(scope="module", params=list(MLX_LAYOUTS))
def layout(request, tmp_path_factory):
    name = request.param
    return name, write_layout(tmp_path_factory.mktemp(name) / "ckpt", name, SHAPE)


def test_sizes_equal_the_headers(layout):
    name, path = layout
    checkpoint = open_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    prefix = "language_model." if config["model_type"] == "kimi_k25" else ""
    headers = _headers(path)
    text = {n: b for n, (_, b) in headers.items() if n.startswith(prefix)
            and not re.match(rf"{re.escape(prefix)}model\.layers\.{SHAPE.layers}\.", n)}
    layers = [sum(b for n, b in text.items() if n.startswith(f"{prefix}model.layers.{i}."))
              for i in range(SHAPE.layers)]
    sizes = checkpoint.sizes()
    assert sizes.layer_bytes == layers
    assert sizes.total_bytes == sum(text.values())
    extra = set(headers) - set(text)  # what the cluster leaves alone
    if MLX_LAYOUTS[name].model_type == "kimi_k25":
        assert any(n.startswith("vision_tower.") for n in extra) and any(n.startswith("mm_projector.") for n in extra)
    assert bool(extra) == (MLX_LAYOUTS[name].model_type == "kimi_k25" or MLX_LAYOUTS[name].mtp)
    assert (path / "tiktoken.model").exists() and not (path / "tokenizer.json").exists()
    auto_map = json.loads((path / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"][0]
    assert re.fullmatch(r"moonshotai/Kimi-K2[.\w-]*--tokenization_kimi\.TikTokenTokenizer", auto_map)
    yarn_factor = config.get("text_config", config)["rope_scaling"]["factor"]
    assert yarn_factor == (64.0 if MLX_LAYOUTS[name].long_context else 32.0)
    if config["model_type"] == "kimi_k25":
        assert config["text_config"]["model_type"] == "kimi_k2"
    else:
        assert config["model_type"] == "kimi_k2" and config["architectures"] == ["DeepseekV3ForCausalLM"]


def test_quantization_as_published(layout):
    """The dtypes and per-module bits that make each layout what it is."""
    name, path = layout
    h = _headers(path)
    q = json.loads((path / "config.json").read_text())["quantization"]
    p = "language_model." if MLX_LAYOUTS[name].model_type == "kimi_k25" else ""
    expert, attn = f"{p}model.layers.1.mlp.switch_mlp.down_proj", f"{p}model.layers.1.self_attn.q_a_proj"
    scheme = MLX_LAYOUTS[name].scheme
    if name in ("k2-thinking", "k2.5"):  # native INT4: experts 4-bit g32 (bf16 scales), the rest bf16
        assert q == {"group_size": 32, "bits": 4, "mode": "affine"} and h[f"{expert}.scales"][0] == "BF16"
        assert h[f"{expert}.weight"][0] == "U32"
        assert h[f"{attn}.weight"][0] == "BF16" and f"{attn}.scales" not in h
        assert h[f"{p}lm_head.weight"][0] == "BF16"
    elif name == "k2-mixed_2_6":
        assert {q[expert]["bits"], q[f"{p}model.layers.2.mlp.switch_mlp.down_proj"]["bits"]} <= {2, 6}
        assert len({json.dumps(v) for k, v in q.items() if isinstance(v, dict)}) > 1
    elif name == "k2-overrides":
        assert q[expert] == {"group_size": 32, "bits": 3} and q["lm_head"] == {"group_size": 128, "bits": 8}
        assert q[f"model.layers.{SHAPE.layers - 1}.self_attn.q_a_proj"] is False
        assert attn not in q  # left to the default, inferred from the weights
    else:  # uniform, as mlx-lm's -q writes it: the default only
        assert q == {"group_size": scheme.group_size, "bits": scheme.expert_bits, "mode": scheme.mode}
        assert h[f"{expert}.scales"][0] == ("BF16" if scheme.mode == "affine" else "U8")
        assert h[f"{attn}.scales"][0] == h[f"{expert}.scales"][0] and f"{p}lm_head.scales" in h


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """The second stage of every layout's cluster: one node process, reloaded by each coordinator
    (a coordinator stopped with SIGTERM releases it), so each layout costs one process start."""
    workdir = tmp_path_factory.mktemp("peer")
    node = start_node(workdir, "peer1", env=node_env(workdir / "home"))
    yield node
    node.kill()


def test_cluster_tokens_equal_mlx_lm(layout, peer, tmp_path):
    name, path = layout
    # mlx-lm drops only a layer numbered 61, so it reads the tiny model's MTP layer non-strictly
    model, _ = load_model(path, strict=not MLX_LAYOUTS[name].mtp)
    want = oracle_reply((model, load_tokenizer(path)), PROMPT, MAX_TOKENS)
    with LocalCluster(tmp_path, path, stages=2, running_peers=[peer]) as cluster:
        tokens, _ = cluster.generate(prompt_tokens=PROMPT, max_tokens=MAX_TOKENS)
        stages = sorted((n.start, n.end, n.name) for n in cluster.memory_map().nodes if n.has_layers)
        log = cluster.coordinator.log()
        cluster.stop()  # SIGTERM: the coordinator releases the peer for the next layout
    assert [(s[0], s[1]) for s in stages] == [(0, stages[0][1]), (stages[0][1], SHAPE.layers)], stages
    assert "peer1" in {s[2] for s in stages}
    assert list(tokens) == want and want
    assert "trust_remote_code" not in log and "[y/N]" not in log  # nothing asked, no remote code


@pytest.mark.parametrize("name", list(OFFICIAL_NAMES))
def test_official_layouts_name_the_conversion(name, tmp_path):
    path = write_layout(tmp_path / name, name, OFFICIAL_SHAPE)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert f"kimi-cluster convert {path} OUT" in msg
    assert ("without -q keeps the native INT4 experts lossless" in msg) == name.endswith("-int4")


def test_the_advised_int4_conversion_keeps_native_int4(tmp_path):
    """The command the INT4 error gives, run as given: experts 4-bit g32 holding exactly the source's
    nibbles (biases = -8 x scales), everything else bf16, as mlx-community publishes it."""
    import mlx.core as mx
    import subprocess

    from harness import KIMI

    src = write_layout(tmp_path / "src", "k2-thinking-int4", OFFICIAL_SHAPE)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(src)
    command = re.search(r"`kimi-cluster (convert [^`]*--other-bits 16)`", str(e.value)).group(1)
    args = [a if a != "OUT" else str(tmp_path / "out") for a in command.split()]
    run = subprocess.run([KIMI, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = open_checkpoint(tmp_path / "out")
    kinds = {t.name: t.dtype for t in out.tensors.values()}
    assert kinds["model.layers.1.mlp.switch_mlp.down_proj.weight"] == "U32"
    assert kinds["model.layers.1.self_attn.q_a_proj.weight"] == kinds["lm_head.weight"] == "BF16"
    weights = {}
    for file in sorted((tmp_path / "out").glob("model-*.safetensors")):
        weights.update(mx.load(str(file)))
    scales = weights["model.layers.1.mlp.switch_mlp.down_proj.scales"]
    assert scales.shape[-1] * 32 == SHAPE.moe_intermediate_size
    assert mx.array_equal(weights["model.layers.1.mlp.switch_mlp.down_proj.biases"], -8 * scales).item()


def test_make_tiny_layout_cli(tmp_path):
    """`kimi-cluster make-tiny --layout` writes the same model as the library (same model id, however
    sharded); an official layout's line names the conversion."""
    import subprocess

    from harness import KIMI

    runs = {out: subprocess.Popen([KIMI, "make-tiny", str(tmp_path / out), "--layout", out, "--layers", "3"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for out in ("k2.5", "k2-instruct-fp8")}
    library = open_checkpoint(write_layout(tmp_path / "library", "k2.5", SHAPE))
    done = {out: p.communicate(timeout=300) for out, p in runs.items()}
    assert all(p.returncode == 0 for p in runs.values()), done
    made = open_checkpoint(tmp_path / "k2.5")
    assert made.model_id == library.model_id and made.model_id[:16] in done["k2.5"][0]
    words = " ".join(done["k2-instruct-fp8"][0].split())  # rich wraps long lines at spaces
    assert f"kimi-cluster convert {tmp_path / 'k2-instruct-fp8'} OUT" in words
