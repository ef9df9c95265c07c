"""A session on a stage: its KV caches, the bytes it reserved, and its own sampler and random key.

Besides drawing one token (sample), a session verifies a speculative draft (verify): the last
stage's logits at every drafted position decide how many drafted tokens stand, with the same
output distribution as drawing them one by one."""

import math
import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

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

    def _prepare(self, params: pb.SamplingParams, rng_state: int | None):
        if self.sampler is None:
            self.sampler = make_sampler(
                params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k
            )
            self.rng_seed = params.seed if params.HasField("seed") else _key_seed(mx.random.key(time.time_ns()))
        if rng_state is not None:
            self.rng_seed = rng_state
        mx.random.seed(self.rng_seed)

    def sample(self, logprobs: mx.array, params: pb.SamplingParams, rng_state: int | None = None) -> mx.array:
        """Sample like mlx-lm's generate after mx.random.seed(seed), but with this session's own
        random key, so concurrent sessions never disturb each other's draws. `rng_state` replaces
        that key (a session replayed elsewhere draws on where it stopped)."""
        self._prepare(params, rng_state)
        token = self.sampler(logprobs)
        mx.eval(token)
        self.rng_seed = _key_seed(mx.random.state[0])
        return token

    def verify(self, logprobs: mx.array, draft: list, params: pb.SamplingParams,
               rng_state: int | None = None) -> list:
        """The tokens a step with `draft` produces: the drafted tokens that stand, then one more
        (the correction at the first one rejected, or a bonus after them all). Row i of
        `logprobs` (len(draft) + 1 rows) is the distribution after the first i drafted tokens.
        Greedy keeps a drafted token where it is the argmax. Sampled keeps it with probability
        p(token) (p as sample() draws from: filtered, then tempered) and at the first rejection
        draws from p without it, renormalised: the rejection rule for a deterministic draft, so
        every token is distributed as drawing it alone. Draws use the session's random key, so a
        replay from the same `rng_state` gives the same tokens."""
        self._prepare(params, rng_state)
        k = len(draft)
        if params.temperature == 0:
            best = mx.argmax(logprobs, axis=-1).tolist()
            kept = next((i for i in range(k) if best[i] != draft[i]), k)
            return draft[:kept] + [best[kept]]
        logits = _filtered(logprobs, params) * (1 / params.temperature)
        probs = mx.softmax(logits, axis=-1)
        chances = probs[mx.arange(k), mx.array(draft, dtype=mx.int32)] if k else mx.zeros((0,))
        draws = mx.random.uniform(shape=(k,))
        kept = next((i for i, (u, p) in enumerate(zip(draws.tolist(), chances.tolist())) if u >= p), k)
        row = logits[kept]
        if kept < k:  # p with the rejected token removed
            row = mx.where(mx.arange(row.shape[-1]) == draft[kept], -mx.inf, row)
        token = mx.random.categorical(row)
        mx.eval(token)
        self.rng_seed = _key_seed(mx.random.state[0])
        return draft[:kept] + [token.item()]


def _filtered(logprobs: mx.array, params: pb.SamplingParams) -> mx.array:
    """`logprobs` with what make_sampler's filters drop set to -inf, in its order."""
    if 0 < params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p != 0.0:
        logprobs = apply_min_p(logprobs, params.min_p)
    if params.top_k > 0:
        logprobs = apply_top_k(logprobs, params.top_k)
    return logprobs


def most_likely(logprobs: mx.array, n: int, normalizer: mx.array | None = None) -> list:
    """For each row of `logprobs`, its `n` most likely tokens, most likely first, with their
    logprobs: a TopLogprobs per row. Tokens that cannot be drawn (-inf: masked by a grammar or a
    bias) are left out, so a row may hold fewer. `normalizer`: `logprobs` are logits, and this,
    each row's logsumexp, turns the chosen ones into logprobs (no second matrix the vocabulary wide)."""
    n = min(n, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, kth=n - 1, axis=-1)[:, :n]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    if normalizer is not None:
        values = values - normalizer[:, None]
    order = mx.argsort(-values, axis=-1)
    ids, values = mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
    return [pb.TopLogprobs(tokens=[t for t, v in zip(row_ids, row) if v > -math.inf],
                           logprobs=[v for v in row if v > -math.inf])
            for row_ids, row in zip(ids.tolist(), values.tolist())]
