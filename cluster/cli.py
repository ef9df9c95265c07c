"""The `kimi-cluster` command."""

import argparse
import json
import logging
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from mlx_kimi.checkpoint import CheckpointError, SizeReport, open_checkpoint, text_config
from mlx_kimi.builtin import BUILTIN_MODELS

from .auth import AuthError, AuthInterceptor, load_secret
from .chat import add_arguments as add_chat_arguments
from .units import format_bytes, parse_size

DEFAULT_PORT = 7470
# Rich assumes 80 columns when stdout is not a terminal; tables of nodes need more.
console = Console(width=None if sys.stdout.isatty() else 140)


def fail(message: str, code: int = 2):
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(code)


def model_sizes(model: str, expert_bits, other_bits) -> tuple:
    """(display name, SizeReport, text config, activation bytes) of a built-in model or a checkpoint."""
    if model in BUILTIN_MODELS:
        from mlx_kimi.spec import QuantScheme, describe_sizes

        scheme = QuantScheme(expert_bits or 2, other_bits or 4)
        config = BUILTIN_MODELS[model]
        return f"{model} ({scheme})", describe_sizes(config, scheme), text_config(config), 2
    if expert_bits or other_bits:
        fail("--expert-bits/--other-bits describe a built-in model; a checkpoint's sizes come from its files")
    checkpoint = open_checkpoint(model)
    return (f"{checkpoint.path} (model id {checkpoint.model_id[:16]})", checkpoint.sizes(),
            text_config(checkpoint.config), checkpoint.activation_itemsize)


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
    title, sizes, _, _ = model_sizes(args.model, args.expert_bits, args.other_bits)
    if args.json:
        print(json.dumps({"model": title, **sizes.to_json()}))
    else:
        print_sizes(title, sizes)


def cmd_plan(args) -> None:
    from .planner import NodeCapacity, mac_default_usable_bytes, plan_partition, sizes_for_model, usable_from_wired_limit_mb

    title, report, config, itemsize = model_sizes(args.model, args.expert_bits, args.other_bits)
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

    if args.script is not None:
        from mlx_kimi.scripted import make_scripted

        out = make_scripted(args.dir, args.script, TinyShape(layers=args.layers), model_type=args.model_type,
                            dtype=args.dtype)
    else:
        out = make_tiny(args.dir, TinyShape(layers=args.layers), seed=args.seed, model_type=args.model_type,
                        dtype=args.dtype)
    checkpoint = open_checkpoint(out)
    console.print(
        f"wrote {out}: {checkpoint.num_layers} layers, {len(checkpoint.tensors)} tensors, "
        f"{checkpoint.sizes().total_bytes:,} bytes, model id {checkpoint.model_id[:16]}"
    )


def _secret(args, create=False) -> bytes:
    secret, note = load_secret(args.secret_file, create=create)
    if note:
        Console(stderr=True).print(note, highlight=False)
    return secret


class LoadBars:
    """One rich progress bar per node while the slices load."""

    def __init__(self):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self.progress = Progress(TextColumn("{task.description:<24}"), BarColumn(), DownloadColumn(), console=console)
        self.tasks = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, update):
        with self._lock:
            if not self.tasks:
                self.progress.start()
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(f"loading {name}", total=update.bytes_total)
            self.progress.update(self.tasks[name], completed=update.bytes_done, total=update.bytes_total)
            if update.done and all(t.finished for t in self.progress.tasks):
                self.progress.stop()


def serve(args, secret: bytes):
    """Start this process's node (and coordinator with --model); returns a function that stops them."""
    from . import __version__
    from .auth import fingerprint
    from .coordinator import Coordinator
    from .discovery import Advertiser, Announcement, open_zeroconf
    from .generated import kimi_cluster_pb2_grpc as pb_grpc
    from .machine import describe_machine, node_id
    from .node import NodeService
    from .wire import SERVER_OPTIONS

    name = args.name or socket.gethostname().split(".")[0]
    machine = describe_machine(args.memory)
    server = grpc.server(ThreadPoolExecutor(max_workers=64), interceptors=[AuthInterceptor(secret)],
                         options=SERVER_OPTIONS)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        fail(f"cannot listen on {args.host}:{args.port}: address in use or not on this machine")
    address = f"{args.host}:{port}"
    node = NodeService(name, node_id(name), address, machine, secret, session_ttl_s=args.session_ttl)
    pb_grpc.add_NodeServicer_to_server(node, server)
    zeroconf = advertiser = coordinator = None
    if not args.no_mdns:
        zeroconf = open_zeroconf(args.host)
    if args.model:
        coordinator = Coordinator(node, args.model, secret, args.peer, context=args.context,
                                  min_nodes=args.nodes, zeroconf=zeroconf)
        pb_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    server.start()
    if zeroconf:
        advertiser = Advertiser(zeroconf, Announcement(
            node.node_id, name, __version__, machine.backend, machine.chip, machine.total_bytes,
            machine.usable_bytes, args.host, port, fingerprint(secret)))

    def stop():
        if coordinator:
            coordinator.stop()
        if advertiser:
            advertiser.close()
        if zeroconf:
            zeroconf.close()
        node.stop()
        server.stop(grace=2).wait()

    return node, coordinator, stop


