"""Slices over the cluster's own channel: serve the parts this node holds, fetch the ones it lacks.

A node loads a slice from a whole checkpoint it holds (`--model`, `--model-dir`), else from its
cache, after fetching the parts the cache lacks from the nodes the coordinator names as sources:
fastest answer first. Where several sources hold a part, each sends a different share of its chunks
at once; every chunk is checked against the manifest of the first source before it is written at
its place in the part's file. A part cut short resumes with the chunks it lacks; a chunk that fails
its sha256 is fetched again from another source when one holds it, and failing twice stops the load
with the reason.
"""

import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from mlx_kimi.checkpoint import Checkpoint, CheckpointError
from mlx_kimi.slice_cache import CHUNK_BYTES, PartManifest, SliceCache, checkpoint_part, local_part, slice_parts

from .generated import kimi_cluster_pb2 as pb
from .generated import kimi_cluster_pb2_grpc as pb_grpc
from .wire import decode_chunk, encode_chunk, open_channel

log = logging.getLogger("kimi_cluster.transfer")

PARALLEL_PARTS = 4          # parts received at once
MANIFEST_TIMEOUT_S = 600.0  # a source hashes the parts it serves from a whole checkpoint
PART_TIMEOUT_S = 3600.0
MAX_BAD_CHUNKS = 2          # the same chunk failing its sha256 this often stops the transfer


SLICES = pb.DESCRIPTOR.services_by_name["Slices"].full_name

# The status of a Load that failed because the node cannot receive its slice (disk full, a chunk
# failing its sha256 twice, no source holding a part): the cluster waits for that node.
CANNOT_RECEIVE = grpc.StatusCode.DATA_LOSS


class TransferError(Exception):
    """This node cannot receive its slice; the message says why and what to do."""


def manifest_to_pb(m: PartManifest) -> pb.PartManifest:
    return pb.PartManifest(
        name=m.name, chunk_bytes=m.chunk_bytes, chunk_sha256=[bytes.fromhex(c) for c in m.chunks],
        tensors=[pb.TensorEntry(name=n, dtype=d, shape=list(s)) for n, d, s in m.tensors],
    )


def manifest_from_pb(m: pb.PartManifest) -> PartManifest:
    manifest = PartManifest(m.name, tuple((t.name, t.dtype, tuple(t.shape)) for t in m.tensors),
                            m.chunk_bytes, tuple(c.hex() for c in m.chunk_sha256))
    manifest.check()
    return manifest


class SliceStore:
    """What this node holds of models: whole checkpoints, directories with some of a checkpoint's
    shards (`local_dirs`), and its cache; with `download_repo`, the Hugging Face repo it may fetch
    its slice's shards from. Parts of a whole checkpoint are hashed once, when first asked for."""

    def __init__(self, cache: SliceCache, checkpoints=(), chunk_bytes: int = CHUNK_BYTES, local_dirs=(),
                 download_repo: str | None = None):
        self.cache, self.chunk_bytes = cache, chunk_bytes
        self.checkpoints = {c.model_id: c for c in checkpoints}
        self.local_dirs, self.download_repo = list(local_dirs), download_repo
        self._readers = {}
        self._lock = threading.Lock()

    def whole(self, model_id: str) -> Checkpoint | None:
        return self.checkpoints.get(model_id)

    def reader(self, model_id: str, name: str):
        """A PartReader for a part this node can serve, or None."""
        checkpoint = self.checkpoints.get(model_id)
        if checkpoint is None:
            return self.cache.reader(model_id, name)
        with self._lock:
            key = (model_id, name)
            if key not in self._readers:
                self._readers[key] = checkpoint_part(checkpoint, name, self.chunk_bytes)
            return self._readers[key]

    def config(self, model_id: str) -> tuple:
        """(model name, config) of a model this node holds in any form, or None."""
        if checkpoint := self.checkpoints.get(model_id):
            return checkpoint.name, checkpoint.config
        path = self.cache.model_dir(model_id)
        if (path / "config.json").exists():
            return path.name, json.loads((path / "config.json").read_text())
        return None


