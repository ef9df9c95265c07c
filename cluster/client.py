"""Talking to a running cluster: find its coordinator, connect, read replies, show its map.

Shared by `kimi-cluster chat/map/status/stop`, the terminal chat, the tests and the benchmark.
A coordinator is found, in order: the address given (HOST alone means port 7470), the
coordinator this machine runs (a state file `up` writes into the config dir), or an mDNS
announcement of this cluster's coordinator on this machine's chosen interfaces.
"""

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .auth import config_dir, load_secret
from .units import format_bytes

DEFAULT_PORT = 7470
BROWSE_S = 3.0


class ClientError(Exception):
    """A client cannot reach the cluster; the message says what to do."""


def secret(secret_file: Path | None = None, create: bool = False) -> bytes:
    value, note = load_secret(secret_file, create=create)
    if note:
        Console(stderr=True, soft_wrap=True).print(note, highlight=False)
    return value


def with_port(address: str, port: int = DEFAULT_PORT) -> str:
    """HOST, HOST:PORT or [V6]:PORT -> HOST:PORT (HOST alone gets the default port)."""
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{port}"
    host, sep, given = address.rpartition(":")
    if not sep:
        return f"{address}:{port}"
    if not given.isdigit():
        raise ClientError(f"{address!r}: the port after ':' must be a number (HOST or HOST:PORT)")
    return address


# ---- local state: what `up` runs on this machine ----------------------------------------------------


def _state_dir() -> Path:
    return config_dir() / "running"


def write_node_state(name: str, **state) -> Path:
    """Record a node this machine runs (its address, pid, coordinator and API if any)."""
    path = _state_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "pid": os.getpid(), **state}))
    return path


def remove_node_state(name: str) -> None:
    (_state_dir() / f"{name}.json").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its parent has not reaped yet (Linux) is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def local_nodes() -> list:
    """The nodes `up` runs on this machine (state files of processes that are gone are dropped)."""
    nodes = []
    for path in sorted(_state_dir().glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _alive(state.get("pid", -1)):
            nodes.append(state)
        else:
            path.unlink(missing_ok=True)
    return nodes


# ---- finding and connecting ---------------------------------------------------------------------------


def find_coordinator(given: str | None, cluster_secret: bytes, host: str | None = None) -> str:
    """The coordinator's HOST:PORT: `given`, this machine's own, or one announced over mDNS."""
    if given:
        return with_port(given)
    for node in local_nodes():
        if node.get("coordinator"):
            return node["address"]
    from .discovery import find_coordinators
    from .auth import fingerprint

    found = find_coordinators(fingerprint(cluster_secret), host, BROWSE_S)
    if len(found) == 1:
        return found[0].address
    if found:
        raise ClientError("several coordinators of this cluster answer over mDNS: "
                          + ", ".join(f"{a.name} at {a.address}" for a in found)
                          + "; pick one with --coordinator HOST[:PORT]")
    raise ClientError("no coordinator found: none runs on this machine and none of this cluster answered over "
                      f"mDNS within {BROWSE_S:.0f} s. Start one with `kimi-cluster up --model DIR`, or name it "
                      "with --coordinator HOST[:PORT]")


def connect(address: str, cluster_secret: bytes):
    """A Coordinator stub for `address`, or for the coordinator the node at `address` serves."""
    import grpc

    from .generated import kimi_cluster_pb2 as pb
    from .wire import coordinator_stub, handshake_failure, node_stub, open_channel

    try:
        info = node_stub(open_channel(address, cluster_secret)).Info(pb.InfoRequest(), timeout=10)
    except grpc.RpcError as e:
        if why := handshake_failure(e, address, cluster_secret):
            raise ClientError(why) from e
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise ClientError(f"no kimi-cluster node answers at {address}: is `kimi-cluster up` running there, "
                              "and is that its --host and --port?") from e
        raise
    if not info.is_coordinator:
        if not info.coordinator:
            raise ClientError(f"{info.name} ({address}) serves no coordinator yet; run this against the "
                              "coordinator (the node started with --model)")
        address = info.coordinator
    return coordinator_stub(open_channel(address, cluster_secret))


def sampling(temperature=None, top_p=None, top_k=None, min_p=None, seed=None):
    """SamplingParams; a value left None is the coordinator's default (the checkpoint's
    generation_config where it has one)."""
    from .generated import kimi_cluster_pb2 as pb

    params = pb.SamplingParams()
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("min_p", min_p),
                        ("seed", seed)):
        if value is not None:
            setattr(params, name, value)
    return params


# ---- replies ------------------------------------------------------------------------------------------


