"""Only the coordinator holds the checkpoint: workers that cannot read its disk receive exactly their
slices over the cluster's channel, resume a transfer cut by a kill, find a corrupt cached part at
load, and the cluster's greedy tokens equal mlx-lm's."""

import os
import re
import shutil
import signal
import subprocess

import pytest

from cluster.generated import kimi_cluster_pb2 as pb
from mlx_kimi.checkpoint import open_checkpoint, tensor_part
from mlx_kimi.slice_cache import SliceCache, checkpoint_part, part_name, slice_parts

from cluster.client import read_reply
from cluster.wire import coordinator_stub, node_stub, open_channel

import harness
from harness import KIMI, START_TIMEOUT_S, launch_node, oracle_reply, poll, start_node, wait_for_log

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root and unshare(1): workers run in a private mount namespace where the checkpoint is hidden",
)


CONTEXT = 256


def hidden_node(workdir, name, hide, env, port=0, extra=(), memory="1GB"):
    """A worker in its own mount namespace with an empty tmpfs over `hide` (the checkpoint's parent)."""
    up = [KIMI, "up", "--host", "127.0.0.1", "--port", str(port), "--name", name, "--memory", memory,
          "--no-mdns", "--cache-dir", str(workdir / f"{name}-cache"), *extra]
    script = f'mount -t tmpfs none "{hide}" && exec "$@"'
    return launch_node(workdir, name, ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *up],
                       env)


def slice_bytes(checkpoint, start, end) -> int:
    return slice_bytes_of(checkpoint, slice_parts(start, end, checkpoint.num_layers))


def slice_bytes_of(checkpoint, names) -> int:
    return sum(t.nbytes for t in checkpoint.tensors.values()
               if part_name(tensor_part(t.name, checkpoint.prefix)) in names)


def held_bytes(cache_dir) -> int:
    """Data bytes of the complete parts in a node's cache."""
    cache = SliceCache(cache_dir)
    return sum(cache.manifest(m.model_id, p).data_bytes for m in cache.models() for p in m.parts)


def partial_bytes(cache_dir, checkpoint) -> int:
    """Data bytes of the chunks verified in parts not yet put in place when the node was killed (a
    partial file has the part's full size from the start; a chunk counts when its bytes are the part's)."""
    total = 0
    for partial in cache_dir.rglob("*.safetensors.partial"):
        reader = checkpoint_part(checkpoint, partial.name.split(".")[0])
        raw = partial.read_bytes()
        data = raw[8 + int.from_bytes(raw[:8], "little"):]
        for i in range(len(reader.manifest.chunks)):
            begin, end = reader.manifest.chunk_span(i)
            total += end - begin if data[begin:end] == reader.chunk(i) else 0
    return total


def test_workers_without_the_checkpoint_receive_only_their_slices(tiny_dir, oracle, tmp_path):
    checkpoint = open_checkpoint(tiny_dir)
    hide = tiny_dir.parent
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f'mount -t tmpfs none "{hide}" && ls "{tiny_dir}"'], capture_output=True, text=True)
    assert probe.returncode != 0, "the checkpoint is still readable inside the workers' namespace"

    env = harness.node_env(tmp_path / "home")
    # three nodes of this size hold the tiny model, two do not: a lost worker's layers wait for it
    memory = harness.tight_memory(tiny_dir, 3, CONTEXT)
    peer1 = hidden_node(tmp_path, "peer1", hide, env, memory=memory)
    # peer2 receives slowly, so it can be killed halfway through its transfer.
    peer2 = hidden_node(tmp_path, "peer2", hide, env, extra=["--max-transfer-rate", "1MB"], memory=memory)
    port2 = peer2.address.rsplit(":", 1)[1]
    coord = start_node(tmp_path, "coord", memory=memory, model=tiny_dir, peers=[peer1.address, peer2.address],
                       env=env, extra=["--cache-dir", str(tmp_path / "coord-cache"), "--context", str(CONTEXT)])
    nodes = [peer1, peer2, coord]
    try:
        wait_for_log(peer2, r"received (embed|layer-\d+|head)")
        peer2.kill(signal.SIGKILL)
        before = held_bytes(tmp_path / "peer2-cache") + partial_bytes(tmp_path / "peer2-cache", checkpoint)
        peer2 = hidden_node(tmp_path, "peer2", hide, env, port=int(port2), memory=memory)
        nodes[1] = peer2
        coord.wait_for(r"cluster ready", timeout=START_TIMEOUT_S)

        secret = bytes.fromhex(env["KIMI_CLUSTER_SECRET"])
        infos = {n.name: info(n, secret) for n in nodes}
        for name in ("peer1", "peer2"):
            loaded = infos[name].loaded
            want = slice_bytes(checkpoint, loaded.start, loaded.end)
            assert loaded.source == f"received from {coord.address}", loaded
            cache_dir = tmp_path / f"{name}-cache"
            on_disk = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
            assert want <= on_disk <= want * 1.01 + 64 * 1024, (name, want, [(f.name, f.stat().st_size) for f in cache_dir.rglob("*")])
            assert held_bytes(cache_dir) == want == loaded.cache_bytes - (on_disk - want)
            if name == "peer1":
                assert loaded.received_bytes == want
            else:  # what peer2 had verified before the kill did not travel again
                assert 0 < before < want
                assert loaded.received_bytes == want - before, (want, before, loaded.received_bytes)
        assert infos["coord"].loaded.source == f"read from {tiny_dir}"
        shown = subprocess.run([KIMI, "map", "--coordinator", coord.address], capture_output=True, text=True,
                               env=env, timeout=60).stdout
        assert f"peer1: slice received from {coord.address}; " in shown and "in its cache" in shown, shown
        assert f"coord: slice read from {tiny_dir}" in shown, shown
        client = coordinator_stub(open_channel(coord.address, secret))
        prompt = [1, 2, 3, 4, 5]
        reply = read_reply(client.Generate(pb.GenerateRequest(prompt_tokens=prompt, max_tokens=24), timeout=120))
        assert reply.token_ids == oracle_reply(oracle, prompt, 24)

        # A byte of peer1's cached slice rots while it is down: found at load, fetched again.
        port1 = int(peer1.address.rsplit(":", 1)[1])
        peer1.kill(signal.SIGKILL)
        cache = SliceCache(tmp_path / "peer1-cache")
        (model,) = cache.models()
        rotten = model.path / f"{model.parts[-1]}.safetensors"
        data = bytearray(rotten.read_bytes())
        data[-100] ^= 0x10
        rotten.write_bytes(bytes(data))
        peer1 = nodes[0] = hidden_node(tmp_path, "peer1", hide, env, port=port1, memory=memory)
        wait_for_log(peer1, rf"cached part {model.parts[-1]} is corrupt \(.*fails its sha256\); fetching it again")
        poll(lambda: info(peer1, secret).loaded.received_bytes, lambda n: n > 0, 60, "peer1 to load again")
        assert info(peer1, secret).loaded.received_bytes == cache.manifest(model.model_id, model.parts[-1]).data_bytes
        assert cache.verify(model.model_id, model.parts[-1]) is None
        poll(lambda: client.MemoryMap(pb.MemoryMapRequest(), timeout=10).state, lambda s: s == "ready", 60,
             "the cluster to be ready again")
        reply = read_reply(client.Generate(pb.GenerateRequest(prompt_tokens=prompt, max_tokens=24), timeout=120))
        assert reply.token_ids == oracle_reply(oracle, prompt, 24)
    finally:
        for n in nodes:
            n.kill()


