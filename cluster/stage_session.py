"""A session on a stage: its KV caches, the bytes it reserved, and its own sampler and random key."""

import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .generated import kimi_cluster_pb2 as pb


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

    def trim_to(self, offset: int):
        """Keep the first `offset` positions of the caches (a step that starts before their end
        reuses the common prefix and drops the rest)."""
        drop = self.position - offset
        if drop > 0:
            for c in self.caches:
                c.trim(drop)

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
