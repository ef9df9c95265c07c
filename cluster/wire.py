"""Helpers around the wire contract: tensors as bytes, channels and servers, limits and error naming."""

import ctypes
import errno
import gc
import ipaddress
import math
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
import mlx.core as mx
import numpy as np

from .auth import SECRET_ENV, config_dir, secret_origin
from .identity import CLUSTER_HOST, Revocations, channel_credentials, fingerprint, identity, peer_name, server_credentials
from .generated import kimi_cluster_pb2 as pb
from .generated import kimi_cluster_pb2_grpc as pb_grpc

# gRPC refuses messages over its limit; prefill chunks are sized to stay well under it.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHUNK_PAYLOAD_BYTES = 32 * 1024 * 1024
# What a request message may be before it is parsed (MessageLimits): the data path's follows the plan.
CONTROL_MESSAGE_BYTES = 1 << 20
GENERATE_MESSAGE_BYTES = 16 << 20  # a conversation the length of Kimi's context, as JSON, and its token ids
DATA_METHODS = {"Forward", "ForwardStream"}

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A node back after a long outage is reached within a second, not after gRPC's default
    # exponential backoff (up to 120 s between tries).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
# No SO_REUSEPORT: a second process on a taken port must fail, not share the requests.
SERVER_OPTIONS = CHANNEL_OPTIONS + [("grpc.http2.min_ping_interval_without_data_ms", 5_000), ("grpc.so_reuseport", 0)]

# Each kind of call has slots of its own, and the server a thread for every slot (and a few more to
# answer refusals): a call whose kind has no slot free is refused at once (RESOURCE_EXHAUSTED),
# so a flood of one kind (Joins naming an address that never answers, streams that never end)
# never takes the capacity of another. The token ring's Deliver and the data path never wait
# behind control calls, and health checks are answered whatever else arrives.
MAX_WORK_CALLS = 32              # Forward and ForwardStream (and Release) at once
CALL_KINDS = {
    "ring": ({"Deliver"}, 32),
    "data": ({"Forward", "ForwardStream", "Release"}, MAX_WORK_CALLS),
    "generate": ({"Generate"}, 32),
    "health": ({"Health"}, 8),
    "control": ({"Info", "Load", "Stop", "MemoryMap", "RemoveNode"}, 16),
    "join": ({"Join"}, 4),
    "transfer": ({"Manifest", "FetchPart"}, 8),
}
REFUSAL_THREADS = 8
SERVER_THREADS = sum(limit for _, limit in CALL_KINDS.values()) + REFUSAL_THREADS
CALL_KIND = {method: kind for kind, (methods, _) in CALL_KINDS.items() for method in methods}

# wire name -> mlx dtype, the same-width unsigned integer (numpy has no bf16; memoryview no
# float16) and that integer's buffer format.
_DTYPES = {
    "bfloat16": (mx.bfloat16, mx.uint16, "H"),
    "float16": (mx.float16, mx.uint16, "H"),
    "float32": (mx.float32, mx.uint32, "I"),
}
_NAMES = {v[0]: k for k, v in _DTYPES.items()}


class WireError(ValueError):
    """A message whose contents cannot be what it claims to be."""


# A large refused message outlives its call (its refusal's traceback holds it in a reference
# cycle until Python's collector runs), and glibc keeps what it freed (gRPC's receive buffers, the
# parsed message) for reuse in every thread's arena: eighteen refused 60 MiB tensors left a node
# 665 MiB larger. A second after the last of them, the cycles are collected and the freed memory
# goes back to the system (Linux; macOS's allocator returns large blocks itself).
RETURN_AFTER_BYTES = 8 << 20
RETURN_DELAY_S = 1.0
_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None
_trim_lock = threading.Lock()
_trim_due: float | None = None  # when the pending trim runs (None: none pending)


def return_freed_memory(refused_bytes: int):
    """A message of `refused_bytes` was refused: once it is freed, give its memory back."""
    global _trim_due
    if _trim is None or refused_bytes < RETURN_AFTER_BYTES:
        return
    with _trim_lock:
        pending, _trim_due = _trim_due is not None, time.monotonic() + RETURN_DELAY_S
    if not pending:
        threading.Thread(target=_trim_when_due, name="return-memory", daemon=True).start()


