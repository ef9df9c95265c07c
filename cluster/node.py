"""A node: holds one slice of the model, runs it for every session, passes the result on.

One compute thread owns MLX (it is not built for concurrent evaluation from many threads);
gRPC threads validate requests, hand the math to that thread and talk to the next stage.
"""

import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import grpc
import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from mlx_kimi.batch import forward_rows
from mlx_kimi.checkpoint import CheckpointError, text_config
from mlx_kimi.slice import LayerRange, ModelSlice, load_slice

from . import __version__
from .generated import kimi_cluster_pb2 as pb
from .generated import kimi_cluster_pb2_grpc as pb_grpc
from .link import ForwardLink, StageError, failure_of, reply_of
from .machine import Machine
from .stage_queue import StageQueue, Step
from .transfer import CANNOT_RECEIVE, SliceFetcher, SliceStore, TransferError
from .wire import FAILED_NODE_KEY, WireError, check_tensor, decode_tensor, encode_tensor, node_stub, open_channel

log = logging.getLogger("kimi_cluster.node")

# Each hop gives the next one a little less time, so the stage nearest a stalled node reports it.
HOP_MARGIN_S = 0.5
DEFAULT_TIMEOUT_S = 30.0
DELIVER_TIMEOUT_S = 10.0
DELIVER_TRIES = 3
MAX_CHUNK_TOKENS = 8192
# A coordinator that owns this node health-checks it every second; silent this long, it is gone
# and another may load the node without --take-over.
OWNER_LEASE_S = 5.0


class ComputeWorker:
    """The one thread that runs MLX for this process: rounds of its StageQueue (stage_queue.py).
    `compute(steps)` runs one round's decode batch, or its one prefill step, and settles each
    step's future."""

    def __init__(self, compute=None):
        self.queue = StageQueue()
        self._compute = compute
        self.busy_since: float | None = None  # when the running round started (None: idle)
        self.max_batch = 0     # the most decode steps one round has run together
        self.batched_rows = 0  # decode steps run in batches of two or more
        threading.Thread(target=self._loop, name="mlx-compute", daemon=True).start()

    @property
    def queued(self) -> int:
        return len(self.queue)

    def busy_s(self) -> float:
        since = self.busy_since
        return time.monotonic() - since if since is not None else 0.0

    def _loop(self):
        while True:
            round_ = self.queue.take()
            self.busy_since = time.monotonic()
            try:
                for fn, future in round_.jobs:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as e:  # handed to the waiting thread
                            future.set_exception(e)
                if round_.decodes:
                    self.max_batch = max(self.max_batch, len(round_.decodes))
                    if len(round_.decodes) > 1:
                        self.batched_rows += len(round_.decodes)
                    self._compute(round_.decodes)
                if round_.prefill:
                    self._compute([round_.prefill])
            finally:
                self.busy_since = None

    def submit(self, fn) -> Future:
        return self.queue.submit_job(fn)

    def run(self, fn):
        return self.submit(fn).result()

    def outside(self, fn):
        """fn, called from a running job, waiting on something else (a part still arriving): not
        counted as computing, so a long wait is not taken for a stalled job."""
        self.busy_since = None
        try:
            return fn()
        finally:
            self.busy_since = time.monotonic()


def _key_seed(key: mx.array) -> int:
    """An mlx random key as the integer mx.random.seed turns back into that key."""
    hi, lo = key.tolist()
    return (hi << 32) | lo


