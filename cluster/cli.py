"""The `kimi-cluster` command."""

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from mlx_kimi.checkpoint import CheckpointError, SizeReport, open_checkpoint, text_config
from mlx_kimi.builtin import BUILTIN_MODELS

from .auth import AuthError, rotate_secret
from .chat import add_arguments as add_chat_arguments
from .convert_cli import add_compare_parser, add_convert_parser
from .weights_cli import add_weights_parsers
from . import client
from .client import DEFAULT_PORT
from .scheduler import DEFAULT_PREFILL_CHUNK
from .units import format_bytes, parse_size

SHUTDOWN_GRACE_S = 2.0  # calls in flight get this long to finish after SIGTERM
# Rich assumes 80 columns when stdout is not a terminal; tables of nodes need more.
console = Console(width=None if sys.stdout.isatty() else 140)


def fail(message: str, code: int = 2):
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(code)


def quant_scheme(args):
    """(name, QuantScheme) a built-in model is described under: a preset, or bits and group size."""
    from mlx_kimi.spec import PRESETS, QuantScheme

    if args.preset:
        if any(v is not None for v in (args.expert_bits, args.other_bits, args.group_size)):
            fail("--preset names the bits and group size: give it without --expert-bits/--other-bits/--group-size")
        if args.preset not in PRESETS:
            fail(f"unknown preset {args.preset!r}; presets: "
                 + ", ".join(f"{name} ({scheme})" for name, scheme in PRESETS.items()))
        return f"{args.preset}: {PRESETS[args.preset]}", PRESETS[args.preset]
    try:
        scheme = QuantScheme(args.expert_bits or 2, args.other_bits or 4, args.group_size or 64)
    except ValueError as e:
        fail(str(e))
    return str(scheme), scheme


def model_sizes(args) -> tuple:
    """(display name, SizeReport, text config, activation bytes, unused bytes by kind) of a built-in
    model or a checkpoint."""
    if args.model in BUILTIN_MODELS:
        from mlx_kimi.spec import describe_sizes

        name, scheme = quant_scheme(args)
        config = BUILTIN_MODELS[args.model]
        return f"{args.model} ({name})", describe_sizes(config, scheme), text_config(config), 2, {}
    if any(v is not None for v in (args.expert_bits, args.other_bits, args.group_size, args.preset)):
        fail("--preset/--expert-bits/--other-bits/--group-size describe a built-in model; a checkpoint's sizes "
             "come from its files")
    checkpoint = open_checkpoint(args.model)
    return (f"{checkpoint.path} (model id {checkpoint.model_id[:16]})", checkpoint.sizes(),
            text_config(checkpoint.config), checkpoint.activation_itemsize, checkpoint.unused_bytes())


def _layer_groups(layer_bytes: list) -> list:
    """Runs of consecutive layers with equal bytes: [(first, last, bytes)]."""
    groups = []
    for i, b in enumerate(layer_bytes):
        if groups and groups[-1][2] == b and groups[-1][1] == i - 1:
            groups[-1] = (groups[-1][0], i, b)
        else:
            groups.append((i, i, b))
    return groups


