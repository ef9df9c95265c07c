"""What a quantization costs: KL divergence of B's next-token distribution against A's, and the
perplexity of both, on the same text (mlx-lm's `mlx_lm.kld` and `mlx_lm.perplexity` measure
the same things on one model at a time)."""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_model

from .kimi_tokenizer import load_tokenizer

# Text used when none is given: plain prose, code and numbers, so that tokens of several kinds count.
DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pipeline parallelism splits a model by layers across "
    "machines; each machine holds a contiguous slice and passes the hidden state to the next one. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n"
    "In 1969, 3 astronauts flew 384,400 km to the Moon and back in 8 days. "
    "Quantization stores each weight in fewer bits; the error it adds shows up as a difference "
    "between the next-token distributions of the original and the quantized model. "
) * 4


# What the in-memory calibration (recipe.calibrate, the yardstick of the streamed one) measures
# sensitivities on (other words than DEFAULT_TEXT, so that a recipe is not judged on its own calibration text).
CALIBRATION_TEXT = (
    "A tree grows from a seed to a trunk with 42 rings and 7 branches; its roots drink water, its "
    "leaves turn light into sugar. for i in range(10): total += i * i\n"
    "Mixed precision keeps the parts a model is most sensitive to at more bits. "
) * 3


@dataclass(frozen=True)
class Comparison:
    tokens: int  # positions compared
    kl_mean: float
    kl_p95: float
    perplexity_a: float
    perplexity_b: float

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "kl_mean": self.kl_mean, "kl_p95": self.kl_p95,
                "perplexity_a": self.perplexity_a, "perplexity_b": self.perplexity_b}


def next_token_log_probs(model, ids: mx.array) -> mx.array:
    """float32 log probabilities of the next token at every position of ids (1, L)."""
    logits = model(ids)[0].astype(mx.float32)
    out = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(out)
    return out


def windowed_log_probs(model, ids: list, window: int) -> mx.array:
    """Next-token log probabilities (float32) at every position, the text run in windows."""
    out = []
    for start in range(0, len(ids) - 1, window):
        out.append(next_token_log_probs(model, mx.array(ids[start: start + window])[None]))
    return mx.concatenate(out)[: len(ids) - 1]


def compare_logprobs(log_a: mx.array, log_b: mx.array, targets: mx.array) -> Comparison:
    kl = (mx.exp(log_a) * (log_a - log_b)).sum(axis=-1)
    nll_a = -mx.take_along_axis(log_a, targets[:, None], axis=-1)[:, 0]
    nll_b = -mx.take_along_axis(log_b, targets[:, None], axis=-1)[:, 0]
    kl_np = np.array(kl)
    return Comparison(len(kl_np), float(kl_np.mean()), float(np.percentile(kl_np, 95)),
                      float(np.exp(np.array(nll_a).mean())), float(np.exp(np.array(nll_b).mean())))


def compare_checkpoints(path_a, path_b, text: str = DEFAULT_TEXT, max_tokens: int = 512,
                        window: int = 256) -> Comparison:
    """KL(A || B) per position (mean, 95th percentile) and both perplexities on `text`, encoded
    with A's tokenizer. A and B must be the same model (same vocabulary)."""
    ids = load_tokenizer(path_a).encode(text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text encodes to fewer than 2 tokens; give a longer text")
    model_a, _ = load_model(path_a)
    log_a = windowed_log_probs(model_a, ids, window)
    del model_a
    model_b, _ = load_model(path_b)
    log_b = windowed_log_probs(model_b, ids, window)
    if log_a.shape != log_b.shape:
        raise ValueError(f"{path_a} and {path_b} have different vocabularies ({log_a.shape[-1]} vs "
                         f"{log_b.shape[-1]}); compare two checkpoints of the same model")
    return compare_logprobs(log_a, log_b, mx.array(ids[1:]))


def perplexity(model, ids: list, window: int = 256) -> float:
    """exp of the mean next-token negative log likelihood of `ids`, the text run in windows."""
    log_probs = windowed_log_probs(model, ids, window)
    nll = -mx.take_along_axis(log_probs, mx.array(ids[1:])[:, None], axis=-1)
    return float(np.exp(np.array(nll).mean()))
