"""Which address a node binds and announces on when `kimi-cluster up` is given no --host.

macOS: the Thunderbolt bridge (bridge0) when it has an IPv4 address, since Macs wired together
over Thunderbolt talk fastest there; else the interface of the default route (the active LAN,
Ethernet or Wi-Fi). Linux and others: the one private IPv4 address, if there is exactly one;
otherwise --host must say which. mDNS is then bound to that interface only.
"""

import ipaddress
import platform
import subprocess
from dataclasses import dataclass

THUNDERBOLT_BRIDGE = "bridge0"


@dataclass(frozen=True)
class Interface:
    name: str
    address: str  # IPv4


@dataclass(frozen=True)
class HostChoice:
    address: str
    reason: str


class NoHostError(ValueError):
    pass


def list_interfaces() -> list:
    """This machine's IPv4 interfaces (ifaddr comes with zeroconf)."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                out.append(Interface(adapter.nice_name, ip.ip))
    return out


def default_route_interface(system: str) -> str | None:
    """Name of the interface the default route leaves by, or None."""
    try:
        if system == "Darwin":
            text = subprocess.run(["route", "-n", "get", "default"], capture_output=True, text=True, timeout=5).stdout
            for line in text.splitlines():
                if line.strip().startswith("interface:"):
                    return line.split(":", 1)[1].strip()
        else:
            text = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True, text=True,
                                  timeout=5).stdout.split()
            if "dev" in text:
                return text[text.index("dev") + 1]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _usable(iface: Interface) -> bool:
    ip = ipaddress.ip_address(iface.address)
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast)


def choose_host(interfaces: list, system: str, default_interface: str | None) -> HostChoice:
    """The address to bind and announce on, and why; NoHostError says what to pass instead."""
    usable = [i for i in interfaces if _usable(i)]
    listing = ", ".join(f"{i.name} {i.address}" for i in usable) or "none"
    if system == "Darwin":
        for i in usable:
            if i.name == THUNDERBOLT_BRIDGE:
                return HostChoice(i.address, f"Thunderbolt bridge {i.name}")
        for i in usable:
            if i.name == default_interface:
                return HostChoice(i.address, f"{i.name}, the interface of the default route (no Thunderbolt bridge)")
        raise NoHostError(f"no Thunderbolt bridge and no default route to pick an interface from (IPv4 interfaces: "
                          f"{listing}); pass --host ADDRESS")
    private = [i for i in usable if ipaddress.ip_address(i.address).is_private
               and not ipaddress.ip_address(i.address).is_link_local]
    if len(private) == 1:
        return HostChoice(private[0].address, f"{private[0].name}, the only private IPv4 interface")
    raise NoHostError(f"{len(private) or 'no'} private IPv4 interfaces (IPv4 interfaces: {listing}): pass --host "
                      "ADDRESS to say which one the cluster uses (127.0.0.1 keeps it on this machine)")


def pick_host() -> HostChoice:
    system = platform.system()
    return choose_host(list_interfaces(), system, default_route_interface(system))
