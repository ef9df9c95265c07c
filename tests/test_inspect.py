"""The real `kimi-cluster inspect` / `make-tiny` commands, run as subprocesses.

Built-in model sizes are checked against /work/shared/kimi-facts.md ("Bytes in memory under MLX
quantization"), whose numbers were measured independently with mlx-lm.

Each command pays about 2 s of CPU importing mlx-lm, so all of them are started at once in one
module fixture and the tests read their results.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_kimi.checkpoint import open_checkpoint

CLI = str(Path(sys.executable).parent / "kimi-cluster")
REL = 0.002  # the facts table gives 4 significant figures

# scheme -> (total GB, one MoE layer GB, layer 0 GB, embed + head GB), from the facts table
FACTS = {
    (2, 4): (323.9, 5.372, 0.280, 1.32),
    (4, 4): (577.6, 9.600, 0.280, 1.32),
    (3, 6): (453.6, 7.522, 0.404, 1.91),
}


REPO = "mlx-community/Kimi-Tiny-4bit"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(root: Path, repo: str, src: Path) -> Path:
    """A Hugging Face cache holding `src` as `repo`, laid out as huggingface_hub writes it: file
    contents in blobs/ named by their hash, snapshots/<revision>/ of relative symlinks, refs/main."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in src.iterdir():
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """Start every command in parallel; name -> CompletedProcess."""
    made = tmp_path_factory.mktemp("cli_tiny") / "made"
    hf_home = tmp_path_factory.mktemp("hf_home")
    hf_cache(hf_home / "hub", REPO, tiny_dir)
    dtype = json.loads((tiny_dir / "config.json").read_text())["text_config"]["torch_dtype"]
    commands = {
        f"k2.5-{e}-{o}": ["inspect", "kimi-k2.5", "--expert-bits", str(e), "--other-bits", str(o), "--json"]
        for e, o in FACTS
    }
    commands.update(
        {
            "tiny-json": ["inspect", str(tiny_dir), "--json"],
            "make-tiny": ["make-tiny", str(made), "--dtype", dtype],
            "nonexistent": ["inspect", "/nonexistent/kimi-ckpt"],
            "preset-native-int4": ["inspect", "kimi-k2.5", "--preset", "native-int4", "--json"],
            "flags-native-int4": ["inspect", "kimi-k2.6", "--expert-bits", "4", "--other-bits", "16",
                                  "--group-size", "32", "--json"],
            "plan-native-int4": ["plan", "--model", "kimi-k2.5", "--preset", "native-int4", "--node", "512GB",
                                 "--node", "512GB", "--json"],
            "hub-cache": ["inspect", REPO, "--json"],
            "hub-home": ["inspect", REPO, "--json"],
            "hub-missing": ["inspect", "mlx-community/Kimi-K2-Thinking"],
        }
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE")}
    envs = {"hub-cache": {"HF_HUB_CACHE": str(hf_home / "hub")}, "hub-home": {"HF_HOME": str(hf_home)},
            "hub-missing": {"HF_HOME": str(hf_home)}}
    procs = {
        name: subprocess.Popen(
            [CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**env, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **envs.get(name, {})},
        )
        for name, args in commands.items()
    }
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    results["made_dir"] = made
    return results


def _json(run):
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _close(actual_bytes, expected_gb):
    return abs(actual_bytes / 1e9 - expected_gb) <= REL * expected_gb


@pytest.mark.parametrize("scheme", list(FACTS), ids=lambda s: f"experts{s[0]}-rest{s[1]}")
def test_builtin_sizes_match_the_facts_table(scheme, runs):
    report = _json(runs[f"k2.5-{scheme[0]}-{scheme[1]}"])
    total, moe, layer0, embed_head = FACTS[scheme]
    layers = report["layers"]
    assert [entry["index"] for entry in layers] == list(range(61))
    assert _close(report["total_bytes"], total), report["total_bytes"]
    assert _close(layers[0]["bytes"], layer0), layers[0]
    assert {entry["bytes"] for entry in layers[1:]} == {layers[1]["bytes"]}  # 60 identical MoE layers
    assert _close(layers[1]["bytes"], moe), layers[1]
    assert _close(report["embed_bytes"] + report["head_bytes"], embed_head)
    assert report["total_bytes"] == sum(e["bytes"] for e in layers) + report["embed_bytes"] + report["head_bytes"]
    assert f"experts {scheme[0]}-bit, rest {scheme[1]}-bit" in report["model"]


# preset -> (total GB, one MoE layer GB, layer 0 GB, embed + head GB) from the facts table, and the
# exact bytes this project computes (the README's sizes table).
PRESET_FACTS = {
    "native-int4": ((657.6, 10.866, 0.995, 4.70), 657_623_228_416),
    "4bit": ((577.6, 9.600, 0.280, 1.32), 577_593_561_088),
    "3bit": ((449.3, 7.468, 0.218, 1.03), 449_313_304_576),
    "experts2-rest4": ((323.9, 5.372, 0.280, 1.32), 323_922_055_168),
    "experts2-rest8": ((329.7, 5.445, 0.529, 2.50), 329_700_069_376),
    "experts3-rest6": ((453.6, 7.522, 0.404, 1.91), 453_646_815_232),
}


@pytest.mark.parametrize("model", ["kimi-k2", "kimi-k2.5"])
def test_presets_match_the_facts_table(model):
    from mlx_kimi.builtin import BUILTIN_MODELS
    from mlx_kimi.spec import PRESETS, describe_sizes

    assert set(PRESETS) == set(PRESET_FACTS)
    for preset, ((total, moe, layer0, embed_head), exact) in PRESET_FACTS.items():
        report = describe_sizes(BUILTIN_MODELS[model], PRESETS[preset])
        assert _close(report.total_bytes, total) and report.total_bytes == exact, preset
        assert _close(report.layer_bytes[0], layer0) and _close(report.layer_bytes[1], moe), preset
        assert abs((report.embed_bytes + report.head_bytes) / 1e9 - embed_head) <= 0.005, preset  # 2 decimals


def test_native_int4_is_experts_4bit_group_32_rest_16bit(runs):
    """The preset is the same scheme spelled out: 16-bit (unquantized bf16) non-expert part, group 32;
    and plan places exactly those bytes."""
    preset = _json(runs["preset-native-int4"])
    assert preset["total_bytes"] == PRESET_FACTS["native-int4"][1] and "native-int4" in preset["model"]
    assert _json(runs["flags-native-int4"])["total_bytes"] == PRESET_FACTS["native-int4"][1]
    assert "rest 16-bit (unquantized), group 32" in _json(runs["flags-native-int4"])["model"]
    plan = _json(runs["plan-native-int4"])
    assert plan["feasible"] and plan["total_bytes"] == PRESET_FACTS["native-int4"][1]
    assert sum(st["weight_bytes"] for st in plan["stages"]) == plan["total_bytes"]


@pytest.mark.parametrize("args, words", [
    (["--preset", "5bit"], ["unknown preset '5bit'", "native-int4 (experts 4-bit, rest 16-bit"]),
    (["--group-size", "48"], ["group size 48", "32, 64, 128"]),
    (["--preset", "4bit", "--group-size", "32"], ["--preset names the bits and group size"]),
])
def test_scheme_errors_name_what_is_allowed(args, words, capsys):
    """In-process (the CLI's own main), as the commands above already run it as a subprocess."""
    from cluster.cli import main

    with pytest.raises(SystemExit) as e:
        main(["inspect", "kimi-k2.5", *args])
    err = capsys.readouterr().err
    assert e.value.code != 0 and all(w in err for w in words), err


def test_inspect_tiny_checkpoint(runs, tiny_dir):
    report = _json(runs["tiny-json"])
    tensor_bytes = 0
    for shard in tiny_dir.glob("*.safetensors"):
        with open(shard, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        tensor_bytes += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    assert report["total_bytes"] == tensor_bytes
    assert len(report["layers"]) == 6
    assert open_checkpoint(tiny_dir).model_id[:16] in report["model"]


def test_make_tiny_cli(runs, tiny_dir):
    run = runs["make-tiny"]
    assert run.returncode == 0, run.stderr
    made = runs["made_dir"]
    ckpt = open_checkpoint(made)
    assert len(list(made.glob("*.safetensors"))) >= 3
    assert ckpt.num_layers == 6
    assert ckpt.model_id[:16] in run.stdout
    # Same defaults and seed as the library call behind the `tiny_dir` fixture: the same model.
    assert ckpt.model_id == open_checkpoint(tiny_dir).model_id


def test_inspect_nonexistent_path(runs):
    run = runs["nonexistent"]
    assert run.returncode != 0
    assert "/nonexistent/kimi-ckpt" in run.stderr
    assert re.search(r"not a directory", run.stderr)
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.parametrize("how", ["hub-cache", "hub-home"])
def test_model_as_a_repo_id_in_the_hugging_face_cache(how, runs, tiny_dir):
    """HF_HUB_CACHE, or HF_HOME/hub: the snapshot refs/main names, read through its symlinks."""
    report = _json(runs[how])
    assert REVISION in report["model"]
    assert report["total_bytes"] == _json(runs["tiny-json"])["total_bytes"]


def test_repo_id_not_in_the_cache_says_how_to_download_it(runs):
    run = runs["hub-missing"]
    assert run.returncode != 0
    assert "mlx-community/Kimi-K2-Thinking: not a directory, and not in the local Hugging Face cache" in run.stderr
    assert "`hf download mlx-community/Kimi-K2-Thinking`" in run.stderr
    assert "--local-dir Kimi-K2-Thinking" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_up_with_a_repo_id_serves_the_cached_snapshot(tiny_dir, oracle, chat_prompt_ids, tmp_path):
    """`up --model ORG/NAME` runs the snapshot the cache's refs/main names, as `--model DIR` would."""
    from harness import LocalCluster, node_env, oracle_reply

    hf_cache(tmp_path / "hf" / "hub", REPO, tiny_dir)
    env = {**node_env(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    with LocalCluster(tmp_path, REPO, stages=1, env=env) as cluster:
        tokens, _ = cluster.generate(prompt_tokens=chat_prompt_ids, max_tokens=4)
        assert cluster.memory_map().model == REPO
    assert list(tokens) == oracle_reply(oracle, chat_prompt_ids, 4)