def print_sizes(title: str, sizes: SizeReport) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("each", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("GB", justify="right")
    table.add_row("embedding", "", f"{sizes.embed_bytes:,}", f"{sizes.embed_bytes / 1e9:.3f}")
    for first, last, b in _layer_groups(sizes.layer_bytes):
        name = f"layer {first}" if first == last else f"layers {first}-{last}"
        n = last - first + 1
        table.add_row(name, f"{b / 1e9:.3f} GB" if n > 1 else "", f"{b * n:,}", f"{b * n / 1e9:.3f}")
    table.add_row("final norm + lm_head", "", f"{sizes.head_bytes:,}", f"{sizes.head_bytes / 1e9:.3f}")
    table.add_row("[bold]total", "", f"[bold]{sizes.total_bytes:,}", f"[bold]{sizes.total_bytes / 1e9:.1f}")
    console.print(table)


def cmd_inspect(args) -> None:
    title, sizes, _, _, unused = model_sizes(args)
    if args.json:
        print(json.dumps({"model": title, **sizes.to_json(), "unused_bytes": unused}))
        return
    print_sizes(title, sizes)
    for what, nbytes in unused.items():
        console.print(f"also in the files, never loaded: {what}, {nbytes:,} bytes", highlight=False)


def cmd_plan(args) -> None:
    from .planner import NodeCapacity, mac_default_usable_bytes, plan_partition, sizes_for_model, usable_from_wired_limit_mb

    title, report, config, itemsize, _ = model_sizes(args)
    sizes = sizes_for_model(report.layer_bytes, report.embed_bytes, report.head_bytes, config, itemsize)
    nodes = []
    for i, total in enumerate(args.node, 1):
        if args.wired_limit_mb:
            usable, wired = usable_from_wired_limit_mb(args.wired_limit_mb), args.wired_limit_mb * 2**20
        else:
            usable, wired = mac_default_usable_bytes(total), None
        nodes.append(NodeCapacity(f"mac{i}", usable, total_bytes=total, wired_limit_bytes=wired))
    plan = plan_partition(sizes, nodes, context=args.context)
    by_name = {n.name: n for n in nodes}
    result = {
        "model": title, "feasible": plan.feasible, "total_bytes": report.total_bytes, "context": args.context,
        "nodes": [{"node": n.name, "total_bytes": n.total_bytes, "usable_bytes": n.usable_bytes} for n in nodes],
        "stages": [{"node": st.node, "start": st.start, "end": st.end, "weight_bytes": st.weight_bytes,
                    "kv_bytes": st.kv_bytes, "scratch_bytes": st.scratch_bytes, "usable_bytes": st.usable_bytes,
                    "free_bytes": st.free_bytes} for st in plan.stages],
        "advice": plan.advice,
    }
    if not plan.feasible:
        result["shortfall_bytes"] = plan.shortfall_bytes
        result["wired_limit_mb"] = plan.wired_limit_mb
    if args.json:
        print(json.dumps(result))
        return
    console.print(f"{title}: {format_bytes(report.total_bytes)} of weights, context {args.context:,} tokens")
    usable = sum(n.usable_bytes for n in nodes)
    console.print("Mac memory as Apple counts it (binary): "
                  + ", ".join(f"{n.name} {n.total_bytes / 2**30:g} GiB = {n.total_bytes:,} bytes" for n in nodes),
                  highlight=False)
    console.print(f"{len(nodes)} nodes, {format_bytes(usable)} usable"
                  + ("" if args.wired_limit_mb else " at the default GPU wired limit (75% of memory)"))
    if plan.feasible:
        table = Table(title="plan: fits", title_justify="left")
        for col in ("node", "memory", "usable", "layers", "weights", "KV", "scratch", "free"):
            table.add_column(col, justify="left" if col in ("node", "layers") else "right")
        for st in plan.stages:
            table.add_row(st.node, format_bytes(by_name[st.node].total_bytes), format_bytes(st.usable_bytes),
                          f"{st.start}-{st.end - 1}", format_bytes(st.weight_bytes), format_bytes(st.kv_bytes),
                          format_bytes(st.scratch_bytes), format_bytes(st.free_bytes))
        console.print(table)
    else:
        console.print(f"[bold red]does not fit[/]: {format_bytes(plan.shortfall_bytes)} missing")
    for line in plan.advice:
        console.print(f"- {line}", highlight=False)


def cmd_make_tiny(args) -> None:
    from mlx_kimi.tiny import TinyShape, make_tiny

    if args.layout:
        from mlx_kimi.layouts import MLX_LAYOUTS, write_layout

        if args.script is not None:
            raise ValueError("--script writes its own weights: give it without --layout")
        out = write_layout(args.dir, args.layout, TinyShape(layers=args.layers), seed=args.seed,
                           dtype=args.dtype or "bfloat16")
        if args.layout not in MLX_LAYOUTS:
            console.print(f"wrote {out}: Moonshot's official {args.layout} layout, which kimi-cluster runs after "
                          f"`kimi-cluster convert {out} OUT`")
            return
    elif args.script is not None:
        from mlx_kimi.scripted import make_scripted

        out = make_scripted(args.dir, args.script, TinyShape(layers=args.layers), model_type=args.model_type,
                            dtype=args.dtype or "float32")
    else:
        out = make_tiny(args.dir, TinyShape(layers=args.layers), seed=args.seed, model_type=args.model_type,
                        dtype=args.dtype or "float32")
    checkpoint = open_checkpoint(out)
    console.print(
        f"wrote {out}: {checkpoint.num_layers} layers, {len(checkpoint.tensors)} tensors, "
        f"{checkpoint.sizes().total_bytes:,} bytes, model id {checkpoint.model_id[:16]}"
    )


def _secret(args, create=False) -> bytes:
    return client.secret(args.secret_file, create=create)


class LoadBars:
    """One rich progress bar per node while slices arrive and load: `receiving NODE` while the node
    fetches parts it lacks, then `loading NODE`, with rate and time left. A round of bars starts with
    the first update and ends when every node of the round is done: the first round is the whole plan
    (so a fast node finishing early does not end it), a later one a node loaded again on its own."""

    PHASES = {"transfer": "receiving", "load": "loading"}

    def __init__(self, coordinator, console: Console):
        self.coordinator, self.console = coordinator, console
        self.progress, self.tasks, self.rounds = None, {}, 0
        self.phases, self.done = {}, set()
        self._lock = threading.Lock()

    def _start_round(self, name: str, update):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        plan = self.coordinator.plan
        names = [s.node for s in plan.stages] if self.rounds == 0 and plan else []
        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
        self.tasks, self.phases, self.done = {}, {}, set()
        for node in names if name in names else [name]:
            stage = next((s for s in plan.stages if s.node == node), None) if plan else None
            self.tasks[node] = self.progress.add_task(f"loading {node}",
                                                      total=stage.weight_bytes if stage else update.bytes_total)
        self.rounds += 1
        self.progress.start()

    def __call__(self, name: str, update):
        with self._lock:
            if self.progress is None or name not in self.tasks:
                if self.progress is not None:  # a node outside this round: finish the round's bars first
                    self.progress.stop()
                self._start_round(name, update)
            task, phase = self.tasks[name], update.phase or "load"
            if self.phases.get(name) != phase:  # receiving, then loading: each phase's bar and rate afresh
                self.phases[name] = phase
                self.progress.reset(task, total=update.bytes_total, description=f"{self.PHASES.get(phase, phase)} {name}")
            self.progress.update(task, completed=update.bytes_done, total=update.bytes_total)
            if update.done:
                self.progress.update(task, completed=update.bytes_total)
                self.done.add(name)
            if self.done >= set(self.tasks):
                self.progress.stop()
                self.progress = None


def serve(args, secret: bytes):
    """Start this process's node (and coordinator with --model); returns a function that stops them."""
    from . import __version__
    from .coordinator import Coordinator
    from .discovery import Advertiser, Announcement, open_zeroconf
    from .generated import kimi_cluster_pb2_grpc as pb_grpc
    from .identity import fingerprint
    from .machine import describe_machine, node_id
    from mlx_kimi.slice_cache import SliceCache

    from .auth import config_dir
    from .node import NodeService
    from .rejoin import Rejoiner
    from .transfer import SliceStore, SlicesService
    from .wire import ListenError, make_server

    name = args.name or socket.gethostname().split(".")[0]
    machine = describe_machine(args.memory)
    this_id = node_id(name)
    try:
        server, port = make_server(args.host, args.port, secret, this_id)
    except ListenError as e:
        fail(str(e))
    address = f"{args.host}:{port}"
    slices = SliceStore(SliceCache(args.cache_dir or config_dir() / "cache"), _whole_checkpoints(args.model_dir),
                        local_dirs=[args.model_dir] if args.model_dir else [], download_repo=args.download)
    node = NodeService(name, this_id, address, machine, secret, slices, session_ttl_s=args.session_ttl,
                       max_transfer_rate=args.max_transfer_rate or 0)
    pb_grpc.add_NodeServicer_to_server(node, server)
    pb_grpc.add_SlicesServicer_to_server(SlicesService(slices), server)
    zeroconf = advertiser = coordinator = rejoiner = None
    if not args.no_mdns:
        zeroconf = open_zeroconf(args.host)
    if args.model:
        coordinator = Coordinator(node, args.model, secret, args.peer, context=args.context,
                                  min_nodes=args.nodes, zeroconf=zeroconf, take_over=args.take_over,
                                  max_prefill_chunk=args.prefill_chunk)
        slices.checkpoints[coordinator.checkpoint.model_id] = coordinator.checkpoint
        pb_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    server.start()
    if not coordinator:
        rejoiner = Rejoiner(node, secret, args.peer)
    if zeroconf:
        advertiser = Advertiser(zeroconf, Announcement(
            node.node_id, name, __version__, machine.backend, machine.chip, machine.total_bytes,
            machine.usable_bytes, args.host, port, fingerprint(secret), coordinator=coordinator is not None))

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

    return node, coordinator, stop


def _whole_checkpoints(model_dir) -> list:
    """--model-dir as a whole checkpoint, when it is one; a directory with only some of its shards
    still gives the parts it holds (checked against the coordinator's manifest)."""
    if model_dir is None:
        return []
    if not (model_dir / "config.json").exists():
        fail(f"--model-dir {model_dir}: no config.json there; give the directory that holds the checkpoint")
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
        return _secret(args)
    except AuthError:
        if args.secret_file is not None or args.no_mdns:
            return _secret(args, create=args.secret_file is None)
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
        return _secret(args, create=True)
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
            secret = _secret(args)
        except AuthError:
            time.sleep(1.0)  # pacing between looks for the file the user copies
            continue
        print(f"found the cluster secret (fingerprint {fingerprint(secret)}); joining", flush=True)
        return secret


def cmd_up(args) -> None:
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
    node, coordinator, stop = serve(args, secret)
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


def _start_api(args, coordinator) -> RunningApi:
    import uvicorn

    from .api import allowed_hosts, build_app

    app = build_app(coordinator, coordinator.checkpoint.name, args.api_key,
                    hosts=allowed_hosts(args.api_host, args.api_allow_host), origins=args.api_allow_origin)
    server = uvicorn.Server(uvicorn.Config(app, host=args.api_host, port=args.api_port, log_level="warning"))
    threading.Thread(target=server.run, name="openai-api", daemon=True).start()
    while not server.started:
        if not threading.main_thread().is_alive():
            break
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.api_port
    url = f"http://{args.api_host}:{port}/v1"
    print(f"OpenAI API on {url} (model {coordinator.checkpoint.name!r})", flush=True)
    return RunningApi(server, url)


def _announce_ready(coordinator, stopped, address: str, api):
    while not stopped.is_set():
        if coordinator.ready.wait(0.5):
            print(f"cluster ready: {coordinator.checkpoint.name} on "
                  + ", ".join(f"{s.node} [{s.start}, {s.end})" for s in coordinator.plan.stages), flush=True)
            print(f"  chat:   kimi-cluster chat --coordinator {address}", flush=True)
            if api:
                print(f"  API:    {api.url}   web view: {api.url[:-3]}/", flush=True)
            return


def _connect(args):
    cluster_secret = _secret(args)
    return client.connect(client.find_coordinator(args.coordinator, cluster_secret, args.host), cluster_secret)


def _sampling(args):
    return client.sampling(args.temperature, args.top_p, args.top_k, args.min_p, args.seed)


def cmd_chat(args) -> None:
    from .generated import kimi_cluster_pb2 as pb

    if args.prompt is None:
        if args.json:
            fail("--json needs --prompt")
        from .chat import run_from_args

        return run_from_args(args, _connect(args), _sampling(args))

    stub = _connect(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    request = pb.GenerateRequest(messages_json=json.dumps(messages), max_tokens=args.max_tokens,
                                 sampling=_sampling(args))
    if args.thinking is not None:
        request.thinking = args.thinking
    show = None if args.json else (lambda token: print(token.text, end="", flush=True))
    call = stub.Generate(request, timeout=args.timeout)
    try:
        reply = client.read_reply(call, show)
    except KeyboardInterrupt:
        call.cancel()
        print("\nreply cancelled", file=sys.stderr)
        sys.exit(130)
    done = reply.done
    if args.json:
        print(json.dumps({
            "text": reply.text, "token_ids": reply.token_ids, "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens, "finish_reason": done.finish_reason,
            "ttft_s": done.ttft_s, "decode_tok_s": reply.decode_tok_s,
        }))
    else:
        print()
        Console(stderr=True).print(f"[dim]{reply.stats_line()}[/]", highlight=False)


def cmd_node(args) -> None:
    from .generated import kimi_cluster_pb2 as pb

    reply = _connect(args).RemoveNode(pb.RemoveNodeRequest(name=args.name), timeout=30)
    print(f"removed {args.name} ({reply.node_id}): the coordinator refuses it from now on and plans without it")


def cmd_map(args) -> None:
    from .generated import kimi_cluster_pb2 as pb

    m = client.map_json(_connect(args).MemoryMap(pb.MemoryMapRequest(), timeout=30))
    if args.json:
        print(json.dumps(m))
    else:
        client.print_map(m, console)


def cmd_status(args) -> None:
    """This machine's nodes, then the cluster at a glance (when a coordinator answers)."""
    from .generated import kimi_cluster_pb2 as pb

    local = client.local_nodes()
    out = {"local_nodes": local, "cluster": None, "error": None}
    try:
        out["cluster"] = client.map_json(_connect(args).MemoryMap(pb.MemoryMapRequest(), timeout=30))
    except (client.ClientError, AuthError, grpc.RpcError) as e:
        out["error"] = str(e) if not isinstance(e, grpc.RpcError) else f"{e.code().name}: {e.details()}"
    if args.json:
        print(json.dumps(out))
        sys.exit(0 if local or out["cluster"] else 1)
    if local:
        for n in local:
            role = "coordinator and node" if n.get("coordinator") else "node"
            api = f", API {n['api_url']}" if n.get("api_url") else ""
            console.print(f"this machine runs {role} {n['name']} on {n['address']} (pid {n['pid']}{api})",
                          highlight=False)
    else:
        console.print("no kimi-cluster node runs on this machine (start one with `kimi-cluster up`)")
    if out["cluster"]:
        client.print_map(out["cluster"], console)
    else:
        console.print(f"cluster: {out['error']}", highlight=False)
    if not local and not out["cluster"]:
        sys.exit(1)


def cmd_stop(args) -> None:
    """Stop this machine's nodes (SIGTERM: each releases its slice), or with --cluster every node."""
    from .generated import kimi_cluster_pb2 as pb
    from .wire import node_stub, open_channel

    if args.cluster:
        cluster_secret = _secret(args)
        address = client.find_coordinator(args.coordinator, cluster_secret, args.host)
        nodes = client.connect(address, cluster_secret).MemoryMap(pb.MemoryMapRequest(), timeout=30).nodes
        for entry in sorted(nodes, key=lambda n: n.address == address):  # the coordinator last
            try:
                reply = node_stub(open_channel(entry.address, cluster_secret)).Stop(pb.StopRequest(exit=True),
                                                                                 timeout=10)
                console.print(f"stopped {reply.name} ({entry.address}), released {format_bytes(reply.freed_bytes)}",
                              highlight=False)
            except grpc.RpcError as e:
                console.print(f"could not stop {entry.name} ({entry.address}): {e.details()}", highlight=False)
        return
    local = [n for n in client.local_nodes() if args.name in (None, n["name"])]
    if not local:
        fail("no kimi-cluster node " + (f"named {args.name} " if args.name else "") + "runs on this machine "
             "(--cluster stops every node of the cluster)", code=1)
    for n in local:
        os.kill(n["pid"], signal.SIGTERM)
    left = client.wait_gone([n["pid"] for n in local], timeout=30)
    for n in local:
        console.print(f"{n['name']}: " + ("still running after 30 s" if n["pid"] in left else "stopped"),
                      highlight=False)
    if left:
        sys.exit(1)


def cmd_secret_rotate(args) -> None:
    Console(stderr=True).print(rotate_secret(args.secret_file), highlight=False)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def cmd_service(args) -> None:
    import platform
    import shutil as shutil_

    from . import service

    if platform.system() != "Darwin":
        fail("`service` writes a macOS launchd agent; on Linux run `kimi-cluster up ...` from a systemd unit")
    home = Path.home()
    if args.action == "uninstall":
        path, existed = service.uninstall(home)
        print(f"removed {path}; stop the running one with: launchctl bootout gui/$(id -u)/{service.LABEL}"
              if existed else f"no agent at {path}")
        return
    up_args = [a for a in args.up_args if a != "--"]
    executable = shutil_.which("kimi-cluster") or str(Path(sys.executable).parent / "kimi-cluster")
    path, start = service.install(executable, up_args, home)
    print(f"wrote {path}: `kimi-cluster up {' '.join(up_args)}` at every login (log in ~/Library/Logs/kimi-cluster.log)")
    print(f"start it now: {start}")


def _mac_memory(text: str) -> int:
    """A Mac's unified memory: "192GB" is Apple's 192 GiB (and TB is TiB); KiB/MiB/GiB as written."""
    size = text.strip()
    if size[-2:].lower() in ("gb", "tb") and size[-3:-2].lower() != "i":
        size = size[:-2].rstrip() + size[-2].upper() + "iB"
    return _size(size)


def _memory(text: str) -> int:
    if text.strip().replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} has no unit: write e.g. {text.strip()}GB (10^9 bytes) or "
                                         f"{text.strip()}GiB (2^30 bytes)")
    return _size(text)


