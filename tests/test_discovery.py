"""Discovery over mDNS on loopback: no --peer anywhere. Nodes announce `_kimi-cluster._tcp` with
zeroconf bound to 127.0.0.1; the coordinator (`--nodes 3`) browses, plans, loads and serves.

One cluster is shared by the tests of this module (it is left ready after each): it plans over the
three nodes it found and replies like mlx-lm; a node of another cluster (another secret) is ignored;
a late node is a spare; the spare leaving drops out of the map; a planned node leaving degrades the
cluster and the same node restarted on a new port is loaded again, with the same node id.

Real processes, real zeroconf, real gRPC, real MLX. Every wait is on a printed line, a logged line
or a memory-map state, with a deadline. Each run uses its own random secrets, so concurrent runs on
the same loopback cannot join each other's clusters.
"""

import json
import re
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.client import read_reply
from cluster.generated import kimi_cluster_pb2 as pb
from cluster.wire import coordinator_stub, open_channel
import harness
from harness import oracle_reply, start_mdns_node, wait_for_log
from mlx_kimi.checkpoint import open_checkpoint

# Its nodes announce and browse over mDNS on loopback, which every test shares: these tests run
# on one pytest-xdist worker, one at a time (scripts/test runs --dist loadgroup).
pytestmark = pytest.mark.xdist_group("mdns")

GREEDY_TOKENS = 32
SYSTEM, USER = "Be brief.", "Hi!"
MAP_TIMEOUT_S = 30.0


class MdnsCluster:
    """Processes started with mDNS on and no peers; every process is killed by close()."""

    def __init__(self, workdir, model):
        self.workdir, self.model = workdir, model
        self.secret = secrets.token_hex(32)
        self.other_secret = secrets.token_hex(32)
        self.procs = []  # every process ever started, for cleanup
        self.nodes = {}  # name -> the live NodeProcess of that name
        self.foreign = None
        self.coordinator = None
        self.channel = self.client = None

    def env(self, name, secret=None):
        """A node's environment: its own KIMI_CLUSTER_HOME (so its own machine id) and the secret."""
        return harness.node_env(self.workdir / f"home-{name}", secret or self.secret)

    def start(self, name, secret=None, **kw):
        node = start_mdns_node(self.workdir, name, self.env(name, secret), **kw)
        self.procs.append(node)
        self.nodes[name] = node
        return node

    def up(self):
        # The foreign node and both plain nodes start together, before the coordinator: the
        # foreign node is on the network while the coordinator counts nodes for --nodes 3.
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(self.start, "foreign", secret=self.other_secret),
                       pool.submit(self.start, "node-a"), pool.submit(self.start, "node-b")]
            for f in futures:
                f.result()
        self.foreign = self.nodes.pop("foreign")
        self.coordinator = self.start("coord", model=self.model, extra=["--nodes", "3"])
        self.ready_line = self.coordinator.wait_for(r"cluster ready: .*").group(0)
        self.channel = open_channel(self.coordinator.address, bytes.fromhex(self.secret))
        self.client = coordinator_stub(self.channel)

    def memory_map(self) -> pb.MemoryMapReply:
        reply = self.client.MemoryMap(pb.MemoryMapRequest(), timeout=30)
        # whenever we look, the node of the other cluster is not in it
        assert self.foreign.name not in {n.name for n in reply.nodes}, reply
        assert self.foreign.address not in {n.address for n in reply.nodes}, reply
        return reply

    def wait_map(self, ok, what, timeout=MAP_TIMEOUT_S) -> pb.MemoryMapReply:
        """Ask the coordinator for its map until ok(map) or the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.memory_map()
            if ok(reply):
                return reply
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; last map:\n{reply}\n"
                                     f"coordinator log:\n{self.coordinator.log()}")
            time.sleep(0.2)  # pacing between polls only; the map's state is what we wait on

    def generate(self, messages, max_tokens=GREEDY_TOKENS):
        request = pb.GenerateRequest(messages_json=json.dumps(messages), max_tokens=max_tokens)
        reply = read_reply(self.client.Generate(request, timeout=120))
        return reply.token_ids, reply.done

    def close(self):
        if self.channel:
            self.channel.close()
        for node in self.procs:
            node.kill()


@pytest.fixture(scope="module")
def mdns_cluster(tmp_path_factory, tiny_dir):
    cluster = MdnsCluster(tmp_path_factory.mktemp("mdns"), tiny_dir)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def chat(oracle, make_chat_prompt):
    """(messages, mlx-lm's greedy reply to them)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    expected = oracle_reply(oracle, make_chat_prompt(oracle[1], USER, SYSTEM), GREEDY_TOKENS)
    assert len(expected) > 10, "the oracle reply is too short to say anything"
    return messages, expected


def by_name(reply) -> dict:
    return {n.name: n for n in reply.nodes}


def check_planned(reply, cluster, tiny_dir):
    """Ready; exactly the three discovered nodes, each ready at its printed address, with
    contiguous non-empty layer ranges covering [0, num_layers)."""
    num_layers = open_checkpoint(tiny_dir).num_layers
    assert reply.state == "ready", reply
    assert reply.num_layers == num_layers
    assert {n.name: n.address for n in reply.nodes} == {name: n.address for name, n in cluster.nodes.items()}
    assert all(n.has_layers and n.status == "ready" for n in reply.nodes), reply
    ranges = sorted((n.start, n.end) for n in reply.nodes)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers, ranges
    assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:])), ranges
    assert all(start < end for start, end in ranges), ranges


