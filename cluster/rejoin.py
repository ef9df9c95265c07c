"""A node finds its coordinator: it tells it where it listens (Coordinator.Join).

Without mDNS a coordinator knows only the addresses it was given with --peer, so a node that
restarts on another port, or one started later with `--peer COORDINATOR`, would never be used.
While no coordinator owns it, a node joins every coordinator it knows of each second: the ones
named with --peer, and the last one that loaded it (saved in the config dir as it loads the
node, so that a restart finds it again). A coordinator that already knows the address answers
at once.
"""

import json
import logging
import threading
import time

import grpc

from .auth import config_dir
from .generated import kimi_cluster_pb2 as pb
from .node import OWNER_LEASE_S
from .wire import coordinator_stub, handshake_failure, open_channel

log = logging.getLogger("kimi_cluster.rejoin")

JOIN_INTERVAL_S = 1.0
JOIN_TIMEOUT_S = 5.0  # the coordinator asks the node who it is before it answers


def _saved_path(name: str):
    return config_dir() / "coordinators" / f"{name}.json"


def saved_coordinator(name: str) -> str:
    """The address of the coordinator that last loaded node `name` on this machine, or ''."""
    try:
        return json.loads(_saved_path(name).read_text())["coordinator"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def save_coordinator(name: str, address: str):
    path = _saved_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"coordinator": address}))
    temporary.replace(path)


class Rejoiner:
    """Joins `node` to the coordinators of `peers` and to the one it served last, while unowned."""

    def __init__(self, node, secret: bytes, peers: list):
        self.node, self.secret, self.peers = node, secret, list(peers)
        self.saved = saved_coordinator(node.name)
        node.on_owner = self._remember
        self._stubs = {}
        self._said = {}  # coordinator address -> what its last Join gave (logged when it changes)
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="rejoin", daemon=True).start()

    def close(self):
        self._stop.set()

    def _run(self):
        while True:
            owner = self.node.owner
            if owner is None or time.monotonic() - owner.seen > OWNER_LEASE_S:
                for address in dict.fromkeys([*self.peers, self.saved]):
                    if address and address != self.node.address:
                        self._join(address)
            if self._stop.wait(JOIN_INTERVAL_S):
                return

    def _remember(self, coordinator: str):
        if coordinator and coordinator != self.saved:
            save_coordinator(self.node.name, coordinator)
            self.saved = coordinator

    def _join(self, address: str):
        if address not in self._stubs:
            self._stubs[address] = coordinator_stub(open_channel(address, self.secret, self.node.node_id))
        try:
            reply = self._stubs[address].Join(pb.JoinRequest(address=self.node.address), timeout=JOIN_TIMEOUT_S)
            said = f"joined the coordinator at {address} (this node's status there: {reply.status})"
        except grpc.RpcError as e:
            said = f"cannot join the coordinator at {address}: {handshake_failure(e, address, self.secret) or e.details()}"
        if self._said.get(address) != said:
            self._said[address] = said
            log.info("%s", said)
