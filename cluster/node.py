"""A node's gRPC face: who owns it, loading its slice, and the Node service's handlers.

What it runs is a stage (stage.py: sessions, the data path, the token ring) whose math runs on
the process's one compute thread (compute.py); the Forward, ForwardStream and Deliver handlers
hand their requests to it.
"""

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
import mlx.core as mx

from mlx_kimi.checkpoint import CheckpointError, text_config
from mlx_kimi.slice import LayerRange, load_slice

from . import __version__
from .compute import ComputeWorker
from .generated import kimi_cluster_pb2 as pb
from .generated import kimi_cluster_pb2_grpc as pb_grpc
from .identity import peer_name
from .link import StageError
from .machine import Machine
from .stage import MAX_CHUNK_TOKENS, LocalStage, Stage
from .transfer import CANNOT_RECEIVE, SliceFetcher, SliceStore, TransferError
from .wire import FAILED_NODE_KEY, node_stub, open_channel

log = logging.getLogger("kimi_cluster.node")

# A coordinator that owns this node health-checks it every second; silent this long, it is gone
# and another may load the node without --take-over.
OWNER_LEASE_S = 5.0


@dataclass
class Owner:
    """The coordinator this node serves: every Load, Forward and health check it sends names it."""

    node_id: str          # the coordinator's node id (the same after it restarts)
    coordinator_id: str   # its process
    address: str
    seen: float = field(default_factory=time.monotonic)  # its last call


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, name: str, node_id: str, address: str, machine: Machine, secret: bytes,
                 slices: SliceStore, session_ttl_s: float = 600.0, max_transfer_rate: float = 0.0):
        self.name, self.node_id, self.address = name, node_id, address
        self.slices, self.max_transfer_rate = slices, max_transfer_rate
        self.machine, self.secret = machine, secret
        self.session_ttl_s = session_ttl_s
        self.coordinator_address = ""
        self.owner: Owner | None = None
        self.is_coordinator = False
        self.worker = ComputeWorker()
        self.stage = self._new_stage(deliver=None)
        self.on_exit_request = None  # called when asked to shut down (Stop with exit)
        self.on_owner = None  # (coordinator address) a coordinator loads this node (rejoin.py remembers it)
        self._lock = threading.Lock()  # guards owner, and loading
        self._stop = threading.Event()
        threading.Thread(target=self._reap_idle_sessions, name="session-reaper", daemon=True).start()

    def _new_stage(self, deliver) -> Stage:
        return Stage(self.name, self.address, self.worker, self._connect, deliver=deliver, admit=self._check_owner)

    def _connect(self, address: str):
        return node_stub(open_channel(address, self.secret, self.node_id))

    def serve_coordinator(self, deliver):
        """This process's coordinator is starting (before the node serves anything): the token
        ring's replies to this node go to `deliver`."""
        self.is_coordinator = True
        self.coordinator_address = self.address
        self.stage = self._new_stage(deliver)

    # ---- bookkeeping -------------------------------------------------------------------------

    def info(self) -> pb.NodeInfo:
        m = self.machine
        loaded = self.stage.loaded
        sessions, kv = self.stage.usage()
        reply = pb.NodeInfo(
            node_id=self.node_id, name=self.name, version=__version__, backend=m.backend, chip=m.chip,
            total_bytes=m.total_bytes, usable_bytes=m.usable_bytes, kv_bytes=kv, sessions=sessions,
            address=self.address, coordinator=self.coordinator_address, is_coordinator=self.is_coordinator,
            memory_bandwidth=m.bandwidth_bytes_per_s or 0,
        )
        if loaded:
            reply.loaded.CopyFrom(pb.LoadedSlice(
                model_id=loaded.model_id, model_name=loaded.model_name, start=loaded.slice.layers.start,
                end=loaded.slice.layers.end, num_layers=loaded.num_layers, weight_bytes=loaded.slice.nbytes(),
                kv_budget_bytes=loaded.kv_budget_bytes, next_address=loaded.next_address,
                next_name=loaded.next_name, source=loaded.source, received_bytes=loaded.received_bytes,
                cache_bytes=self.slices.cache.model_bytes(loaded.model_id),
            ))
        return reply

    def _reap_idle_sessions(self):
        while not self._stop.wait(1.0):
            for k in self.stage.free_idle(self.session_ttl_s):
                log.info("freed idle session %s after %.0f s", k, self.session_ttl_s)

    def stop(self):
        self._stop.set()

    def unload(self) -> int:
        """Drop the slice, every session and the owner; returns the bytes released."""
        with self._lock:
            self.owner = None
            return self.stage.unload()

    def Stop(self, request, context):
        freed = self.unload()
        log.info("released %d bytes on request%s", freed, "; shutting down" if request.exit else "")
        if request.exit and self.on_exit_request:
            self.on_exit_request()
        return pb.StopReply(name=self.name, freed_bytes=freed)

    # ---- loading -----------------------------------------------------------------------------

    def _take_ownership(self, request: pb.LoadRequest):
        """Make the requesting coordinator this node's owner, or refuse naming the owner (caller
        holds the lock). Another coordinator process frees the sessions its predecessor left."""
        owner, now = self.owner, time.monotonic()
        who = request.owner or request.coordinator
        if owner and owner.node_id != who and now - owner.seen < OWNER_LEASE_S and not request.take_over:
            raise StageError(
                grpc.StatusCode.ABORTED,
                f"node {self.name} serves the coordinator at {owner.address} ({owner.node_id}); stop that "
                "coordinator, or start this one with --take-over to take the node from it", self.name)
        if owner is None or owner.coordinator_id != request.coordinator_id:
            if dropped := self.stage.drop_sessions():
                log.info("freeing %d sessions of a previous coordinator", dropped)
        self.owner = Owner(who, request.coordinator_id, request.coordinator, now)
        self.coordinator_address = request.coordinator or self.coordinator_address
        if self.on_owner:
            self.on_owner(self.coordinator_address)

    def _check_owner(self, coordinator_id: str):
        """Refuse a Forward of any coordinator but the owner; the owner's keep its lease fresh."""
        owner = self.owner
        if owner is None or owner.coordinator_id != coordinator_id:
            now = f"the coordinator at {owner.address}" if owner else "no coordinator"
            raise StageError(grpc.StatusCode.ABORTED,
                             f"node {self.name} now serves {now}: this request's coordinator no longer owns it",
                             self.name)
        owner.seen = time.monotonic()

    def load(self, request: pb.LoadRequest, progress) -> LocalStage:
        """Load layers [start, end) of model request.model_id: from a checkpoint this node was given,
        else from its cache, after fetching what the cache lacks from the request's sources.
        `progress(done, total, phase)`."""
        layers = LayerRange(request.start, request.end)
        if not 0 < request.prefill_chunk <= MAX_CHUNK_TOKENS:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: prefill_chunk must be 1 to "
                             f"{MAX_CHUNK_TOKENS} positions, not {request.prefill_chunk}", self.name)
        with self._lock:
            self._take_ownership(request)
            loaded = self.stage.loaded
            if loaded and loaded.model_id == request.model_id and loaded.slice.layers == layers:
                # Already holds this slice: only the next stage or the budget changed.
                if request.drop_sessions and (dropped := self.stage.drop_sessions()):
                    log.info("dropping %d sessions of a broken chain", dropped)
                self.stage.retarget(request.kv_budget_bytes, request.next_name, request.next_address,
                                    request.prefill_chunk)
                n = loaded.slice.nbytes()
                progress(n, n, "load")
                return loaded
            self.stage.unload()
        # A new range of the same model (a re-plan after a lost node): the layers already in memory
        # are kept, and only the others are read.
        held = loaded.slice if loaded and loaded.model_id == request.model_id else None

        fetcher = SliceFetcher(self.slices, self.secret, lambda done, total: progress(done, total, "transfer"),
                               self.max_transfer_rate)
        # Never a path from the request: a path on the coordinator's Mac means nothing here.
        in_memory = (held.layers.start, held.layers.end) if held else ()
        receiving = fetcher.receive(request.model_id, request.start, request.end, list(request.sources), in_memory)
        checkpoint = receiving.checkpoint

        def load_progress(done, total):
            if receiving.finished():  # parts load as they arrive: one bar receiving, then one loading
                progress(done, total, "load")

        def work():
            mx.clear_cache()
            return load_slice(checkpoint, layers, load_progress, reuse=held,
                              ready=lambda file: self.worker.outside(lambda: receiving.ready(file)))

        model_slice = self.worker.run(work)
        received = receiving.result()
        loaded = LocalStage(
            slice=model_slice, model_id=request.model_id, model_name=checkpoint.name,
            num_layers=text_config(checkpoint.config)["num_hidden_layers"], kv_budget_bytes=request.kv_budget_bytes,
            next_link=self.stage.link(request.next_name, request.next_address), prefill_chunk=request.prefill_chunk,
            source=received.source, received_bytes=received.received_bytes,
        )
        with self._lock:
            self.stage.loaded = loaded
        start, end = (max(layers.start, in_memory[0]), min(layers.end, in_memory[1])) if held else (0, 0)
        kept = f"; layers {LayerRange(start, end)} were in memory already" if start < end else ""
        log.info("loaded %s layers %s (%d bytes; %s%s)", checkpoint.name, layers, model_slice.nbytes(), received.source,
                 kept)
        return loaded

    # ---- gRPC handlers ---------------------------------------------------------------------------

    def Info(self, request, context):
        return self.info()

    def Health(self, request, context):
        with self._lock:
            owner, now = self.owner, time.monotonic()
            if owner and request.coordinator_id == owner.coordinator_id:  # the owner's checks keep its lease
                owner.seen = now
            alive = owner is not None and now - owner.seen < OWNER_LEASE_S
            sessions, kv = self.stage.usage()
            return pb.HealthReply(node_id=self.node_id, loaded=self.stage.loaded is not None,
                                  sessions=sessions, kv_bytes=kv,
                                  queued=self.worker.queued, busy_s=self.worker.busy_s(),
                                  max_batch=self.worker.max_batch, batched_rows=self.worker.batched_rows,
                                  speculation=self.stage.speculation,
                                  coordinator_id=owner.coordinator_id if owner else "",
                                  owner=owner.address if alive else "",
                                  owner_node_id=owner.node_id if owner else "")

    def Deliver(self, request, context):
        if self.stage.deliver is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name} is not a coordinator")
        try:
            self.stage.deliver(request, peer_name(context))
        except StageError as e:
            context.abort(e.code, e.message)
        return pb.DeliverReply()

    def Release(self, request, context):
        return self.stage.release(request.session_id)

    def Forward(self, request, context):
        try:
            return self.stage.forward(request, context.time_remaining())
        except StageError as e:
            if e.node:
                context.set_trailing_metadata(((FAILED_NODE_KEY, e.node),))
            context.abort(e.code, e.message)

    def ForwardStream(self, requests, context):
        return self.stage.stream(requests)

    def Load(self, request, context):
        updates = queue.Queue()

        def progress(done, all_bytes, phase):
            updates.put(pb.LoadProgress(bytes_done=done, bytes_total=all_bytes, phase=phase))

        result = Future()

        def run():
            try:
                result.set_result(self.load(request, progress))
            except BaseException as e:
                result.set_exception(e)
            updates.put(None)

        threading.Thread(target=run, name="load", daemon=True).start()
        while (update := updates.get()) is not None:
            yield update
        try:
            loaded = result.result()
        except StageError as e:
            context.abort(e.code, e.message)
        except TransferError as e:
            context.abort(CANNOT_RECEIVE, f"node {self.name} cannot receive its slice: {e}")
        except (CheckpointError, ValueError) as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name}: {e}")
        except Exception as e:
            log.exception("load failed")
            context.abort(grpc.StatusCode.INTERNAL, f"node {self.name}: loading failed: {e}")
        n = loaded.slice.nbytes()
        yield pb.LoadProgress(bytes_done=n, bytes_total=n, done=True, phase="load",
                              message=f"{self.name} holds layers {loaded.slice.layers} ({loaded.source})")