def info(node, secret) -> pb.NodeInfo:
    return node_stub(open_channel(node.address, secret)).Info(pb.InfoRequest(), timeout=10)


def test_a_node_that_cannot_receive_is_named_and_the_cluster_waits(tiny_dir, tmp_path):
    env = harness.node_env(tmp_path / "home")
    cache = tmp_path / "small-cache"
    cache.mkdir()
    up = [KIMI, "up", "--host", "127.0.0.1", "--port", "0", "--name", "small", "--memory", "1GB", "--no-mdns",
          "--cache-dir", str(cache)]
    script = f'mount -t tmpfs -o size=64k none "{cache}" && mount -t tmpfs none "{tiny_dir.parent}" && exec "$@"'
    small = launch_node(tmp_path, "small", ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                                            *up], env)
    coord = start_node(tmp_path, "coord", model=tiny_dir, peers=[small.address], env=env,
                       extra=["--cache-dir", str(tmp_path / "coord-cache")])
    try:
        coord.wait_for(r"loading small failed: node small cannot receive its slice: disk full")
        client = coordinator_stub(open_channel(coord.address, bytes.fromhex(env["KIMI_CLUSTER_SECRET"])))
        reply = poll(lambda: client.MemoryMap(pb.MemoryMapRequest(), timeout=10), lambda r: r.state != "loading", 60,
                     "the coordinator to finish loading")
        assert reply.state == "waiting" and "small" in reply.message and "disk full" in reply.message
        assert {n.name: n.status for n in reply.nodes}["small"] == "cannot receive"
    finally:
        for n in (small, coord):
            n.kill()


def test_a_worker_with_download_takes_its_shards_from_the_hub_not_the_coordinator(tiny_dir, tmp_path):
    """`up --download REPO`: the worker fetches only its layers' shards with huggingface_hub (here
    offline, from a directory in the Hugging Face cache layout) and receives nothing it got there."""
    files = [p.name for p in tiny_dir.iterdir()]
    snapshot = harness.hub_cache(tmp_path / "hub", "kimi-test/tiny", tiny_dir, files)
    env = harness.node_env(tmp_path / "home") | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    worker = hidden_node(tmp_path, "worker", tiny_dir.parent, env, extra=["--download", "kimi-test/tiny"])
    coord = start_node(tmp_path, "coord", model=tiny_dir, peers=[worker.address], env=env,
                       extra=["--cache-dir", str(tmp_path / "coord-cache")])
    try:
        coord.wait_for(r"cluster ready")
        loaded = info(worker, bytes.fromhex(env["KIMI_CLUSTER_SECRET"])).loaded
        assert loaded.received_bytes == 0 and loaded.source.startswith("read ")
        assert loaded.source.endswith(f"parts from {snapshot}"), loaded.source
        assert re.search(rf"layers {loaded.start}-{loaded.end - 1} of kimi-test/tiny are in \d+ of its 3 shards",
                         worker.log())
    finally:
        for n in (worker, coord):
            n.kill()