class SlicesService(pb_grpc.SlicesServicer):
    def __init__(self, store: SliceStore):
        self.store = store

    def Manifest(self, request, context):
        held = self.store.config(request.model_id)
        if held is None:
            return pb.ManifestReply()
        reply = pb.ManifestReply(model_id=request.model_id, model_name=held[0], config_json=json.dumps(held[1]))
        for name in request.parts:
            try:
                reader = self.store.reader(request.model_id, name)
            except CheckpointError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            if reader is not None:
                reply.parts.append(manifest_to_pb(reader.manifest))
        return reply

    def FetchPart(self, request, context):
        reader = self.store.reader(request.model_id, request.part)
        if reader is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"part {request.part} of model {request.model_id[:16]} is not here")
        # One chunk at a time: the generator is resumed only when gRPC has room to send.
        end = request.end_chunk or len(reader.manifest.chunks)
        for index in range(request.first_chunk, min(end, len(reader.manifest.chunks))):
            yield encode_chunk(index, reader.chunk(index))


def add_slices_service(server: grpc.Server, store: SliceStore) -> None:
    """Serve the Slices service: as the generated code would, except that FetchPart's chunks go out
    as encode_chunk made them (protobuf would copy each 4 MiB chunk twice more)."""
    service = SlicesService(store)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SLICES, {
        "Manifest": grpc.unary_unary_rpc_method_handler(service.Manifest, pb.ManifestRequest.FromString,
                                                        pb.ManifestReply.SerializeToString),
        "FetchPart": grpc.unary_stream_rpc_method_handler(service.FetchPart, pb.FetchPartRequest.FromString),
    }),))


@dataclass
class Source:
    address: str
    channel: grpc.Channel
    rtt_s: float = 0.0
    parts: dict = field(default_factory=dict)  # part name -> PartManifest

    def __post_init__(self):
        self.stub = pb_grpc.SlicesStub(self.channel)
        # FetchPart's replies as they arrive, for decode_chunk (no PartChunk copy of each chunk)
        self.fetch_part = self.channel.unary_stream(f"/{SLICES}/FetchPart",
                                                    request_serializer=pb.FetchPartRequest.SerializeToString)


@dataclass
class Received:
    """What a load took from where (shown in the map)."""

    source: str
    received_bytes: int = 0


@dataclass
class Receiving:
    """A slice whose missing parts arrive in the background: `checkpoint` names every part already;
    ready(file) returns once that file's part is verified and in place, result() once all are."""

    checkpoint: Checkpoint
    jobs: dict          # file name -> the Future of its part
    received: Callable  # -> Received, once every part is in place

    def ready(self, file: str) -> None:
        if job := self.jobs.get(file):
            self._wait(job)

    def finished(self) -> bool:
        return all(job.done() for job in self.jobs.values())

    def result(self) -> Received:
        for job in self.jobs.values():
            self._wait(job)
        return self.received()

    def _wait(self, job):
        try:
            job.result()
        except BaseException:
            for other in self.jobs.values():  # the load fails: parts not yet begun are not fetched
                other.cancel()
            raise


