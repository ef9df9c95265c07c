"""The commands that talk to a running cluster: `kimi-cluster chat`, `map`, `status`, `stop` and `node remove`."""

import json
import os
import signal
import sys
from pathlib import Path

import grpc
from rich.console import Console

from . import client
from .auth import AuthError
from .chat import add_arguments as add_chat_arguments, run_from_args, session_from_args
from .cli_args import SECRET_HELP, console, fail
from .client import DEFAULT_PORT
from .units import format_bytes


def _connect(args):
    cluster_secret = client.secret(args.secret_file)
    return client.connect(client.find_coordinator(args.coordinator, cluster_secret, args.host), cluster_secret)


def _sampling(args):
    return client.sampling(args.temperature, args.top_p, args.top_k, args.min_p, args.seed)


def cmd_chat(args) -> None:
    if args.prompt is None:
        if args.json:
            fail("--json needs --prompt")
        return run_from_args(args, _connect(args), _sampling(args))

    stub = _connect(args)
    session = session_from_args(args)
    session.messages.append({"role": "user", "content": args.prompt})  # as typed, even if it starts with "/"
    request = session.request(_sampling(args), args.max_tokens)
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
        cluster_secret = client.secret(args.secret_file)
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


def add_client_parsers(sub) -> None:
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
        p.add_argument("--secret-file", type=Path, help=SECRET_HELP)
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
