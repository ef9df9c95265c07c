"""`kimi-cluster up`: start this machine's node (and, with --model, the coordinator and the API),
and the process around it: host, secret, logging, signals, load progress. `serve` starts the
node from explicit `NodeOptions`, so a test can run one in-process."""

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import grpc
from rich.console import Console

from mlx_kimi.checkpoint import CheckpointError, open_checkpoint

from . import client
from .auth import AuthError, rotate_secret
from .cli_args import SECRET_HELP, console, fail, memory, positive_int, size
from .client import DEFAULT_PORT
from .load_progress import LoadBars
from .planner import DEFAULT_PREFILL_CHUNK
from .speculation import MODES
from .units import format_bytes

SHUTDOWN_GRACE_S = 2.0  # calls in flight get this long to finish after SIGTERM


@dataclass
class NodeOptions:
    """What `serve` starts: `up`'s options, named as its flags (argparse's dests)."""

    host: str
    port: int = DEFAULT_PORT  # 0 picks one
    name: str | None = None  # default: the host name
    memory: int | None = None  # bytes this node may use (default: what the machine allows)
    no_mdns: bool = False
    model: str | None = None  # a checkpoint: also run the coordinator
    model_dir: Path | None = None  # a local copy of (some of) the checkpoint's shards
    download: str | None = None  # a Hugging Face repo to fetch this node's shards from
    cache_dir: Path | None = None  # default: the cache folder beside the cluster secret
    max_transfer_rate: int | None = None  # bytes/s of received slices (None: unlimited)
    peer: list = field(default_factory=list)  # HOST:PORT of nodes to include, or the coordinator to join
    context: int = 32768
    nodes: int | None = None  # with model: wait for this many nodes before planning
    take_over: bool = False
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    speculate: str = "off"
    session_ttl: float = 600.0

    @classmethod
    def from_args(cls, args) -> "NodeOptions":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


@dataclass
class ServingNode:
    """A started node (with its coordinator when it has --model); `stop()` releases everything."""

    node: object  # NodeService
    coordinator: object | None  # Coordinator, not started yet
    stop: object  # () -> None


def serve(options: NodeOptions, secret: bytes) -> ServingNode:
    """Start this process's node (and coordinator with a model), listening on options.host."""
    from mlx_kimi.slice_cache import SliceCache

    from . import __version__
    from .auth import config_dir
    from .coordinator import Coordinator
    from .discovery import Advertiser, Announcement, open_zeroconf
    from .generated import kimi_cluster_pb2_grpc as pb_grpc
    from .identity import fingerprint
    from .machine import describe_machine, node_id
    from .node import NodeService
    from .rejoin import Rejoiner
    from .transfer import SliceStore, add_slices_service
    from .wire import make_server

    name = options.name or socket.gethostname().split(".")[0]
    machine = describe_machine(options.memory)
    this_id = node_id(name)
    # The data path's message limit follows the plan `node` is loaded with (made below, before
    # the server starts).
    server, port = make_server(options.host, options.port, secret, this_id,
                               data_limit=lambda: node.stage.request_limit())
    address = f"{options.host}:{port}"
    slices = SliceStore(SliceCache(options.cache_dir or config_dir() / "cache"),
                        _whole_checkpoints(options.model_dir),
                        local_dirs=[options.model_dir] if options.model_dir else [], download_repo=options.download)
    node = NodeService(name, this_id, address, machine, secret, slices, session_ttl_s=options.session_ttl,
                       max_transfer_rate=options.max_transfer_rate or 0)
    pb_grpc.add_NodeServicer_to_server(node, server)
    add_slices_service(server, slices)
    zeroconf = advertiser = coordinator = rejoiner = None
    if not options.no_mdns:
        zeroconf = open_zeroconf(options.host)
    if options.model:
        coordinator = Coordinator(node, options.model, secret, options.peer, context=options.context,
                                  min_nodes=options.nodes, zeroconf=zeroconf, take_over=options.take_over,
                                  max_prefill_chunk=options.prefill_chunk, speculate=options.speculate)
        slices.checkpoints[coordinator.checkpoint.model_id] = coordinator.checkpoint
        pb_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    server.start()
    if not coordinator:
        rejoiner = Rejoiner(node, secret, options.peer)
    if zeroconf:
        advertiser = Advertiser(zeroconf, Announcement(
            node.node_id, name, __version__, machine.backend, machine.chip, machine.total_bytes,
            machine.usable_bytes, options.host, port, fingerprint(secret), coordinator=coordinator is not None))

    def stop():
        if coordinator:
            coordinator.stop()
            _release_workers(coordinator, secret)
        if rejoiner:
            rejoiner.close()
        if advertiser:
            advertiser.close()
        if zeroconf:
            zeroconf.close()
        node.unload()
        node.stop()
        server.stop(grace=SHUTDOWN_GRACE_S).wait(SHUTDOWN_GRACE_S + 1)

    return ServingNode(node, coordinator, stop)


