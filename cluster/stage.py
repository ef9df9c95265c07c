"""A stage: the sessions a node runs its slice for, the data path, and the token ring.

A step arrives (accept), is checked and queued for the compute thread (compute.py), runs in one
round with other sessions' steps (_compute), and what it produces goes on: the hidden state to
the next stage, or the last stage's sampled token to the coordinator. Every collaborator comes
in the constructor (the compute worker, how to reach another node, where the ring's replies to
this node go), so a test drives a stage in-process; node.py puts the gRPC face on it.
"""

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc
import mlx.core as mx

from mlx_kimi.batch import forward_rows
from mlx_kimi.constrain import words_for
from mlx_kimi.penalties import MAX_CONTEXT
from mlx_kimi.slice import ModelSlice

from .generated import kimi_cluster_pb2 as pb
from .delivery import Delivery
from .link import ForwardLink, StageError, failure_of, reply_of
from .shaping import check_step, penalties_of, shape_logits
from .stage_queue import Step
from .stage_session import Session, most_likely
from .wire import CONTROL_MESSAGE_BYTES, WireError, check_tensor, decode_tensor, encode_tensor, return_freed_memory

log = logging.getLogger("kimi_cluster.stage")

# Each hop gives the next one a little less time, so the stage nearest a stalled node reports it.
HOP_MARGIN_S = 0.5
DEFAULT_TIMEOUT_S = 30.0
MAX_CHUNK_TOKENS = 8192  # the widest prefill chunk a coordinator may plan
# Released session ids remembered, so a step of one still on its way (sent before the Release,
# arriving after it) is refused instead of opening the session again and holding KV bytes.
REMEMBERED_RELEASES = 8192


@dataclass
class LocalStage:
    """What this node runs: its slice and the node after it."""

    slice: ModelSlice
    model_id: str
    model_name: str
    num_layers: int
    kv_budget_bytes: int
    next_link: ForwardLink | None = None  # the stage after this one; None on the last
    prefill_chunk: int = MAX_CHUNK_TOKENS  # the coordinator's widest chunk (its Load says): a wider Forward is refused
    source: str = ""         # where the slice came from (a local directory, the cache, or peers)
    received_bytes: int = 0  # of the slice, over the network

    @property
    def next_name(self) -> str:
        return self.next_link.name if self.next_link else ""

    @property
    def next_address(self) -> str:
        return self.next_link.address if self.next_link else ""


def _hop_timeout(time_left: float | None) -> float:
    return max((time_left if time_left is not None else DEFAULT_TIMEOUT_S) - HOP_MARGIN_S, 0.1)


def _onward(request: pb.ForwardRequest, out: mx.array) -> pb.ForwardRequest:
    """`request` as the next stage gets it: this stage's output in place of its input."""
    onward = pb.ForwardRequest(
        session_id=request.session_id, offset=request.offset, sample=request.sample,
        sampling=request.sampling, max_positions=request.max_positions, new_generation=request.new_generation,
        coordinator_id=request.coordinator_id, reply_to=request.reply_to, ticket=request.ticket, draft=request.draft,
        targets=request.targets,
    )
    encode_tensor(out, onward.hidden)
    if request.HasField("rng_state"):
        onward.rng_state = request.rng_state
    if request.sample:
        onward.allowed_tokens, onward.penalty_history[:] = request.allowed_tokens, request.penalty_history
    return onward


def _check_draft(request: pb.ForwardRequest, positions: int, vocab: int, first: bool):
    """A draft is the step's last positions, verified where it samples."""
    k = len(request.draft)
    if not request.sample:
        raise WireError("a draft is verified by sampling: set `sample`")
    if k >= positions:
        raise WireError(f"a draft of {k} tokens needs a step of at least {k + 1} positions, not {positions}")
    if any(not 0 <= t < vocab for t in request.draft):
        raise WireError(f"draft token ids must be in [0, {vocab})")
    if first and list(request.tokens[positions - k:]) != list(request.draft):
        raise WireError("`tokens` must end with the draft")
    if request.allowed_tokens or request.penalty_history or penalties_of(request.sampling).active:
        raise WireError("a step with a grammar mask or penalties cannot carry a draft (each position's mask "
                        "depends on the token before it)")