def test_discovered_nodes_are_planned_and_reply_like_mlx_lm(mdns_cluster, tiny_dir, chat):
    cluster = mdns_cluster
    assert set(cluster.nodes) == {"coord", "node-a", "node-b"}
    reply = cluster.memory_map()
    check_planned(reply, cluster, tiny_dir)
    assert len(reply.nodes) == 3
    # the printed plan names all three nodes
    assert all(f"{name} [" in cluster.ready_line for name in cluster.nodes), cluster.ready_line
    # the peers were found over mDNS (nobody was given --peer)
    for name in ("node-a", "node-b"):
        wait_for_log(cluster.coordinator, rf"mDNS: {name} join at {re.escape(cluster.nodes[name].address)}", 5)

    messages, expected = chat
    ids, done = cluster.generate(messages)
    assert ids == expected
    assert done.completion_tokens == len(expected)

    # the node with another secret was seen and ignored (it is absent from every map we fetch)
    wait_for_log(cluster.coordinator, rf"ignoring foreign at {re.escape(cluster.foreign.address)}: "
                                      r"it belongs to another cluster", 30)
    assert cluster.foreign.proc.poll() is None, "the foreign node should still be up (and announcing)"
    assert "mDNS: foreign" not in cluster.coordinator.log()
    assert len(cluster.memory_map().nodes) == 3


def test_spare_leave_and_rejoin(mdns_cluster, tiny_dir, chat):
    cluster = mdns_cluster
    before = cluster.wait_map(lambda m: m.state == "ready", "a ready cluster")
    planned = {n.name for n in before.nodes}

    # a 4th node joining later is a spare: listed, no layers, the plan unchanged
    spare = cluster.start("spare")
    reply = cluster.wait_map(lambda m: "spare" in by_name(m), "the spare in the map")
    entry = by_name(reply)["spare"]
    assert entry.status == "spare" and not entry.has_layers, entry
    assert entry.address == spare.address
    assert reply.state == "ready" and len(reply.nodes) == 4
    assert {(n.name, n.start, n.end) for n in reply.nodes if n.has_layers} == \
           {(n.name, n.start, n.end) for n in before.nodes}

    # the spare leaving gracefully (SIGTERM: it says goodbye over mDNS) drops out of the map
    spare.kill(signal.SIGTERM)
    assert spare.proc.returncode == 0, spare.log()
    del cluster.nodes["spare"]
    reply = cluster.wait_map(lambda m: "spare" not in by_name(m), "the spare to leave the map")
    assert reply.state == "ready" and {n.name for n in reply.nodes} == planned

    # a planned node leaving: the other two can hold the model, so its layers move to them
    victim = "node-b"
    old = by_name(reply)[victim]
    assert old.has_layers and old.node_id.endswith(f"-{victim}"), old
    cluster.nodes[victim].kill(signal.SIGTERM)
    reply = cluster.wait_map(lambda m: m.state == "ready" and by_name(m)[victim].status == "lost"
                             and not by_name(m)[victim].has_layers, f"{victim}'s layers to move")
    ranges = sorted((n.start, n.end) for n in reply.nodes if n.has_layers)
    assert len(ranges) == 2 and ranges[0][0] == 0 and ranges[-1][1] == open_checkpoint(tiny_dir).num_layers, ranges
    messages, expected = chat
    ids, _ = cluster.generate(messages)
    assert ids == expected

    # the same node (same name, same home) restarted on a new port replaces its old entry, as a spare
    back = cluster.start(victim)
    assert back.address != old.address
    reply = cluster.wait_map(lambda m: by_name(m)[victim].address == back.address
                             and by_name(m)[victim].status == "spare", f"{victim} back at {back.address}", timeout=60)
    assert [n.name for n in reply.nodes].count(victim) == 1
    assert by_name(reply)[victim].node_id == old.node_id, "the node id must survive a restart with the same name and home"
    assert "mDNS: foreign" not in cluster.coordinator.log()


def test_a_waiting_coordinator_says_what_it_found_and_why_not_more(tmp_path, tiny_dir):
    """Alone on the network but for a node of another cluster: while it waits, the coordinator
    names that node and why it is ignored, and says what may hide the others (multicast,
    macOS Local Network permission) and how to get past it."""
    lonely = MdnsCluster(tmp_path, tiny_dir)
    try:
        foreign = lonely.start("foreign", secret=lonely.other_secret)
        coordinator = lonely.start("coord", model=tiny_dir, extra=["--nodes", "2"])
        # the hint comes once it has been alone a few seconds (MDNS_QUIET_S), not at every start
        # (other tests' clusters on loopback may be listed too: to this one they are foreign)
        line = coordinator.wait_for(rf"coordinator: found 1 node \(coord\).*ignoring .*foreign "
                                    rf"\({re.escape(foreign.address)}\).*: another cluster secret.*"
                                    r"no other node answered over mDNS.*").group(0)
        assert "Local Network" in line, line
        assert "--peer HOST:PORT" in line and "--host" in line, line
        assert "cluster ready" not in coordinator.log()
    finally:
        lonely.close()