def _whole_checkpoints(model_dir) -> list:
    """--model-dir as a whole checkpoint, when it is one; a directory with only some of its shards
    still gives the parts it holds (checked against the coordinator's manifest)."""
    if model_dir is None:
        return []
    if not (model_dir / "config.json").exists():
        raise ValueError(f"--model-dir {model_dir}: no config.json there; give the directory that holds the "
                         "checkpoint")
    try:
        return [open_checkpoint(model_dir)]
    except CheckpointError as e:
        print(f"--model-dir {model_dir} is not a whole checkpoint ({e}); parts of it that match the coordinator's "
              "are used, the rest is received", flush=True)
        return []


def _release_workers(coordinator, secret: bytes) -> None:
    """Ask every other node holding a slice for this coordinator to drop it (they stay up)."""
    from .generated import kimi_cluster_pb2 as pb
    from .wire import node_stub, open_channel

    for entry in coordinator.memory_map().nodes:
        if entry.address == coordinator.local.address or not (entry.has_layers and entry.resident_bytes):
            continue
        try:
            reply = node_stub(open_channel(entry.address, secret)).Stop(pb.StopRequest(), timeout=5)
            print(f"released {format_bytes(reply.freed_bytes)} on {reply.name}", flush=True)
        except grpc.RpcError as e:
            print(f"could not release {entry.name} ({entry.address}): {e.details()}", flush=True)


def _setup_logging(args) -> None:
    handlers = [logging.StreamHandler()]
    if args.log_file:
        args.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=handlers, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _choose_host(args) -> None:
    from .interfaces import NoHostError, pick_host

    if args.host is not None:
        return
    try:
        choice = pick_host()
    except NoHostError as e:
        fail(str(e))
    args.host = choice.address
    print(f"using {choice.address}: {choice.reason} (--host to choose another)", flush=True)


JOIN_BROWSE_S = 3.0


def _join_or_create_secret(args) -> bytes:
    """The cluster secret. Without one, the first node of a network creates it; a node that sees
    other kimi-cluster nodes announced says what to copy from where, and waits for it."""
    from .auth import SECRET_ENV, config_dir
    from .identity import fingerprint
    from .discovery import Browser, open_zeroconf

    try:
        return client.secret(args.secret_file)
    except AuthError:
        if args.secret_file is not None or args.no_mdns:
            return client.secret(args.secret_file, create=args.secret_file is None)
    zeroconf = open_zeroconf(args.host)
    browser = Browser(zeroconf, "", on_change=None)  # every announcement lands in `ignored`
    try:
        deadline = time.monotonic() + JOIN_BROWSE_S
        while not browser.ignored_nodes() and time.monotonic() < deadline:
            time.sleep(0.1)  # pacing between reads of what the browser found
        others = browser.ignored_nodes()
    finally:
        browser.close()
        zeroconf.close()
    if not others:
        return client.secret(args.secret_file, create=True)
    path = config_dir() / "secret"
    try:
        remote = '"$HOME/' + str(path.relative_to(Path.home())) + '"'
    except ValueError:
        remote = f'"{path}"'
    first = sorted(others, key=lambda a: a.name)[0]
    print(f"this node has no cluster secret, and {len(others)} kimi-cluster node(s) answer on this network "
          f"({', '.join(sorted({a.name + ' at ' + a.host for a in others}))}). Copy the secret from one of them, "
          f"e.g. {first.name}, with this one line (then this node goes on by itself):", flush=True)
    print(f"  mkdir -p '{path.parent}' && ssh {first.host} 'cat {remote}' > '{path}' && chmod 600 '{path}'",
          flush=True)
    print(f"or set {SECRET_ENV} to its contents and restart; waiting for {path} ...", flush=True)
    while True:
        try:
            secret = client.secret(args.secret_file)
        except AuthError:
            time.sleep(1.0)  # pacing between looks for the file the user copies
            continue
        print(f"found the cluster secret (fingerprint {fingerprint(secret)}); joining", flush=True)
        return secret