def _trim_when_due():
    global _trim_due
    while True:
        with _trim_lock:
            wait = _trim_due - time.monotonic()
            if wait <= 0:
                _trim_due = None
                break
        time.sleep(wait)  # until a second after the last refusal
    gc.collect()
    _trim(0)


def encode_tensor(x: mx.array, into: pb.Tensor | None = None) -> pb.Tensor:
    """x as a Tensor; `into`: fill that one (a field of the message that carries it: building the
    Tensor apart and then the message would copy its bytes once more)."""
    name = _NAMES.get(x.dtype)
    if name is None:
        raise WireError(f"dtype {x.dtype} cannot travel between stages")
    try:
        data = bytes(memoryview(x))  # an evaluated, contiguous array: its bytes as they are
    except (TypeError, ValueError, BufferError):
        data = b""
    if len(data) != x.nbytes:
        data = np.array(x.view(_DTYPES[name][1]), copy=False).tobytes()
    t = pb.Tensor() if into is None else into
    t.data, t.dtype = data, name
    t.shape[:] = x.shape
    return t


def check_tensor(t: pb.Tensor, expect_shape: tuple, data: bytes | None = None) -> tuple:
    """Check dtype, shape and byte length without touching the data; `None` in expect_shape is
    free. Returns the shape. `data`: t.data where the caller holds it already (every read of a
    bytes field copies it: 7 MB for a prefill chunk of Kimi's hidden states in float32)."""
    if t.dtype not in _DTYPES:
        raise WireError(f"hidden state dtype {t.dtype!r} is not one of {', '.join(_DTYPES)}")
    shape = tuple(t.shape)
    if len(shape) != len(expect_shape) or any(e is not None and e != s for e, s in zip(expect_shape, shape)):
        want = tuple("*" if e is None else e for e in expect_shape)
        raise WireError(f"hidden state shape {list(shape)} does not match the expected {list(want)}")
    expected = math.prod(shape) * _DTYPES[t.dtype][0].size
    size = len(t.data if data is None else data)
    if size != expected:
        raise WireError(f"hidden state carries {size} bytes; {t.dtype}{list(shape)} needs {expected}")
    return shape


def decode_tensor(t: pb.Tensor, expect_shape: tuple) -> mx.array:
    """`t` as an MLX array, checked; its bytes are read once."""
    data = t.data
    shape = check_tensor(t, expect_shape, data)
    dtype, _, fmt = _DTYPES[t.dtype]
    # one copy, from the message's bytes into MLX; the view is evaluated with the stage's graph
    return mx.array(memoryview(data).cast(fmt)).reshape(shape).view(dtype)


def open_channel(address: str, secret: bytes, name: str = "client") -> grpc.Channel:
    """A mutual-TLS channel to a member of the cluster `secret` names; `name` goes in our certificate."""
    options = CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", CLUSTER_HOST)]
    return grpc.secure_channel(address, channel_credentials(identity(secret, name)), options=options)


def canonical_address(address: str) -> str:
    """One spelling per listening socket: `ipv4:127.0.0.1:07470`, `localhost:7470` and
    `127.0.0.1:7470` are all `127.0.0.1:7470` (IPv6 as `[::1]:7470`); a host name is resolved.
    ValueError names what is wrong."""
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        address = address.removeprefix(scheme)
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r}: give the HOST:PORT the node serves on (a port from 1 to 65535)")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
        except (OSError, ValueError) as e:
            raise ValueError(f"address {address!r}: {host!r} does not resolve ({e})") from None
    return f"[{ip.compressed}]:{int(port)}" if ip.version == 6 else f"{ip.compressed}:{int(port)}"


class ListenError(Exception):
    """This process cannot listen where it was asked to."""


def revocations() -> Revocations:
    """This machine's list of removed nodes (the coordinator writes it; every server reads it)."""
    return Revocations(config_dir() / "revoked.json")


def _wrap(handler, wrapper, deserializer=None):
    """`handler` with its behaviour passed through `wrapper(behaviour) -> behaviour` (and its
    requests read by `deserializer`, if given)."""
    kind = ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary")
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(wrapper(getattr(handler, kind)), deserializer or handler.request_deserializer,
                   handler.response_serializer)


