"""Finding nodes over mDNS (DNS-SD service `_kimi-cluster._tcp`).

Every node advertises who it is and what memory it offers; the coordinator browses and is told
of joins, updates and leaves. Nodes of other clusters on the same network advertise another
secret's fingerprint and are ignored. Zeroconf is bound to the node's own address (--host), so
a node bound to loopback or a Thunderbolt bridge announces itself only there.
"""

import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf import InterfaceChoice

log = logging.getLogger("kimi_cluster.discovery")

SERVICE_TYPE = "_kimi-cluster._tcp.local."
INFO_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class Announcement:
    """What a node tells the network about itself (the TXT record)."""

    node_id: str
    name: str
    version: str
    backend: str
    chip: str
    total_bytes: int
    usable_bytes: int
    host: str
    port: int
    fingerprint: str
    coordinator: bool = False  # this node runs the cluster's coordinator (clients connect to it)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def instance(self) -> str:
        return f"{self.node_id}.{SERVICE_TYPE}"

    def service_info(self) -> ServiceInfo:
        props = {
            "id": self.node_id, "name": self.name, "version": self.version, "backend": self.backend,
            "chip": self.chip[:100], "total": str(self.total_bytes), "usable": str(self.usable_bytes),
            "fp": self.fingerprint, "coord": "1" if self.coordinator else "0",
        }
        return ServiceInfo(
            SERVICE_TYPE, self.instance, addresses=[socket.inet_aton(self.host)], port=self.port,
            properties=props, server=f"{self.node_id}.local.",
        )

    @classmethod
    def from_service_info(cls, info: ServiceInfo) -> "Announcement | None":
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        addresses = info.parsed_addresses(IPVersion.V4Only)
        try:
            return cls(
                node_id=props["id"], name=props["name"], version=props.get("version", ""),
                backend=props.get("backend", ""), chip=props.get("chip", ""),
                total_bytes=int(props["total"]), usable_bytes=int(props["usable"]),
                host=addresses[0], port=info.port, fingerprint=props["fp"], coordinator=props.get("coord") == "1",
            )
        except (KeyError, ValueError, IndexError):
            log.warning("ignoring malformed announcement %s", info.name)
            return None


def find_coordinators(fingerprint: str, host: str | None, timeout: float) -> list:
    """Coordinators of this cluster announced on `host`'s interface (None: the interface `up`
    would choose), waiting up to `timeout` s for the first."""
    if host is None:
        from .interfaces import NoHostError, pick_host

        try:
            host = pick_host().address
        except NoHostError:
            host = "127.0.0.1"
    zeroconf = open_zeroconf(host)
    found = threading.Event()
    browser = Browser(zeroconf, fingerprint, on_change=lambda kind, a: a.coordinator and found.set())
    try:
        found.wait(timeout)
        return [a for a in browser.nodes.values() if a.coordinator]
    finally:
        browser.close()
        zeroconf.close()


def open_zeroconf(host: str) -> Zeroconf:
    """Zeroconf on the interface that owns `host` only (all interfaces for 0.0.0.0)."""
    if ipaddress.ip_address(host).is_unspecified:
        return Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    return Zeroconf(interfaces=[host], ip_version=IPVersion.V4Only)


class Advertiser:
    def __init__(self, zeroconf: Zeroconf, announcement: Announcement):
        self.zeroconf, self.info = zeroconf, announcement.service_info()
        # A restarted node reuses its instance name; replace whatever record is still cached.
        zeroconf.register_service(self.info, allow_name_change=False, cooperating_responders=True)

    def close(self):
        self.zeroconf.unregister_service(self.info)


class Browser:
    """Keeps the nodes of this cluster (same fingerprint) seen on the network, by node id.

    `on_change(kind, announcement)` is called with kind "join", "update" or "leave"."""

    def __init__(self, zeroconf: Zeroconf, fingerprint: str, on_change=None):
        self.zeroconf, self.fingerprint, self.on_change = zeroconf, fingerprint, on_change
        self.nodes: dict[str, Announcement] = {}
        self.ignored: dict[str, Announcement] = {}  # other clusters, by node id
        self._by_instance: dict[str, str] = {}
        self._lock = threading.Lock()
        self._browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[self._handle])

    def _handle(self, zeroconf, service_type, name, state_change):
        # Resolving blocks; ServiceBrowser calls handlers on its own thread, so hand off.
        threading.Thread(target=self._resolve, args=(service_type, name, state_change), daemon=True).start()

    def _resolve(self, service_type, name, state_change):
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                node_id = self._by_instance.pop(name, None)
                gone = self.nodes.pop(node_id, None) if node_id else None
            if gone and self.on_change:
                self.on_change("leave", gone)
            return
        info = self.zeroconf.get_service_info(service_type, name, timeout=INFO_TIMEOUT_MS)
        found = Announcement.from_service_info(info) if info else None
        if found is None:
            return
        if found.fingerprint != self.fingerprint:
            with self._lock:
                new = found.node_id not in self.ignored
                self.ignored[found.node_id] = found
            if new:
                log.info("ignoring %s at %s: it belongs to another cluster (different secret)",
                         found.name, found.address)
            return
        with self._lock:
            before = self.nodes.get(found.node_id)
            self.nodes[found.node_id] = found
            self._by_instance[name] = found.node_id
        if before != found and self.on_change:
            self.on_change("join" if before is None else "update", found)

    def ignored_nodes(self) -> list:
        """Nodes of other clusters seen on the network (another secret's fingerprint)."""
        with self._lock:
            return list(self.ignored.values())

    def close(self):
        self._browser.cancel()
