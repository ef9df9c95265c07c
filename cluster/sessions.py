"""Sessions on the nodes: the conversations whose KV caches stay there for their next turn.

A finished request leaves its session cached (least recently used first out); the next prompt
that continues it (prompt_cache.pick_reusable) takes it and prefills only what is new.
"""

import threading
import uuid
from collections import OrderedDict

import grpc

from .generated import kimi_cluster_pb2 as pb
from .membership import HEALTH_TIMEOUT_S
from .prompt_cache import CachedSession, pick_reusable

MAX_CACHED_SESSIONS = 16    # conversations whose KV caches stay on the nodes for their next turn


class Sessions:
    """The prompt cache, and freeing a session on every node of `chain()`."""

    def __init__(self, chain):
        self.chain = chain  # () -> the members holding slices
        self.cached: OrderedDict[str, CachedSession] = OrderedDict()  # LRU first
        self._lock = threading.Lock()

    def release(self, session_id: str):
        for m in self.chain():
            if not m.down:  # a node being loaded again still holds its sessions
                try:
                    m.stub.Release(pb.ReleaseRequest(session_id=session_id), timeout=HEALTH_TIMEOUT_S)
                except grpc.RpcError:
                    pass

    def claim(self, prompt: list) -> tuple:
        """(session id, positions to keep): the cached session `prompt` continues, taken out of
        the cache while in use, or a new session."""
        with self._lock:
            best, keep = pick_reusable(self.cached, prompt)
            if best is None:
                return uuid.uuid4().hex, 0
            del self.cached[best]
            return best, keep

    def keep(self, session_id: str, cached: CachedSession):
        with self._lock:
            self.cached[session_id] = cached
        while len(self.cached) > MAX_CACHED_SESSIONS and self.evict_one():
            pass

    def evict_one(self) -> bool:
        """Free the least recently used cached session on every node."""
        with self._lock:
            if not self.cached:
                return False
            session_id, _ = self.cached.popitem(last=False)
        self.release(session_id)
        return True

    def evict_all(self):
        while self.evict_one():
            pass
