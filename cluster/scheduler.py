"""Scheduling: how one request runs through the chain.

The prompt goes to the first stage in chunks (prefill), then one token at a time (decode), or
the token with a draft of the next ones to verify (speculation.py); the stages pass hidden
states along the chain and the last one's sampled tokens come back as the reply. Sessions cached
on the nodes (sessions.py) let a conversation's next turn skip its prefix.
"""

import collections
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc

from .generated import kimi_cluster_pb2 as pb
from .shaping import Shaper, penalties_of
from .link import ForwardLink, StageError, failure_of, reply_of
from .prompt_cache import CachedSession
from .speculation import PromptLookup, Speculator, StepCost, speculation_mode

log = logging.getLogger("kimi_cluster.scheduler")

# A step waits for its reply as long as every node of the chain is alive (membership.py decides,
# from health, never from how long a busy node takes), or until the client's deadline.
WAIT_SLICE_S = 0.25          # how often a waiting step looks at the chain's health
HOP_WAIT_S = 600.0           # what a stage waits on the next one when the client set no deadline
RECOVERY_WAIT_S = 600.0      # how long a request waits for a lost node's stages to run again
# A step whose reply never comes (the last stage could not deliver it, after its own retries: see
# stage.py) is silent: it is replayed like a lost node's (up to MAX_RECOVERIES, then the request
# fails saying so). Silent means waiting longer than SILENT_STEPS times the slowest of the last
# STEP_HISTORY steps (at least SILENT_FLOOR_S) while every stage of the chain has been idle for
# SILENT_IDLE_S (longer than a delivery is retried), or, however busy the chain, longer than
# SILENT_BUSY_S and SILENT_STEPS times the slowest step.
SILENT_STEPS = 10
SILENT_FLOOR_S = 15.0
SILENT_IDLE_S = 12.0
SILENT_BUSY_S = 180.0
STEP_HISTORY = 64
MAX_RECOVERIES = 3           # replays of one request before its error is the client's
# A step refused for a full KV budget, with no cached session left to evict, waits while other
# requests run for one of them to end (its session freed or cached, so evictable), then retries;
# at most this long, or the client's deadline. With no other request running it fails at once.
ROOM_WAIT_S = 300.0
STOPPING = "coordinator stopping: it was asked to shut down; retry once it is up again"


class GenerateError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class SessionLost(GenerateError):
    """The session's caches are gone from a node (it was lost, or freed them): replay it."""


class SilentStep(StageError):
    """No reply came for a step, and none is coming (see SILENT_STEPS): replay it."""


def sampling_error(s: pb.SamplingParams, vocab_size: int) -> str | None:
    """What is wrong with `s`, or None; `vocab_size` (the model's head) bounds top_k."""
    if not s.temperature >= 0:
        return f"temperature must be >= 0, got {s.temperature}"
    if not 0 <= s.top_p <= 1:
        return f"top_p must be in (0, 1] (0 turns it off), got {s.top_p}"
    if s.top_k < 0:
        return f"top_k must be >= 0, got {s.top_k}"
    if s.top_k >= vocab_size:
        return f"top_k must be below the model's vocabulary of {vocab_size} tokens (0 turns it off), got {s.top_k}"
    if not 0 <= s.min_p <= 1:
        return f"min_p must be in [0, 1], got {s.min_p}"
    try:
        penalties_of(s)
    except ValueError as e:
        return str(e)
    return None


def produced_by(reply: pb.ForwardReply) -> list:
    """(token, logprob, its TopLogprobs or None: sampling.top_logprobs) for every token a sampling
    step produced: its accepted draft and one more, or its one token."""
    pairs = list(zip(reply.tokens, reply.logprobs)) or [(reply.token, reply.logprob)]
    return [(token, logprob, top) for (token, logprob), top in zip(pairs, _tops(reply, len(pairs)))]


def _tops(reply: pb.ForwardReply, n: int | None = None) -> list:
    """The reply's TopLogprobs per token or position, None for each where none came (n of them,
    or as many as its logprobs)."""
    n = len(reply.logprobs) if n is None else n
    return list(reply.top)[:n] + [None] * (n - len(reply.top))


def deadline_message(when: str, running: int) -> str:
    return (f"the client's deadline passed {when}, with {running} requests running on the cluster; "
            "the request was stopped and its caches freed: give it more time (the API's `timeout` field, "
            "or a longer gRPC deadline), ask for fewer tokens, or retry when fewer requests run")


@dataclass
class Ticket:
    """A request riding the token ring: the reply it waits for and who may deliver it."""

    reply: Future
    last: str          # the node id of the chain's last stage: only it delivers a token
    stages: frozenset  # every stage's node id: any of them may report a failure (link.failure_of)


