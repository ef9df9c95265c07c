"""An attacker on the same network, played on loopback against real `kimi-cluster up` processes:
captured traffic replayed to another node, a rogue server that knows the public fingerprint, big
bodies from strangers, a flood of streams, a second `up` on a taken port."""

import queue
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import harness
from cluster.generated import kimi_cluster_pb2 as pb
from cluster.generated import kimi_cluster_pb2_grpc as pb_grpc
from cluster.identity import identity
from cluster.wire import MAX_WORK_CALLS, node_stub, open_channel
from harness import KIMI, TEST_SECRET, LocalCluster, oracle_reply, poll, start_node, wait_for_log

SECRET = bytes.fromhex(TEST_SECRET)


class TapProxy:
    """A TCP relay on loopback that records every byte each way and counts connections."""

    def __init__(self, target: str):
        self.target = target.rsplit(":", 1)
        self.sent, self.received = bytearray(), bytearray()  # client -> server, server -> client
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection((self.target[0], int(self.target[1])))
            threading.Thread(target=self._pump, args=(client, server, self.sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.received), daemon=True).start()

    @staticmethod
    def _pump(src, dst, record):
        try:
            while data := src.recv(65536):
                record.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._listener.close()


def replay(address: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send captured bytes on a fresh connection; everything the server says back."""
    host, port = address.rsplit(":", 1)
    answer = bytearray()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        try:
            while chunk := s.recv(65536):
                answer.extend(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return bytes(answer)


@pytest.fixture
def two_nodes(tmp_path):
    nodes = [start_node(tmp_path, name) for name in ("node-alpha", "node-bravo")]
    yield nodes
    for node in nodes:
        node.kill()


def test_captured_call_replayed_to_another_node_is_refused_and_unreadable(two_nodes):
    alpha, bravo = two_nodes
    tap = TapProxy(alpha.address)
    try:
        with open_channel(tap.address, SECRET) as channel:
            assert node_stub(channel).Info(pb.InfoRequest(), timeout=10).name == "node-alpha"
    finally:
        tap.close()
    # nothing readable on the wire: not the reply's node name, nor the method called
    assert b"node-alpha" not in tap.received and b"Info" not in tap.sent
    # the whole captured client side, replayed to another node and to the same one: no answer
    for target in (bravo, alpha):
        answer = replay(target.address, bytes(tap.sent))
        assert b"node-" not in answer and b"NodeInfo" not in answer, answer[:200]
    for node in (alpha, bravo):  # both still serve their members
        with open_channel(node.address, SECRET) as channel:
            assert node_stub(channel).Health(pb.HealthRequest(), timeout=10).node_id


class RogueNode(pb_grpc.NodeServicer):
    """Knows the cluster's public fingerprint and a node's name, and would like to be planned."""

    def __init__(self):
        self.calls = []

    def Info(self, request, context):
        self.calls.append("Info")
        return pb.NodeInfo(name="peer1", node_id="rogue", backend="cpu", total_bytes=2**40, usable_bytes=2**39,
                           version="0.1.0")

    def Health(self, request, context):
        self.calls.append("Health")
        return pb.HealthReply(node_id="rogue")

    def Load(self, request, context):
        self.calls.append("Load")
        yield pb.LoadProgress(done=True, bytes_done=1, bytes_total=1)

    def ForwardStream(self, requests, context):
        self.calls.append("ForwardStream")
        for r in requests:
            yield pb.ForwardReply(seq=r.seq, sampled=True, token=1)


def _rogue_server(kind: str):
    """A rogue gRPC node: plaintext, or TLS with its own CA whose certificate names the cluster host."""
    rogue = RogueNode()
    server = grpc.server(ThreadPoolExecutor(8))
    pb_grpc.add_NodeServicer_to_server(rogue, server)
    if kind == "plaintext":
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        # A made-up secret gives a CA and a certificate for the right host name, not the cluster's CA.
        me = identity(bytes(range(7, 39)), "rogue")
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(me.key_pem, me.cert_pem)]))
    server.start()
    return rogue, server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("kind", ["plaintext", "tls-own-ca"])
def test_rogue_server_is_never_called(tmp_path, tiny_dir, kind):
    rogue, server, address = _rogue_server(kind)
    tap = TapProxy(address)
    coordinator = None
    try:
        coordinator = start_node(tmp_path, "coord", model=tiny_dir, peers=[tap.address], extra=["--nodes", "2"])
        # the coordinator tries the rogue again and again (each try a new connection, refused)
        poll(lambda: tap.connections, lambda n: n >= 2, 60, "two connections to the rogue")
        with open_channel(coordinator.address, SECRET) as channel:
            reply = node_stub(channel).Info(pb.InfoRequest(), timeout=10)
            assert not reply.HasField("loaded")
            m = pb_grpc.CoordinatorStub(channel).MemoryMap(pb.MemoryMapRequest(), timeout=30)
        assert m.state == "waiting" and tap.address in m.message, m
        assert rogue.calls == []  # no Info, no Load, no hidden state ever reached it
        assert "cluster ready" not in coordinator.log()
    finally:
        if coordinator:
            coordinator.kill()
        tap.close()
        server.stop(None)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_big_bodies_from_strangers_are_never_read(tmp_path):
    node = start_node(tmp_path, "lonely")
    try:
        before = _rss_bytes(node.proc.pid)
        body = pb.ForwardRequest(session_id="x", hidden=pb.Tensor(data=b"\x01" * (24 << 20), shape=[1], dtype="float32"))
        options = [("grpc.max_send_message_length", 64 << 20)]

        def send(_):
            with grpc.insecure_channel(node.address, options=options) as channel:
                try:
                    pb_grpc.NodeStub(channel).Forward(body, timeout=15)
                except grpc.RpcError as e:
                    return e.code()
            return None

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(send, range(16)))
        assert all(code == grpc.StatusCode.UNAVAILABLE for code in codes), codes
        grown = _rss_bytes(node.proc.pid) - before
        assert grown < 100 << 20, f"a node without any authenticated call grew by {grown >> 20} MiB"
        with open_channel(node.address, SECRET) as channel:  # and it still serves its cluster
            assert node_stub(channel).Health(pb.HealthRequest(), timeout=10).node_id
    finally:
        node.kill()


def test_stream_flood_is_refused_and_health_still_answers_and_sigterm_exits(tmp_path):
    node = start_node(tmp_path, "flooded")
    release = threading.Event()
    codes = queue.Queue()
    flood = MAX_WORK_CALLS + 48

    def idle_requests():
        release.wait()
        return
        yield

    def hold(stub):
        try:
            for _ in stub.ForwardStream(idle_requests(), timeout=120):
                pass
            codes.put(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.put(e.code())

    channel = open_channel(node.address, SECRET)
    try:
        stub = node_stub(channel)
        threads = [threading.Thread(target=hold, args=(stub,), daemon=True) for _ in range(flood)]
        for t in threads:
            t.start()
        refused = [codes.get(timeout=60) for _ in range(flood - MAX_WORK_CALLS)]
        assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused
        # MAX_WORK_CALLS streams are still held open; health and info answer at once, from another client too
        with open_channel(node.address, SECRET, "health-checker") as other:
            for _ in range(5):
                assert node_stub(other).Health(pb.HealthRequest(), timeout=2).node_id
            assert node_stub(other).Info(pb.InfoRequest(), timeout=2).name == "flooded"
        assert codes.empty()  # nothing else ended
        # SIGTERM while every slot holds a stream that never ends: the process exits within seconds
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(timeout=10)
        assert time.monotonic() - started < 6
    finally:
        release.set()
        channel.close()
        node.kill()


def _up_fails(tmp_path, *args) -> str:
    env = harness.node_env(tmp_path / "home")
    done = subprocess.run([KIMI, "up", "--no-mdns", "--name", "second", *args], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "listening on" not in done.stdout
    return done.stderr.strip()


def test_second_up_on_a_taken_port_fails_in_one_line(tmp_path):
    first = start_node(tmp_path, "first")
    try:
        port = first.address.rsplit(":", 1)[1]
        error = _up_fails(tmp_path, "--host", "127.0.0.1", "--port", port)
        assert "port is in use" in error and f"127.0.0.1:{port}" in error and "\n" not in error, error
    finally:
        first.kill()


def test_up_on_an_address_of_another_machine_fails_in_one_line(tmp_path):
    # 192.0.2.1 (TEST-NET-1) is no interface's address here; nothing is sent, the bind just fails
    error = _up_fails(tmp_path, "--host", "192.0.2.1", "--port", "0")
    assert "not an address of this machine" in error and "\n" not in error, error


# ---- one owner per node -----------------------------------------------------------------------------

OWNER_TOKENS = 24


def _generate_or_error(client, prompt: list) -> list | grpc.StatusCode:
    request = pb.GenerateRequest(prompt_tokens=prompt, max_tokens=OWNER_TOKENS)
    try:
        return [e.token.id for e in client.Generate(request, timeout=60) if e.HasField("token") and e.token.id >= 0]
    except grpc.RpcError as e:
        return e.code()


def test_coordinators_starting_stopping_and_taking_over_never_give_wrong_tokens(tmp_path, tiny_dir, oracle,
                                                                                  chat_prompt_ids):
    """A second coordinator is refused a node another one owns, naming it; with --take-over it
    gets it and the first stops using it; when the second dies the first loads it again; when the
    first restarts it gets the node back. Every reply, at every step, is mlx-lm's or an error."""
    expected = oracle_reply(oracle, chat_prompt_ids, OWNER_TOKENS)
    # one node cannot hold the model: a taken node leaves the first cluster waiting for it
    with LocalCluster(tmp_path, tiny_dir, stages=2, memory=harness.tight_memory(tiny_dir, 2)) as first:
        peer = first.peers[0]

        def first_replies():
            got = _generate_or_error(first.client, chat_prompt_ids)
            assert got == expected or isinstance(got, grpc.StatusCode), got  # never other tokens
            return got

        assert first_replies() == expected
        second = start_node(tmp_path, "coord-b", model=tiny_dir, peers=[peer.address], extra=["--nodes", "2"],
                            env=first.env)
        try:
            # refused, naming the owner; the first cluster goes on untouched
            wait_for_log(second, rf"node peer1 serves the coordinator at {re.escape(first.coordinator.address)}", 60)
            assert "cluster ready" not in second.log()
            assert first_replies() == expected
        finally:
            second.kill()
        taker = start_node(tmp_path, "coord-c", model=tiny_dir, peers=[peer.address],
                           extra=["--nodes", "2", "--take-over"], env=first.env)
        try:
            taker.wait_for(r"cluster ready", 120)
            with open_channel(taker.address, SECRET) as channel:
                assert _generate_or_error(pb_grpc.CoordinatorStub(channel), chat_prompt_ids) == expected
            # the first sees peer1 serve another coordinator and marks it lost rather than use it
            poll(first.memory_map, lambda m: m.state == "degraded", 30, "the first cluster to see peer1 taken")
            assert first_replies() == grpc.StatusCode.UNAVAILABLE
        finally:
            taker.kill()  # SIGKILL: it cannot hand the node back; its lease runs out
        poll(first.memory_map, lambda m: m.state == "ready", 60, "the first cluster to load peer1 again")
        assert first_replies() == expected
        # the first coordinator dies and restarts (same name, so the same owner): it gets peer1 back at once
        first.coordinator.kill()
        first.coordinator = start_node(tmp_path, "coord", model=tiny_dir, peers=[peer.address], env=first.env)
        first.coordinator.wait_for(r"cluster ready", 120)
        with open_channel(first.coordinator.address, SECRET) as channel:
            assert _generate_or_error(pb_grpc.CoordinatorStub(channel), chat_prompt_ids) == expected


# ---- KV accounting ------------------------------------------------------------------------------------


def test_a_session_never_holds_more_positions_than_it_reserved(tmp_path, tiny_dir, chat_prompt_ids):
    with LocalCluster(tmp_path, tiny_dir, stages=1) as cluster:
        node = cluster.node_stub(cluster.coordinator)
        owner = node.Health(pb.HealthRequest(), timeout=10).coordinator_id

        def forward(**fields):
            return node.Forward(pb.ForwardRequest(coordinator_id=owner, tokens=chat_prompt_ids, **fields), timeout=60)

        # no reservation (max_positions 0) or one smaller than the chunk: refused, nothing held
        for max_positions in (0, 1, len(chat_prompt_ids) - 1):
            with pytest.raises(grpc.RpcError) as err:
                forward(session_id=f"greedy-{max_positions}", max_positions=max_positions)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"past max_positions {max_positions}" in err.value.details()
        assert cluster.kv_state()["coord"] == (0, 0)
        # within its reservation it runs; going past it is refused and the cache does not grow
        n = len(chat_prompt_ids)
        forward(session_id="fits", max_positions=n)
        held = cluster.kv_state()["coord"]
        with pytest.raises(grpc.RpcError) as err:
            node.Forward(pb.ForwardRequest(coordinator_id=owner, session_id="fits", offset=n, tokens=[1],
                                           max_positions=n), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert cluster.kv_state()["coord"] == held and held[1] > 0