def _check_targets(request: pb.ForwardRequest, positions: int, vocab: int):
    """Scoring targets: one token per position of a prefill step."""
    if request.sample:
        raise WireError("`targets` score a prefill step: a sampling step has none")
    if len(request.targets) != positions:
        raise WireError(f"`targets` holds a token for each of the step's {positions} positions, "
                        f"not {len(request.targets)}")
    if any(not 0 <= t < vocab for t in request.targets):
        raise WireError(f"target token ids must be in [0, {vocab})")


def _scored(out: mx.array, request: pb.ForwardRequest) -> pb.ForwardReply:
    """A scored prefill step's reply: each target's logprob after its position (and, with
    top_logprobs, each position's most likely tokens), from the raw logits. Beyond the chunk's
    logits (positions x vocabulary) it makes nothing as wide: a row's logsumexp, then the few
    logits it reports, less it."""
    logits = out[0]
    normalizer = mx.logsumexp(logits, axis=-1)  # in the logits' dtype, as a sampling step's logprobs
    chosen = logits[mx.arange(logits.shape[0]), mx.array(list(request.targets))] - normalizer
    reply = pb.ForwardReply(sampled=False, logprobs=chosen.tolist())
    if request.sampling.top_logprobs:
        reply.top.extend(most_likely(logits, request.sampling.top_logprobs, normalizer))
    return reply


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