class Scheduler:
    """Runs requests through `membership.chain`; `local` is this process's own node."""

    def __init__(self, local, membership, sessions, prefill_chunk: int, on_lost, ready: threading.Event,
                 speculate: str = "off"):
        self.local, self.membership, self.sessions = local, membership, sessions
        self.prefill_chunk = prefill_chunk
        self.speculate = speculate  # --speculate: auto, on or off (a request's `speculate` overrides it)
        self.step_cost = StepCost()
        self.speculation = pb.Speculation()  # every request's sampling steps, summed (under _ring_lock)
        self.on_lost = on_lost  # (node name) a node's link broke
        self.ready = ready  # set while every stage of the chain is loaded
        # Tickets are random 64-bit numbers, never one outstanding: a member cannot guess a live one,
        # and a Deliver for one is accepted only from the stages it was sent to.
        self._ring: dict[int, Ticket] = {}
        self._refused_senders: set = set()  # node ids whose forged Delivers were logged already
        self._ring_lock = threading.Lock()
        self.running = 0  # requests generating now (named when a deadline passes)
        self._step_s = collections.deque([0.0], maxlen=STEP_HISTORY)  # how long the last steps took
        self.stopping = threading.Event()  # set by stop(): every request ends with STOPPING
        self._room = threading.Condition()  # notified when a request ends (KV room may be free)
        self._ended = 0               # requests ended so far (under _room)
        self._waiting_for_room = 0    # requests in _wait_for_room now (under _room)

    def stop(self):
        """The coordinator is stopping: every running request fails (UNAVAILABLE, STOPPING) within
        WAIT_SLICE_S, so its client hears why instead of a cut connection; none starts."""
        self.stopping.set()

    def _send(self, chain: list, request: pb.ForwardRequest, timeout: float) -> Future:
        """Send `request` round the token ring (see ForwardRequest.reply_to): the Future of the
        reply the last stage delivers, or of the failure a stage reports."""
        reply = Future()
        ids = [self._node_id(m) for m in chain]
        with self._ring_lock:
            while (ticket := secrets.randbits(64)) in self._ring or not ticket:
                pass
            self._ring[ticket] = Ticket(reply, ids[-1], frozenset(ids))
        log.debug("session %s offset %d rides ticket %d, delivered by %s", request.session_id, request.offset,
                  ticket, ids[-1])
        reply.add_done_callback(lambda _: self._forget(ticket))
        request.reply_to, request.ticket = self.local.address, ticket
        first = chain[0]
        if first.address == self.local.address:
            accepted = self.local.stage.accept(request, timeout)
        else:
            if first.link is None or first.link.address != first.address:
                if first.link:
                    first.link.close()
                first.link = ForwardLink(first.stub, first.name, first.address)
            accepted = first.link.send(request, timeout)
        accepted.add_done_callback(lambda f: self._refused(ticket, f))
        return reply

    def _refused(self, ticket: int, accepted: Future):
        """The first stage's answer: nothing to do once accepted; a failure is the reply."""
        if failure := failure_of(accepted):
            self.deliver(pb.ForwardReply(ticket=ticket, failure=failure))

    def _node_id(self, member) -> str:
        return member.info.node_id if member.info else ""

    def deliver(self, reply: pb.ForwardReply, sender: str | None = None):
        """A reply (or failure) for a ticket arrived: from this process (`sender` None) or over
        Deliver from the node id `sender` (its certificate's). A token is taken only from the
        chain's last stage as the request was sent, a failure from any of its stages; any other
        sender is refused (StageError PERMISSION_DENIED). Unknown tickets (late, or given up) are
        ignored."""
        with self._ring_lock:
            ticket = self._ring.get(reply.ticket)
            if ticket is None:
                return
            allowed = ticket.stages if reply.HasField("failure") else (ticket.last,)
            if sender is not None and sender not in allowed:
                first = sender not in self._refused_senders
                self._refused_senders.add(sender)
                refused = True
            else:
                del self._ring[reply.ticket]
                refused = False
        if refused:
            if first:
                log.warning("refused a Deliver from node %s: ticket %d was sent to the chain ending at %s",
                            sender, reply.ticket, ticket.last)
            raise StageError(grpc.StatusCode.PERMISSION_DENIED,
                             f"node {sender} may not deliver this ticket: only the stage its request was sent "
                             "through delivers its reply")
        if ticket.reply.set_running_or_notify_cancel():
            ticket.reply.set_result(reply)

    def _forget(self, ticket: int):
        with self._ring_lock:
            self._ring.pop(ticket, None)

    def _count(self, spec: pb.Speculation, drafted: int, produced: int):
        """A sampling step of a request: into its own figures and the coordinator's."""
        with self._ring_lock:
            for total in (spec, self.speculation):
                total.steps, total.tokens = total.steps + 1, total.tokens + produced
                total.drafted, total.accepted = total.drafted + drafted, total.accepted + produced - 1

    def _wait_ready(self, deadline: float | None):
        wait = min(RECOVERY_WAIT_S, deadline - time.monotonic()) if deadline else RECOVERY_WAIT_S
        until = time.monotonic() + wait
        while not self.ready.wait(max(min(WAIT_SLICE_S, until - time.monotonic()), 0)):
            if self.stopping.is_set():
                raise GenerateError(grpc.StatusCode.UNAVAILABLE, STOPPING)
            if time.monotonic() < until:
                continue
            raise GenerateError(grpc.StatusCode.UNAVAILABLE, f"a node was lost and its layers did not run again "
                                f"within {wait:.0f} s; restart it (same --name) or add a node")

    def _await(self, chain: list, future: Future, sent: float, deadline: float | None) -> pb.ForwardReply:
        """The reply of a request sent to `chain` at `sent`; StageError when a node of it is lost or
        fails, when the step is silent (SilentStep), or when the client's `deadline`
        (time.monotonic()) passes first."""
        while True:
            wait = min(WAIT_SLICE_S, deadline - time.monotonic()) if deadline else WAIT_SLICE_S
            try:
                reply = reply_of(future.result(max(wait, 0)))
                self._step_s.append(time.monotonic() - sent)
                return reply
            except FutureTimeout:
                pass
            if self.stopping.is_set():
                future.cancel()
                raise StageError(grpc.StatusCode.UNAVAILABLE, STOPPING)
            if lost := next((m for m in chain if m.down), None):
                future.cancel()
                raise StageError(grpc.StatusCode.UNAVAILABLE, f"node {lost.name} ({lost.address}) was lost",
                                 lost.name)
            if deadline and time.monotonic() > deadline:
                future.cancel()
                raise StageError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
            if silence := self._silence(chain, sent):
                future.cancel()
                raise SilentStep(grpc.StatusCode.UNAVAILABLE, silence)

    def _silence(self, chain: list, sent: float) -> str | None:
        """Why a step sent at `sent` and still unanswered is silent (see SILENT_STEPS), or None."""
        now = time.monotonic()
        waited, slowest = now - sent, max(self._step_s)
        if waited < max(SILENT_FLOOR_S, SILENT_STEPS * slowest):
            return None
        idle = [m.idle_since for m in chain]
        idle_for = now - max(sent, *idle) if None not in idle else 0.0
        if idle_for < SILENT_IDLE_S and waited < SILENT_BUSY_S:
            return None
        return (f"no reply for {waited:.0f} s (the slowest of the last steps took {slowest:.1f} s) while "
                + (f"every node of the chain was idle for {idle_for:.0f} s" if idle_for >= SILENT_IDLE_S
                   else "the chain stayed busy") + ": the step's reply was lost on its way back")

    def _wait_for_room(self, deadline: float | None, why: str, gone) -> bool:
        """Wait for another request to end (ROOM_WAIT_S at most, or `deadline`, or until `gone()`:
        the client left); False at once when none runs that is not itself waiting (then nothing
        would free the room)."""
        with self._room:
            if self.running - self._waiting_for_room <= 1:
                return False
            log.info("%s; waiting for one of the %d other requests to end", why, self.running - 1)
            ended, self._waiting_for_room = self._ended, self._waiting_for_room + 1
            until = min(time.monotonic() + ROOM_WAIT_S, deadline or float("inf"))
            try:
                while self._ended == ended:
                    left = until - time.monotonic()
                    if left <= 0 or self.stopping.is_set() or gone():
                        return False
                    self._room.wait(min(left, WAIT_SLICE_S))
                return True
            finally:
                self._waiting_for_room -= 1

    def _request_ended(self):
        with self._room:
            self._ended += 1
            self._room.notify_all()

    def _forward(self, requests: list, deadline: float | None) -> list:
        """Send `requests` (steps of one session, in offset order) down the chain at once, without
        waiting for each other's replies, and wait for every reply; the first StageError in
        order (the steps after it are given up: each fails, or is wasted work a retry redoes)."""
        if self.stopping.is_set():
            raise StageError(grpc.StatusCode.UNAVAILABLE, STOPPING)
        chain = list(self.membership.chain)
        timeout = deadline - time.monotonic() if deadline else HOP_WAIT_S
        if timeout <= 0:
            raise StageError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        sent = time.monotonic()
        futures = [self._send(chain, request, timeout) for request in requests]
        replies = []
        for i, future in enumerate(futures):
            try:
                replies.append(self._await(chain, future, sent, deadline))
            except StageError:
                for later in futures[i + 1:]:
                    later.cancel()
                raise
        return replies

    def generate(self, prompt: list, max_tokens: int, sampling: pb.SamplingParams, stats: dict | None = None,
                 deadline: float | None = None, shaper: Shaper | None = None, speculate: bool | None = None,
                 prediction: list = (), score_prompt: bool = False):
        """Yield (token id, logprob, TopLogprobs or None) like mlx-lm's generate_step: prefill
        prompt[:-1] in chunks, then the last prompt token, then one token at a time, or with a
        draft of the next ones (speculation.py; `speculate` forces or disables it, None leaves it
        to --speculate, or to `prediction`: the tokens the client expects, drafted first).

        When `prompt` continues a cached conversation (prompt_cache.pick_reusable), the nodes'
        caches for the shared prefix are reused and only the rest is prefilled; afterwards the
        session stays cached for the next turn unless `stats["cancelled"]` is set (a client that
        went away). `stats` receives the session id and the number of cached prompt tokens.
        `deadline` (time.monotonic(): the client's) bounds the whole request, its wait behind
        other requests included; without one it runs as long as the chain is alive (a busy
        cluster only makes it slower). `shaper` (shaping.py) gives every sampling step the
        grammar's mask and the penalties' history for the reply so far, replays included.
        `score_prompt`: the prompt is prefilled whole (no cached prefix) with each token's logprob
        after the ones before it computed at the last stage: stats["prompt_logprobs"] receives
        (logprob, TopLogprobs or None) for prompt[1:]. stats["accepted_prediction"]: how many of
        the tokens drafted from `prediction` the reply kept."""
        stats = {} if stats is None else stats
        began = time.monotonic()
        if deadline and began >= deadline:
            raise GenerateError(grpc.StatusCode.DEADLINE_EXCEEDED, deadline_message(
                "before it started: it waited its turn", self.running))
        session_id, cached = self.sessions.claim(prompt)
        if score_prompt:  # every position is computed again (the stages trim the session's caches to 0)
            cached = 0
        spec = pb.Speculation()  # this request's sampling steps
        stats.update(session_id=session_id, cached_tokens=cached, speculation=spec, accepted_prediction=0)
        max_positions = len(prompt) + max_tokens
        generated, kept = [], False
        widths = []  # positions each decode step left in the caches (its token and the drafted ones accepted)
        draft = []   # of the step in flight
        rng_state = None  # the last stage's random state after the last draw
        recoveries = 0
        speculator = Speculator(speculation_mode(self.speculate, speculate, sampling, constrained=shaper is not None,
                                                 predicted=bool(prediction)), self.step_cost)
        lookup = PromptLookup(prompt, prediction)

        def request(tokens: list, offset: int, sample: bool, new_generation: bool = False, rng=None, drafted=(),
                    targets=()):
            r = pb.ForwardRequest(session_id=session_id, sampling=sampling, max_positions=max_positions,
                                  offset=offset, sample=sample, new_generation=new_generation,
                                  coordinator_id=self.membership.coordinator_id, draft=drafted)
            r.tokens.extend(tokens)
            r.tokens.extend(drafted)
            r.targets.extend(targets)
            if rng is not None:
                r.rng_state = rng
            if sample and shaper is not None:  # the mask and history tail for the reply so far
                shaper.fill(r, generated)
            return r

        def run_steps(requests: list) -> pb.ForwardReply:
            """Send a session's steps down the chain together; the last one's reply."""
            return run_all(requests)[-1]

        def run_all(requests: list) -> list:
            """Send a session's steps down the chain together; their replies."""
            while True:
                try:
                    return self._forward(requests, deadline)
                except SilentStep as e:
                    raise SessionLost(e.code, e.message) from e
                except StageError as e:
                    if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        # retrying is safe: every stage trims back to each step's offset
                        if self.sessions.evict_one():
                            continue
                        if self._wait_for_room(deadline, f"session {session_id}: {e.message}",
                                               lambda: stats.get("cancelled")):
                            continue
                    if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED) and e.node:
                        self.on_lost(e.node)
                        raise SessionLost(e.code, e.message) from e
                    if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                        raise SessionLost(e.code, e.message) from e
                    raise GenerateError(e.code, e.message) from e

        def decode() -> pb.ForwardReply:
            """The next step: the last token and the draft, timed for the cost model."""
            began, before = time.monotonic(), recoveries
            reply = run_steps([request(generated[-1:], len(prompt) + len(generated) - 1, True, drafted=draft)])
            if recoveries == before:
                self.step_cost.record(1 + len(draft), time.monotonic() - began)
            return reply

        def prefill(tokens: list, offset: int, sample: bool = True, score: bool = False) -> list:
            """The steps of a prefill: chunks of at most prefill_chunk tokens, then the last token
            alone (sampled unless replaying). They are sent at once: chunk k+1 enters the first
            stage while chunk k is on the next one, and decodes run between chunks on every stage.
            `score`: each chunk asks for the logprob of the token after each of its positions."""
            steps = []
            while len(tokens) - offset > 1:
                n = min(self.prefill_chunk, len(tokens) - offset - 1)
                steps.append(request(tokens[offset:offset + n], offset, sample=False,
                                     targets=tokens[offset + 1:offset + n + 1] if score else ()))
                offset += n
            return steps + [request(tokens[offset:], offset, sample=sample, new_generation=sample)]

        def start(offset: int) -> pb.ForwardReply:
            """The prompt's prefill from `offset` and the first token (scoring the prompt if asked)."""
            replies = run_all(prefill(prompt, offset, score=score_prompt))
            if score_prompt:
                stats["prompt_logprobs"] = [(logprob, top) for chunk in replies[:-1]
                                            for logprob, top in zip(chunk.logprobs, _tops(chunk))]
            return replies[-1]

        def resume() -> pb.ForwardReply:
            """A new session on the chain as it is now, computing what the lost one held in the
            same steps as the first time (so the caches are the same, but for the arithmetic of
            other batches: README, Honest performance), all sent at once, then the next token
            drawn with the sampler's saved random state."""
            nonlocal session_id
            self.sessions.release(session_id)
            self._wait_ready(deadline)
            session_id = uuid.uuid4().hex
            stats.update(session_id=session_id, cached_tokens=0)
            if not generated:
                return start(0)
            replay, offset = [], 0
            for width in widths:
                replay.append(request(generated[offset:offset + width], len(prompt) + offset, sample=False))
                offset += width
            last = request(generated[-1:], len(prompt) + len(generated) - 1, sample=True, new_generation=True,
                           rng=rng_state, drafted=draft)
            return run_steps(prefill(prompt, 0, sample=False) + replay + [last])

        def attempt(run) -> pb.ForwardReply:
            nonlocal recoveries
            while True:
                try:
                    return run()
                except SessionLost as e:
                    recoveries += 1
                    if recoveries > MAX_RECOVERIES:
                        raise GenerateError(e.code, e.message) from e
                    log.warning("session %s: %s; replaying its %d tokens once the chain is ready",
                                session_id, e.message, len(prompt) + len(generated))
                    run = resume

        with self._ring_lock:
            self.running += 1
        try:
            reply, guess = attempt(lambda: start(cached)), []
            while True:
                produced = produced_by(reply)
                rng_state = reply.rng_state
                if generated:
                    widths.append(len(produced))
                self._count(spec, len(draft), len(produced))
                if lookup.predicted:
                    stats["accepted_prediction"] += len(produced) - 1
                speculator.observe(guess, [token for token, _, _ in produced])
                for token, logprob, top in produced:
                    generated.append(token)
                    yield token, logprob, top
                    if len(generated) == max_tokens:
                        break
                if len(generated) == max_tokens:
                    break
                lookup.extend(token for token, _, _ in produced)
                k = speculator.draft_length(max_tokens - len(generated) - 1)
                guess = lookup.draft(max(k, 1)) if speculator.mode != "off" else []
                draft = guess[:k]
                reply = attempt(decode)
            kept = not stats.get("cancelled")
        except GeneratorExit:  # the consumer stopped reading (an EOS, a stop string, or it went away)
            kept = not stats.get("cancelled")
            raise
        except GenerateError as e:
            if e.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            when = f"{time.monotonic() - began:.1f} s into its generation, " + \
                (f"after {len(generated)} of {max_tokens} tokens" if generated else
                 f"while its {len(prompt) - cached}-token prompt was read")
            raise GenerateError(e.code, deadline_message(when, self.running)) from e
        finally:
            with self._ring_lock:
                self.running -= 1
            if kept:  # the caches hold the prompt and every token but the last one sampled
                self.sessions.keep(session_id, CachedSession(prompt + generated[:-1], len(prompt)))
            else:
                self.sessions.release(session_id)
            self._request_ended()
