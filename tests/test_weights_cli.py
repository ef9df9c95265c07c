"""Where weights come from: the shards a layer range needs (from the index), `kimi-cluster download`
against a local directory laid out like the Hugging Face cache (offline: the hub is never reached),
and `kimi-cluster cache list|prune` on slices received from a peer."""

import json
import subprocess

import pytest

import harness
from mlx_kimi.checkpoint import INDEX_FILE, open_checkpoint, shards_for_slice, tensor_part

REPO = "kimi-test/tiny"


def test_the_index_names_the_shards_a_slice_needs(tiny_dir):
    checkpoint = open_checkpoint(tiny_dir)
    weight_map = json.loads((tiny_dir / INDEX_FILE).read_text())["weight_map"]
    n = checkpoint.num_layers
    for start, end in ((0, 1), (2, 4), (n - 1, n), (0, n)):
        parts = set(range(start, end)) | ({"embed"} if start == 0 else set()) | ({"head"} if end == n else set())
        want = sorted({t.file for t in checkpoint.tensors.values() if tensor_part(t.name, checkpoint.prefix) in parts})
        assert shards_for_slice(weight_map, checkpoint.config, start, end) == want
    assert len(shards_for_slice(weight_map, checkpoint.config, 2, 4)) < len(set(weight_map.values()))


def test_download_fetches_only_the_shards_of_its_layers(tiny_dir, tmp_path):
    checkpoint = open_checkpoint(tiny_dir)
    weight_map = json.loads((tiny_dir / INDEX_FILE).read_text())["weight_map"]
    needed = shards_for_slice(weight_map, checkpoint.config, 2, 4)
    metadata = [p.name for p in tiny_dir.iterdir() if not p.name.endswith(".safetensors")]
    snapshot = harness.hub_cache(tmp_path / "hub", REPO, tiny_dir, metadata + needed)
    env = harness.node_env(tmp_path / "home") | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    run = subprocess.run([harness.KIMI, "download", REPO, "--layers", "2-3"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"layers 2-3 of {REPO} are in {len(needed)} of its {len(set(weight_map.values()))} shards: " \
           f"{', '.join(needed)}" in run.stdout
    assert f"{REPO} (layers 2-3) is in {snapshot}" in run.stdout

    # A layer range whose shard is not there yet: named, with how to resume.
    others = sorted(set(weight_map.values()) - set(needed))
    run = subprocess.run([harness.KIMI, "download", REPO, "--layers", f"0-{checkpoint.num_layers - 1}"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0 and others[0] in run.stderr and "again to resume" in run.stderr, run.stderr


@pytest.mark.parametrize("bad", ["3", "4-2", "x-y"])
def test_download_refuses_a_bad_layer_range(bad, tmp_path):
    run = subprocess.run([harness.KIMI, "download", REPO, "--layers", bad], capture_output=True, text=True,
                         env=harness.node_env(tmp_path / "home"), timeout=60)
    assert run.returncode != 0 and "--layers" in run.stderr, run.stderr


def test_cache_list_and_prune(tiny_dir, tmp_path):
    from mlx_kimi.slice_cache import SliceCache, checkpoint_part

    checkpoint = open_checkpoint(tiny_dir)
    cache = SliceCache(tmp_path / "cache")
    cache.add_model(checkpoint.model_id, checkpoint.name, checkpoint.config)
    reader = checkpoint_part(checkpoint, "layer-0001")
    with cache.receiving(checkpoint.model_id, reader.manifest) as writer:
        for i in range(len(reader.manifest.chunks)):
            assert writer.write(i, reader.chunk(i))
        writer.complete()
    env = harness.node_env(tmp_path / "home")
    listed = subprocess.run([harness.KIMI, "cache", "list", "--cache-dir", str(tmp_path / "cache"), "--json"],
                            capture_output=True, text=True, env=env, timeout=60)
    (entry,) = json.loads(listed.stdout)
    assert entry["model_id"] == checkpoint.model_id and entry["parts"] == ["layer-0001"]
    assert entry["bytes"] >= reader.manifest.data_bytes
    kept = subprocess.run([harness.KIMI, "cache", "prune", "--cache-dir", str(tmp_path / "cache"), "--keep",
                           checkpoint.model_id[:12]], capture_output=True, text=True, env=env, timeout=60)
    assert "nothing to delete" in kept.stdout and cache.models()
    pruned = subprocess.run([harness.KIMI, "cache", "prune", "--cache-dir", str(tmp_path / "cache")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert f"deleted {checkpoint.name} ({checkpoint.model_id[:16]})" in pruned.stdout and not cache.models()