def cmd_up(args) -> None:
    from .wire import ListenError

    if args.api_port is not None:
        if not args.model:
            fail("--api-port serves the model: it needs --model (only the coordinator serves the API)")
        args.api_key = _api_key(args)
        _check_api_exposure(args)
    if args.nodes is not None and not args.model:
        fail("--nodes says how many nodes the coordinator waits for: it needs --model (give it to the node "
             "that coordinates, and start the others with plain `kimi-cluster up`)")
    _setup_logging(args)
    _choose_host(args)
    secret = _join_or_create_secret(args)
    try:
        serving = serve(NodeOptions.from_args(args), secret)
    except ListenError as e:
        fail(str(e))
    node, coordinator, stop = serving.node, serving.coordinator, serving.stop
    m = node.machine
    print(f"node {node.name} listening on {node.address} ({m.backend}, usable {format_bytes(m.usable_bytes)} "
          f"of {format_bytes(m.total_bytes)}{'' if args.no_mdns else ', announced over mDNS'})", flush=True)
    stopped, interrupted = threading.Event(), []

    def on_signal(signum, _frame):
        interrupted.append(signal.Signals(signum).name)
        stopped.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    node.on_exit_request = stopped.set
    api = None
    state = {"address": node.address, "coordinator": coordinator is not None}
    if coordinator:
        coordinator.on_status = lambda message: print(f"coordinator: {message}", flush=True)
        coordinator.on_load_progress = LoadBars(coordinator, console)
        coordinator.start()
        if args.api_port is not None:
            api = _start_api(args, coordinator)
            state["api_url"] = api.url
        threading.Thread(target=_announce_ready, args=(coordinator, stopped, node.address, api), daemon=True).start()
    client.write_node_state(node.name, **state)
    try:
        stopped.wait()
        what = ("coordinator and node" if coordinator else "node") + f" {node.name}"
        if interrupted:
            print(f"\n{interrupted[0]}: stopping {what}"
                  + ("" if not coordinator or coordinator.ready.is_set() else f" (cluster was {coordinator.state})"),
                  flush=True)
        else:
            print(f"asked to stop over the network: stopping {what}", flush=True)
        if api:
            api.server.should_exit = True
        # Whatever a stream's handler is stuck on, exit within a few seconds of the signal: stop in
        # a thread, and leave (os._exit below) without joining threads that did not finish.
        stopping = threading.Thread(target=stop, name="stop", daemon=True)
        stopping.start()
        stopping.join(SHUTDOWN_GRACE_S + 6)
        if api:  # its open streams end with an error event (the coordinator's stop fails their requests)
            api.thread.join(SHUTDOWN_GRACE_S)
    finally:
        client.remove_node_state(node.name)
    print(f"stopped {node.name}: its slice and sessions are released", flush=True)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(130 if interrupted and interrupted[0] == "SIGINT" else 0)


API_KEY_ENV = "KIMI_CLUSTER_API_KEY"


