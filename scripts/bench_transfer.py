#!/usr/bin/env python3
"""Slice transfer throughput and time-to-ready on loopback against a plain file copy of the same bytes.

    python scripts/bench_transfer.py              # about 300 MB of weights, 3 rounds
    python scripts/bench_transfer.py --quick      # about 80 MB, 1 round
    python scripts/bench_transfer.py --plaintext  # also a control run without TLS (bench only)
    python scripts/bench_transfer.py --bare       # also a bare TLS socket doing the same checks

What it measures, on one generated Kimi-architecture checkpoint (mlx_kimi/tiny.py, widened), with
every source a Slices service in its own process (another node) on 127.0.0.1:

  1. plain copy: shutil.copyfile of the checkpoint's shard files (the same bytes plus their headers)
     into an empty directory, fsynced, on the same disk.
  2. transfer: a node's SliceFetcher (cluster/transfer.py) receiving every part of the model over the
     cluster's mutual-TLS channel into an empty slice cache: each chunk checked against its sha256
     before it is written, every part fsynced. `1 source`, then `2 sources` holding the model, each
     sending a different share of every part's chunks at once.
  3. time-to-ready: receiving the slice from one source while load_slice reads each part as soon as
     it is in place (what a node's Load does), against receiving then loading one after the other.
  4. the check's floor: the same bytes read in 4 MiB chunks, each hashed with sha256 (what a receiver
     must do before it writes a chunk) and written at its place, fsynced, on as many threads as the
     transfer receives parts at once: no network, no encryption, no copy a transport makes. A
     verified transfer can hardly beat it; its ratio to the plain copy is about the most the
     transfer's could reach on this machine.
  5. with --bare, the transport's floor: the model's bytes over one bare socket with the cluster's
     mutual TLS (Python's ssl, no gRPC, no HTTP/2), each 4 MiB chunk sent with its sha256 (hashed
     before timing, as the manifests are) and checked before it is written, fsynced: what the
     transfer would reach with nothing but encryption and the check on the wire.
The sources hashed their parts once before timing (a coordinator does that once per part and keeps
the manifests), and their files are in the page cache, like the copy's (each round reads them first);
every measurement starts after os.sync(), so none pays for the writeback of the one before, and
just after twice the model's bytes were written to a scratch file and deleted (see _warm: on a VM
that hands free memory back to its host, a measurement otherwise runs fast or 3x slower by what ran
before it). The rounds alternate the order; the ratio is the median over rounds of transfer MB/s /
copy MB/s.
"""

import argparse
import hashlib
import multiprocessing
import os
import shutil
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from cluster import transfer  # noqa: E402
from cluster.identity import identity  # noqa: E402
from cluster.transfer import SliceFetcher, SliceStore, add_slices_service  # noqa: E402
from cluster.wire import CHANNEL_OPTIONS, SERVER_OPTIONS, make_server  # noqa: E402
from mlx_kimi.checkpoint import open_checkpoint  # noqa: E402
from mlx_kimi.slice import LayerRange, load_slice  # noqa: E402
from mlx_kimi.slice_cache import CHUNK_BYTES, SliceCache, slice_parts  # noqa: E402
from mlx_kimi.tiny import TinyShape, make_tiny  # noqa: E402

SECRET = bytes.fromhex("7e" * 32)


def _tls_context(server: bool, name: str) -> ssl.SSLContext:
    """The cluster's mutual TLS for a bare socket (the --bare control): `name`'s certificate, the
    cluster's CA, the peer's certificate required."""
    me = identity(SECRET, name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(me.cert_pem)
        key.write_bytes(me.key_pem)
        context.load_cert_chain(cert, key)
    context.load_verify_locations(cadata=me.ca_pem.decode())
    context.check_hostname, context.verify_mode = False, ssl.CERT_REQUIRED
    return context


_CHUNK_HEAD = struct.Struct("<I32s")  # a bare chunk's length and sha256


def _bare_source(listener: socket.socket, shards: list):
    """Sends every shard's bytes, chunk after chunk with its sha256, to each connection."""
    digests = {}
    for shard in shards:
        with open(shard, "rb") as f:
            digests[shard] = [hashlib.sha256(c).digest() for c in iter(lambda: f.read(CHUNK_BYTES), b"")]
    context, buffer = _tls_context(True, "source"), bytearray(CHUNK_BYTES)
    while True:
        with context.wrap_socket(listener.accept()[0], server_side=True) as sock:
            for shard in shards:
                with open(shard, "rb", buffering=0) as f:
                    for digest in digests[shard]:
                        n = f.readinto(buffer)
                        sock.sendall(_CHUNK_HEAD.pack(n, digest))
                        sock.sendall(memoryview(buffer)[:n])


def serve(model_dir: str, cache_dir: str, plaintext: bool, ports, conn):
    """A source node: the Slices service over a whole checkpoint, its parts hashed before it answers;
    says its CPU seconds so far each time `conn` asks, until it is told to stop."""
    checkpoint = open_checkpoint(model_dir)
    store = SliceStore(SliceCache(cache_dir), [checkpoint])
    for name in slice_parts(0, checkpoint.num_layers, checkpoint.num_layers):
        store.reader(checkpoint.model_id, name)
    servers = []
    for tls in [True] + [False] * plaintext:
        if tls:
            server, port = make_server("127.0.0.1", 0, SECRET, "source")
        else:  # the control: no TLS, never offered by the product
            server = grpc.server(ThreadPoolExecutor(max_workers=16), options=SERVER_OPTIONS)
            port = server.add_insecure_port("127.0.0.1:0")
        add_slices_service(server, store)
        server.start()
        servers.append(server)
        ports.put(port)
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_bare_source, args=(listener, sorted(checkpoint.path.glob("*.safetensors"))),
                     daemon=True).start()
    ports.put(listener.getsockname()[1])
    while conn.recv() == "cpu":
        conn.send(time.process_time())