def cmd_up(args) -> None:
    if args.api_port is not None:
        if not args.model:
            fail("--api-port serves the model: it needs --model (only the coordinator serves the API)")
        _check_api_exposure(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    secret = _secret(args, create=True)
    node, coordinator, stop = serve(args, secret)
    m = node.machine
    print(f"node {node.name} listening on {node.address} ({m.backend}, usable {format_bytes(m.usable_bytes)} "
          f"of {format_bytes(m.total_bytes)}{'' if args.no_mdns else ', announced over mDNS'})", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    api = None
    if coordinator:
        coordinator.on_status = lambda message: print(f"coordinator: {message}", flush=True)
        coordinator.on_load_progress = LoadBars()
        coordinator.start()
        threading.Thread(target=_announce_ready, args=(coordinator, stopped), daemon=True).start()
        if args.api_port is not None:
            api = _start_api(args, coordinator)
    stopped.wait()
    if api:
        api.should_exit = True
    stop()


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


def _start_api(args, coordinator):
    import uvicorn

    from .api import build_app

    app = build_app(coordinator, coordinator.checkpoint.name, args.api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=args.api_host, port=args.api_port, log_level="warning"))
    threading.Thread(target=server.run, name="openai-api", daemon=True).start()
    while not server.started:
        if not threading.main_thread().is_alive():
            break
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.api_port
    print(f"OpenAI API on http://{args.api_host}:{port}/v1 (model {coordinator.checkpoint.name!r})", flush=True)
    return server


def _announce_ready(coordinator, stopped):
    while not stopped.is_set():
        if coordinator.ready.wait(0.5):
            print(f"cluster ready: {coordinator.checkpoint.name} on "
                  + ", ".join(f"{s.node} [{s.start}, {s.end})" for s in coordinator.plan.stages), flush=True)
            return


def _coordinator_stub(address: str, secret: bytes):
    from .generated import kimi_cluster_pb2 as pb
    from .wire import coordinator_stub, node_stub, open_channel

    info = node_stub(open_channel(address, secret)).Info(pb.InfoRequest(), timeout=10)
    if not info.is_coordinator:
        if not info.coordinator:
            fail(f"{info.name} ({address}) serves no coordinator yet; run this against the coordinator")
        address = info.coordinator
    return coordinator_stub(open_channel(address, secret))


def _sampling(args):
    from .generated import kimi_cluster_pb2 as pb

    s = pb.SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)
    if args.seed is not None:
        s.seed = args.seed
    return s


def cmd_chat(args) -> None:
    from .generated import kimi_cluster_pb2 as pb

    if args.prompt is None:
        if args.json:
            fail("--json needs --prompt")
        from .chat import run_from_args

        return run_from_args(args)

    stub = _coordinator_stub(args.coordinator, _secret(args))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    request = pb.GenerateRequest(messages_json=json.dumps(messages), max_tokens=args.max_tokens,
                                 sampling=_sampling(args))
    if args.thinking is not None:
        request.thinking = args.thinking
    text, ids, done = [], [], None
    for event in stub.Generate(request, timeout=args.timeout):
        if event.HasField("token"):
            if event.token.id >= 0:
                ids.append(event.token.id)
            text.append(event.token.text)
            if not args.json:
                print(event.token.text, end="", flush=True)
        else:
            done = event.done
    decode_tok_s = (done.completion_tokens - 1) / done.decode_s if done.decode_s > 0 else 0.0
    if args.json:
        print(json.dumps({
            "text": "".join(text), "token_ids": ids, "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens, "finish_reason": done.finish_reason,
            "ttft_s": done.ttft_s, "decode_tok_s": decode_tok_s,
        }))
    else:
        print()
        Console(stderr=True).print(
            f"[dim]{done.prompt_tokens} prompt tokens, {done.completion_tokens} generated ({done.finish_reason}); "
            f"TTFT {done.ttft_s * 1000:.0f} ms, {decode_tok_s:.1f} tok/s[/]"
        )


def map_json(reply) -> dict:
    nodes = []
    for n in reply.nodes:
        nodes.append({
            "name": n.name, "address": n.address, "node_id": n.node_id, "backend": n.backend, "chip": n.chip,
            "status": n.status, "total_bytes": n.total_bytes, "usable_bytes": n.usable_bytes,
            "layers": [n.start, n.end] if n.has_layers else None, "weight_bytes": n.weight_bytes,
            "resident_bytes": n.resident_bytes, "kv_bytes": n.kv_bytes, "free_bytes": n.free_bytes,
        })
    return {"state": reply.state, "model": reply.model, "model_id": reply.model_id,
            "num_layers": reply.num_layers, "message": reply.message, "nodes": nodes}