@dataclass
class Session:
    caches: list
    reserved_bytes: int
    positions: int = 0  # positions the reservation covers
    last_used: float = field(default_factory=time.monotonic)
    sampler: object = None
    rng_seed: int = 0  # the session's random key, as a seed (see _key_seed)

    @property
    def position(self) -> int:
        """Positions the caches hold (changed only on the compute thread)."""
        return self.caches[0].offset

    def held_bytes(self) -> int:
        """KV bytes this session holds: its reservation, or what its caches really allocated if
        more (mlx-lm grows a cache in whole steps from wherever a chunk starts)."""
        return max(self.reserved_bytes, sum(c.nbytes for c in self.caches))

    def sample(self, logprobs: mx.array, params: pb.SamplingParams, rng_state: int | None = None) -> mx.array:
        """Sample like mlx-lm's generate after mx.random.seed(seed), but with this session's own
        random key, so concurrent sessions never disturb each other's draws. `rng_state` replaces
        that key (a session replayed elsewhere draws on where it stopped)."""
        if self.sampler is None:
            self.sampler = make_sampler(
                params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k
            )
            self.rng_seed = params.seed if params.HasField("seed") else _key_seed(mx.random.key(time.time_ns()))
        if rng_state is not None:
            self.rng_seed = rng_state
        mx.random.seed(self.rng_seed)
        token = self.sampler(logprobs)
        mx.eval(token)
        self.rng_seed = _key_seed(mx.random.state[0])
        return token