@dataclass
class Oversize:
    """A request message refused for its size before it was parsed (what its deserializer returns)."""

    method: str
    size: int
    limit: int
    why: str

    def message(self) -> str:
        return (f"a {self.method} message of {self.size:,} bytes is larger than this node takes ({self.limit:,} "
                f"bytes: {self.why})")


class MessageRefused(grpc.RpcError):
    """Raised from a request stream whose next message was Oversize: the stream's reader stops as
    it does when the sender goes away, and the call ends with the status already set."""


class MessageLimits(grpc.ServerInterceptor):
    """Each request message is checked against its method's limit on its raw bytes, before it is
    parsed: Forward and ForwardStream against `data_limit()` -> (bytes, why), which follows this
    node's plan (stage.request_limit); Generate against GENERATE_MESSAGE_BYTES; every other call
    against CONTROL_MESSAGE_BYTES. gRPC's own limit (MAX_MESSAGE_BYTES) is the server's, set
    before any plan, so a larger message is still received, but never parsed nor worked on."""

    def __init__(self, data_limit=None):
        self.data_limit = data_limit

    def limit_of(self, method: str) -> tuple[int, str]:
        if method in DATA_METHODS:
            return self.data_limit() if self.data_limit else (MAX_MESSAGE_BYTES, "gRPC's limit")
        if method == "Generate":
            return GENERATE_MESSAGE_BYTES, "a request of a prompt of the longest context"
        return CONTROL_MESSAGE_BYTES, "a control message"

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return handler
        method, parse = details.method.rsplit("/", 1)[-1], handler.request_deserializer

        def checked(raw: bytes):
            limit, why = self.limit_of(method)
            if len(raw) > limit:
                return Oversize(method, len(raw), limit, why)
            return parse(raw) if parse else raw

        return _wrap(handler, _refuse_streamed if handler.request_streaming else _refuse_unary, checked)


def _refuse_unary(behavior):
    def run(request, context):
        if isinstance(request, Oversize):
            return_freed_memory(request.size)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, request.message())
        return behavior(request, context)

    return run


def _refuse_streamed(behavior):
    def run(requests, context):
        return behavior(_checked_stream(requests, context), context)

    return run


def _checked_stream(requests, context):
    for request in requests:
        if isinstance(request, Oversize):
            return_freed_memory(request.size)
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(request.message())
            raise MessageRefused(request.message())
        yield request


class RefuseRemoved(grpc.ServerInterceptor):
    """Every call from a removed node (its certificate's node id is in `revoked`) is refused
    with PERMISSION_DENIED before its handler runs."""

    def __init__(self, revoked: Revocations):
        self.revoked = revoked

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        return handler and _wrap(handler, self._checked)

    def _checked(self, behavior):
        def run(request, context):
            caller = peer_name(context)
            if (name := self.revoked.name_of(caller)) is not None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"node {name} ({caller}) was removed from this cluster (`kimi-cluster node remove`); "
                              f"to admit it again, delete its line from {self.revoked.path} on the coordinator's machine")
            return behavior(request, context)

        return run


class CallLimiter(grpc.ServerInterceptor):
    """At most CALL_KINDS' limit of calls of each kind at once; the next of that kind is refused at
    once with RESOURCE_EXHAUSTED. A method in no kind counts as control."""

    def __init__(self):
        self._slots = {kind: threading.BoundedSemaphore(limit) for kind, (_, limit) in CALL_KINDS.items()}

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return handler
        call_kind = CALL_KIND.get(details.method.rsplit("/", 1)[-1], "control")
        return _wrap(handler, lambda behavior: self._limited(behavior, call_kind))

    def _limited(self, behavior, kind: str):
        slots, limit = self._slots[kind], CALL_KINDS[kind][1]

        def run(request, context):
            if not slots.acquire(blocking=False):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"busy: {limit} {kind} calls already in progress here; retry later")
            if not context.add_callback(slots.release):  # the call already ended
                slots.release()
            return behavior(request, context)

        return run