def _read(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def _empty(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()  # the deletion's and the last run's writeback are not charged to the next


def _warm(work: Path, nbytes: int) -> None:
    """Write `nbytes` to a scratch file and delete it, just before a measurement. On a virtual machine
    that hands free memory back to its host (free page reporting), writing into pages freed seconds
    ago costs several times what reusing pages freed just now does (2-3 ms/MB against 0.4 on the
    2-vCPU VM): without this, whichever measurement follows a deletion is the lucky one. A Mac keeps
    its free memory, so every measurement starts with warm pages, as there."""
    block = b"\x5a" * CHUNK_BYTES
    scratch = work / "scratch"
    with open(scratch, "wb") as f:
        for _ in range(-(-nbytes // CHUNK_BYTES)):
            f.write(block)
    scratch.unlink()


def time_copy(shards: list, work: Path) -> float:
    out = work / "copy"
    out.mkdir()
    began = time.perf_counter()
    for shard in shards:
        shutil.copyfile(shard, out / shard.name)
        with open(out / shard.name, "rb") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - began


def time_floor(shards: list, work: Path) -> float:
    out = work / "copy"
    out.mkdir()
    began = time.perf_counter()
    files = {shard: (os.open(shard, os.O_RDONLY), os.open(out / shard.name, os.O_WRONLY | os.O_CREAT, 0o644))
             for shard in shards}

    def check_and_write(shard, at):  # hashlib and os.pwrite release the GIL: threads share the cores
        src, dst = files[shard]
        chunk = os.pread(src, CHUNK_BYTES, at)
        hashlib.sha256(chunk).digest()
        os.pwrite(dst, chunk, at)

    try:
        with ThreadPoolExecutor(max_workers=transfer.PARALLEL_PARTS) as pool:
            list(pool.map(lambda job: check_and_write(*job),
                          [(s, at) for s in shards for at in range(0, s.stat().st_size, CHUNK_BYTES)]))
        for _, dst in files.values():
            os.fsync(dst)
    finally:
        for fds in files.values():
            for fd in fds:
                os.close(fd)
    return time.perf_counter() - began


def time_bare(address: str, shards: list, work: Path) -> float:
    """Seconds to receive the shards over a bare mutual-TLS socket from _bare_source, each chunk
    checked against its sha256 before it is written."""
    out = work / "copy"
    out.mkdir()
    view, head = memoryview(bytearray(CHUNK_BYTES)), memoryview(bytearray(_CHUNK_HEAD.size))

    def read_exactly(sock, into):
        got = 0
        while got < len(into):
            n = sock.recv_into(into[got:])
            if not n:
                raise RuntimeError("the bare source closed early")
            got += n

    began = time.perf_counter()
    host, port = address.rsplit(":", 1)
    with _tls_context(False, "client").wrap_socket(socket.create_connection((host, int(port)))) as sock:
        for shard in shards:
            fd = os.open(out / shard.name, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                at, size = 0, shard.stat().st_size
                while at < size:
                    read_exactly(sock, head)
                    n, digest = _CHUNK_HEAD.unpack(head)
                    read_exactly(sock, view[:n])
                    if hashlib.sha256(view[:n]).digest() != digest:
                        raise RuntimeError(f"chunk at {at} of {shard.name} fails its sha256")
                    os.pwrite(fd, view[:n], at)
                    at += n
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - began


def time_transfer(model_id: str, n: int, addresses: list, work: Path, load: str = "") -> float:
    """Seconds to receive the whole model; with `load`, until its slice is also loaded, either while
    it arrives ("overlapped") or after ("after")."""
    fetcher = SliceFetcher(SliceStore(SliceCache(work / "cache")), SECRET)
    began = time.perf_counter()
    receiving = fetcher.receive(model_id, 0, n, addresses)
    if load == "overlapped":
        load_slice(receiving.checkpoint, LayerRange(0, n), ready=receiving.ready)
    receiving.result()
    if load == "after":
        load_slice(receiving.checkpoint, LayerRange(0, n))
    return time.perf_counter() - began


def plaintext_channel(address: str, secret: bytes, name: str = "client"):
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, help="rounds of every measurement (default 3, 1 with --quick)")
    parser.add_argument("--plaintext", action="store_true", help="also receive without TLS (a control)")
    parser.add_argument("--bare", action="store_true",
                        help="also receive over a bare mutual-TLS socket with the same checks (a control)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = TinyShape(layers=8 if args.quick else 16, hidden_size=1024, intermediate_size=2048,
                          moe_intermediate_size=512, routed_experts=16 if args.quick else 32, vocab_size=4096)
        checkpoint = open_checkpoint(make_tiny(work / "model", shape, model_type="deepseek_v3"))
        shards = sorted(checkpoint.path.glob("*.safetensors"))
        data = sum(t.nbytes for t in checkpoint.tensors.values())
        spawn = multiprocessing.get_context("spawn")
        ports, conns = [spawn.Queue() for _ in range(2)], [spawn.Pipe() for _ in range(2)]
        sources = [spawn.Process(target=serve, args=(str(checkpoint.path), str(work / f"source{i}"), args.plaintext,
                                                     ports[i], conns[i][1]), daemon=True) for i in range(2)]
        for source in sources:
            source.start()
        found = [[f"127.0.0.1:{q.get(timeout=600)}" for _ in range(2 + args.plaintext)] for q in ports]
        tls, plain = [f[0] for f in found], [f[1] for f in found[:1] if args.plaintext]
        bare = found[0][-1]
        print(f"model: {len(shards)} shards, {data / 1e6:.1f} MB of tensors, {checkpoint.num_layers} layers; "
              f"{os.cpu_count()} CPUs")
        n, model_id = checkpoint.num_layers, checkpoint.model_id
        runs = {"plain copy": lambda: time_copy(shards, work),
                "floor: sha256 + write": lambda: time_floor(shards, work),
                "transfer, 1 source": lambda: time_transfer(model_id, n, tls[:1], work),
                "transfer, 2 sources": lambda: time_transfer(model_id, n, tls, work),
                "ready, load overlapped": lambda: time_transfer(model_id, n, tls[:1], work, "overlapped"),
                "ready, load after": lambda: time_transfer(model_id, n, tls[:1], work, "after")}
        if plain:
            def without_tls():
                secure, transfer.open_channel = transfer.open_channel, plaintext_channel
                try:
                    return time_transfer(model_id, n, plain[:1], work)
                finally:
                    transfer.open_channel = secure
            runs["control: 1 source, no TLS"] = without_tls
        if args.bare:
            runs["control: bare TLS socket"] = lambda: time_bare(bare, shards, work)
        def cpu_s() -> float:  # this process (the receiver, gRPC's threads included) and both sources
            for conn, _ in conns:
                conn.send("cpu")
            return time.process_time() + sum(conn.recv() for conn, _ in conns)

        took = {what: [] for what in runs}
        cpu = {what: [] for what in runs}  # CPU seconds per MB, all processes together
        for r in range(rounds):
            _read(shards)
            for what in list(runs) if r % 2 == 0 else reversed(list(runs)):
                _empty(work / "copy")
                _empty(work / "cache")
                _warm(work, 2 * data)
                before = cpu_s()
                took[what].append(runs[what]())
                cpu[what].append((cpu_s() - before) / (data / 1e6))
            print(f"round {r + 1}: " + "   ".join(
                f"{what} {data / took[what][-1] / 1e6:.0f} MB/s" if "ready" not in what
                else f"{what} {took[what][-1]:.2f} s" for what in runs))
        for conn, _ in conns:
            conn.send("stop")
        for source in sources:
            source.join(timeout=10)
        copy = took["plain copy"]
        print(f"\nmedian over {rounds} round(s); CPU: ms of CPU time per MB, every process together:")
        for what in runs:
            cost = f"CPU {statistics.median(cpu[what]) * 1e3:5.2f} ms/MB"
            if what.startswith("ready"):
                print(f"  {what:<28} {statistics.median(took[what]):6.2f} s to a loaded slice   {cost}")
            elif what == "floor: sha256 + write":
                floor = statistics.median(c / t for c, t in zip(copy, took[what]))
                print(f"  {what:<28} {data / statistics.median(took[what]) / 1e6:7.1f} MB/s   {cost}   "
                      f"ratio to the plain copy {floor:.3f} (about the most a verified transfer could reach here)")
            elif what != "plain copy":
                ratio = statistics.median(c / t for c, t in zip(copy, took[what]))
                of_floor = statistics.median(f / t for f, t in zip(took["floor: sha256 + write"], took[what]))
                print(f"  {what:<28} {data / statistics.median(took[what]) / 1e6:7.1f} MB/s   {cost}   "
                      f"ratio to the plain copy {ratio:.3f}, to the floor {of_floor:.3f}")
        print(f"  {'plain copy':<28} {data / statistics.median(copy) / 1e6:7.1f} MB/s   "
              f"CPU {statistics.median(cpu['plain copy']) * 1e3:5.2f} ms/MB")
        print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