def _api_key(args) -> str | None:
    """The API key: --api-key-file, else $KIMI_CLUSTER_API_KEY, else --api-key (which every local
    user can read in `ps`: prefer the others)."""
    if args.api_key_file:
        try:
            key = args.api_key_file.expanduser().read_text().strip()
        except OSError as e:
            fail(f"--api-key-file {args.api_key_file}: {e.strerror}")
        if not key:
            fail(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or args.api_key


def _check_api_exposure(args) -> None:
    import ipaddress

    if args.api_key or args.api_allow_no_key:
        return
    try:
        loopback = ipaddress.ip_address(args.api_host).is_loopback
    except ValueError:
        loopback = args.api_host == "localhost"
    if not loopback:
        fail(f"--api-host {args.api_host} would let anyone on the network use the model without a key: "
             "add --api-key KEY, or pass --api-allow-no-key if you accept that")


@dataclass
class RunningApi:
    server: object
    url: str
    thread: threading.Thread  # runs the server until it has closed every connection


def _start_api(args, coordinator) -> RunningApi:
    import uvicorn

    from .api import build_app
    from .api_guards import HttpProtocol, allowed_hosts

    app = build_app(coordinator, coordinator.checkpoint.name, args.api_key,
                    hosts=allowed_hosts(args.api_host, args.api_allow_host), origins=args.api_allow_origin)
    server = uvicorn.Server(uvicorn.Config(app, host=args.api_host, port=args.api_port, log_level="warning",
                                           http=HttpProtocol))
    thread = threading.Thread(target=server.run, name="openai-api", daemon=True)
    thread.start()
    while not server.started:
        if not threading.main_thread().is_alive():
            break
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.api_port
    url = f"http://{args.api_host}:{port}/v1"
    print(f"OpenAI API on {url} (model {coordinator.checkpoint.name!r})", flush=True)
    return RunningApi(server, url, thread)


def _announce_ready(coordinator, stopped, address: str, api):
    while not stopped.is_set():
        if coordinator.ready.wait(0.5):
            print(f"cluster ready: {coordinator.checkpoint.name} on "
                  + ", ".join(f"{s.node} [{s.start}, {s.end})" for s in coordinator.plan.stages), flush=True)
            print(f"  chat:   kimi-cluster chat --coordinator {address}", flush=True)
            if api:
                print(f"  API:    {api.url}   web view: {api.url[:-3]}/", flush=True)
            return


def cmd_secret_rotate(args) -> None:
    Console(stderr=True).print(rotate_secret(args.secret_file), highlight=False)


def add_up_parsers(sub) -> None:
    p = sub.add_parser("up", help="start a node (and, with --model, the coordinator)")
    p.add_argument("--host", help="address to bind and announce on (default: the Thunderbolt bridge, else the "
                                  "default route's interface on macOS; the only private address on Linux)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"gRPC port (default {DEFAULT_PORT}; 0 picks one)")
    p.add_argument("--name", help="node name (default: host name)")
    p.add_argument("--memory", type=memory, help="memory this node may use, with a unit: e.g. 96GB or 512MiB "
                                                  "(at most the machine's memory)")
    p.add_argument("--no-mdns", action="store_true", help="do not announce or browse over mDNS")
    p.add_argument("--secret-file", type=Path, help=SECRET_HELP)
    p.add_argument("--model", help="checkpoint directory: also run the coordinator")
    p.add_argument("--model-dir", type=Path, help="a copy of the checkpoint (or of some of its shards) on this "
                   "machine: load what it holds from it instead of receiving it from the coordinator")
    p.add_argument("--download", metavar="REPO", help="fetch the shards holding this node's layers from this "
                   "Hugging Face repo (into the Hugging Face cache) instead of receiving them from the coordinator")
    p.add_argument("--cache-dir", type=Path, help="where received slices are kept (default: the cache folder "
                   "beside the cluster secret)")
    p.add_argument("--max-transfer-rate", type=size, metavar="SIZE",
                   help="receive slices at most this many bytes per second, e.g. 500MB")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="with --model: a node to include; without: the coordinator to join (repeat)")
    p.add_argument("--context", type=int, default=32768, help="tokens of KV cache to plan for (default 32768)")
    p.add_argument("--nodes", type=int, metavar="N",
                   help="wait for N nodes (this one included) before planning; default: as soon as the model fits")
    p.add_argument("--take-over", action="store_true",
                   help="load nodes even if another running coordinator serves them (it then stops using them)")
    p.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                   help="prompt tokens per prefill step: the most a running reply waits for another's prompt "
                        f"on each node (default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--speculate", choices=MODES, default="off",
                   help="speculative decoding drafted from the context (prompt lookup): auto drafts where it "
                        "pays and not for seeded sampling, on always, off never (default off: a verify step "
                        "may break a bf16 near-tie otherwise than mlx-lm; a request's `speculate` overrides it)")
    p.add_argument("--api-port", type=int, help="also serve the OpenAI-compatible API on this port (0 picks one)")
    p.add_argument("--api-host", default="127.0.0.1", help="address of the API (default 127.0.0.1)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every API request (visible in `ps`: "
                                     f"prefer ${API_KEY_ENV} or --api-key-file)")
    p.add_argument("--api-key-file", type=Path, help="file holding the API key")
    p.add_argument("--api-allow-host", action="append", default=[], metavar="NAME",
                   help="a Host name the API answers to besides its address and localhost (repeat)")
    p.add_argument("--api-allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (e.g. http://studio.local:3000) allowed to call the API (repeat)")
    p.add_argument("--api-allow-no-key", action="store_true",
                   help="serve the API on a non-loopback address without a key (anyone there can use it)")
    p.add_argument("--session-ttl", type=float, default=600.0, help="free idle sessions after this many seconds")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-file", type=Path, help="also write the log to this file")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("secret", help="the cluster secret")
    secret_sub = p.add_subparsers(dest="action", required=True)
    r = secret_sub.add_parser("rotate", help="replace the cluster secret with a new random one (restart every node)")
    r.add_argument("--secret-file", type=Path, help="file to write (default: the config dir's secret)")
    r.set_defaults(func=cmd_secret_rotate)