def print_map(m: dict) -> None:
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


def cmd_map(args) -> None:
    from .generated import kimi_cluster_pb2 as pb

    reply = _coordinator_stub(args.coordinator, _secret(args)).MemoryMap(pb.MemoryMapRequest(), timeout=30)
    m = map_json(reply)
    if args.json:
        print(json.dumps(m))
    else:
        print_map(m)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="exact bytes per layer of a checkpoint or a built-in model")
    p.add_argument("model", help=f"checkpoint directory or one of {', '.join(BUILTIN_MODELS)}")
    p.add_argument("--expert-bits", type=int, help="routed-expert bits of a built-in model (default 2)")
    p.add_argument("--other-bits", type=int, help="bits of every other weight of a built-in model (default 4)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="what-if: would this model fit on these Macs, and how would it be split")
    p.add_argument("--model", required=True, help=f"checkpoint directory or one of {', '.join(BUILTIN_MODELS)}")
    p.add_argument("--expert-bits", type=int, help="routed-expert bits of a built-in model (default 2)")
    p.add_argument("--other-bits", type=int, help="bits of every other weight of a built-in model (default 4)")
    p.add_argument("--node", type=_size, action="append", required=True, metavar="SIZE",
                   help="a Mac with SIZE of unified memory, e.g. 192GB (repeat per Mac)")
    p.add_argument("--wired-limit-mb", type=int, help="GPU wired limit set with sudo sysctl iogpu.wired_limit_mb")
    p.add_argument("--context", type=int, default=32768, help="tokens of KV cache to plan for (default 32768)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("make-tiny", help="write a tiny Kimi-architecture checkpoint for tests and demos")
    p.add_argument("dir", type=Path)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-type", default="kimi_k25", choices=["kimi_k25", "deepseek_v3"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of unquantized weights and activations (float32 runs fastest on CPU)")
    p.add_argument("--script", metavar="TEXT",
                   help="weights whose greedy decoding, after TEXT's first token (e.g. <think>), emits the rest "
                        "of TEXT, then [EOS]; special tokens are written as text, e.g. "
                        "'<think>Hm.</think>Hi!<|im_end|>'")
    p.set_defaults(func=cmd_make_tiny)

    secret_help = "file holding the cluster secret (default: $KIMI_CLUSTER_SECRET or the config dir)"
    p = sub.add_parser("up", help="start a node (and, with --model, the coordinator)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind and advertise (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"gRPC port (default {DEFAULT_PORT}; 0 picks one)")
    p.add_argument("--name", help="node name (default: host name)")
    p.add_argument("--memory", type=_size, help="memory this node may use, e.g. 96GB or 512MiB")
    p.add_argument("--no-mdns", action="store_true", help="do not announce or browse over mDNS")
    p.add_argument("--secret-file", type=Path, help=secret_help)
    p.add_argument("--model", help="checkpoint directory: also run the coordinator")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="a node to include (repeat)")
    p.add_argument("--context", type=int, default=32768, help="tokens of KV cache to plan for (default 32768)")
    p.add_argument("--nodes", type=int, metavar="N",
                   help="wait for N nodes (this one included) before planning; default: as soon as the model fits")
    p.add_argument("--api-port", type=int, help="also serve the OpenAI-compatible API on this port (0 picks one)")
    p.add_argument("--api-host", default="127.0.0.1", help="address of the API (default 127.0.0.1)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every API request")
    p.add_argument("--api-allow-no-key", action="store_true",
                   help="serve the API on a non-loopback address without a key (anyone there can use it)")
    p.add_argument("--session-ttl", type=float, default=600.0, help="free idle sessions after this many seconds")
    p.set_defaults(func=cmd_up)

    for command, func, what in (("chat", cmd_chat, "chat with the cluster"), ("map", cmd_map, "memory map")):
        p = sub.add_parser(command, help=what)
        p.add_argument("--coordinator", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT")
        p.add_argument("--secret-file", type=Path, help=secret_help)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)
        if command == "chat":
            p.add_argument("--prompt", help="send one message and exit (default: an interactive chat)")
            add_chat_arguments(p)
            p.add_argument("--max-tokens", type=int, default=256)
            p.add_argument("--temperature", type=float, default=0.0)
            p.add_argument("--top-p", type=float, default=0.0)
            p.add_argument("--top-k", type=int, default=0)
            p.add_argument("--min-p", type=float, default=0.0)
            p.add_argument("--seed", type=int)
            p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole reply")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, AuthError, ValueError) as e:
        fail(str(e))
    except grpc.RpcError as e:
        fail(f"{e.code().name}: {e.details()}", code=1)
