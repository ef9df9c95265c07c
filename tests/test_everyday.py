"""Everyday use: the interface `up` picks, clients that find the coordinator, status, stop, Ctrl-C.

Live tests run one 2-node cluster on loopback with mDNS on and a secret of their own (other
clusters on loopback use other secrets, so they are invisible to these clients)."""

import json
import re
import secrets
import shutil
import signal
import subprocess

import pytest

import harness
from cluster.client import ClientError, with_port
from cluster.generated import kimi_cluster_pb2 as pb
from cluster.interfaces import HostChoice, Interface, NoHostError, choose_host
from cluster.wire import node_stub, open_channel
from harness import KIMI, start_mdns_node, wait_for_log

# Its nodes announce and browse over mDNS on loopback, which every test shares: these tests run
# on one pytest-xdist worker, one at a time (scripts/test runs --dist loadgroup).
pytestmark = pytest.mark.xdist_group("mdns")

LO = Interface("lo", "127.0.0.1")


@pytest.mark.parametrize("interfaces, system, default, want", [
    ([LO, Interface("en0", "192.168.1.20"), Interface("bridge0", "169.254.10.2")], "Darwin", "en0",
     HostChoice("169.254.10.2", "Thunderbolt bridge bridge0")),
    ([LO, Interface("en1", "10.0.0.5"), Interface("en0", "192.168.1.20")], "Darwin", "en0",
     HostChoice("192.168.1.20", "en0, the interface of the default route (no Thunderbolt bridge)")),
    ([LO, Interface("eth0", "10.1.2.3"), Interface("docker0", "8.8.4.4")], "Linux", "eth0",
     HostChoice("10.1.2.3", "eth0, the only private IPv4 interface")),
])
def test_up_picks_the_interface(interfaces, system, default, want):
    assert choose_host(interfaces, system, default) == want


@pytest.mark.parametrize("interfaces, system, default, words", [
    ([LO, Interface("eth0", "10.1.2.3"), Interface("wlan0", "192.168.1.7")], "Linux", "eth0",
     "2 private IPv4 interfaces (IPv4 interfaces: eth0 10.1.2.3, wlan0 192.168.1.7): pass --host"),
    ([LO], "Linux", None, "no private IPv4 interfaces (IPv4 interfaces: none): pass --host"),
    ([LO, Interface("en0", "192.168.1.20")], "Darwin", None, "no Thunderbolt bridge and no default route"),
])
def test_up_refuses_to_guess_between_interfaces(interfaces, system, default, words):
    with pytest.raises(NoHostError, match="^" + words.replace("(", r"\(").replace(")", r"\)")):
        choose_host(interfaces, system, default)


def test_coordinator_address_gets_the_default_port():
    assert with_port("10.0.0.1") == "10.0.0.1:7470"
    assert with_port("10.0.0.1:7999") == "10.0.0.1:7999"
    assert with_port("mac-a.local") == "mac-a.local:7470"
    with pytest.raises(ClientError, match="must be a number"):
        with_port("10.0.0.1:x")