class SliceFetcher:
    """Finds or fetches the parts of one slice into the cache (one per load)."""

    def __init__(self, store: SliceStore, secret: bytes, progress=None, max_rate: float = 0.0):
        self.store, self.secret = store, secret
        self.progress = progress or (lambda done, total: None)
        self.max_rate = max_rate  # bytes/s over all parts, 0 for no limit
        self.received = 0
        self.received_from = {}  # source address -> bytes it sent
        self._done = self._total = 0
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def checkpoint(self, model_id: str, start: int, end: int, sources: list, in_memory: tuple = ()) -> tuple:
        """(Checkpoint holding at least layers [start, end), Received), once every part is in place."""
        receiving = self.receive(model_id, start, end, sources, in_memory)
        return receiving.checkpoint, receiving.result()

    def receive(self, model_id: str, start: int, end: int, sources: list, in_memory: tuple = ()) -> "Receiving":
        """Start receiving the parts of layers [start, end) this node lacks; they arrive in the
        background, in pipeline order, while the returned Receiving's checkpoint is loaded.
        `in_memory`: the (start, end) this node holds in memory already; their cached parts are not
        checked again (they are not read)."""
        if whole := self.store.whole(model_id):
            return Receiving(whole, {}, lambda: Received(f"read from {whole.path}"))
        cache = self.store.cache
        sources = [Source(a, open_channel(a, self.secret)) for a in sources]
        if self.store.config(model_id) is None:
            self._add_model(model_id, sources)
        path = cache.model_dir(model_id)
        config = json.loads((path / "config.json").read_text())
        text = config.get("text_config", config) if config.get("model_type") == "kimi_k25" else config
        if not 0 <= start < end <= text["num_hidden_layers"]:
            raise ValueError(f"layers [{start}, {end}) are not a slice of model {model_id[:16]}, which has "
                             f"{text['num_hidden_layers']} layers")
        names = slice_parts(start, end, text["num_hidden_layers"])
        resident = set(slice_parts(*in_memory, text["num_hidden_layers"])) if in_memory else set()
        missing = []
        for name in names:
            if cache.manifest(model_id, name) is None:
                missing.append(name)
            elif name not in resident and (why := cache.verify(model_id, name)):
                log.warning("cached part %s is corrupt (%s); fetching it again", name, why)
                cache.remove_part(model_id, name)
                missing.append(name)
        held = [n for n in names if n not in missing]
        if missing and self.store.download_repo:
            from .weights_cli import download  # the shards of this slice, into the Hugging Face cache

            path = download(self.store.download_repo, (start, end))
            if path not in self.store.local_dirs:
                self.store.local_dirs.append(path)
        copied, jobs, manifests = self._fetch(model_id, missing, sources, held) if missing else ({}, {}, {})

        def received() -> Received:
            origins = [f"read {n} part{'s' * (n != 1)} from {d}" for d, n in copied.items()]
            if self.received_from:
                origins.append(f"received from {', '.join(sorted(self.received_from))}")
            return Received("; ".join(origins) or "from its cache", self.received)

        return Receiving(cache.checkpoint(model_id, names, manifests),
                         {manifests[n].file: job for n, job in jobs.items()}, received)

    def _add_model(self, model_id: str, sources: list):
        for source in sources:
            try:
                reply = source.stub.Manifest(pb.ManifestRequest(model_id=model_id), timeout=MANIFEST_TIMEOUT_S)
            except grpc.RpcError as e:
                log.warning("source %s did not answer: %s", source.address, e.details())
                continue
            if reply.model_id == model_id:
                self.store.cache.add_model(model_id, reply.model_name, json.loads(reply.config_json))
                return
        raise TransferError(f"no source holds model {model_id[:16]} (asked {', '.join(s.address for s in sources) or 'none'}); "
                            "start a node that holds the checkpoint (--model or --model-dir)")

    def _ask(self, model_id: str, missing: list, sources: list) -> dict:
        """part -> the sources that hold it, fastest first; every source's manifest must agree
        with the first source's."""
        request = pb.ManifestRequest(model_id=model_id, parts=missing)
        for source in sources:
            began = time.monotonic()
            try:
                reply = source.stub.Manifest(request, timeout=MANIFEST_TIMEOUT_S)
            except grpc.RpcError as e:
                log.warning("source %s did not answer: %s", source.address, e.details())
                continue
            source.rtt_s = time.monotonic() - began
            source.parts = {m.name: manifest_from_pb(m) for m in reply.parts}
        holders = {}
        for name in missing:
            having = [s for s in sources if name in s.parts]
            agreed = [s for s in having if s.parts[name] == having[0].parts[name]]
            holders[name] = sorted(agreed, key=lambda s: s.rtt_s)
        return holders

    def _fetch(self, model_id: str, missing: list, sources: list, held: list):
        holders = self._ask(model_id, missing, sources)
        if lacking := [n for n in missing if not holders[n]]:
            raise TransferError(f"no source holds {', '.join(lacking)} of model {model_id[:16]} "
                                f"(asked {', '.join(s.address for s in sources) or 'none'})")
        manifests = {n: holders[n][0].parts[n] for n in missing}
        cache = self.store.cache
        need = sum(len(m.header()) + m.data_bytes for m in manifests.values())
        free = shutil.disk_usage(cache.model_dir(model_id)).free
        if free < need:
            raise TransferError(f"disk full: the slice needs {need:,} bytes in {cache.root} and only {free:,} are free; "
                                "free space there or start the node with another --cache-dir")
        held_bytes = sum(cache.manifest(model_id, n).data_bytes for n in held)
        self._total = held_bytes + sum(m.data_bytes for m in manifests.values())
        self._done = held_bytes
        self.progress(self._done, self._total)
        copied = {}
        for name in list(missing):
            if directory := self._copy_local(model_id, manifests[name]):
                copied[directory] = copied.get(directory, 0) + 1
                missing = [n for n in missing if n != name]
        # In pipeline order, so the first parts are in place (and loading) while the last arrive.
        pool = ThreadPoolExecutor(max_workers=PARALLEL_PARTS, thread_name_prefix="fetch")
        jobs = {name: pool.submit(self.fetch_part, model_id, manifests[name], holders[name]) for name in missing}
        pool.shutdown(wait=False)
        return copied, jobs, manifests

    def _copy_local(self, model_id: str, manifest: PartManifest):
        """Take a part from a local directory holding its tensors, when every chunk matches the
        source's manifest; returns that directory, or None (then it travels over the network)."""
        for directory in self.store.local_dirs:
            reader = local_part(directory, manifest)
            if reader is None:
                continue
            with self.store.cache.receiving(model_id, manifest) as writer:
                for index in list(writer.missing):
                    if not writer.write(index, reader.chunk(index)):
                        log.warning("%s in %s differs from the coordinator's (chunk %d); receiving it instead",
                                    manifest.name, directory, index)
                        break
                    self._count(manifest.chunk_span(index)[1] - manifest.chunk_span(index)[0], 0)
                if writer.done:
                    writer.complete()
                    return directory
        return None

    def fetch_part(self, model_id: str, manifest: PartManifest, order: list):
        """Receive one part into the cache from the sources in `order`, each sending a different share
        of the chunks it lacks at once; a source that failed or sent a bad chunk is asked again only
        when no other is left."""
        bad = {}       # chunk index -> sources whose copy failed its sha256
        failed = {}    # source address -> its failures on this part
        errors = []
        with self.store.cache.receiving(model_id, manifest) as writer:
            self._count(writer.verified_bytes(), 0)
            while not writer.done:
                usable = [s for s in order if failed.get(s.address, 0) < MAX_BAD_CHUNKS]
                if not usable:
                    raise TransferError(f"cannot receive {manifest.name}: {'; '.join(errors)}")
                senders = [s for s in usable if s.address not in failed] or usable
                shares = _shares(writer.missing, len(senders))
                stop = threading.Event()  # a chunk failed twice: the other shares stop too
                with ThreadPoolExecutor(max_workers=len(shares), thread_name_prefix="share") as pool:
                    jobs = [pool.submit(self._receive, model_id, writer, source, share, bad, errors, stop)
                            for source, share in zip(senders, shares)]
                    for source, job in zip(senders, jobs):
                        if not job.result():
                            failed[source.address] = failed.get(source.address, 0) + 1
            writer.complete()
        log.info("received %s (%d bytes)", manifest.name, manifest.data_bytes)

    def _receive(self, model_id: str, writer, source: Source, share: list, bad: dict, errors: list,
                 stop: threading.Event) -> bool:
        """Chunks `share` of a part from `source` into `writer`; False when the source failed or
        sent a chunk that fails its sha256."""
        name = writer.manifest.name
        for first, end in _runs(share):
            request = pb.FetchPartRequest(model_id=model_id, part=name, first_chunk=first, end_chunk=end)
            call = source.fetch_part(request, timeout=PART_TIMEOUT_S)
            try:
                for raw in call:
                    if stop.is_set():
                        call.cancel()
                        return True
                    index, data = decode_chunk(raw)
                    self._count(0, len(data), source.address)
                    self._pace()
                    if writer.write(index, data):
                        self._count(len(data), 0)
                        continue
                    with self._lock:
                        sent_bad = bad.setdefault(index, [])
                        sent_bad.append(source.address)
                    log.warning("chunk %d of %s from %s fails its sha256; fetching it again",
                                index, name, source.address)
                    call.cancel()
                    if len(sent_bad) >= MAX_BAD_CHUNKS:
                        stop.set()
                        raise TransferError(f"checksum mismatch twice: chunk {index} of {name} "
                                            f"(from {', '.join(sent_bad)}) does not match its manifest")
                    return False
            except grpc.RpcError as e:
                errors.append(f"{source.address}: {e.details()}")
                log.warning("fetching %s from %s failed: %s", name, source.address, e.details())
                return False
        if short := [i for i in share if i in writer.missing]:
            errors.append(f"{source.address}: ended its stream {len(short)} chunks short")
            return False
        return True

    def _count(self, verified: int, received: int, source: str = ""):
        with self._lock:
            self.received += received
            if received:
                self.received_from[source] = self.received_from.get(source, 0) + received
            self._done += verified
            done, total = self._done, self._total
        if verified:
            self.progress(done, total)

    def _pace(self):
        if self.max_rate:
            ahead = self.received / self.max_rate - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)  # hold the link to --max-transfer-rate


def _shares(chunks: list, n: int) -> list:
    """`chunks` (ascending) cut into `n` consecutive shares as even as can be (no empty one)."""
    n = min(n, len(chunks))
    return [chunks[len(chunks) * i // n:len(chunks) * (i + 1) // n] for i in range(n)]


def _runs(chunks: list) -> list:
    """Ascending chunk indices as [first, end) runs of consecutive ones (one request each)."""
    runs = []
    for index in chunks:
        if runs and runs[-1][1] == index:
            runs[-1][1] += 1
        else:
            runs.append([index, index + 1])
    return runs
