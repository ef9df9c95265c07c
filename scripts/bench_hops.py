"""The cost of one hop, measured for scripts/bench_pipeline.py (item 4 of its docstring, shown by its
--help, says what each row is): round trips of one Kimi-wide bf16 hidden state to a node of a running
cluster on its ForwardStream, back to back, after idle and after spinning; the in-process pieces of a
hop (encode, decode, check, the compute thread's hand-off); and the bare ForwardStream round trip to a
server that answers at once, plaintext and mutual TLS, in this process and in one of its own (this
file run with `--answer SECRET`). report_hop prints the table and returns the summary's hop parts."""

import os
import statistics
import subprocess
import sys
import time

# bench_common first: it puts the repository and tests/ on sys.path
from bench_common import console, on_vm, pct, verdict

import grpc
import mlx.core as mx
from rich.table import Table

import harness  # tests/harness.py (bench_common tracks the processes it starts)
from cluster.compute import ComputeWorker
from cluster.generated import kimi_cluster_pb2 as pb
from cluster.generated import kimi_cluster_pb2_grpc as pb_grpc
from cluster.link import ForwardLink, StageError
from cluster.wire import (CHANNEL_OPTIONS, check_tensor, decode_tensor, encode_tensor, make_server,
                          node_stub, open_channel)

TARGET_HOP_US = 500.0
TARGET_IDLE_HOP_US = 400.0  # issue 13: a hop after the stage sat idle for one token's compute
TARGET_BARE_RATIO = 1.25  # issue 19: the per-hop estimates against the bare ForwardStream round trip (echo_tls)
KIMI_HIDDEN = 7168


def busy_wait(seconds: float):
    """Wait actively: spin, yielding the core to any other runnable thread, instead of sleeping."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        os.sched_yield()


def time_calls(fn, calls: int, warmup: int, idle_s: float = 0.0, spin: bool = False) -> list:
    """µs per call; with idle_s, this process sleeps that long before each call (untimed), or
    with `spin` waits actively that long (busy_wait)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        if idle_s:
            busy_wait(idle_s) if spin else time.sleep(idle_s)
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1e3)
    return out


