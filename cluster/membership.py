"""Membership and health: which nodes are present, which are lost, which came back.

Nodes join from the command line (--peer) or over mDNS. Once the chain is planned, every node
of it is health-checked each second: one that stops answering is lost, and one that answers
again (or restarts under the same name on a new address) is handed back to be loaded again.
"""

import logging
import threading
import time
from dataclasses import dataclass, field

import grpc

from .auth import fingerprint
from .discovery import Browser
from .generated import kimi_cluster_pb2 as pb
from .link import ForwardLink
from .wire import canonical_address, handshake_failure, node_stub, open_channel, revocations

log = logging.getLogger("kimi_cluster.membership")

MDNS_QUIET_S = 5.0          # alone this long while browsing: say what may hide the other nodes
HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 2.0
# Busy is not dead: health is answered off the compute thread, so a node is lost only when its
# link is gone (two checks in a row fail to connect), when it answers nothing for LOST_AFTER_S (a
# stopped or wedged process), or when one compute job has run for STALL_S (it stopped making progress).
REFUSED_TWICE = 2
LOST_AFTER_S = 6.0
STALL_S = 120.0


class NameTaken(Exception):
    """A node joined under the name of another node (another node id) that is not lost, or under
    the name of a live member that still answers at its own address."""


class Refused(Exception):
    """A Join this cluster refuses: a removed node, or a caller that is not the node it names."""


@dataclass
class Member:
    """A node as the coordinator sees it."""

    address: str
    stub: object
    info: pb.NodeInfo | None = None
    status: str = "waiting"  # waiting, loading, ready, lost, failed, spare
    link: ForwardLink | None = None  # the data path, when this node is the first stage and not this process
    heard: float = field(default_factory=time.monotonic)  # its last health answer
    refused: int = 0  # health checks refused in a row (connection failed)
    idle_since: float | None = None  # since when its health says it computes nothing and queues nothing
    error: grpc.RpcError | None = None  # why its last Info failed (None: it answered)

    @property
    def name(self) -> str:
        return self.info.name if self.info else self.address

    @property
    def down(self) -> bool:
        """Lost (stopped answering) or failed (its load failed): it serves nothing until loaded again."""
        return self.status in ("lost", "failed")

    def answered(self, health: pb.HealthReply):
        """It answered a health check: heard now, and idle since when if it computes and queues nothing."""
        self.heard, self.refused = time.monotonic(), 0
        idle = health.queued == 0 and health.busy_s == 0
        self.idle_since = (self.idle_since or self.heard) if idle else None

    def refresh(self) -> bool:
        """Ask the node for its NodeInfo; whether it answered."""
        try:
            self.info = self.stub.Info(pb.InfoRequest(), timeout=HEALTH_TIMEOUT_S)
            self.heard, self.error = time.monotonic(), None
            return True
        except grpc.RpcError as e:
            self.error = e
            return False

    def failed(self, error: grpc.RpcError) -> bool:
        """Count a failed health check; whether the node is now lost, by the one rule for every node
        (chain or spare): its connection refused twice in a row, or nothing heard for LOST_AFTER_S."""
        self.refused = self.refused + 1 if error.code() == grpc.StatusCode.UNAVAILABLE else 0
        return self.refused >= REFUSED_TWICE or time.monotonic() - self.heard > LOST_AFTER_S


