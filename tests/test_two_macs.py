"""Done when: two "Macs" (network namespaces joined by a bridge, each with its own host name and
config dir, no secret anywhere) run nothing but `kimi-cluster up` (the coordinator adds --model and
--nodes), plus the one copy step the second one prints, and `kimi-cluster chat --prompt hi` on the
coordinator gets mlx-lm's reply. Needs root and iproute2; skipped, with the reason, otherwise."""

import json
import os
import re
import shutil
import subprocess

from harness import KIMI, launch_node, oracle_reply
from test_multihost import SUBNET, network  # noqa: F401  (the namespaces fixture)

MAX_TOKENS = 16


def mac(network, i: int) -> tuple:  # noqa: F811
    """Run a command in host i's namespace with host i's own host name (as on a separate Mac)."""
    return (*network.exec_prefix(i), "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', f"mac{i}")


def test_bare_up_on_two_macs_then_chat(network, tmp_path, tiny_dir, oracle):  # noqa: F811
    network.check_multicast(1, 2)
    env = {}
    for i in (1, 2):
        env[i] = {k: v for k, v in os.environ.items() if k != "KIMI_CLUSTER_SECRET"}
        env[i].update(KIMI_CLUSTER_HOME=str(tmp_path / f"home{i}"), PYTHONUNBUFFERED="1")
    nodes = []
    try:
        first = launch_node(tmp_path, "mac1", [*mac(network, 1), KIMI, "up"], env[1])
        nodes.append(first)
        assert first.address == f"{SUBNET}.1:7470"
        assert (tmp_path / "home1" / "secret").is_file()  # the first node created the cluster secret

        second = launch_node(tmp_path, "mac2", [*mac(network, 2), KIMI, "up", "--model", str(tiny_dir),
                                                "--nodes", "2"], env[2], wait_listening=False)
        nodes.append(second)
        second.wait_for(rf"using {SUBNET}\.2: eth0, the only private IPv4 interface")
        second.wait_for(r"this node has no cluster secret, and 1 kimi-cluster node\(s\) answer on this network "
                        rf"\(mac1 at {SUBNET}\.1\)")
        copy = second.wait_for(r"^  mkdir -p '(.+)' && ssh (\S+) 'cat \"(.+)\"' > '(.+)' && chmod 600 '(.+)'$")
        # the same place on the other Mac (here: its own config dir, as both have the default one there)
        assert copy.group(2) == f"{SUBNET}.1" and copy.group(3) == copy.group(4) == str(tmp_path / "home2" / "secret")
        # the one copy step, as the printed line does it over ssh
        os.makedirs(copy.group(1), exist_ok=True)
        shutil.copy(tmp_path / "home1" / "secret", copy.group(4))
        os.chmod(copy.group(4), 0o600)

        second.wait_for(r"found the cluster secret .*; joining")
        second.wait_for(r"cluster ready: .*mac1.*|cluster ready: .*mac2.*")
        chat = subprocess.run([*network.exec_prefix(2), KIMI, "chat", "--prompt", "hi", "--json", "--max-tokens",
                               str(MAX_TOKENS)], capture_output=True, text=True, env=env[2], timeout=120)
        assert chat.returncode == 0, chat.stderr + second.log()
        prompt = list(oracle[1].apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True))
        assert json.loads(chat.stdout)["token_ids"] == oracle_reply(oracle, prompt, MAX_TOKENS)
        assert re.search(r"mDNS: mac1 join", second.log())
    finally:
        for node in nodes:
            node.kill()