def _check_bindable(host: str, port: int):
    """One line naming why `host:port` cannot be listened on, before gRPC says it less clearly."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like gRPC: a TIME_WAIT port is free
            s.bind((host, port))
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {host}:{port}: {host!r} is not an address ({e.strerror})") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ListenError(f"cannot listen on {host}:{port}: the port is in use (another kimi-cluster up?); "
                              "stop that process or pick another --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ListenError(f"cannot listen on {host}:{port}: {host} is not an address of this machine; "
                              "--host takes one of this machine's own addresses") from None
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def make_server(host: str, port: int, secret: bytes, name: str, data_limit=None) -> tuple[grpc.Server, int]:
    """A mutual-TLS gRPC server for the cluster `secret` names, presenting a certificate for `name`,
    bound to host:port (0 picks one), taking request messages up to MessageLimits (`data_limit`:
    the data path's, see there). Returns (server, port)."""
    _check_bindable(host, port)
    # Calls past the threads wait for one (refusals take a moment each); past four times as many, gRPC
    # itself refuses them, which bounds what a flood can queue.
    server = grpc.server(ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="grpc"),
                         interceptors=[MessageLimits(data_limit), RefuseRemoved(revocations()), CallLimiter()],
                         options=SERVER_OPTIONS, maximum_concurrent_rpcs=4 * SERVER_THREADS)
    try:
        bound = server.add_secure_port(f"{host}:{port}", server_credentials(identity(secret, name)))
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ListenError(f"cannot listen on {host}:{port}")
    return server, bound


def node_stub(channel: grpc.Channel) -> pb_grpc.NodeStub:
    return pb_grpc.NodeStub(channel)


def coordinator_stub(channel: grpc.Channel) -> pb_grpc.CoordinatorStub:
    return pb_grpc.CoordinatorStub(channel)


# The first node in a chain that failed is named in this trailing metadata, so callers further
# up the chain pass the name on instead of blaming the stage they talked to.
FAILED_NODE_KEY = "x-kimi-failed-node"


def failed_node(error: grpc.RpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == FAILED_NODE_KEY:
            return value
    return None


def handshake_failure(error: grpc.RpcError, address: str, secret: bytes) -> str | None:
    """What a failed TLS handshake with `address` means and what to do, or None when `error` is
    not one: the peer's certificate was not signed by this cluster's CA, so the two sides hold
    different cluster secrets. Says where this side read its secret from."""
    details = error.details() or ""
    if "handshake failed" not in details.lower():
        return None
    here = f"this side read its secret from {secret_origin(secret)} (cluster fingerprint {fingerprint(secret)[:16]})"
    if "CERTIFICATE_VERIFY_FAILED" not in details:
        return (f"the TLS handshake with {address} failed: it is not a kimi-cluster node of this version, or "
                f"not a TLS server ({here}; gRPC said: {details})")
    return (f"the TLS handshake with {address} failed because the cluster secrets differ: {here}; the "
            f"process at {address} reads its own from its --secret-file, else ${SECRET_ENV}, else its "
            f"{config_dir() / 'secret'}. Copy the cluster's secret to whichever side is wrong (`kimi-cluster up` "
            "prints the ssh line that copies it) and restart that node")


# A slice part's chunks travel as PartChunk messages built around the data (transfer.py's FetchPart),
# so 4 MiB of weights are neither copied into a message nor out of one.
def encode_chunk(index: int, data: bytes) -> bytes:
    """The PartChunk message (index, data) as it travels, built around `data` with one copy."""
    return b"".join((b"\x08" + _varint(index) if index else b"", b"\x12", _varint(len(data)), data))


def decode_chunk(raw: bytes) -> tuple:
    """(index, data) of a PartChunk as it travelled; data is a view into `raw` when encode_chunk made
    it (no copy), else what protobuf reads; (-1, b"") when `raw` is not a PartChunk."""
    index, at = _read_varint(raw, 1) if raw[:1] == b"\x08" else (0, 0)
    if raw[at:at + 1] == b"\x12":
        size, start = _read_varint(raw, at + 1)
        if size >= 0 and start + size == len(raw):
            return index, memoryview(raw)[start:]
    try:
        chunk = pb.PartChunk.FromString(raw)
    except DecodeError:
        return -1, b""
    return chunk.index, chunk.data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(raw: bytes, at: int) -> tuple:
    """(value, position after it) of the varint at `at`; (-1, len(raw) + 1) when it runs off the end."""
    value = shift = 0
    for i in range(at, min(at + 10, len(raw))):
        value |= (raw[i] & 0x7F) << shift
        if raw[i] < 0x80:
            return value, i + 1
        shift += 7
    return -1, len(raw) + 1