class Membership:
    """The nodes of one cluster: named on the command line (`static`, all must answer) or found
    over mDNS, and the planned `chain` among them."""

    def __init__(self, local_address: str, secret: bytes, peers: list, coordinator_id: str, node_id: str,
                 zeroconf=None, take_over: bool = False):
        self.secret = secret
        self.coordinator_id = coordinator_id  # every health check names this coordinator process
        self.node_id = node_id  # a node that served this node id before it restarted is its own again
        self.take_over = take_over  # plan nodes another live coordinator owns (their Load takes them)
        self.members = {a: Member(a, node_stub(open_channel(a, secret))) for a in [local_address, *peers]}
        self.static = set(self.members)
        self.chain: list[Member] = []
        self.lock = threading.Lock()  # members and chain change from zeroconf's threads
        self.changed = threading.Event()
        self.on_lost = lambda name: None  # set by the coordinator
        self.removed = revocations()  # node ids `kimi-cluster node remove` refused
        self._waiting_since = time.monotonic()  # started waiting for nodes (see discovery_hint)
        self.browser = Browser(zeroconf, fingerprint(secret), self.on_discovery) if zeroconf else None

    def close(self):
        self.changed.set()
        if self.browser:
            self.browser.close()

    def snapshot(self) -> tuple:
        """(chain, every member), copied under the lock."""
        with self.lock:
            return list(self.chain), list(self.members.values())

    def on_discovery(self, kind: str, found):
        """A node of this cluster joined, changed or left (mDNS)."""
        log.info("mDNS: %s %s at %s", found.name, kind, found.address)
        if kind != "leave":
            try:
                self.attach(found.address, found.name, found.node_id)
            except (NameTaken, Refused) as e:
                log.warning("%s", e)
            return
        lost_name = None
        with self.lock:
            member = self.members.get(found.address)
            if member and member not in self.chain and found.address not in self.static:
                del self.members[found.address]
            elif member:
                lost_name = member.name
        if lost_name:
            self.on_lost(lost_name)
        self.changed.set()

    def join(self, address: str, caller: str) -> str:
        """The node `caller` (its certificate's node id) says it serves at `address` (Join): ask
        the node there who it is, attach it, return its status. Any spelling of a member's address
        is that member (ValueError: not an address); a caller that is not the node there, or a
        removed node, is Refused."""
        address = canonical_address(address)
        with self.lock:
            member = self._at(address)
        info = member.info if member and member.info else None
        if info is None:
            stub = node_stub(open_channel(address, self.secret))
            info = stub.Info(pb.InfoRequest(), timeout=HEALTH_TIMEOUT_S)
        if info.node_id != caller:
            raise Refused(f"{address} serves node {info.name} ({info.node_id}), not the caller ({caller}): "
                          "a node joins only with its own address")
        return member.status if member else self.attach(address, info.name, info.node_id, stub)

    def _at(self, address: str) -> Member | None:
        """The member serving at `address` (canonical), under whatever spelling it was named."""
        for known, member in self.members.items():
            try:
                if known == address or canonical_address(known) == address:
                    return member
            except ValueError:
                continue
        return None

    def _still_serves(self, member: Member, node_id: str) -> bool:
        """Whether `member` still answers as `node_id` at its own address (then it has not moved)."""
        try:
            return member.stub.Info(pb.InfoRequest(), timeout=HEALTH_TIMEOUT_S).node_id == node_id
        except grpc.RpcError:
            return False

    def remove(self, name: str) -> str:
        """`kimi-cluster node remove NAME`: refuse that node's identity from now on (on every call
        this machine's servers take) and drop it; a planned node is lost, so its layers move.
        Returns its node id; KeyError when no member has that name."""
        with self.lock:
            member = next((m for m in self.members.values() if m.info and m.info.name == name), None)
            if member is None:
                raise KeyError(name)
            self.removed.add(member.info.node_id, name)
            del self.members[member.address]
            self.static.discard(member.address)
            planned = member in self.chain
        log.warning("removed node %s (%s at %s): refused from now on", name, member.info.node_id, member.address)
        if planned:
            self.on_lost(name)
        self.changed.set()
        return member.info.node_id

    def attach(self, address: str, name: str, node_id: str, stub=None) -> str:
        """The node `name` serves at `address` (found over mDNS, or it said so with Join): a new
        one is a spare once the chain is planned; one known under another address (restarted on a
        new port or host) replaces its old entry, and a planned one is then loaded there. Names are
        unique: another node (another node id) taking the name of one that is not lost is refused
        (NameTaken). Returns its status."""
        if (removed := self.removed.name_of(node_id)) is not None:
            raise Refused(f"node {removed} ({node_id}) at {address} was removed from this cluster "
                          f"(`kimi-cluster node remove`); delete its line from {self.removed.path} to admit it again")
        with self.lock:
            known = next((m for m in self.members.values() if m.name == name and m.address != address), None)
        if known and known.info and known.info.node_id == node_id and known.status != "lost" \
                and self._still_serves(known, node_id):
            raise NameTaken(f"node {name} ({node_id}) still answers at {known.address}; a node moves to "
                            f"{address} only once its old address stops answering")
        lost_name = None
        with self.lock:
            member = self.members.get(address)
            if member is not None:
                return member.status
            stub = stub or node_stub(open_channel(address, self.secret))
            member = next((m for m in self.members.values() if m.name == name), None)
            if member and member.info and member.info.node_id != node_id and member.status != "lost":
                raise NameTaken(f"a node named {name} ({member.info.node_id}) already serves at {member.address}; "
                                f"start the one at {address} ({node_id}) with another --name")
            if member:
                del self.members[member.address]
                if member.address in self.static:  # named with --peer: wait for it where it is now
                    self.static.discard(member.address)
                    self.static.add(address)
                log.info("%s moved from %s to %s", name, member.address, address)
                member.address, member.stub = address, stub
                if member in self.chain:
                    member.status, lost_name = "lost", name
            else:
                member = Member(address, stub, status="spare" if self.chain else "waiting")
                log.info("%s joined at %s as %s", name, address, member.status)
            self.members[address] = member
            status = member.status
        if lost_name:
            self.on_lost(lost_name)
        self.changed.set()
        return status

    def wait_for_members(self, enough, stop: threading.Event, on_status) -> list:
        """Wait until every static node answers and `enough(present)` says (True, _); meanwhile
        tell `on_status` why not. Returns the members present ([] when stopped)."""
        while not stop.is_set():
            self.changed.clear()
            with self.lock:
                members = list(self.members.values())
            present = [m for m in members if m.refresh()]
            # A node another live coordinator owns would refuse its Load: plan without it, and wait
            # for one named on the command line (a restarted coordinator's nodes free up 5 s after
            # their old owner's last call).
            taken = [] if self.take_over else [(m, o) for m in present if (o := self.owner_elsewhere(m))]
            present = [m for m in present if all(m is not t for t, _ in taken)]
            missing = [m.address for m in members if m not in present and m.address in self.static]
            ok, why = enough(present)
            if not missing and ok:
                return present
            serving = "".join(f"; node {m.name} serves the coordinator at {o} (until it stops, or start this "
                              "one with --take-over)" for m, o in taken)
            failures = [why for m in members if m.address in missing and m.error
                        and (why := handshake_failure(m.error, m.address, self.secret))]
            on_status(f"waiting for {', '.join(missing)} to answer{''.join(f' ({w})' for w in failures)}{serving}"
                      if missing
                      else why + serving + self.discovery_hint(len(present)))
            self.changed.wait(HEALTH_INTERVAL_S)
        return []

    def owner_elsewhere(self, member: Member) -> str:
        """The address of the live coordinator other than this one that `member` serves, or ''."""
        try:
            health = member.stub.Health(pb.HealthRequest(coordinator_id=self.coordinator_id),
                                        timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError:
            return ""
        mine = health.coordinator_id in ("", self.coordinator_id) or health.owner_node_id == self.node_id
        return "" if mine else health.owner

    def discovery_hint(self, present: int) -> str:
        """What may keep other nodes from being found (said while waiting for them)."""
        if self.browser is None:
            return ""
        others = sorted(f"{a.name} ({a.address})" for a in self.browser.ignored_nodes())
        hint = ""
        if others:
            hint += (f"; ignoring {', '.join(others)}: another cluster secret, copy this cluster's secret "
                     "there (see `kimi-cluster up` output) if it should join")
        if present <= 1 and time.monotonic() - self._waiting_since > MDNS_QUIET_S:
            hint += ("; no other node answered over mDNS: multicast may be blocked (some Wi-Fi and switches), or "
                     "macOS has not yet allowed the terminal 'Local Network' access; bind every node with "
                     "--host to the same network, or name them with --peer HOST:PORT")
        return hint

    def mark_lost(self, name: str) -> bool:
        """Mark the chain's node `name` lost; whether it was not already."""
        changed = False
        for m in self.chain:
            if m.name == name and m.status != "lost":
                log.warning("lost node %s (%s)", m.name, m.address)
                m.status, changed = "lost", True
        return changed

    def check(self, on_back):
        """One health round over the chain: a node that is gone or stalled (see LOST_AFTER_S) or
        that now serves another coordinator goes to `on_lost`, one that answers again (or lost its
        slice) to `on_back(index, member)`. A lost node outside the chain (its layers moved) that
        answers again becomes a spare, and a spare that does not answer is lost."""
        for i, member in enumerate(list(self.chain)):
            if member.info and self.removed.name_of(member.info.node_id) is not None:
                if member.status != "lost":
                    self.on_lost(member.name)
                continue  # removed: never loaded again
            try:
                health = member.stub.Health(pb.HealthRequest(coordinator_id=self.coordinator_id),
                                            timeout=HEALTH_TIMEOUT_S)
            except grpc.RpcError as e:
                silent = time.monotonic() - member.heard
                if member.failed(e) and member.status != "lost":
                    why = handshake_failure(e, member.address, self.secret) or e.details()
                    log.warning("%s (%s): %s (silent %.1f s)", member.name, member.address, why, silent)
                    self.on_lost(member.name)
                continue
            member.answered(health)
            if health.coordinator_id not in ("", self.coordinator_id):
                if member.status != "lost":
                    log.warning("%s (%s) now serves the coordinator at %s: not using it", member.name,
                                member.address, health.owner or "(gone)")
                    self.on_lost(member.name)
                if health.owner:  # that coordinator is alive: the node stays with it
                    continue
            if health.busy_s > STALL_S:
                if member.status != "lost":
                    log.warning("%s: one compute job has run %.0f s; it stopped making progress",
                                member.name, health.busy_s)
                    self.on_lost(member.name)
                continue
            if member.status == "lost" or (member.status == "ready" and not health.loaded):
                member.refresh()
                on_back(i, member)
        with self.lock:
            others = [m for m in self.members.values() if m.status in ("lost", "spare") and m not in self.chain]
        for member in others:
            if member.refresh():
                member.refused = 0
                if member.status == "lost":
                    log.info("%s is back at %s; a spare now", member.name, member.address)
                    member.status = "spare"
            elif member.status == "spare" and member.failed(member.error):
                log.warning("spare %s (%s) does not answer (%s); lost", member.name, member.address,
                            handshake_failure(member.error, member.address, self.secret) or member.error.details())
                member.status = "lost"
