"""Presence, frequency and repetition penalties and logit bias, exactly as mlx-lm's
`make_logits_processors` defines them (each over the last `*_context_size` tokens of prompt +
reply), applied row by row: a row needs only the last `history_size` tokens of its sequence, so
that tail is all a step has to carry to where the token is sampled.
"""

from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

DEFAULT_CONTEXT = 20  # mlx-lm's default context size for every penalty
MAX_CONTEXT = 1024
MAX_BIAS_ENTRIES = 300  # OpenAI's limit on logit_bias
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's range for presence and frequency penalties
MAX_REPETITION_PENALTY = 10.0


@dataclass(frozen=True)
class Penalties:
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 0.0  # 0 (or unset) is off, as in mlx-lm; 1.0 changes nothing
    logit_bias: dict = field(default_factory=dict)  # token id -> added to its logit
    presence_context_size: int = DEFAULT_CONTEXT
    frequency_context_size: int = DEFAULT_CONTEXT
    repetition_context_size: int = DEFAULT_CONTEXT

    def __post_init__(self):
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1]:
                raise ValueError(f"{name} must be between {PENALTY_RANGE[0]} and {PENALTY_RANGE[1]}, got {value}")
        if not 0.0 <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be between 0 (off) and {MAX_REPETITION_PENALTY}, "
                             f"got {self.repetition_penalty}")
        for name in ("presence_context_size", "frequency_context_size", "repetition_context_size"):
            if not 1 <= getattr(self, name) <= MAX_CONTEXT:
                raise ValueError(f"{name} must be between 1 and {MAX_CONTEXT}, got {getattr(self, name)}")
        if len(self.logit_bias) > MAX_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_BIAS_ENTRIES}")

    def check_vocab(self, vocab_size: int) -> None:
        for token, bias in self.logit_bias.items():
            if not 0 <= token < vocab_size:
                raise ValueError(f"logit_bias names token {token}; this model's tokens are 0..{vocab_size - 1}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias for token {token} is {bias}; it must be between -100 and 100")

    @property
    def active(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty or self.logit_bias)

    @property
    def history_size(self) -> int:
        """How many of the sequence's last tokens the penalties read."""
        sizes = [size for on, size in ((self.presence_penalty, self.presence_context_size),
                                       (self.frequency_penalty, self.frequency_context_size),
                                       (self.repetition_penalty, self.repetition_context_size)) if on]
        return max(sizes, default=0)

    def processors(self) -> list:
        """mlx-lm's own logits processors for these settings."""
        return make_logits_processors(
            logit_bias=dict(self.logit_bias) or None,
            repetition_penalty=self.repetition_penalty or None, repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty or None, presence_context_size=self.presence_context_size,
            frequency_penalty=self.frequency_penalty or None, frequency_context_size=self.frequency_context_size,
        )

    def apply(self, logits: mx.array, history: list) -> mx.array:
        """logits[1, vocab] after the penalties, `history` being (at least) the last `history_size`
        tokens of prompt + reply."""
        tokens = mx.array(history[max(0, len(history) - self.history_size):], dtype=mx.int32)
        for processor in self.processors():
            logits = processor(tokens, logits)
        return logits
