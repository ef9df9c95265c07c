"""Who may be a member (issue 22, items 5 and 6), on one 2-stage loopback cluster with a spare:

- a wrong secret is named as such: `kimi-cluster map` / `chat` with another secret say the cluster
  secrets differ and where this side read its secret, and so does the log of a node with another
  secret that tries to join;
- Join takes any spelling of a member's address as that member, and cannot displace a live one;
- a spare is lost by the same rule as any node: a pause shorter than that rule's silence is not a loss;
- `kimi-cluster node remove NAME` makes the cluster refuse that node: its Join, Deliver and Forward.

Real processes, real gRPC with mutual TLS, real MLX; every wait is on a printed or logged line or
on the memory map, with a deadline.
"""

import secrets
import signal
import subprocess
import time

import grpc
import pytest

import harness
from cluster.generated import kimi_cluster_pb2 as pb
from cluster.wire import coordinator_stub, node_stub, open_channel
from harness import LocalCluster, poll, start_node, wait_for_log

GREEDY_TOKENS = 16


def statuses(cluster) -> dict:
    return {n.name: n.status for n in cluster.memory_map().nodes}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_dir):
    workdir = tmp_path_factory.mktemp("trust")
    with LocalCluster(workdir, tiny_dir, stages=2) as c:
        spare = start_node(workdir, "spare", env=c.env, extra=["--peer", c.coordinator.address])
        c.peers.append(spare)
        poll(lambda: statuses(c), lambda s: s.get("spare") == "spare", 60, "the node started with --peer to be a spare")
        yield c


def test_a_wrong_secret_is_named_as_such(cluster, tmp_path):
    other = secrets.token_hex(32)
    env = harness.node_env(tmp_path / "home", secret=other)
    address = cluster.coordinator.address
    for command in (["map"], ["chat", "--prompt", "Hi!"]):
        done = subprocess.run([harness.KIMI, *command, "--coordinator", address], capture_output=True,
                                      text=True, env=env, timeout=120)
        assert done.returncode == 1, done
        said = " ".join(done.stderr.split())
        assert f"the TLS handshake with {address} failed because the cluster secrets differ" in said, said
        assert "this side read its secret from $KIMI_CLUSTER_SECRET" in said, said
        assert "is `kimi-cluster up` running there" not in said, said
    # a node with that other secret trying to join says the same in its log
    stranger = start_node(tmp_path, "stranger", env=env, extra=["--peer", address])
    try:
        wait_for_log(stranger, rf"cannot join the coordinator at {address}: the TLS handshake with {address} "
                               r"failed because the cluster secrets differ: this side read its secret from "
                               r"\$KIMI_CLUSTER_SECRET", 60)
    finally:
        stranger.kill()
    assert "stranger" not in statuses(cluster)


def test_join_under_another_spelling_of_a_live_members_address_changes_nothing(cluster, chat_prompt_ids, oracle):
    peer = next(p for p in cluster.peers if p.name == "peer1")
    node_id = next(n.node_id for n in cluster.memory_map().nodes if n.name == peer.name)
    host, port = peer.address.rsplit(":", 1)
    # a member's own identity (every member can make one: it holds the secret) joining its own
    # address under each spelling gRPC or a user might write
    with open_channel(cluster.coordinator.address, cluster.secret, node_id) as channel:
        join = coordinator_stub(channel).Join
        for spelling in (f"ipv4:{host}:{port}", f"{host}:0{port}", f"localhost:{port}", f"dns:localhost:{port}"):
            assert join(pb.JoinRequest(address=spelling), timeout=30).status == "ready", spelling
    nodes = {n.name: (n.status, n.address) for n in cluster.memory_map().nodes}
    assert nodes[peer.name] == ("ready", peer.address), nodes
    log = cluster.coordinator.log()
    assert f"{peer.name} moved" not in log and "lost node" not in log, log
    # a member naming another member's address is refused: a node joins with its own address only
    spare = next(p for p in cluster.peers if p.name == "spare")
    with open_channel(cluster.coordinator.address, cluster.secret, node_id) as channel:
        with pytest.raises(grpc.RpcError) as info:
            coordinator_stub(channel).Join(pb.JoinRequest(address=spare.address), timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
    assert "a node joins only with its own address" in info.value.details()
    assert cluster.generate(chat_prompt_ids, max_tokens=GREEDY_TOKENS)[0] == \
        harness.oracle_reply(oracle, chat_prompt_ids, GREEDY_TOKENS)


def test_a_paused_spare_is_not_lost_before_the_rule_says(cluster):
    """A spare that answers nothing for 3 s (SIGSTOP) is still a spare: one failed Info is not a
    loss (the rule for every node: connection refused twice, or silent for 6 s)."""
    spare = next(p for p in cluster.peers if p.name == "spare")
    seen = set()
    spare.kill(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            seen.add(statuses(cluster)["spare"])  # each read asks every member, the paused one too
    finally:
        spare.kill(signal.SIGCONT)
    assert seen == {"spare"}, seen
    assert "spare spare" not in cluster.coordinator.log()


def test_a_removed_node_is_refused_on_every_call(cluster, chat_prompt_ids, oracle):
    spare = next(p for p in cluster.peers if p.name == "spare")
    node_id = next(n.node_id for n in cluster.memory_map().nodes if n.name == "spare")
    done = cluster.cli("node", "remove", "spare", "--coordinator", cluster.coordinator.address)
    assert done.returncode == 0 and f"removed spare ({node_id})" in done.stdout, done
    assert "spare" not in statuses(cluster)
    # its own process, joining again, is refused naming the removal
    wait_for_log(spare, r"cannot join the coordinator at \S+: node spare \(\S+\) was removed from this cluster", 60)
    # any call under its identity: Join, Deliver to the coordinator, Forward to the coordinator's stage
    with open_channel(cluster.coordinator.address, cluster.secret, node_id) as channel:
        calls = (lambda: coordinator_stub(channel).Join(pb.JoinRequest(address=spare.address), timeout=30),
                 lambda: node_stub(channel).Deliver(pb.ForwardReply(), timeout=30),
                 lambda: node_stub(channel).Forward(pb.ForwardRequest(session_id="x", tokens=[1]), timeout=30))
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
            assert "was removed from this cluster" in info.value.details()
    # restarted (same machine, same name: the same identity), still refused
    spare.kill()
    again = start_node(spare.log_path.parent, "spare", env=cluster.env, extra=["--peer", cluster.coordinator.address])
    cluster.peers[cluster.peers.index(spare)] = again
    wait_for_log(again, r"was removed from this cluster", 60)
    assert "spare" not in statuses(cluster)
    # the other members, and the cluster's replies, are untouched
    assert statuses(cluster) == {"coord": "ready", "peer1": "ready"}
    assert cluster.generate(chat_prompt_ids, max_tokens=GREEDY_TOKENS)[0] == \
        harness.oracle_reply(oracle, chat_prompt_ids, GREEDY_TOKENS)
    with pytest.raises(grpc.RpcError) as info:
        cluster.client.RemoveNode(pb.RemoveNodeRequest(name="nobody"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "`kimi-cluster map`" in info.value.details()
