"""The stage queue's rounds: decode batches, speculative batches, one prefill chunk, each session's
steps in order."""

import threading
import time
from dataclasses import dataclass

import grpc
import pytest

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.link import StageError
from cluster.stage_queue import StageQueue, Step


@dataclass
class Session:
    position: int = 0  # what the compute thread would have computed


def step(session, offset, positions, deadline_s=60.0, name="s", draft=()):
    return Step(None, session, pb.ForwardRequest(session_id=name, offset=offset, draft=draft), positions,
                time.monotonic() + deadline_s)


def compute(round_):
    """What the compute thread does to the sessions' positions."""
    for s in [*round_.decodes, *round_.verifies, *([round_.prefill] if round_.prefill else [])]:
        s.session.position = s.offset + s.positions


def test_a_round_batches_every_decode_and_runs_one_prefill_chunk():
    q = StageQueue()
    a, b, c, long_ = Session(10), Session(20), Session(5), Session(0)
    chunks = [step(long_, 0, 32), step(long_, 32, 32), step(long_, 64, 1)]
    decodes = [step(a, 10, 1), step(b, 20, 1), step(c, 5, 1)]
    for s in [chunks[0], decodes[0], chunks[1], decodes[1], chunks[2], decodes[2]]:
        q.submit(s)
    first = q.take()
    assert first.decodes == decodes and first.prefill is chunks[0]
    compute(first)
    for s, session in zip([step(a, 11, 1), step(b, 21, 1)], [a, b]):
        q.submit(s)
    second = q.take()  # the next decodes run before the prompt's next chunk completes
    assert [d.session for d in second.decodes] == [a, b] and second.prefill is chunks[1]
    compute(second)
    third = q.take()
    assert third.decodes == [chunks[2]] and third.prefill is None and len(q) == 0


def test_steps_that_arrive_early_wait_for_their_turn():
    q = StageQueue()
    s = Session(0)
    later, first = step(s, 16, 16), step(s, 0, 16)
    q.submit(later)
    q.submit(first)
    r = q.take()
    assert r.prefill is first and not r.decodes
    taken = []
    thread = threading.Thread(target=lambda: taken.append(q.take()))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()  # `later` is held: the session is still at position 0
    compute(r)
    q.submit(step(Session(3), 3, 1))  # any new step wakes the queue, which finds `later` ready now
    thread.join(10)
    assert taken[0].prefill is later


def test_a_held_step_fails_at_its_deadline_and_a_dropped_session_fails_its_steps():
    q = StageQueue()
    gap = step(Session(0), 8, 1, deadline_s=0.2)
    q.submit(gap)
    assert q.take().decodes == []
    with pytest.raises(StageError) as info:
        gap.future.result(5)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "at position 0" in info.value.message
    s = Session(0)
    held = step(s, 4, 1)
    q.submit(held)
    q.drop_session(s, StageError(grpc.StatusCode.FAILED_PRECONDITION, "released"))
    assert held.future.exception(5).message == "released" and len(q) == 0


def take_in_thread(q):
    taken = []
    thread = threading.Thread(target=lambda: taken.append(q.take()))
    thread.start()
    return thread, taken


def test_a_batch_coming_back_one_by_one_runs_together_and_a_session_that_left_is_not_awaited(monkeypatch):
    monkeypatch.setattr("cluster.stage_queue.GATHER_FRACTION", 1e9)  # the window is GATHER_MAX_S
    monkeypatch.setattr("cluster.stage_queue.GATHER_MAX_S", 60.0)
    q = StageQueue()
    a, b, c = Session(0), Session(0), Session(0)
    for s in (a, b, c):
        q.submit(step(s, 0, 1))
    first = q.take()
    compute(first)
    assert len(first.decodes) == 3
    q.submit(step(a, 1, 1))  # a is back first; the round waits for b and c, who ran with it
    thread, taken = take_in_thread(q)
    thread.join(0.3)
    assert thread.is_alive()
    q.submit(step(b, 1, 1))
    q.submit(step(c, 1, 1))
    thread.join(10)
    assert [d.session for d in taken[0].decodes] == [a, b, c]
    compute(taken[0])
    q.submit(step(a, 2, 1))
    q.submit(step(b, 2, 1))
    q.drop_session(c, StageError(grpc.StatusCode.FAILED_PRECONDITION, "released"))  # c ended: go without it
    thread, taken = take_in_thread(q)
    thread.join(10)
    assert [d.session for d in taken[0].decodes] == [a, b]


def test_a_batch_member_that_does_not_come_back_in_time_is_awaited_once(monkeypatch):
    monkeypatch.setattr("cluster.stage_queue.GATHER_FRACTION", 1e9)
    monkeypatch.setattr("cluster.stage_queue.GATHER_MAX_S", 0.2)
    q = StageQueue()
    a, b = Session(0), Session(0)
    q.submit(step(a, 0, 1))
    q.submit(step(b, 0, 1))
    compute(q.take())
    q.submit(step(a, 1, 1))
    waited = time.monotonic()
    r = q.take()  # b (whose reply ended its generation) never comes: a runs alone after the window
    assert [d.session for d in r.decodes] == [a] and time.monotonic() - waited >= 0.2
    compute(r)
    monkeypatch.setattr("cluster.stage_queue.GATHER_MAX_S", 60.0)  # were b awaited, take would block
    q.submit(step(a, 2, 1))
    thread, taken = take_in_thread(q)
    thread.join(10)
    assert [d.session for d in taken[0].decodes] == [a]  # b is no longer awaited


def test_speculative_steps_batch_and_their_sessions_are_gathered_like_decodes(monkeypatch):
    """Speculative steps (a draft) of a round form their own batch; sessions that ran in one round
    come back one by one, speculating or not, and the next round waits for them."""
    monkeypatch.setattr("cluster.stage_queue.GATHER_FRACTION", 1e9)
    monkeypatch.setattr("cluster.stage_queue.GATHER_MAX_S", 60.0)
    q = StageQueue()
    a, b, c = Session(0), Session(0), Session(0)
    q.submit(step(a, 0, 3, draft=[1, 2]))
    q.submit(step(b, 0, 2, draft=[1]))
    q.submit(step(c, 0, 1))
    first = q.take()
    assert [s.session for s in first.verifies] == [a, b] and [s.session for s in first.decodes] == [c]
    compute(first)
    q.submit(step(a, 3, 2, draft=[1]))  # a is back first; the round waits for b and c, who ran with it
    thread, taken = take_in_thread(q)
    thread.join(0.3)
    assert thread.is_alive()
    q.submit(step(b, 2, 1))             # b no longer speculates
    q.submit(step(c, 1, 3, draft=[1, 2]))  # c now does
    thread.join(10)
    assert [s.session for s in taken[0].verifies] == [a, c] and [s.session for s in taken[0].decodes] == [b]