@dataclass
class LocalStage:
    """What this node runs: its slice and the node after it."""

    slice: ModelSlice
    model_id: str
    model_name: str
    num_layers: int
    kv_budget_bytes: int
    next_link: ForwardLink | None = None  # the stage after this one; None on the last
    source: str = ""         # where the slice came from (a local directory, the cache, or peers)
    received_bytes: int = 0  # of the slice, over the network

    @property
    def next_name(self) -> str:
        return self.next_link.name if self.next_link else ""

    @property
    def next_address(self) -> str:
        return self.next_link.address if self.next_link else ""


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
        self.worker = ComputeWorker(self._compute)
        self.stage: LocalStage | None = None
        self.sessions: dict[str, Session] = {}
        self.on_exit_request = None  # called when asked to shut down (Stop with exit)
        self.on_deliver = None  # the coordinator's: a token ring reply arrived (Deliver)
        self.on_owner = None  # (coordinator address) a coordinator loads this node (rejoin.py remembers it)
        self._deliver_stubs: dict[str, object] = {}  # coordinator address -> stub, for the ring
        self._lock = threading.Lock()  # guards stage and sessions
        self._stop = threading.Event()
        threading.Thread(target=self._reap_idle_sessions, name="session-reaper", daemon=True).start()

    # ---- bookkeeping -------------------------------------------------------------------------

    def kv_bytes(self) -> int:
        with self._lock:
            return sum(s.held_bytes() for s in self.sessions.values())

    def info(self) -> pb.NodeInfo:
        m = self.machine
        with self._lock:
            stage, sessions = self.stage, len(self.sessions)
            kv = sum(s.held_bytes() for s in self.sessions.values())
        reply = pb.NodeInfo(
            node_id=self.node_id, name=self.name, version=__version__, backend=m.backend, chip=m.chip,
            total_bytes=m.total_bytes, usable_bytes=m.usable_bytes, kv_bytes=kv, sessions=sessions,
            address=self.address, coordinator=self.coordinator_address, is_coordinator=self.is_coordinator,
            memory_bandwidth=m.bandwidth_bytes_per_s or 0,
        )
        if stage:
            reply.loaded.CopyFrom(pb.LoadedSlice(
                model_id=stage.model_id, model_name=stage.model_name, start=stage.slice.layers.start,
                end=stage.slice.layers.end, num_layers=stage.num_layers, weight_bytes=stage.slice.nbytes(),
                kv_budget_bytes=stage.kv_budget_bytes, next_address=stage.next_address, next_name=stage.next_name,
                source=stage.source, received_bytes=stage.received_bytes,
                cache_bytes=self.slices.cache.model_bytes(stage.model_id),
            ))
        return reply

    def release(self, session_id: str) -> pb.ReleaseReply:
        with self._lock:
            session = self.sessions.pop(session_id, None)
        if session is None:
            return pb.ReleaseReply(found=False)
        self.worker.queue.drop_session(session, StageError(
            grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name}: session {session_id} was released"))
        return pb.ReleaseReply(found=True, freed_bytes=session.reserved_bytes)

    def _reap_idle_sessions(self):
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                idle = [k for k, s in self.sessions.items() if now - s.last_used > self.session_ttl_s]
                for k in idle:
                    del self.sessions[k]
            for k in idle:
                log.info("freed idle session %s after %.0f s", k, self.session_ttl_s)

    def stop(self):
        self._stop.set()

    def unload(self) -> int:
        """Drop the slice, every session and the owner; returns the bytes released."""
        with self._lock:
            stage, self.stage, self.owner = self.stage, None, None
            sessions, self.sessions = self.sessions, {}
        freed = (stage.slice.nbytes() if stage else 0) + sum(s.reserved_bytes for s in sessions.values())
        if stage and stage.next_link:
            stage.next_link.close()
        return freed

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
            if self.sessions:
                log.info("freeing %d sessions of a previous coordinator", len(self.sessions))
                self.sessions.clear()
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
        with self._lock:
            self._take_ownership(request)
            stage = self.stage
            if stage and stage.model_id == request.model_id and stage.slice.layers == layers:
                # Already holds this slice: only the next stage or the budget changed.
                stage.kv_budget_bytes = request.kv_budget_bytes
                if request.drop_sessions and self.sessions:
                    log.info("dropping %d sessions of a broken chain", len(self.sessions))
                    self.sessions.clear()
                if stage.next_address != request.next_address:
                    if stage.next_link:
                        stage.next_link.close()
                    stage.next_link = self._link(request.next_name, request.next_address)
                n = stage.slice.nbytes()
                progress(n, n, "load")
                return stage
            if stage and stage.next_link:
                stage.next_link.close()
            self.stage = None
            self.sessions.clear()
        # A new range of the same model (a re-plan after a lost node): the layers already in memory
        # are kept, and only the others are read.
        held = stage.slice if stage and stage.model_id == request.model_id else None

        fetcher = SliceFetcher(self.slices, self.secret, lambda done, total: progress(done, total, "transfer"),
                               self.max_transfer_rate)
        # Never a path from the request: a path on the coordinator's Mac means nothing here.
        in_memory = (held.layers.start, held.layers.end) if held else ()
        receiving = fetcher.receive(request.model_id, request.start, request.end, list(request.sources), in_memory)
        checkpoint = receiving.checkpoint

        def loaded(done, total):
            if receiving.finished():  # parts load as they arrive: one bar receiving, then one loading
                progress(done, total, "load")

        def work():
            mx.clear_cache()
            return load_slice(checkpoint, layers, loaded, reuse=held,
                              ready=lambda file: self.worker.outside(lambda: receiving.ready(file)))

        model_slice = self.worker.run(work)
        received = receiving.result()
        stage = LocalStage(
            slice=model_slice, model_id=request.model_id, model_name=checkpoint.name,
            num_layers=text_config(checkpoint.config)["num_hidden_layers"], kv_budget_bytes=request.kv_budget_bytes,
            next_link=self._link(request.next_name, request.next_address),
            source=received.source, received_bytes=received.received_bytes,
        )
        with self._lock:
            self.stage = stage
        start, end = (max(layers.start, in_memory[0]), min(layers.end, in_memory[1])) if held else (0, 0)
        kept = f"; layers {LayerRange(start, end)} were in memory already" if start < end else ""
        log.info("loaded %s layers %s (%d bytes; %s%s)", checkpoint.name, layers, model_slice.nbytes(), received.source,
                 kept)
        return stage

    def _link(self, name: str, address: str) -> ForwardLink | None:
        return ForwardLink(node_stub(open_channel(address, self.secret, self.node_id)), name, address) if address else None

    # ---- the data path -----------------------------------------------------------------------

    def _open_session(self, stage: LocalStage, request: pb.ForwardRequest) -> Session:
        with self._lock:
            session = self.sessions.get(request.session_id)
            if session is not None:
                session.last_used = time.monotonic()
                if request.max_positions > session.positions:  # a reused session grows
                    self._reserve(stage, session, request.max_positions)
                return session
            if request.offset != 0:
                raise StageError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {self.name}: session {request.session_id} is not here (expired or released); "
                    "start it again from the beginning",
                )
            session = Session(stage.slice.make_caches(), reserved_bytes=0)
            self._reserve(stage, session, request.max_positions)
            self.sessions[request.session_id] = session
            return session

    def _reserve(self, stage: LocalStage, session: Session, positions: int):
        """Reserve KV bytes for `positions` from this node's budget (caller holds the lock)."""
        need = stage.slice.kv_bytes(positions) - session.reserved_bytes
        held = sum(s.held_bytes() for s in self.sessions.values())
        if held + need > stage.kv_budget_bytes:
            raise StageError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"node {self.name}: KV cache budget full: {len(self.sessions)} sessions hold {held:,} of "
                f"{stage.kv_budget_bytes:,} bytes and this one needs {need:,} more for "
                f"{positions} positions; retry when a session ends, or ask for fewer tokens",
                self.name,
            )
        session.reserved_bytes += need
        session.positions = positions

    def _check_input(self, stage: LocalStage, request: pb.ForwardRequest) -> int:
        """Validate a request before it touches memory; returns its number of positions."""
        if stage.slice.is_first:
            n = len(request.tokens)
            vocab = stage.slice.args.vocab_size
            if any(not 0 <= t < vocab for t in request.tokens):
                raise WireError(f"token ids must be in [0, {vocab})")
        elif not request.HasField("hidden"):
            raise WireError("a stage after the first needs the hidden state")
        else:
            n = check_tensor(request.hidden, (1, None, stage.slice.args.hidden_size))[1]
        if not 0 < n <= MAX_CHUNK_TOKENS:
            raise WireError(f"a chunk carries 1 to {MAX_CHUNK_TOKENS} positions, not {n}")
        if request.offset + n > request.max_positions:  # what the session reserved: it never holds more
            raise WireError(f"chunk ends at position {request.offset + n}, past max_positions {request.max_positions} "
                            "(the positions its session reserves; every request must cover its own)")
        return n

    def _input(self, stage: LocalStage, request: pb.ForwardRequest) -> mx.array:
        if stage.slice.is_first:
            return mx.array(list(request.tokens), dtype=mx.int32)[None]
        return decode_tensor(request.hidden, (1, None, stage.slice.args.hidden_size))

    def _compute(self, steps: list):
        """Runs on the compute thread (MLX arrays are made and evaluated only there): one batch of
        single-position steps of distinct sessions, or one prefill step; settles every step."""
        for stage in {id(step.stage): step.stage for step in steps}.values():  # one, unless a reload came between
            self._compute_on(stage, [step for step in steps if step.stage is stage])

    def _compute_on(self, stage: LocalStage, steps: list):
        """One forward for `steps`; what fails for one row alone (its input, its sampling) fails
        that step only, never the others of its batch."""
        rows = []  # (step, its input)
        for step in steps:
            try:
                rows.append((step, self._input(stage, step.request)))
            except Exception as e:
                self._fail(step, self._internal(e))
        if not rows:
            return
        caches = [step.session.caches for step, _ in rows]
        try:
            for step, _ in rows:
                drop = step.session.position - step.offset
                if drop > 0:  # reuse the common prefix, drop the rest
                    for c in step.session.caches:
                        c.trim(drop)
            outs = forward_rows(stage.slice, [x for _, x in rows], caches)
            mx.eval([] if stage.slice.is_last else outs, [[c.state for c in layers] for layers in caches])
        except Exception as e:  # MLX failed on this node (e.g. out of memory)
            error = self._internal(e)
            for step, _ in rows:
                self._fail(step, error)
            return
        for (step, _), out in zip(rows, outs):
            try:
                result = self._output(stage, step, out)
                if step.request.reply_to:
                    result = self._pass_on_ring(stage, step.request, result, step.deadline - time.monotonic())
            except Exception as e:
                self._fail(step, self._internal(e))
                continue
            if step.future.set_running_or_notify_cancel():
                step.future.set_result(result)

    def _internal(self, e: Exception) -> StageError:
        log.error("forward failed", exc_info=e)
        return StageError(grpc.StatusCode.INTERNAL, f"node {self.name}: {e}", self.name)

    def _fail(self, step: Step, error: StageError):
        """A step failed: so do the session's later steps queued here (they would wait for it)."""
        if step.future.set_running_or_notify_cancel():
            step.future.set_exception(error)
        self.worker.queue.drop_session(step.session, error)

    def _output(self, stage: LocalStage, step: Step, out: mx.array):
        """What a step passes on: the hidden state (encoded), or the last stage's reply."""
        request, session = step.request, step.session
        if not stage.slice.is_last:
            return encode_tensor(out)
        if not request.sample:
            return pb.ForwardReply(sampled=False)
        logits = out[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        if request.new_generation:
            session.sampler = None
        token = session.sample(logprobs, request.sampling,
                               request.rng_state if request.HasField("rng_state") else None)
        tok = token.item()
        return pb.ForwardReply(sampled=True, token=tok, logprob=logprobs[0, tok].item(), rng_state=session.rng_seed)

    def accept(self, request: pb.ForwardRequest, time_left: float | None) -> Future:
        """Validate `request` and queue its step; the Future of its reply (a StageError when it
        fails). With `reply_to` (the token ring) the reply is an empty acceptance once the step is
        computed and passed on; otherwise it is the last stage's reply, through the stages after
        this one."""
        try:
            stage = self.stage
            if stage is None:
                raise StageError(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name}: no model loaded", self.name)
            try:
                positions = self._check_input(stage, request)
            except WireError as e:
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: {e}", self.name) from e
            self._check_owner(request.coordinator_id)
            session = self._open_session(stage, request)
        except StageError as e:
            refused = Future()
            refused.set_exception(e)
            return refused
        wait = time_left if time_left is not None else DEFAULT_TIMEOUT_S
        computed = self.worker.queue.submit(Step(stage, session, request, positions, time.monotonic() + wait))
        if request.reply_to or stage.slice.is_last:
            return computed
        reply = Future()

        def pass_on(f: Future):
            if f.exception() is not None:
                reply.set_exception(f.exception())
                return
            sent = stage.next_link.send(self._onward(request, f.result()), self._hop_timeout(time_left))
            sent.add_done_callback(lambda r: reply.set_exception(r.exception()) if r.exception() is not None
                                   else reply.set_result(r.result()))

        computed.add_done_callback(pass_on)
        return reply

    def forward(self, request: pb.ForwardRequest, time_left: float | None) -> pb.ForwardReply:
        """accept(), waiting for the reply; StageError when it failed or did not come in time."""
        wait = time_left if time_left is not None else DEFAULT_TIMEOUT_S
        try:
            return reply_of(self.accept(request, time_left).result(wait))
        except FutureTimeout:
            raise StageError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"node {self.name}: no reply within {wait:.1f} s", self.name) from None

    def _onward(self, request: pb.ForwardRequest, hidden: pb.Tensor) -> pb.ForwardRequest:
        onward = pb.ForwardRequest(
            session_id=request.session_id, offset=request.offset, hidden=hidden, sample=request.sample,
            sampling=request.sampling, max_positions=request.max_positions, new_generation=request.new_generation,
            coordinator_id=request.coordinator_id, reply_to=request.reply_to, ticket=request.ticket,
        )
        if request.HasField("rng_state"):
            onward.rng_state = request.rng_state
        return onward

    @staticmethod
    def _hop_timeout(time_left: float | None) -> float:
        return max((time_left if time_left is not None else DEFAULT_TIMEOUT_S) - HOP_MARGIN_S, 0.1)

    # ---- the token ring ------------------------------------------------------------------------

    def _pass_on_ring(self, stage: LocalStage, request: pb.ForwardRequest, out, time_left) -> pb.ForwardReply:
        """Send the last stage's reply to the coordinator, or this stage's output to the next
        stage without waiting for it; the sender gets an empty reply (accepted) at once."""
        if stage.slice.is_last:
            out.ticket = request.ticket
            self._deliver(request.reply_to, out)
        else:
            sent = stage.next_link.send(self._onward(request, out), self._hop_timeout(time_left))
            sent.add_done_callback(lambda f: self._relay_failure(request, f))
        return pb.ForwardReply()

    def _relay_failure(self, request: pb.ForwardRequest, sent: Future):
        """The next stage refused or lost `request`: tell the coordinator (it waits on the ring)."""
        if failure := failure_of(sent, self.name):
            self._deliver(request.reply_to, pb.ForwardReply(ticket=request.ticket, failure=failure))

    def _deliver(self, address: str, reply: pb.ForwardReply, tries: int = DELIVER_TRIES):
        if address == self.address:
            if self.on_deliver:
                self.on_deliver(reply)
            return
        stub = self._deliver_stubs.get(address)
        if stub is None:
            stub = self._deliver_stubs[address] = node_stub(open_channel(address, self.secret, self.node_id))
        call = stub.Deliver.future(reply, timeout=DELIVER_TIMEOUT_S)

        def done(f):
            if f.exception() is not None:
                if tries > 1:
                    self._deliver(address, reply, tries - 1)
                else:
                    log.warning("could not deliver ticket %d to %s: %s", reply.ticket, address, f.exception())

        call.add_done_callback(done)

    @staticmethod
    def _streamed(reply: Future, seq: int) -> pb.ForwardReply:
        """A ForwardStream reply: the request's reply, or the failure in it."""
        error = reply.exception()
        if error is None:
            out = reply.result()
        elif isinstance(error, StageError):
            out = pb.ForwardReply(failure=error.failure())
        else:  # a bug: still answer, or the sender waits out its deadline
            log.error("forward failed", exc_info=error)
            out = pb.ForwardReply(failure=StageError(grpc.StatusCode.INTERNAL, f"{error}").failure())
        out.seq = seq
        return out

    # ---- gRPC handlers ---------------------------------------------------------------------------

    def Info(self, request, context):
        return self.info()

    def Health(self, request, context):
        with self._lock:
            owner, now = self.owner, time.monotonic()
            if owner and request.coordinator_id == owner.coordinator_id:  # the owner's checks keep its lease
                owner.seen = now
            alive = owner is not None and now - owner.seen < OWNER_LEASE_S
            return pb.HealthReply(node_id=self.node_id, loaded=self.stage is not None,
                                  sessions=len(self.sessions),
                                  kv_bytes=sum(s.held_bytes() for s in self.sessions.values()),
                                  queued=self.worker.queued, busy_s=self.worker.busy_s(),
                                  max_batch=self.worker.max_batch, batched_rows=self.worker.batched_rows,
                                  coordinator_id=owner.coordinator_id if owner else "",
                                  owner=owner.address if alive else "",
                                  owner_node_id=owner.node_id if owner else "")

    def Deliver(self, request, context):
        if self.on_deliver is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name} is not a coordinator")
        self.on_deliver(request)
        return pb.DeliverReply()

    def Release(self, request, context):
        return self.release(request.session_id)

    def Forward(self, request, context):
        try:
            return self.forward(request, context.time_remaining())
        except StageError as e:
            if e.node:
                context.set_trailing_metadata(((FAILED_NODE_KEY, e.node),))
            context.abort(e.code, e.message)

    def ForwardStream(self, requests, context):
        replies = queue.Queue()

        def read():
            # Requests are queued in the order they arrive (a session's steps then reach the
            # compute thread in order) and answered as each is done, out of order across sessions.
            try:
                for request in requests:
                    self.accept(request, request.time_left_s or None).add_done_callback(
                        lambda f, seq=request.seq: replies.put(self._streamed(f, seq)))
            except grpc.RpcError:  # the sender went away; what is in flight still finishes
                pass
            finally:
                replies.put(None)

        threading.Thread(target=read, name="forward-stream", daemon=True).start()
        while (reply := replies.get()) is not None:
            yield reply

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
            stage = result.result()
        except StageError as e:
            context.abort(e.code, e.message)
        except TransferError as e:
            context.abort(CANNOT_RECEIVE, f"node {self.name} cannot receive its slice: {e}")
        except (CheckpointError, ValueError) as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name}: {e}")
        except Exception as e:
            log.exception("load failed")
            context.abort(grpc.StatusCode.INTERNAL, f"node {self.name}: loading failed: {e}")
        n = stage.slice.nbytes()
        yield pb.LoadProgress(bytes_done=n, bytes_total=n, done=True, phase="load",
                              message=f"{self.name} holds layers {stage.slice.layers} ({stage.source})")
