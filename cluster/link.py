"""The data path between two stages: one long-lived ForwardStream, requests matched to replies.

A unary call per token pays call set-up, authentication and a fresh HTTP/2 stream every time;
a stream opened once per stage pair pays them once. Requests from many sessions share it and
are answered out of order, so each carries a `seq` and waits for the reply with that `seq`.
"""

import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from .generated import kimi_cluster_pb2 as pb
from .wire import failed_node

log = logging.getLogger("kimi_cluster.link")

_STATUS = {code.value[0]: code for code in grpc.StatusCode}


class StageError(Exception):
    """A request this stage (or one after it) could not serve; `node` names the node at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, node: str = ""):
        super().__init__(message)
        self.code, self.message, self.node = code, message, node

    def failure(self) -> pb.StageFailure:
        return pb.StageFailure(code=self.code.value[0], message=self.message, node=self.node)

    @classmethod
    def from_failure(cls, f: pb.StageFailure) -> "StageError":
        return cls(_STATUS.get(f.code, grpc.StatusCode.UNKNOWN), f.message, f.node)


def failure_of(sent: Future, node: str = "") -> pb.StageFailure | None:
    """Why a request sent on (a ForwardLink's or a local stage's Future) was refused or lost;
    None when it was accepted or its sender cancelled it. `node` names this node in an
    unexpected error's message."""
    if sent.cancelled():
        return None
    error = sent.exception()
    if error is None:
        reply = sent.result()
        return reply.failure if reply.HasField("failure") else None
    if isinstance(error, StageError):
        return error.failure()
    return StageError(grpc.StatusCode.INTERNAL, f"node {node}: {error}" if node else str(error), node).failure()


def reply_of(reply: pb.ForwardReply) -> pb.ForwardReply:
    """The reply, or the StageError it carries."""
    if reply.HasField("failure"):
        raise StageError.from_failure(reply.failure)
    return reply


class ForwardLink:
    """A ForwardStream to one node, opened on first use and again after it broke."""

    def __init__(self, stub, name: str, address: str):
        self.stub, self.name, self.address = stub, name, address
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue | None = None  # feeds the open stream; None when there is none
        self._call = None
        self._pending: dict[int, Future] = {}  # the open stream's requests awaiting replies
        self._seq = itertools.count(1)

    def send(self, request: pb.ForwardRequest, timeout: float) -> Future:
        """Send `request`, telling the node we wait `timeout` seconds; the reply's Future (it
        fails with StageError naming the node at fault when the node or the stream fails)."""
        future = Future()
        with self._lock:
            if self._outbox is None:
                self._open()
            seq, pending, outbox = next(self._seq), self._pending, self._outbox
            pending[seq] = future
        request.seq, request.time_left_s = seq, timeout
        outbox.put(request)
        future.add_done_callback(lambda _: self._forget(pending, seq))
        return future

    def call(self, request: pb.ForwardRequest, timeout: float) -> pb.ForwardReply:
        """Send `request` and wait up to `timeout` seconds for its reply; StageError naming the
        node at fault when it failed or is unreachable, DEADLINE_EXCEEDED when it did not answer
        in time (a busy node is not a lost one)."""
        future = self.send(request, timeout)
        try:
            return reply_of(future.result(timeout))
        except FutureTimeout:
            future.cancel()
            raise StageError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"node {self.name} ({self.address}) did not answer within {timeout:.1f} s", self.name)

    def _forget(self, pending: dict, seq: int):
        with self._lock:
            pending.pop(seq, None)

    def close(self):
        with self._lock:
            outbox, call, self._outbox = self._outbox, self._call, None
        if outbox is not None:
            outbox.put(None)
            call.cancel()

    def _open(self):
        """Start a stream and its reader (caller holds the lock)."""
        outbox = queue.SimpleQueue()

        def requests():
            while (request := outbox.get()) is not None:
                yield request

        self._outbox, self._pending = outbox, {}
        self._call = self.stub.ForwardStream(requests())
        threading.Thread(target=self._read, args=(self._call, outbox, self._pending), name=f"link-{self.name}",
                         daemon=True).start()

    def _read(self, call, outbox: queue.SimpleQueue, pending: dict):
        try:
            for reply in call:
                with self._lock:
                    future = pending.pop(reply.seq, None)
                if future is not None and future.set_running_or_notify_cancel():  # not given up on
                    future.set_result(reply)
            error = StageError(grpc.StatusCode.UNAVAILABLE, f"node {self.name} ({self.address}) ended the stream",
                               self.name)
        except grpc.RpcError as e:
            error = self._error(e)
        with self._lock:
            if self._outbox is outbox:  # the next call opens a new stream
                self._outbox = None
            failed = list(pending.values())
            pending.clear()
        outbox.put(None)
        for future in failed:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _error(self, e: grpc.RpcError) -> StageError:
        named = failed_node(e)
        if named:
            return StageError(e.code(), e.details(), named)
        who = f"node {self.name} ({self.address})"
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            return StageError(grpc.StatusCode.UNAVAILABLE, f"{who} is unreachable: {e.details()}", self.name)
        if e.code() == grpc.StatusCode.CANCELLED:
            return StageError(grpc.StatusCode.UNAVAILABLE, f"{who}: the stream was closed", self.name)
        return StageError(e.code(), f"{who}: {e.details()}", self.name)
