"""What shapes a reply's logits before its token is sampled, on the wire: penalties and logit bias
(in SamplingParams) and a grammar's mask of allowed tokens (ForwardRequest.allowed_tokens, with
the history tail the penalties read in penalty_history).

The coordinator holds each reply's tokens, so it keeps the grammar's matcher (`Shaper`, one per
reply) and sends each sampling step the mask for the reply so far: replay after a node loss and
prefix reuse stay exact, and stages stay generic. The last stage checks the fields' bounds
(`check_step`) and applies them row by row (`shape_logits`) with mlx_kimi's code.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_kimi.constrain import Constraint, apply_bitmask, words_for
from mlx_kimi.penalties import DEFAULT_CONTEXT, MAX_CONTEXT, Penalties

from .generated import kimi_cluster_pb2 as pb


def penalties_of(params: pb.SamplingParams) -> Penalties:
    """The penalties a step's sampling params ask for (ValueError naming what is out of bounds)."""
    return Penalties(
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, logit_bias=dict(params.logit_bias),
        presence_context_size=params.presence_context or DEFAULT_CONTEXT,
        frequency_context_size=params.frequency_context or DEFAULT_CONTEXT,
        repetition_context_size=params.repetition_context or DEFAULT_CONTEXT,
    )


def put_penalties(params: pb.SamplingParams, penalties: Penalties) -> None:
    params.presence_penalty = penalties.presence_penalty
    params.frequency_penalty = penalties.frequency_penalty
    params.repetition_penalty = penalties.repetition_penalty
    params.presence_context = penalties.presence_context_size
    params.frequency_context = penalties.frequency_context_size
    params.repetition_context = penalties.repetition_context_size
    params.logit_bias.clear()
    params.logit_bias.update(penalties.logit_bias)


MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


def check_step(request: pb.ForwardRequest, vocab_size: int) -> None:
    """ValueError unless the step's sampling and shaping fields are within this vocabulary's bounds."""
    if request.sampling.top_logprobs > MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {request.sampling.top_logprobs}")
    if request.sampling.top_k >= vocab_size:  # mlx-lm's top-k sampler raises on it
        raise ValueError(f"top_k must be below the vocabulary size {vocab_size} (0 turns it off), "
                         f"got {request.sampling.top_k}")
    if request.allowed_tokens and len(request.allowed_tokens) != 4 * words_for(vocab_size):
        raise ValueError(f"allowed_tokens must be {4 * words_for(vocab_size)} bytes (a bit per token of "
                         f"{vocab_size}), not {len(request.allowed_tokens)}")
    if len(request.penalty_history) > MAX_CONTEXT:
        raise ValueError(f"penalty_history carries at most {MAX_CONTEXT} tokens, not {len(request.penalty_history)}")
    if any(not 0 <= t < vocab_size for t in request.penalty_history):
        raise ValueError(f"penalty_history token ids must be in [0, {vocab_size})")
    penalties_of(request.sampling).check_vocab(vocab_size)


def shape_logits(logits: mx.array, request: pb.ForwardRequest) -> mx.array:
    """logits[1, vocab] after the step's penalties and its grammar's mask (in mlx-lm's order:
    the processors, then sampling)."""
    penalties = penalties_of(request.sampling)
    if penalties.active:
        logits = penalties.apply(logits, list(request.penalty_history))
    if request.allowed_tokens:
        logits = apply_bitmask(logits, np.frombuffer(request.allowed_tokens, dtype=np.uint32)[None])
    return logits


@dataclass
class ThinkingBudget:
    """A reply that starts inside <think> may think `tokens` tokens: the next one is </think>."""
    tokens: int
    think_end: int
    vocab_size: int

    def due(self, reply: list) -> bool:
        """Whether the token after `reply` must be </think>: it has thought its tokens, and not ended."""
        return len(reply) == self.tokens and self.think_end not in reply

    def mask(self) -> np.ndarray:
        words = np.zeros(words_for(self.vocab_size), dtype=np.uint32)
        words[self.think_end // 32] = np.uint32(1 << (self.think_end % 32))
        return words


@dataclass
class Shaper:
    """One reply's shaping, kept where its tokens are: fills each sampling step's fields."""
    prompt: list
    penalties: Penalties
    constraint: Constraint | None = None
    budget: ThinkingBudget | None = None

    def fill(self, request: pb.ForwardRequest, reply: list) -> None:
        """Set `request`'s allowed_tokens and penalty_history for sampling after `reply`."""
        if self.constraint is not None:
            self.constraint.sync(reply)
            request.allowed_tokens = self.constraint.mask().tobytes()
        if self.budget is not None and self.budget.due(reply):
            request.allowed_tokens = self.budget.mask().tobytes()  # thinking ends here, whatever else allowed
        size = self.penalties.history_size
        if size:
            tail = (self.prompt[-size:] + reply)[-size:] if len(reply) < size else reply[-size:]
            request.penalty_history[:] = tail

    def complete(self) -> bool:
        """Whether the reply so far satisfies the grammar (a reply cut before is 'length')."""
        return self.constraint is None or self.constraint.accepting