def run(*args, env=None, timeout=60):
    return subprocess.run([KIMI, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_version_and_nodes_without_model(tmp_path):
    env = harness.node_env(tmp_path / "home")
    assert run("--version", env=env).stdout.startswith("kimi-cluster ")
    refused = run("up", "--host", "127.0.0.1", "--nodes", "2", env=env)
    assert refused.returncode == 2 and "--nodes says how many nodes the coordinator waits for: it needs --model" \
        in refused.stderr


def test_clients_say_what_to_do_when_no_coordinator_runs(tmp_path):
    env = harness.node_env(tmp_path / "home", secrets.token_hex(32))
    done = run("map", "--host", "127.0.0.1", env=env)
    assert done.returncode == 1
    assert "no coordinator found: none runs on this machine and none of this cluster answered over mDNS" \
        in done.stderr and "kimi-cluster up --model DIR" in done.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_dir):
    workdir = tmp_path_factory.mktemp("everyday")
    env = harness.node_env(workdir / "home", secrets.token_hex(32))
    worker = start_mdns_node(workdir, "worker", env)
    coordinator = start_mdns_node(workdir, "coord", env, model=tiny_dir, extra=["--nodes", "2", "--api-port", "0"])
    try:
        coordinator.wait_for(r"cluster ready")
        yield env, worker, coordinator
    finally:
        for node in (coordinator, worker):
            node.kill()


def test_ready_says_how_to_connect(cluster):
    _, _, coordinator = cluster
    assert coordinator.wait_for(r"chat: +kimi-cluster chat --coordinator (\S+)").group(1) == coordinator.address
    assert coordinator.wait_for(r"API: +(http://\S+/v1)")


def test_status_shows_this_machines_nodes_and_the_cluster(cluster):
    env, worker, coordinator = cluster
    done = run("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert {n["name"]: (n["address"], n["coordinator"]) for n in status["local_nodes"]} == {
        "worker": (worker.address, False), "coord": (coordinator.address, True)}
    assert status["cluster"]["state"] == "ready"
    assert sorted(n["name"] for n in status["cluster"]["nodes"]) == ["coord", "worker"]


def test_client_on_another_machine_finds_the_coordinator_over_mdns(cluster, tmp_path):
    env, _, coordinator = cluster
    elsewhere = {**env, "KIMI_CLUSTER_HOME": str(tmp_path / "other-home")}  # no local state there
    done = run("map", "--json", "--host", "127.0.0.1", env=elsewhere)
    assert done.returncode == 0, done.stderr
    assert {n["address"] for n in json.loads(done.stdout)["nodes"]} >= {coordinator.address}


def test_coordinator_logs_one_line_per_request(cluster):
    env, worker, coordinator = cluster
    done = run("chat", "--prompt", "Hi!", "--max-tokens", "5", "--json", env=env)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    wait_for_log(coordinator, rf"request \S+: \d+ prompt tokens \(0 cached\), {reply['completion_tokens']} generated "
                              rf"\({reply['finish_reason']}\); TTFT \d+ ms, [\d.]+ tok/s; "
                              r"nodes (coord, worker|worker, coord); \d+ steps \([\d.]+ per token\), \d+ drafted, "
                              r"\d+ accepted")


def test_ctrl_c_stops_the_coordinator_says_so_and_releases_the_workers(cluster):
    env, worker, coordinator = cluster
    secret = bytes.fromhex(env["KIMI_CLUSTER_SECRET"])
    assert node_stub(open_channel(worker.address, secret)).Info(pb.InfoRequest(), timeout=10).HasField("loaded")
    coordinator.kill(signal.SIGINT)
    assert coordinator.proc.wait(timeout=30) == 130
    wait_for_log(coordinator, r"SIGINT: stopping coordinator and node coord")
    wait_for_log(coordinator, r"released \S+ \S+ on worker")
    info = node_stub(open_channel(worker.address, secret)).Info(pb.InfoRequest(), timeout=10)
    assert not info.HasField("loaded") and worker.proc.poll() is None


def test_stop_stops_this_machines_nodes(cluster):
    env, worker, _ = cluster
    done = run("stop", env=env)
    assert done.returncode == 0, done.stderr
    assert "worker: stopped" in done.stdout and worker.proc.wait(timeout=10) == 0
    status = run("status", "--json", "--host", "127.0.0.1", env=env)
    assert json.loads(status.stdout)["local_nodes"] == [] and status.returncode == 1


@pytest.mark.parametrize("memory, words", [
    ("96", "'96' has no unit: write e.g. 96GB (10^9 bytes) or 96GiB (2^30 bytes)"),
    ("900TB", "--memory 900.0 TB is more than this machine has"),
])
def test_memory_needs_a_unit_and_fits_the_machine(tmp_path, memory, words):
    done = run("up", "--host", "127.0.0.1", "--port", "0", "--no-mdns", "--memory", memory,
               env=harness.node_env(tmp_path / "home"))
    assert done.returncode == 2 and words in done.stderr, done.stderr


def test_load_bars_show_every_planned_node_once_however_the_loads_interleave():
    import io
    from dataclasses import dataclass

    from rich.console import Console

    from cluster.load_progress import LoadBars

    @dataclass
    class Stage:
        node: str
        weight_bytes: int

    @dataclass
    class Plan:
        stages: list

    @dataclass
    class Coordinator:
        plan: Plan

    out = io.StringIO()
    bars = LoadBars(Coordinator(Plan([Stage("a", 100), Stage("b", 200)])), Console(file=out, width=100))
    bars("a", pb.LoadProgress(bytes_done=100, bytes_total=100, done=True))  # a is done before b starts
    assert out.getvalue() == ""  # the round waits for b
    bars("b", pb.LoadProgress(bytes_done=100, bytes_total=200))
    bars("b", pb.LoadProgress(bytes_done=200, bytes_total=200, done=True))
    lines = out.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["loading", "a"], ["loading", "b"]], lines
    assert "100/100 bytes" in lines[0] and "200/200 bytes" in lines[1]