@dataclass
class Reply:
    text: str = ""
    token_ids: list = field(default_factory=list)
    done: object = None  # the DoneEvent

    @property
    def decode_tok_s(self) -> float:
        d = self.done
        return (d.completion_tokens - 1) / d.decode_s if d and d.decode_s > 0 else 0.0

    def stats_line(self) -> str:
        d = self.done
        cached = f" ({d.cached_tokens} cached)" if d.cached_tokens else ""
        return (f"{d.prompt_tokens} prompt tokens{cached}, {d.completion_tokens} generated ({d.finish_reason}); "
                f"TTFT {d.ttft_s * 1000:.0f} ms, {self.decode_tok_s:.1f} tok/s")


def read_reply(events, on_token=None) -> Reply:
    """Read a Generate event stream to its end; `on_token(event.token)` sees every token as it comes."""
    reply, text = Reply(), []
    for event in events:
        if event.HasField("done"):
            reply.done = event.done
            continue
        if event.token.id >= 0:
            reply.token_ids.append(event.token.id)
        text.append(event.token.text)
        if on_token:
            on_token(event.token)
    reply.text = "".join(text)
    if reply.done is None:
        raise RuntimeError("the coordinator ended the reply without its summary")
    return reply


# ---- the memory map -----------------------------------------------------------------------------------


def map_json(reply) -> dict:
    nodes = []
    for n in reply.nodes:
        nodes.append({
            "name": n.name, "address": n.address, "node_id": n.node_id, "backend": n.backend, "chip": n.chip,
            "status": n.status, "total_bytes": n.total_bytes, "usable_bytes": n.usable_bytes,
            "layers": [n.start, n.end] if n.has_layers else None, "weight_bytes": n.weight_bytes,
            "resident_bytes": n.resident_bytes, "kv_bytes": n.kv_bytes, "free_bytes": n.free_bytes,
            "source": n.source, "cache_bytes": n.cache_bytes,
        })
    spec = reply.speculation
    return {"state": reply.state, "model": reply.model, "model_id": reply.model_id,
            "num_layers": reply.num_layers, "message": reply.message, "nodes": nodes,
            "speculation": {"steps": spec.steps, "tokens": spec.tokens, "drafted": spec.drafted,
                            "accepted": spec.accepted}}


def print_map(m: dict, console: Console) -> None:
    table = Table(title=f"{m['model']}: {m['state']}" + (f" ({m['message']})" if m["message"] else ""),
                  title_justify="left")
    for col in ("node", "address", "backend", "status", "layers", "weights", "KV", "free", "usable", "total"):
        table.add_column(col, justify="right" if col in ("weights", "KV", "free", "usable", "total") else "left")
    for n in sorted(m["nodes"], key=lambda n: (n["layers"] is None, n["layers"] or 0, n["name"])):
        layers = f"{n['layers'][0]}-{n['layers'][1] - 1}" if n["layers"] else "-"
        table.add_row(n["name"], n["address"], n["backend"], n["status"], layers,
                      format_bytes(n["resident_bytes"] or n["weight_bytes"]), format_bytes(n["kv_bytes"]),
                      format_bytes(n["free_bytes"]), format_bytes(n["usable_bytes"]), format_bytes(n["total_bytes"]))
    total = {k: sum(n[k] for n in m["nodes"]) for k in ("resident_bytes", "kv_bytes", "free_bytes", "usable_bytes",
                                                          "total_bytes")}
    table.add_row("[bold]cluster", "", "", "", f"{m['num_layers']} layers", format_bytes(total["resident_bytes"]),
                  format_bytes(total["kv_bytes"]), format_bytes(total["free_bytes"]),
                  format_bytes(total["usable_bytes"]), format_bytes(total["total_bytes"]))
    console.print(table)
    for n in m["nodes"]:  # where each slice came from, and what the received ones keep on disk
        if n["source"]:
            cache = f"; {format_bytes(n['cache_bytes'])} in its cache" if n["cache_bytes"] else ""
            console.print(f"{n['name']}: slice {n['source']}{cache}", highlight=False)
    if spec := m.get("speculation", {}).get("tokens"):
        s = m["speculation"]
        console.print(f"speculative decoding: {s['steps']} steps for {spec} tokens ({s['steps'] / spec:.2f} per "
                      f"token), {s['drafted']} drafted, {s['accepted']} accepted", highlight=False)


def wait_gone(pids: list, timeout: float) -> list:
    """Wait until these processes have exited; returns those still alive after `timeout` s."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)  # pacing between checks; the processes' exit is what we wait on
    return left
