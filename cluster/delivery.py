"""The token ring's last hop: a stage's reply (the sampled tokens, or a failure) sent to the
coordinator that is waiting for it (Deliver), tried again while the coordinator is busy or out of
reach. A reply still not delivered at the end is dropped: the coordinator sees the step silent
and replays it (scheduler.py)."""

import logging
import threading
import time

import grpc

from .generated import kimi_cluster_pb2 as pb

log = logging.getLogger("kimi_cluster.stage")

# A try that fails for want of room or reach is tried again after a pause that doubles up to the
# longest, for DELIVER_GIVE_UP_S in all.
DELIVER_TIMEOUT_S = 2.0
DELIVER_PAUSES_S = (0.05, 1.0)  # the first pause and the longest
DELIVER_GIVE_UP_S = 8.0
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


class Delivery:
    """Replies of the ring to coordinators: `local` takes those for this process's own address
    (None: this node is no coordinator); `connect(address)` makes a Node stub for the others."""

    def __init__(self, address: str, connect, local=None):
        self.address, self.connect, self.local = address, connect, local
        self._stubs: dict[str, object] = {}  # coordinator address -> stub

    def send(self, address: str, reply: pb.ForwardReply, since: float | None = None,
             pause: float = DELIVER_PAUSES_S[0]):
        """Send `reply` to the coordinator at `address`, trying again after `pause` (doubling) while
        it is busy or out of reach, until DELIVER_GIVE_UP_S after the first try (`since`)."""
        if address == self.address:
            if self.local:
                self.local(reply)
            return
        since = since or time.monotonic()
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = self.connect(address)
        call = stub.Deliver.future(reply, timeout=DELIVER_TIMEOUT_S)

        def done(f):
            error = f.exception()
            if error is None:
                return
            if error.code() in RETRIED and time.monotonic() + pause - since < DELIVER_GIVE_UP_S:
                retry = threading.Timer(pause, self.send, (address, reply, since, min(2 * pause, DELIVER_PAUSES_S[1])))
                retry.daemon = True
                retry.start()
                return
            log.warning("could not deliver ticket %d to %s in %.1f s (%s: %s); the coordinator replays the step",
                        reply.ticket, address, time.monotonic() - since, error.code().name, error.details())

        call.add_done_callback(done)