class Stage:
    """This node's slice (`loaded`, None until a coordinator loads one) and its sessions.

    `worker` runs the math (compute.py); `connect(address)` gives a Node stub for another node
    (the next stage's link, a coordinator's Deliver); `deliver(reply)` takes the ring's replies
    addressed to this node (None: no coordinator runs here); `admit(coordinator_id)` raises
    StageError for a request whose coordinator does not own this node."""

    def __init__(self, name: str, address: str, worker, connect, deliver=None, admit=None):
        self.name, self.address = name, address
        self.worker, self.connect, self.deliver, self.admit = worker, connect, deliver, admit
        worker.compute = self._compute
        self.loaded: LocalStage | None = None
        self.sessions: dict[str, Session] = {}
        self.released: OrderedDict[str, None] = OrderedDict()  # the last REMEMBERED_RELEASES ids, oldest first
        self._lock = threading.Lock()  # guards loaded, sessions and released
        self.delivery = Delivery(address, connect, deliver)  # the ring's replies to coordinators
        self.speculation = pb.Speculation()  # what the sampling steps run here added up to (compute thread)

    # ---- the slice and the sessions -----------------------------------------------------------

    def link(self, name: str, address: str) -> ForwardLink | None:
        """A link to the stage at `address` ('' on the last stage: None)."""
        return ForwardLink(self.connect(address), name, address) if address else None

    def retarget(self, kv_budget_bytes: int, next_name: str, next_address: str, prefill_chunk: int):
        """The slice stays; its KV budget, the stage after it and the widest chunk change."""
        with self._lock:
            loaded = self.loaded
            loaded.kv_budget_bytes, loaded.prefill_chunk = kv_budget_bytes, prefill_chunk
            if loaded.next_address != next_address:
                if loaded.next_link:
                    loaded.next_link.close()
                loaded.next_link = self.link(next_name, next_address)

    def request_limit(self) -> tuple[int, str]:
        """(bytes, why): the largest Forward message this stage can be sent, from its plan: its
        prefill chunk of hidden states (float32 at most; token ids on the first stage) with a scoring
        target each, and what a sampling step adds (the grammar's mask, the penalties' history).
        Nothing loaded: a control message's, as every step is refused then."""
        loaded = self.loaded
        if loaded is None:
            return CONTROL_MESSAGE_BYTES, "no slice is loaded here"
        args = loaded.slice.args
        per_position = 5 if loaded.slice.is_first else 4 * args.hidden_size  # a varint token id; a float32 row
        per_position += 5  # a varint target
        extras = 4 * words_for(args.vocab_size) + 5 * MAX_CONTEXT + CONTROL_MESSAGE_BYTES
        return (loaded.prefill_chunk * per_position + extras,
                f"its planned prefill chunk of {loaded.prefill_chunk} positions, and a sampling step's mask and history")

    def usage(self) -> tuple[int, int]:
        """(sessions, KV bytes they hold)."""
        with self._lock:
            return len(self.sessions), sum(s.held_bytes() for s in self.sessions.values())

    def drop_sessions(self) -> int:
        """Free every session; how many there were."""
        with self._lock:
            n = len(self.sessions)
            self.sessions.clear()
        return n

    def unload(self) -> int:
        """Drop the slice and every session; the bytes released."""
        with self._lock:
            loaded, self.loaded = self.loaded, None
            sessions, self.sessions = self.sessions, {}
        if loaded and loaded.next_link:
            loaded.next_link.close()
        return (loaded.slice.nbytes() if loaded else 0) + sum(s.reserved_bytes for s in sessions.values())

    def release(self, session_id: str) -> pb.ReleaseReply:
        """Free a session, and refuse any step of it that arrives later (a coordinator never
        reuses a released id; a step sent before the Release may still be on its way here)."""
        with self._lock:
            session = self.sessions.pop(session_id, None)
            self.released[session_id] = None
            self.released.move_to_end(session_id)
            if len(self.released) > REMEMBERED_RELEASES:
                self.released.popitem(last=False)
        if session is None:
            return pb.ReleaseReply(found=False)
        self.worker.queue.drop_session(session, StageError(
            grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name}: session {session_id} was released"))
        return pb.ReleaseReply(found=True, freed_bytes=session.reserved_bytes)

    def free_idle(self, ttl_s: float) -> list:
        """Free the sessions unused for `ttl_s` seconds; their ids."""
        now = time.monotonic()
        with self._lock:
            idle = [k for k, s in self.sessions.items() if now - s.last_used > ttl_s]
            for k in idle:
                del self.sessions[k]
        return idle

    def _open_session(self, loaded: LocalStage, request: pb.ForwardRequest) -> Session:
        with self._lock:
            if loaded is not self.loaded:  # a Load replaced the slice since this step was checked
                raise StageError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"node {self.name}: its slice was replaced while the step arrived; start again")
            session = self.sessions.get(request.session_id)
            if session is not None:
                session.last_used = time.monotonic()
                if request.max_positions > session.positions:  # a reused session grows
                    self._reserve(loaded, session, request.max_positions)
                return session
            if request.session_id in self.released:
                raise StageError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"node {self.name}: session {request.session_id} was released")
            if request.offset != 0:
                raise StageError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {self.name}: session {request.session_id} is not here (expired or released); "
                    "start it again from the beginning",
                )
            session = Session(loaded.slice.make_caches(), reserved_bytes=0)
            self._reserve(loaded, session, request.max_positions)
            self.sessions[request.session_id] = session
            return session

    def _reserve(self, loaded: LocalStage, session: Session, positions: int):
        """Reserve KV bytes for `positions` from this node's budget (caller holds the lock)."""
        need = loaded.slice.kv_bytes(positions) - session.reserved_bytes
        held = sum(s.held_bytes() for s in self.sessions.values())
        if held + need > loaded.kv_budget_bytes:
            raise StageError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"node {self.name}: KV cache budget full: {len(self.sessions)} sessions hold {held:,} of "
                f"{loaded.kv_budget_bytes:,} bytes and this one needs {need:,} more for "
                f"{positions} positions; retry when a session ends, or ask for fewer tokens",
                self.name,
            )
        session.reserved_bytes += need
        session.positions = positions

    # ---- the data path -----------------------------------------------------------------------

    def _check_input(self, loaded: LocalStage, request: pb.ForwardRequest) -> int:
        """Validate a request before it touches memory; returns its number of positions."""
        if loaded.slice.is_first:
            n = len(request.tokens)
            vocab = loaded.slice.args.vocab_size
            if any(not 0 <= t < vocab for t in request.tokens):
                raise WireError(f"token ids must be in [0, {vocab})")
        elif not request.HasField("hidden"):
            raise WireError("a stage after the first needs the hidden state")
        else:
            n = check_tensor(request.hidden, (1, None, loaded.slice.args.hidden_size))[1]
        if not 0 < n <= loaded.prefill_chunk:  # checked before the tensor's bytes are read
            raise WireError(f"a chunk carries 1 to {loaded.prefill_chunk} positions (the coordinator's prefill "
                            f"chunk), not {n}")
        if request.draft:
            _check_draft(request, n, loaded.slice.args.vocab_size, loaded.slice.is_first)
        if request.targets:
            _check_targets(request, n, loaded.slice.args.vocab_size)
        if request.offset + n > request.max_positions:  # what the session reserved: it never holds more
            raise WireError(f"chunk ends at position {request.offset + n}, past max_positions {request.max_positions} "
                            "(the positions its session reserves; every request must cover its own)")
        try:
            check_step(request, loaded.slice.args.vocab_size)
        except ValueError as e:
            raise WireError(str(e)) from e
        return n

    def accept(self, request: pb.ForwardRequest, time_left: float | None) -> Future:
        """Validate `request` and queue its step; the Future of its reply (a StageError when it
        fails). With `reply_to` (the token ring) the reply is an empty acceptance, given as soon as
        the step is queued (its sender waits on nothing more), and a failure after that goes to
        `reply_to` from here; otherwise it is the last stage's reply, through the stages after
        this one."""
        try:
            loaded = self.loaded
            if loaded is None:
                raise StageError(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name}: no model loaded", self.name)
            try:
                positions = self._check_input(loaded, request)
            except WireError as e:
                return_freed_memory(len(request.hidden.data))
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: {e}", self.name) from e
            if self.admit:
                self.admit(request.coordinator_id)
            session = self._open_session(loaded, request)
        except StageError as e:
            refused = Future()
            refused.set_exception(e)
            return refused
        wait = time_left if time_left is not None else DEFAULT_TIMEOUT_S
        computed = self.worker.queue.submit(Step(loaded, session, request, positions, time.monotonic() + wait))
        if request.reply_to:
            computed.add_done_callback(lambda f: self._relay_failure(request, f))
            accepted = Future()
            accepted.set_result(pb.ForwardReply())
            return accepted
        if loaded.slice.is_last:
            return computed
        reply = Future()

        def pass_on(f: Future):
            if f.exception() is not None:
                reply.set_exception(f.exception())
                return
            try:
                onward = _onward(request, f.result())
            except Exception as e:
                reply.set_exception(self._internal(e))
                return
            sent = loaded.next_link.send(onward, _hop_timeout(time_left))
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

    def stream(self, requests):
        """ForwardStream: each request's reply as it is done. Requests are queued in the order
        they arrive (a session's steps then reach the compute thread in order) and answered out
        of order across sessions. The token ring's requests are answered once queued, so the
        gRPC thread that reads them answers them too; from the first reply that is not ready at
        once on (a request outside the ring), a thread of its own reads the rest."""
        requests = iter(requests)
        try:
            for request in requests:
                accepted = self.accept(request, request.time_left_s or None)
                if not accepted.done():
                    yield from self._stream_later(requests, accepted, request.seq)
                    return
                yield _streamed(accepted, request.seq)
        except grpc.RpcError:  # the sender went away; what is in flight still finishes
            pass

    def _stream_later(self, requests, first: Future, seq: int):
        """stream(), once a reply comes later than its request: a thread reads the requests left
        and queues each reply when it is done; this generator yields them."""
        replies = queue.SimpleQueue()

        def answer(reply: Future, seq: int):
            reply.add_done_callback(lambda f: replies.put(_streamed(f, seq)))

        def read():
            try:
                for request in requests:
                    answer(self.accept(request, request.time_left_s or None), request.seq)
            except grpc.RpcError:
                pass
            finally:
                replies.put(None)

        answer(first, seq)
        threading.Thread(target=read, name="forward-stream", daemon=True).start()
        while (reply := replies.get()) is not None:
            yield reply

    def _compute(self, steps: list):
        """Runs on the compute thread (MLX arrays are made and evaluated only there): one batch of
        steps of distinct sessions (single positions, or speculative steps), or one prefill step;
        settles every step."""
        for loaded in {id(step.stage): step.stage for step in steps}.values():  # one, unless a reload came between
            self._compute_on(loaded, [step for step in steps if step.stage is loaded])

    def _compute_on(self, loaded: LocalStage, steps: list):
        """One forward for `steps`; what fails for one row alone (its input, its sampling) fails
        that step only, never the others of its batch."""
        rows = []  # (step, its input)
        for step in steps:
            try:
                rows.append((step, self._input(loaded, step.request)))
            except Exception as e:
                self._fail(step, self._internal(e))
        if not rows:
            return
        try:
            outs = self._forward(loaded, rows)
        except Exception as e:  # MLX failed on this node (e.g. out of memory)
            error = self._internal(e)
            for step, _ in rows:
                self._fail(step, error)
            return
        for (step, _), out in zip(rows, outs):
            self._finish(loaded, step, out)

    def _input(self, loaded: LocalStage, request: pb.ForwardRequest) -> mx.array:
        if loaded.slice.is_first:
            return mx.array(list(request.tokens), dtype=mx.int32)[None]
        return decode_tensor(request.hidden, (1, None, loaded.slice.args.hidden_size))

    def _forward(self, loaded: LocalStage, rows: list) -> list:
        """Every row's output, each session's caches first trimmed back to its step's offset.
        Speculative steps attend in MLA's absorbed form (mlx_kimi/mla.py: a prefill's form would
        up-project the whole cache for a few positions); a prefill chunk where the slice finds
        that it pays."""
        caches = [step.session.caches for step, _ in rows]
        for step, _ in rows:
            step.session.trim_to(step.offset)
        drafted = any(step.request.draft for step, _ in rows)
        outs = forward_rows(loaded.slice, [x for _, x in rows], caches, absorbed=True if drafted else None)
        mx.eval([] if loaded.slice.is_last else outs, [[c.state for c in layers] for layers in caches])
        return outs

    def _finish(self, loaded: LocalStage, step: Step, out: mx.array):
        """Settle `step` with what it produced (passed on round the ring when it rides it)."""
        try:
            result = self._output(loaded, step, out)
            if step.request.reply_to:
                result = self._pass_on_ring(loaded, step.request, result, step.deadline - time.monotonic())
        except Exception as e:
            self._fail(step, self._internal(e))
            return
        if step.future.set_running_or_notify_cancel():
            step.future.set_result(result)

    def _output(self, loaded: LocalStage, step: Step, out: mx.array):
        """What a step passes on: the hidden state (encoded into the onward request by _onward), or
        the last stage's reply."""
        request, session = step.request, step.session
        if not loaded.slice.is_last:
            return out
        if not request.sample:
            return _scored(out, request) if request.targets else pb.ForwardReply(sampled=False)
        if request.new_generation:
            session.sampler = None
        rng_state = request.rng_state if request.HasField("rng_state") else None
        draft = list(request.draft)
        logits = out[0, out.shape[1] - len(draft) - 1:, :]  # the last position's, and each drafted one's
        if not draft:  # a shaped step never carries a draft (_check_draft)
            logits = shape_logits(logits, request)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if draft:
            tokens = session.verify(logprobs, draft, request.sampling, rng_state)
        else:
            tokens = [session.sample(logprobs, request.sampling, rng_state).item()]
        chosen = logprobs[mx.arange(len(tokens)), mx.array(tokens, dtype=mx.int32)].tolist()
        spec = self.speculation
        spec.steps, spec.tokens = spec.steps + 1, spec.tokens + len(tokens)
        spec.drafted, spec.accepted = spec.drafted + len(draft), spec.accepted + len(tokens) - 1
        reply = pb.ForwardReply(sampled=True, token=tokens[-1], logprob=chosen[-1], rng_state=session.rng_seed)
        if draft:
            reply.tokens.extend(tokens)
            reply.logprobs.extend(chosen)
        if request.sampling.top_logprobs:
            reply.top.extend(most_likely(logprobs[:len(tokens)], request.sampling.top_logprobs))
        return reply

    def _internal(self, e: Exception) -> StageError:
        log.error("forward failed", exc_info=e)
        return StageError(grpc.StatusCode.INTERNAL, f"node {self.name}: {e}", self.name)

    def _fail(self, step: Step, error: StageError):
        """A step failed: so do the session's later steps queued here (they would wait for it)."""
        if step.future.set_running_or_notify_cancel():
            step.future.set_exception(error)
        self.worker.queue.drop_session(step.session, error)

    # ---- the token ring ------------------------------------------------------------------------

    def _pass_on_ring(self, loaded: LocalStage, request: pb.ForwardRequest, out, time_left) -> pb.ForwardReply:
        """Send the last stage's reply to the coordinator, or this stage's output to the next
        stage without waiting for it (the sender had its empty reply when the step was queued)."""
        if loaded.slice.is_last:
            out.ticket = request.ticket
            self.delivery.send(request.reply_to, out)
        else:
            sent = loaded.next_link.send(_onward(request, out), _hop_timeout(time_left))
            sent.add_done_callback(lambda f: self._relay_failure(request, f))
        return pb.ForwardReply()

    def _relay_failure(self, request: pb.ForwardRequest, sent: Future):
        """`request` failed here, or the next stage refused or lost it: tell the coordinator (it
        waits on the ring)."""
        if failure := failure_of(sent, self.name):
            self.delivery.send(request.reply_to, pb.ForwardReply(ticket=request.ticket, failure=failure))
