"""Three "hosts" in three network namespaces, joined by veth pairs to a bridge in a fourth one.

One `kimi-cluster up` per namespace, each bound to its own 10.213.0.<i> address (which exists only
inside this test's namespaces), no --peer: the coordinator in host 1 finds the other two over mDNS
across the bridge, plans, loads, and `kimi-cluster chat` run inside host 1 must reply with exactly
mlx-lm's greedy tokens. Needs root and iproute2 (`ip netns`); skipped, with the reason, otherwise.
"""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness
from harness import KIMI, oracle_reply, start_mdns_node, wait_for_log
from mlx_kimi.checkpoint import open_checkpoint

HOSTS = 3
SUBNET = "10.213.0"
PORT = 7470
TEXT = "Hi!"
MAX_TOKENS = 24
IP_TIMEOUT_S = 30

# Receive one datagram on a multicast group joined on this host's address (printing "ready" once
# joined), or fail after a deadline: the probe that multicast crosses the bridge.
MCAST_RECEIVER = r"""
import socket, struct, sys
group, port, local = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton(local))
s.settimeout(10)
print("ready", flush=True)
data, sender = s.recvfrom(1500)
print(data.decode(), sender[0], flush=True)
"""
MCAST_SENDER = r"""
import socket, sys
group, port, local = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
s.sendto(b"kimi-probe", (group, port))
"""


def ip(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and result.returncode != 0:
        raise AssertionError(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


class Network:
    """A bridge namespace and HOSTS host namespaces, each host at SUBNET.<i>/24 on its eth0."""

    def __init__(self):
        suffix = secrets.token_hex(3)
        self.bridge = f"kc-br-{suffix}"
        self.hosts = [f"kc-h{i}-{suffix}" for i in range(1, HOSTS + 1)]
        self.created = []

    def add_namespace(self, name):
        ip("netns", "add", name)
        self.created.append(name)

    def build(self):
        br = self.bridge
        ip("-n", br, "link", "add", "br0", "type", "bridge")
        # let multicast (mDNS) flood to every port rather than depend on IGMP snooping
        ip("-n", br, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", br, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts, 1):
            self.add_namespace(host)
            ip("-n", br, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", host)
            ip("-n", br, "link", "set", f"v{i}", "master", "br0")
            ip("-n", br, "link", "set", f"v{i}", "up")
            ip("-n", host, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            ip("-n", host, "link", "set", "eth0", "up")
            ip("-n", host, "link", "set", "lo", "up")
            link = ip("-n", host, "link", "show", "eth0").stdout
            assert "MULTICAST" in link and "UP" in link, link

    def exec_prefix(self, i) -> tuple:
        return ("ip", "netns", "exec", self.hosts[i - 1])

    def check_multicast(self, sender=1, receiver=HOSTS):
        """A datagram to a multicast group sent from host `sender` arrives at host `receiver`."""
        group, port = "239.255.77.77", 17470
        recv = subprocess.Popen([*self.exec_prefix(receiver), sys.executable, "-c", MCAST_RECEIVER, group,
                                 str(port), f"{SUBNET}.{receiver}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert recv.stdout.readline().strip() == "ready", recv.stderr.read()
            subprocess.run([*self.exec_prefix(sender), sys.executable, "-c", MCAST_SENDER, group, str(port),
                            f"{SUBNET}.{sender}"], check=True, timeout=IP_TIMEOUT_S)
            out, err = recv.communicate(timeout=15)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        assert out.split() == ["kimi-probe", f"{SUBNET}.{sender}"], \
            f"multicast from host {sender} did not reach host {receiver} across the bridge: {out!r} {err}"

    def delete(self):
        errors = []
        for name in reversed(self.created):
            result = ip("netns", "del", name, check=False)
            if result.returncode != 0:
                errors.append(f"{name}: {result.stderr.strip()}")
        self.created = []
        return errors


@pytest.fixture
def network():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip` command")
    net = Network()
    probe = ip("netns", "add", net.bridge, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace: `ip netns add` failed: {probe.stderr.strip()}")
    net.created.append(net.bridge)
    try:
        net.build()
        yield net
    finally:
        errors = net.delete()
        assert not errors, f"could not delete namespaces: {errors}"


def test_three_namespaces_discover_plan_and_chat(network, tmp_path, tiny_dir, oracle):
    prompt = list(oracle[1].apply_chat_template([{"role": "user", "content": TEXT}], add_generation_prompt=True))
    expected = oracle_reply(oracle, prompt, MAX_TOKENS)
    assert len(expected) > 10, "the oracle reply is too short to say anything"
    network.check_multicast()

    secret = secrets.token_hex(32)
    env = {i: harness.node_env(tmp_path / f"home-host{i}", secret) for i in range(1, HOSTS + 1)}
    coordinator_address = f"{SUBNET}.1:{PORT}"
    nodes = {}
    try:
        def start(i):
            model = {"model": tiny_dir, "extra": ["--nodes", str(HOSTS)]} if i == 1 else {}
            nodes[i] = start_mdns_node(tmp_path, f"host{i}", env[i], host=f"{SUBNET}.{i}", port=PORT,
                                       prefix=network.exec_prefix(i), **model)

        with ThreadPoolExecutor(HOSTS) as pool:
            for f in [pool.submit(start, i) for i in range(1, HOSTS + 1)]:
                f.result()
        for i, node in nodes.items():
            assert node.address == f"{SUBNET}.{i}:{PORT}", node.address
        coordinator = nodes[1]
        ready = coordinator.wait_for(r"cluster ready: .*").group(0)
        assert all(f"host{i} [" in ready for i in range(1, HOSTS + 1)), ready
        for i in range(2, HOSTS + 1):  # found over mDNS across the bridge, not given as peers
            wait_for_log(coordinator, rf"mDNS: host{i} join at {re.escape(nodes[i].address)}", 5)

        def cli(*args):
            result = subprocess.run([*network.exec_prefix(1), KIMI, *args, "--coordinator", coordinator_address,
                                     "--json"], capture_output=True, text=True, env=env[1], timeout=120)
            assert result.returncode == 0, f"{args[0]} failed: {result.stderr}\ncoordinator log:\n{coordinator.log()}"
            return json.loads(result.stdout)

        memory_map = cli("map")
        num_layers = open_checkpoint(tiny_dir).num_layers
        assert memory_map["state"] == "ready", memory_map
        assert memory_map["num_layers"] == num_layers
        assert {n["name"]: n["address"] for n in memory_map["nodes"]} == \
               {f"host{i}": f"{SUBNET}.{i}:{PORT}" for i in range(1, HOSTS + 1)}, memory_map
        assert all(n["status"] == "ready" and n["layers"] for n in memory_map["nodes"]), memory_map
        ranges = sorted(tuple(n["layers"]) for n in memory_map["nodes"])
        assert ranges[0][0] == 0 and ranges[-1][1] == num_layers, ranges
        assert all(a_end == b_start and a_start < a_end for (a_start, a_end), (b_start, _) in
                   zip(ranges, ranges[1:])), ranges

        reply = cli("chat", "--prompt", TEXT, "--max-tokens", str(MAX_TOKENS))
        assert reply["token_ids"] == expected, (reply, expected)
        assert reply["completion_tokens"] == len(expected)
        assert reply["finish_reason"] == ("length" if len(expected) == MAX_TOKENS else "stop")
    finally:
        for node in nodes.values():
            node.kill()