def add_scheme_arguments(p) -> None:
    """How a built-in model is quantized: a named preset, or bits and group size."""
    p.add_argument("--preset", help="a published scheme by name: native-int4 (K2-Thinking/K2.5/K2.6 as released: "
                                    "experts INT4 group 32, rest bf16), 4bit (mlx-community uniform 4-bit), 3bit, "
                                    "experts2-rest4 (the default), experts2-rest8, experts3-rest6")
    p.add_argument("--expert-bits", type=int, help="routed-expert bits of a built-in model (default 2)")
    p.add_argument("--other-bits", type=int,
                   help="bits of every other weight of a built-in model (default 4; 16: unquantized bf16)")
    p.add_argument("--group-size", type=int, help="quantization group size of a built-in model: 32, 64 (default) "
                                                  "or 128")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="kimi-cluster", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kimi-cluster {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="exact bytes per layer of a checkpoint or a built-in model")
    p.add_argument("model", help=f"checkpoint directory, Hugging Face repo id in the local cache, or one of "
                                 f"{', '.join(BUILTIN_MODELS)}")
    add_scheme_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="what-if: would this model fit on these Macs, and how would it be split")
    p.add_argument("--model", required=True, help=f"checkpoint directory, Hugging Face repo id in the local cache, "
                                                  f"or one of {', '.join(BUILTIN_MODELS)}")
    add_scheme_arguments(p)
    p.add_argument("--node", type=_mac_memory, action="append", required=True, metavar="SIZE",
                   help="a Mac with SIZE of unified memory, e.g. 192GB (repeat per Mac); GB and TB mean what "
                        "Apple means by them, GiB and TiB: a 192GB Mac has 192 x 2^30 bytes")
    p.add_argument("--wired-limit-mb", type=int, help="GPU wired limit set with sudo sysctl iogpu.wired_limit_mb")
    p.add_argument("--context", type=int, default=32768, help="tokens of KV cache to plan for (default 32768)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("make-tiny", help="write a tiny Kimi-architecture checkpoint for tests and demos")
    p.add_argument("dir", type=Path)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-type", default="kimi_k25", choices=["kimi_k25", "deepseek_v3", "kimi_k2"])
    p.add_argument("--layout", metavar="NAME",
                   help="copy a published checkpoint's layout (config nesting, tensor names, dtypes, quantization, "
                        "tokenizer files), e.g. k2-instruct-4bit, k2-thinking, k2.5, k2-mixed_2_6, k2-mxfp4, or an "
                        "official one to convert, e.g. k2-instruct-fp8, k2.5-int4 (all: mlx_kimi/layouts.py)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of unquantized weights and activations (default float32, which runs fastest on "
                        "CPU; bfloat16 with --layout, as published)")
    p.add_argument("--script", metavar="TEXT",
                   help="weights whose greedy decoding, after TEXT's first token (e.g. <think>), emits the rest "
                        "of TEXT, then [EOS]; special tokens are written as text, e.g. "
                        "'<think>Hm.</think>Hi!<|im_end|>'")
    p.set_defaults(func=cmd_make_tiny)

    add_convert_parser(sub)
    add_compare_parser(sub)
    add_weights_parsers(sub)

    secret_help = "file holding the cluster secret (default: $KIMI_CLUSTER_SECRET or the config dir)"
    p = sub.add_parser("up", help="start a node (and, with --model, the coordinator)")
    p.add_argument("--host", help="address to bind and announce on (default: the Thunderbolt bridge, else the "
                                  "default route's interface on macOS; the only private address on Linux)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"gRPC port (default {DEFAULT_PORT}; 0 picks one)")
    p.add_argument("--name", help="node name (default: host name)")
    p.add_argument("--memory", type=_memory, help="memory this node may use, with a unit: e.g. 96GB or 512MiB "
                                                  "(at most the machine's memory)")
    p.add_argument("--no-mdns", action="store_true", help="do not announce or browse over mDNS")
    p.add_argument("--secret-file", type=Path, help=secret_help)
    p.add_argument("--model", help="checkpoint directory: also run the coordinator")
    p.add_argument("--model-dir", type=Path, help="a copy of the checkpoint (or of some of its shards) on this "
                   "machine: load what it holds from it instead of receiving it from the coordinator")
    p.add_argument("--download", metavar="REPO", help="fetch the shards holding this node's layers from this "
                   "Hugging Face repo (into the Hugging Face cache) instead of receiving them from the coordinator")
    p.add_argument("--cache-dir", type=Path, help="where received slices are kept (default: the cache folder "
                   "beside the cluster secret)")
    p.add_argument("--max-transfer-rate", type=_size, metavar="SIZE",
                   help="receive slices at most this many bytes per second, e.g. 500MB")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="with --model: a node to include; without: the coordinator to join (repeat)")
    p.add_argument("--context", type=int, default=32768, help="tokens of KV cache to plan for (default 32768)")
    p.add_argument("--nodes", type=int, metavar="N",
                   help="wait for N nodes (this one included) before planning; default: as soon as the model fits")
    p.add_argument("--take-over", action="store_true",
                   help="load nodes even if another running coordinator serves them (it then stops using them)")
    p.add_argument("--prefill-chunk", type=_positive_int, default=DEFAULT_PREFILL_CHUNK, metavar="TOKENS",
                   help="prompt tokens per prefill step: the most a running reply waits for another's prompt "
                        f"on each node (default {DEFAULT_PREFILL_CHUNK})")
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

    p = sub.add_parser("service", help="macOS: run `kimi-cluster up` at login (a launchd agent)")
    p.add_argument("action", choices=["install", "uninstall"])
    p.add_argument("up_args", nargs=argparse.REMAINDER, help="arguments for `up`, after --, e.g. -- --model DIR")
    p.set_defaults(func=cmd_service)

    for command, func, what in (("chat", cmd_chat, "chat with the cluster"), ("map", cmd_map, "memory map"),
                                ("status", cmd_status, "this machine's nodes and the cluster at a glance"),
                                ("stop", cmd_stop, "stop this machine's nodes (releasing their slices), or all"),
                                ("node", cmd_node, "remove a node: the cluster refuses it from now on")):
        p = sub.add_parser(command, help=what)
        p.add_argument("--coordinator", metavar="HOST[:PORT]",
                       help=f"the coordinator (default: the one on this machine, else found over mDNS; "
                            f"port {DEFAULT_PORT} when left out)")
        p.add_argument("--host", help="look for the coordinator over mDNS on this address's interface "
                                      "(default: the one `up` would choose)")
        p.add_argument("--secret-file", type=Path, help=secret_help)
        p.set_defaults(func=func)
        if command == "node":
            p.add_argument("action", choices=["remove"], help="remove: the cluster refuses node NAME from now on")
            p.add_argument("name", help="the node's name, as `kimi-cluster map` shows it")
            continue
        if command == "stop":
            p.add_argument("--cluster", action="store_true", help="stop every node of the cluster")
            p.add_argument("--name", help="stop only this machine's node of this name")
            continue
        p.add_argument("--json", action="store_true", help="print JSON")
        if command == "chat":
            p.add_argument("--prompt", help="send one message and exit (default: an interactive chat)")
            add_chat_arguments(p)
            p.add_argument("--max-tokens", type=int, default=256)
            defaults = "default: the checkpoint's generation_config.json, else greedy"
            p.add_argument("--temperature", type=float, help=f"0 is greedy ({defaults})")
            p.add_argument("--top-p", type=float, help=f"0 or 1 is off ({defaults})")
            p.add_argument("--top-k", type=int, help=f"0 is off ({defaults})")
            p.add_argument("--min-p", type=float, help="0 is off (the default)")
            p.add_argument("--seed", type=int)
            p.add_argument("--timeout", type=float,
                           help="seconds for the whole reply (default: none; a busy cluster only makes it wait)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, AuthError, ValueError) as e:
        fail(str(e))
    except client.ClientError as e:
        fail(str(e), code=1)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted", highlight=False)
        sys.exit(130)
    except grpc.RpcError as e:
        if "handshake failed" in (e.details() or "").lower():
            fail("the TLS handshake failed: that process holds another cluster's secret (or none); copy this "
                 f"cluster's secret there, or use its secret here ({e.details()})", code=1)
        fail(f"{e.code().name}: {e.details()}", code=1)