def test_a_node_joining_a_cluster_that_did_not_fit_triggers_a_plan(tmp_path, tiny_dir):
    env = harness.node_env(tmp_path / "home", secrets.token_hex(32))
    small = ["--context", "256"]
    coordinator = start_mdns_node(tmp_path, "coord", env, memory="6MB", model=tiny_dir, extra=small)
    worker = None
    try:
        waiting = wait_for_log(coordinator, r"coordinator: found 1 node \(coord\).*the model does not fit: (.*) "
                                            r"Waiting for another node to join\.")
        assert "sysctl" not in waiting.group(1)  # wired-limit advice is for Macs only (this node is cpu)
        # follow the advice: a node with what it says (rounded up to the 0.1 MB it shows)
        advised = float(re.search(r"Option: add a node with at least ([\d.]+) MB usable", waiting.group(1)).group(1))
        worker = start_mdns_node(tmp_path, "worker", env, memory=f"{advised + 0.1:.1f}MB")
        ready = coordinator.wait_for(r"cluster ready: .*")
        assert "coord [" in ready.group(0) and "worker [" in ready.group(0)
    finally:
        for node in (worker, coordinator):
            if node:
                node.kill()


def test_cli_sampling_defaults_come_from_generation_config(tmp_path, tiny_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config_path = model / "generation_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config_path.write_text(json.dumps({**config, "temperature": 1.0, "top_k": 50}))
    with harness.LocalCluster(tmp_path, model, stages=1, coordinator_extra=["--context", "512"]) as c:
        def reply(*sampling):
            done = c.cli("chat", "--coordinator", c.coordinator.address, "--prompt", "Hi!", "--max-tokens", "12",
                         "--seed", "7", "--json", *sampling)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)["token_ids"]

        default = reply()
        assert default == reply("--temperature", "1.0", "--top-k", "50")
        assert default != reply("--temperature", "0")


def test_plan_reads_a_macs_gb_as_apple_does():
    from cluster.cli import build_parser

    text = run("plan", "--model", "kimi-k2.5", "--node", "192GB", "--node", "192GiB")
    assert text.returncode == 0, text.stderr
    assert "Mac memory as Apple counts it (binary): mac1 192 GiB = 206,158,430,208 bytes, " \
           "mac2 192 GiB = 206,158,430,208 bytes" in text.stdout
    plan_help = build_parser()._subparsers._group_actions[0].choices["plan"].format_help()
    assert "Apple means by them" in " ".join(plan_help.split())


def test_log_file_and_level(tmp_path, tiny_dir):
    log = tmp_path / "logs" / "node.log"
    small = ["--context", "256"]
    node = harness.start_node(tmp_path, "logged", model=tiny_dir, extra=["--log-file", str(log), *small])
    try:
        node.wait_for("cluster ready")
        assert re.search(r" kimi_cluster\.node INFO loaded ", log.read_text())
    finally:
        node.kill()
    quiet = harness.start_node(tmp_path, "quiet", model=tiny_dir, extra=["--log-level", "error", *small])
    try:
        quiet.wait_for("cluster ready")
        assert " INFO " not in quiet.log()
    finally:
        quiet.kill()


def test_stop_cluster_stops_every_node(tmp_path, tiny_dir):
    with harness.LocalCluster(tmp_path, tiny_dir, stages=2, coordinator_extra=["--context", "256"]) as c:
        done = c.cli("stop", "--cluster", "--coordinator", c.coordinator.address)
        assert done.returncode == 0, done.stderr
        for node in c.nodes:
            assert f"stopped {node.name} ({node.address}), released " in done.stdout
            assert node.proc.wait(timeout=30) == 0
            wait_for_log(node, r"asked to stop over the network: stopping")


def test_service_install_writes_a_launchd_agent_that_runs_up(tmp_path):
    import plistlib

    from cluster import service

    path, start = service.install("/opt/bin/kimi-cluster", ["--model", "/models/k2"], tmp_path)
    agent = plistlib.loads(path.read_bytes())
    assert path == tmp_path / "Library/LaunchAgents/ai.kimi-cluster.up.plist"
    assert agent["ProgramArguments"] == ["/opt/bin/kimi-cluster", "up", "--model", "/models/k2"]
    assert agent["RunAtLoad"] and agent["KeepAlive"] == {"SuccessfulExit": False}
    assert start == f"launchctl bootstrap gui/$(id -u) {path}"
    assert service.uninstall(tmp_path) == (path, True) and not path.exists()
    refused = run("service", "install", "--", "--model", "x")
    assert refused.returncode == 2 and "writes a macOS launchd agent" in refused.stderr
