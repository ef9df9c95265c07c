"""What a stage's compute thread does next: rounds of sessions' steps, and other jobs.

Each round takes every session whose next step is a single position (decode, sampled or not)
as one batch, then every session's next speculative step (a few positions ending with a draft)
as a second batch (narrower rows padded to the widest: mlx_kimi/batch.py), then at most one
prompt chunk (prefill): a long prompt sent as several chunks
lets the decodes run between its chunks, so a decode step waits at most one chunk's compute.
A session's steps run in offset order whatever order they arrived in: a step that starts past
the session's position waits for the steps before it (until its own deadline).

Sessions that ran in one round's batches (decode or speculative) come back together (their tokens
went out together), but one by one: a round that started at the first arrival would run one row,
then the rest. So while some of those sessions are back and others not yet (a session may come
back speculating or not), the round waits for them a short, bounded time
(a fraction of the last round's compute); one that does not come in that time is not waited for
again until it has run in a batch once more.
"""

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc

from .link import StageError

GATHER_FRACTION = 0.1   # of the last round's duration: how long a batch's returning sessions are awaited
GATHER_MAX_S = 0.005


@dataclass
class Step:
    """One request's work on this stage: `positions` tokens of `session` from `offset` on."""

    stage: object
    session: object
    request: object  # pb.ForwardRequest
    positions: int
    deadline: float  # time.monotonic() after which a step still waiting for its turn fails
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def offset(self) -> int:
        return self.request.offset


@dataclass
class Round:
    jobs: list    # (fn, future) of other work, e.g. loading a slice
    decodes: list  # single-position steps of distinct sessions, run as one batch
    prefill: Step | None = None
    verifies: list = field(default_factory=list)  # steps with a draft, one forward of their own


class StageQueue:
    """Steps and jobs waiting for the compute thread; a step's session has `position`, the
    positions its caches hold (read only on the compute thread, which changes it)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._jobs = deque()
        self._steps: list[Step] = []  # in arrival order
        self._batches = 0  # rounds with decode or speculative steps taken so far
        self._batch_of: dict[int, tuple] = {}  # id(session) -> (its last batch's number, session)
        self._round_started: float | None = None
        self._round_s = 0.0  # how long the last round took

    def __len__(self) -> int:
        with self._cond:
            return len(self._jobs) + len(self._steps)

    def submit_job(self, fn) -> Future:
        future = Future()
        with self._cond:
            self._jobs.append((fn, future))
            self._cond.notify()
        return future

    def submit(self, step: Step) -> Future:
        with self._cond:
            self._steps.append(step)
            self._cond.notify()
        return step.future

    def drop_session(self, session, error: StageError):
        """Fail the session's queued steps (its caches are gone, or a step before them failed)."""
        with self._cond:
            dropped = [s for s in self._steps if s.session is session]
            self._steps = [s for s in self._steps if s.session is not session]
            self._batch_of.pop(id(session), None)
            self._cond.notify()  # a round may be waiting for this session to come back
        for step in dropped:
            if step.future.set_running_or_notify_cancel():
                step.future.set_exception(error)

    def take(self) -> Round:
        """Block until there is work; the next round (its steps leave the queue)."""
        with self._cond:
            if self._round_started is not None:
                self._round_s = time.monotonic() - self._round_started
            while True:
                round_, expired, wake = self._pick()
                if round_ or expired:
                    break
                self._cond.wait(wake)
            if round_ and (round_.decodes or round_.verifies):
                self._batches += 1
                for step in [*round_.decodes, *round_.verifies]:
                    self._batch_of[id(step.session)] = (self._batches, step.session)
            self._round_started = time.monotonic() if round_ else None
        for step in expired:
            if step.future.set_running_or_notify_cancel():
                step.future.set_exception(StageError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"session {step.request.session_id} is at position {step.session.position}, "
                    f"the request continues at {step.offset} and the steps between never came"))
        return round_ or Round([], [])

    def _pick(self):
        """(the round or None, held steps past their deadline, seconds until the next deadline)."""
        now = time.monotonic()
        jobs, self._jobs = list(self._jobs), deque()
        first = {}  # session -> its next step: the lowest offset, then the earliest arrived
        for step in self._steps:
            best = first.get(id(step.session))
            if best is None or step.offset < best.offset:
                first[id(step.session)] = step
        decodes, verifies, prefill, expired, wake = [], [], None, [], None
        for step in first.values():
            if step.offset > step.session.position:
                if step.deadline <= now:
                    expired.append(step)
                else:
                    wake = min(wake or step.deadline - now, step.deadline - now)
            elif step.positions == 1:
                decodes.append(step)
            elif step.request.draft:
                verifies.append(step)
            elif prefill is None:
                prefill = step
        if (decodes or verifies) and not jobs and (until := self._gathering([*decodes, *verifies], first, now)):
            gone = {id(s) for s in expired}
            self._steps = [s for s in self._steps if id(s) not in gone]
            return None, expired, min(wake or until - now, until - now)
        taken = {id(s) for s in [*decodes, *verifies, *expired, *([prefill] if prefill else [])]}
        self._steps = [s for s in self._steps if id(s) not in taken]
        if not (jobs or decodes or verifies or prefill):
            return None, expired, wake
        return Round(jobs, decodes, prefill, verifies), expired, wake

    def _gathering(self, steps: list, first: dict, now: float) -> float | None:
        """Until when to wait for the rest of the batches these steps' sessions ran in last (None: go)."""
        batches = {self._batch_of[id(s.session)][0] for s in steps if id(s.session) in self._batch_of}
        missing = [key for key, (batch, _) in self._batch_of.items()
                   if batch in batches and key not in first]
        if not missing:
            return None
        until = min(s.arrived for s in steps) + min(GATHER_MAX_S, GATHER_FRACTION * self._round_s)
        if now < until:
            return until
        for key in missing:  # not back in time: run without them, and do not wait for them again
            del self._batch_of[key]
        return None
