"""Every admitted request ends, however the cluster is flooded: real processes, real gRPC, the
mlx-lm oracle for every token. A member flooding the coordinator with Joins naming an address
that never answers (each Join holds its call up to 2 s while the coordinator asks that address
who it is) once took every thread of the server that also takes the last stage's tokens
(Deliver): tokens were dropped and replies hung forever."""

import collections
import socket
import threading
from contextlib import contextmanager

import grpc

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.wire import coordinator_stub, open_channel
from harness import LocalCluster, oracle_reply, poll, run_at_once

FLOOD = 256
GENERATIONS = 4
REPLY_TOKENS = 24


@contextmanager
def silent_address():
    """HOST:PORT of a loopback socket that listens and never answers (no TLS handshake completes)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        yield "127.0.0.1:%d" % listener.getsockname()[1]


class JoinFlood:
    """FLOOD Joins naming `address` at once, again and again until stopped; counts how each ended."""

    def __init__(self, cluster, address: str):
        self.ended = collections.Counter()
        self._stop = threading.Event()
        self._channel = open_channel(cluster.coordinator.address, cluster.secret, "flooder")
        self._stub, self._address = coordinator_stub(self._channel), address
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            calls = [self._stub.Join.future(pb.JoinRequest(address=self._address), timeout=60) for _ in range(FLOOD)]
            for call in calls:
                try:
                    call.result()
                    self.ended["joined"] += 1
                except grpc.RpcError as e:
                    self.ended[e.code().name] += 1

    def stop(self):
        self._stop.set()
        self._thread.join(120)
        self._channel.close()


def test_a_join_flood_starves_no_reply(tmp_path, tiny_dir, oracle, chat_prompt_ids):
    expected = oracle_reply(oracle, chat_prompt_ids, REPLY_TOKENS)
    with LocalCluster(tmp_path, tiny_dir, stages=2) as cluster, silent_address() as silent:
        flood = JoinFlood(cluster, silent)
        try:
            poll(lambda: flood.ended["RESOURCE_EXHAUSTED"], lambda n: n > 0, 60, "the Joins to fill their slots")

            def generate():
                try:
                    return cluster.generate(prompt_tokens=chat_prompt_ids, max_tokens=REPLY_TOKENS, timeout=120)[0]
                except grpc.RpcError as e:
                    return f"{e.code().name}: {e.details()}"

            replies = run_at_once([generate] * GENERATIONS, timeout=300)
            assert flood.ended["joined"] == 0 and sum(flood.ended.values()) >= FLOOD, flood.ended
        finally:
            flood.stop()
        assert replies == [expected] * GENERATIONS
        # the flood left nothing behind: the cluster still answers at once
        assert cluster.generate(prompt_tokens=chat_prompt_ids, max_tokens=4, timeout=30)[0] == expected[:4]