def measure_hop(cluster, model_hidden: int, calls: int, idle_s: float) -> dict:
    """Rows of (what, samples in µs). See scripts/bench_pipeline.py's docstring, item 4."""
    # A later stage validates the hidden state against its width and rejects ours; if this
    # model happened to be 7168 wide it would run it, so go to the first stage then (which
    # rejects a request without token ids, after parsing it).
    later = [e for e in cluster.memory_map().nodes if e.has_layers and e.start > 0]
    target = later[0] if later and model_hidden != KIMI_HIDDEN else \
        next(e for e in cluster.memory_map().nodes if e.has_layers and e.start == 0)
    channel = open_channel(target.address, cluster.secret)
    try:
        stub = node_stub(channel)
        x = mx.random.normal((1, 1, KIMI_HIDDEN)).astype(mx.bfloat16)
        mx.eval(x)
        hidden = encode_tensor(x)
        if len(hidden.data) != KIMI_HIDDEN * 2:
            raise RuntimeError(f"encoded hidden is {len(hidden.data)} bytes, expected {KIMI_HIDDEN * 2}")
        sampling = pb.SamplingParams(temperature=0.0)

        def request():
            return pb.ForwardRequest(session_id="bench-hop", offset=0, hidden=hidden, sample=True,
                                     sampling=sampling, max_positions=64)

        def accepted():
            return RuntimeError(f"node {target.name} accepted a {KIMI_HIDDEN}-wide hidden state; "
                                "the hop measurement would include model compute")

        def stream():  # the chain's data path: a message on the long-lived ForwardStream
            try:
                link.call(request(), 10.0)
            except StageError as e:
                if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                return
            raise accepted()

        def unary():
            try:
                stub.Forward(request(), timeout=10)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                return
            raise accepted()

        def health():
            stub.Health(pb.HealthRequest(), timeout=10)

        link = ForwardLink(stub, target.name, target.address)
        try:  # what the node answers, once, for the record
            link.call(request(), 10.0)
            answer = "accepted (!)"
        except StageError as e:
            answer = f"{e.code.name}: {e.message}"

        warm, idle_calls = max(50, calls // 10), max(50, calls // 5)
        rows = {"health": time_calls(health, calls, warm), "unary": time_calls(unary, calls, warm),
                "forward": time_calls(stream, calls, warm), "forward_idle": [], "forward_spin": []}
        for _ in range(idle_calls // 10):  # sleeping and spinning alternate, so drift hits both alike
            rows["forward_idle"] += time_calls(stream, 10, 2, idle_s)
            rows["forward_spin"] += time_calls(stream, 10, 2, idle_s, spin=True)
        link.close()
    finally:
        channel.close()

    def encode():
        encode_tensor(x)

    def decode():  # as Node._input: the result feeds the stage's graph, evaluated with it
        decode_tensor(hidden, (1, None, KIMI_HIDDEN))

    worker = ComputeWorker()

    def handoff():
        worker.run(lambda: None)

    def check():  # what the receiving node runs on each request: pure Python, no thread, no I/O
        check_tensor(hidden, (1, None, KIMI_HIDDEN))

    tls = measure_tls(hidden, cluster.secret, calls, idle_s)
    rows["echo_plain"], rows["echo_tls"], rows["echo_process"] = tls["plain"], tls["tls"], tls["tls_process"]
    rows["echo_tls_idle"], rows["echo_process_idle"] = tls["tls_idle"], tls["tls_process_idle"]
    rows["encode"] = time_calls(encode, calls, warm)
    rows["decode"] = time_calls(decode, calls, warm)
    rows["handoff"] = time_calls(handoff, calls, warm)
    rows["handoff_idle"] = time_calls(handoff, idle_calls, 10, idle_s)
    rows["check"] = time_calls(check, calls, warm)
    rows["check_idle"] = time_calls(check, idle_calls, 10, idle_s)
    return {"rows": rows, "target": f"{target.name} ({target.address}, layers [{target.start}, {target.end}))",
            "answer": answer}


class _Answerer(pb_grpc.NodeServicer):
    """Answers every ForwardStream request at once: the transport alone."""

    def ForwardStream(self, requests, context):
        for r in requests:
            yield pb.ForwardReply(seq=r.seq, sampled=True)


def serve_answerer(secret_hex: str):
    """`--answer SECRET`: a process of its own serving _Answerer over mutual TLS; prints its port."""
    server, port = make_server("127.0.0.1", 0, bytes.fromhex(secret_hex), "bench-answerer")
    pb_grpc.add_NodeServicer_to_server(_Answerer(), server)
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def measure_tls(hidden: pb.Tensor, secret: bytes, calls: int, idle_s: float) -> dict:
    """µs per ForwardStream round trip of `hidden` to an in-process server, plaintext and mutual TLS,
    and over mutual TLS to the same server in a process of its own (a node is one), measured in
    alternating batches so drift hits all alike; then both TLS ones with this process idle `idle_s`
    before each call (`tls_idle`, `tls_process_idle`: the bare round trip the after-idle estimate is
    held against). See scripts/bench_pipeline.py's docstring, item 4d."""
    from concurrent.futures import ThreadPoolExecutor

    plain_server = grpc.server(ThreadPoolExecutor(4))
    plain_port = plain_server.add_insecure_port("127.0.0.1:0")
    tls_server, tls_port = make_server("127.0.0.1", 0, secret, "bench-answerer")
    answerer = harness.subprocess.Popen([sys.executable, __file__, "--answer", secret.hex()],
                                        stdout=subprocess.PIPE, text=True)
    process_port = int(answerer.stdout.readline())
    channels = {"plain": grpc.insecure_channel(f"127.0.0.1:{plain_port}", options=CHANNEL_OPTIONS),
                "tls": open_channel(f"127.0.0.1:{tls_port}", secret),
                "tls_process": open_channel(f"127.0.0.1:{process_port}", secret)}
    links, rows = {}, {kind: [] for kind in [*channels, "tls_idle", "tls_process_idle"]}
    try:
        for server in (plain_server, tls_server):
            pb_grpc.add_NodeServicer_to_server(_Answerer(), server)
            server.start()
        for kind, channel in channels.items():
            links[kind] = ForwardLink(node_stub(channel), kind, kind)
        batch = 100
        for _ in range(max(1, calls // batch)):
            for kind, link in links.items():
                rows[kind] += time_calls(lambda: link.call(pb.ForwardRequest(hidden=hidden), 10.0), batch, 10)
        for _ in range(max(5, calls // 50)):
            for kind in ("tls", "tls_process"):
                rows[f"{kind}_idle"] += time_calls(lambda: links[kind].call(pb.ForwardRequest(hidden=hidden), 10.0),
                                                   10, 2, idle_s)
    finally:
        for link in links.values():
            link.close()
        for channel in channels.values():
            channel.close()
        plain_server.stop(None)
        tls_server.stop(None)
        answerer.kill()
        answerer.wait()
    return rows


def report_hop(hop: dict, idle_s: float, in_situ_us: float, rounds: int) -> list:
    """Prints the one-hop table and what idle does to it; returns the SUMMARY line's hop parts.
    in_situ_us: the pipelines' median per-token time of 3-stage minus 2-stage, over `rounds`."""
    rows = hop["rows"]
    med = {k: statistics.median(v) for k, v in rows.items()}
    extra = ["forward", "encode", "decode", "handoff"]
    hop_us = sum(med[k] for k in extra)
    # After idle, the hop's round trip and the compute thread's wake-up both run on a CPU that did
    # something else: each is measured so, and the sum held against the bare round trip after idle.
    hop_idle_us = hop_us - med["forward"] - med["handoff"] + med["forward_idle"] + med["handoff_idle"]
    table = Table(title=f"One hop: one bf16 token of width {KIMI_HIDDEN} ({KIMI_HIDDEN * 2:,}-byte hidden state)",
               title_justify="left")
    for col, just in [("what", "left"), ("calls", "right"), ("median µs", "right"), ("p90 µs", "right"),
                      ("in estimate", "left")]:
        table.add_column(col, justify=just)
    labels = {
        "health": "Node.Health round trip, empty (floor of any unary gRPC call over mutual TLS)",
        "unary": "a unary Node.Forward call carrying it (a new call per token on the open connection)",
        "forward": "round trip of one request carrying the hidden state on the stage's long-lived\n"
                   "ForwardStream (cluster.link.ForwardLink, as Node._call_next sends it), back to back:\n"
                   "sent, parsed, validated by check_tensor, rejected, the reply matched by seq",
        "forward_idle": f"the same round trip after {idle_s * 1e3:.1f} ms idle before each call (what a stage of\n"
                        "a 2-stage pipeline waits while the other computes)",
        "forward_spin": f"the same after {idle_s * 1e3:.1f} ms of waiting actively instead (spinning with\n"
                        "sched_yield, as a stage that expects its next message soon could)",
        "check": "check_tensor of the hidden state (the receiver's validation: pure Python), in process",
        "check_idle": f"the same after {idle_s * 1e3:.1f} ms idle before each call",
        "handoff_idle": f"hand-off to the compute thread and back after {idle_s * 1e3:.1f} ms idle",
        "encode": "encode_tensor (sender), in process",
        "decode": "decode_tensor (receiver; its bf16 view is evaluated with the stage's graph), in process",
        "handoff": "hand-off to the node's MLX compute thread and back (ComputeWorker.run), in process",
        "echo_plain": "ForwardStream round trip to an in-process server that answers at once: plaintext",
        "echo_tls": "the same over the cluster's mutual TLS (what every real hop uses): the bare round trip",
        "echo_process": "the same with that server in a process of its own (as every node is)",
        "echo_tls_idle": f"the bare round trip (in-process server, mutual TLS) after {idle_s * 1e3:.1f} ms idle",
        "echo_process_idle": f"the same to the server in a process of its own after {idle_s * 1e3:.1f} ms idle",
    }
    used = {"forward": "yes", "encode": "yes", "decode": "yes", "handoff": "yes", "forward_idle": "idle est.",
            "handoff_idle": "idle est."}
    for k in ("health", "unary", "forward", "forward_idle", "forward_spin", "encode", "decode", "handoff",
              "handoff_idle", "check", "check_idle", "echo_plain", "echo_tls", "echo_process", "echo_tls_idle",
              "echo_process_idle"):
        table.add_row(labels[k], str(len(rows[k])), f"{med[k]:.1f}", f"{pct(rows[k], 0.9):.1f}", used.get(k, "no"))
    tls_us = med["echo_tls"] - med["echo_plain"]
    table.add_row("TLS cost per hop (median TLS minus median plaintext; included in the Forward rows)", "",
               f"{tls_us:.1f}", "", "no")
    bare, apart = med["echo_tls"], med["echo_process"]
    bare_idle, apart_idle = med["echo_tls_idle"], med["echo_process_idle"]
    table.add_row("[bold]per-hop overhead estimate, back to back (sum of the medians marked yes)", "",
               f"[bold]{hop_us:.1f}", f"{hop_us / bare:.2f}x bare", "")
    table.add_row("per-hop overhead estimate after idle (Forward and hand-off after idle + encode + decode)", "",
               f"{hop_idle_us:.1f}", f"{hop_idle_us / bare_idle:.2f}x bare after idle", "")
    table.add_row("in the pipelines above: median per-token time of 3-stage minus 2-stage (one more hop,\n"
               "plus any compute the finer split costs; noisy)", str(rounds), f"{in_situ_us:.1f}", "", "no")
    console.print(table)
    console.print(f"hop target node: {hop['target']}; it answered: {hop['answer']}", highlight=False)
    console.print(
        f"[bold]after idle[/], on this machine ({os.cpu_count()} CPU cores{', a virtual machine' if on_vm() else ''}, "
        f"shared by every process here): the round trip grows from {med['forward']:.0f} to "
        f"{med['forward_idle']:.0f} µs "
        f"({med['forward_idle'] / med['forward']:.1f}x), and so do the in-process pieces with no network and no thread "
        f"between them (check_tensor {med['check']:.0f} -> {med['check_idle']:.0f} µs, hand-off {med['handoff']:.0f} "
        f"-> {med['handoff_idle']:.0f} µs): the path itself runs slower after the CPU did something else, it is not "
        f"a waiting thread being slow to wake. Waiting actively instead of sleeping does not help here "
        f"({med['forward_spin']:.0f} µs spinning vs {med['forward_idle']:.0f} µs sleeping), so kimi-cluster's "
        "stages block rather than spin (a spin would also take the core the computing stage needs). "
        f"A bare round trip with nothing of a stage in it grows too ({bare:.0f} -> {bare_idle:.0f} µs in process, "
        f"{apart:.0f} -> {apart_idle:.0f} µs to another process): the after-idle estimate is held against that.",
        highlight=False)
    return [
        f"mutual TLS adds {tls_us:.0f} µs per hop ({med['echo_plain']:.0f} -> {med['echo_tls']:.0f} µs)",
        f"per-hop overhead {hop_us / bare:.2f}x of the bare ForwardStream round trip back to back "
        f"({bare:.0f} µs) and {hop_idle_us / bare_idle:.2f}x of it after idle ({bare_idle:.0f} µs; "
        f"target <= {TARGET_BARE_RATIO}x: "
        f"{verdict(max(hop_us / bare, hop_idle_us / bare_idle) <= TARGET_BARE_RATIO)}; against the back-to-back "
        f"round trip the after-idle estimate is {hop_idle_us / bare:.2f}x), {hop_us / apart:.2f}x and "
        f"{hop_idle_us / apart_idle:.2f}x of that round trip to another process ({apart:.0f} and {apart_idle:.0f} µs)",
        f"per-hop overhead {hop_us:.0f} µs back to back (target <= {TARGET_HOP_US:.0f} µs: "
        f"{verdict(hop_us <= TARGET_HOP_US)}), {hop_idle_us:.0f} µs after idle (target <= "
        f"{TARGET_IDLE_HOP_US:.0f} µs: {verdict(hop_idle_us <= TARGET_IDLE_HOP_US)}), "
        f"{hop_us - med['forward'] + med['forward_spin']:.0f} µs after waiting actively",
    ]


if __name__ == "__main__":
    if sys.argv[1:2] != ["--answer"] or len(sys.argv) != 3:
        raise SystemExit("bench_hops.py only runs as bench_pipeline's answerer process (--answer SECRET_HEX); "
                         "to measure a hop, run: python scripts/bench_pipeline.py")
    serve_answerer(sys.argv[2])
