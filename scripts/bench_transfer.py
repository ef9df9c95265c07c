#!/usr/bin/env python3
"""Slice transfer throughput on loopback against a plain file copy of the same bytes.

    python scripts/bench_transfer.py            # about 200 MB of weights, 3 rounds
    python scripts/bench_transfer.py --quick    # about 50 MB, 1 round

What it measures, on one generated Kimi-architecture checkpoint (mlx_kimi/tiny.py, widened):

  1. transfer: a node's SliceFetcher (cluster/transfer.py) receiving every part of the model from a
     Slices service in this process over the cluster's mutual-TLS gRPC channel on 127.0.0.1: chunks
     streamed with flow control, each checked against its sha256, written and fsynced into an empty
     slice cache. The source hashed its parts once before timing (a coordinator does that once per
     part and keeps the manifests).
  2. plain copy: shutil.copyfile of the checkpoint's shard files (the same bytes plus their
     headers) into an empty directory, fsynced, on the same disk.
Both read sources that are in the page cache (each round reads them first). The rounds alternate
the order; the ratio is the median over rounds of transfer MB/s / copy MB/s.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.generated import kimi_cluster_pb2_grpc as pb_grpc  # noqa: E402
from cluster.transfer import SliceFetcher, SliceStore, SlicesService  # noqa: E402
from cluster.wire import make_server  # noqa: E402
from mlx_kimi.checkpoint import open_checkpoint  # noqa: E402
from mlx_kimi.slice_cache import SliceCache, slice_parts  # noqa: E402
from mlx_kimi.tiny import TinyShape, make_tiny  # noqa: E402

SECRET = bytes.fromhex("7e" * 32)


def _read(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def time_transfer(checkpoint, address: str, work: Path) -> float:
    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    fetcher = SliceFetcher(SliceStore(SliceCache(cache_dir)), SECRET)
    began = time.perf_counter()
    fetcher.checkpoint(checkpoint.model_id, 0, checkpoint.num_layers, [address])
    return time.perf_counter() - began


def time_copy(shards: list, work: Path) -> float:
    out = work / "copy"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    began = time.perf_counter()
    for shard in shards:
        shutil.copyfile(shard, out / shard.name)
        with open(out / shard.name, "rb") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - began


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, help="rounds of both measurements (default 3, 1 with --quick)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = TinyShape(layers=8 if args.quick else 16, hidden_size=1024, intermediate_size=2048,
                          moe_intermediate_size=512, routed_experts=16 if args.quick else 32, vocab_size=4096)
        checkpoint = open_checkpoint(make_tiny(work / "model", shape, model_type="deepseek_v3"))
        shards = sorted(checkpoint.path.glob("*.safetensors"))
        data = sum(t.nbytes for t in checkpoint.tensors.values())
        store = SliceStore(SliceCache(work / "source-cache"), [checkpoint])
        server, port = make_server("127.0.0.1", 0, SECRET, "source")
        pb_grpc.add_SlicesServicer_to_server(SlicesService(store), server)
        server.start()
        for name in slice_parts(0, checkpoint.num_layers, checkpoint.num_layers):
            store.reader(checkpoint.model_id, name)  # the source's manifests, hashed once
        print(f"model: {len(shards)} shards, {data / 1e6:.1f} MB of tensors, {checkpoint.num_layers} layers")
        ratios = []
        for r in range(rounds):
            _read(shards)
            order = ("transfer", "copy") if r % 2 == 0 else ("copy", "transfer")
            took = {}
            for what in order:
                took[what] = (time_transfer(checkpoint, f"127.0.0.1:{port}", work) if what == "transfer"
                              else time_copy(shards, work))
            t_rate, c_rate = data / took["transfer"] / 1e6, data / took["copy"] / 1e6
            ratios.append(t_rate / c_rate)
            print(f"round {r + 1}: transfer {t_rate:8.1f} MB/s   plain copy {c_rate:8.1f} MB/s   "
                  f"ratio {t_rate / c_rate:.3f}")
        server.stop(0)
        print(f"median ratio transfer / plain copy: {statistics.median(ratios):.3f} over {rounds} round(s)")


if __name__ == "__main__":
    main()
