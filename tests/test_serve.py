"""`up`'s serve started in this process from explicit NodeOptions: a node and its coordinator on
loopback load a tiny checkpoint and answer Info and Health over real gRPC (mutual TLS), then stop
and release their port."""

import grpc
import pytest

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.units import parse_size
from cluster.up import NodeOptions, serve
from cluster.wire import node_stub, open_channel
from harness import TEST_SECRET
from mlx_kimi.checkpoint import open_checkpoint

LOAD_TIMEOUT_S = 120


def test_serve_in_process_answers_then_stops(tmp_path, tiny_dir):
    secret = bytes.fromhex(TEST_SECRET)
    options = NodeOptions(host="127.0.0.1", port=0, name="solo", memory=parse_size("1GB"), no_mdns=True,
                          model=str(tiny_dir), cache_dir=tmp_path / "cache")
    serving = serve(options, secret)
    try:
        stub = node_stub(open_channel(serving.node.address, secret))
        info = stub.Info(pb.InfoRequest(), timeout=10)
        assert (info.name, info.address, info.is_coordinator) == ("solo", serving.node.address, True)
        assert info.usable_bytes <= parse_size("1GB") and not info.HasField("loaded")

        serving.coordinator.start()
        assert serving.coordinator.ready.wait(LOAD_TIMEOUT_S), serving.coordinator.state
        layers = open_checkpoint(tiny_dir).num_layers
        loaded = stub.Info(pb.InfoRequest(), timeout=10).loaded
        assert (loaded.start, loaded.end, loaded.num_layers) == (0, layers, layers)
        health = stub.Health(pb.HealthRequest(), timeout=10)
        assert health.loaded and health.node_id == info.node_id
    finally:
        serving.stop()
    with pytest.raises(grpc.RpcError) as stopped:
        node_stub(open_channel(serving.node.address, secret)).Health(pb.HealthRequest(), timeout=5)
    assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE
    assert serving.node.stage.loaded is None and serving.node.stage.usage() == (0, 0)
