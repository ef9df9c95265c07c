"""The one thread that runs MLX for a node process.

MLX is not built for concurrent evaluation from many threads: gRPC threads validate requests
and hand the math to this thread (stage.py), which runs rounds of its StageQueue (stage_queue.py).
"""

import threading
import time
from concurrent.futures import Future

from .stage_queue import StageQueue


class ComputeWorker:
    """Runs rounds of its StageQueue: other jobs first, then `compute(steps)` for the round's
    decode batch, its speculative steps (one batch of their own), and its one prefill step;
    `compute` settles each step's future."""

    def __init__(self, compute=None):
        self.queue = StageQueue()
        self.compute = compute  # set by the stage that owns the steps (stage.py), before its first step
        self.busy_since: float | None = None  # when the running round started (None: idle)
        self.max_batch = 0     # the most steps one forward has run together
        self.batched_rows = 0  # decode and speculative steps run in batches of two or more
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
                for batch in (round_.decodes, round_.verifies):
                    if batch:
                        self.max_batch = max(self.max_batch, len(batch))
                        if len(batch) > 1:
                            self.batched_rows += len(batch)
                        self.compute(batch)
                if round_.prefill:
                    self.compute([round_.prefill])
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
