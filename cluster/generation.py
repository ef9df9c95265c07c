"""The one generation loop: where a reply ends (EOS, a stop string, max_tokens, the client
leaving), the context check, sampling defaults and validation, timing and the request log line.

The gRPC Generate (coordinator.py) and the HTTP API's endpoints are thin adapters over it: they
build a GenerationRequest, iterate the Generation's Pieces and read its GenerationResult.
Tokens come from the scheduler (Scheduler.generate), which runs them through the chain.
"""

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from mlx_kimi.constrain import Constraint, ConstraintError, ConstraintSpec, cached_llg_tokenizer
from mlx_kimi.kimi_tokenizer import count_past

from .generated import kimi_cluster_pb2 as pb
from .reply import THINK_END, RawText, ReplyDelta, ReplyParser, StopMatcher, prompt_ends_thinking
from .sampling import with_defaults
from .scheduler import GenerateError, sampling_error
from .shaping import Shaper, ThinkingBudget, check_step, penalties_of

log = logging.getLogger("kimi_cluster.generation")


def _never() -> bool:
    return False


@dataclass
class GenerationRequest:
    prompt: list                      # token ids
    max_tokens: int | None            # None: what the context leaves, up to default_max_tokens
    sampling: pb.SamplingParams       # fields left unset take the checkpoint's defaults
    default_max_tokens: int = 256
    stops: list = field(default_factory=list)  # the reply ends before the first of these strings
    raw: bool = True                  # every token is text; False: reasoning, content and tool calls (reply.py)
    deadline: float | None = None     # time.monotonic() by which the client wants it done
    cancelled: Callable[[], bool] = _never  # polled before each token: the client left
    arrived: float = field(default_factory=time.monotonic)  # TTFT counts from here
    constraint: ConstraintSpec | None = None  # the grammar the reply is held to (its `thinking` is set here)
    speculate: bool | None = None     # force (True) or disable (False) speculative decoding; None: --speculate
    prediction: list = field(default_factory=list)  # token ids the client expects the reply to be, drafted first
    thinking_budget: int | None = None  # a reply that starts thinking ends its thinking after this many tokens
    score_prompt: bool = False  # compute each prompt token's logprob (GenerationResult.prompt_logprobs)


@dataclass
class Piece:
    """What one generated token adds to the reply; the last piece (token None) carries what the
    parser and the stop matcher still held."""

    token: int | None
    logprob: float | None
    delta: ReplyDelta
    top: pb.TopLogprobs | None = None  # its most likely alternatives (sampling.top_logprobs)


@dataclass
class GenerationResult:
    finish_reason: str  # stop, length, tool_calls; cancelled or error (the log's only)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float
    decode_s: float  # from the first token to the last
    stop_sequence: str | None = None  # the stop string that ended the reply
    prompt_logprobs: list | None = None  # with score_prompt: (logprob, TopLogprobs or None) of prompt[1:]
    reasoning_tokens: int = 0  # of completion_tokens, those of the thinking block
    accepted_prediction_tokens: int = 0  # of the prediction's tokens, those drafted and kept
    rejected_prediction_tokens: int = 0  # the others


class ContextTooLong(GenerateError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int, counted_all: bool = True):
        # counted_all False: the prompt was refused once it passed `prompt_tokens`, before it was encoded whole
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context
        self.counted_all = counted_all
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, self.explain("the prompt", "max_tokens") +
                         ", or start the coordinator with a larger --context")

    def explain(self, prompt: str, max_tokens: str) -> str:
        """The refusal, naming the request's fields as its client knows them."""
        if self.counted_all and self.max_tokens > self.context:
            return f"max_tokens {self.max_tokens} alone exceeds the planned context of {self.context} tokens: lower {max_tokens}"
        if not self.counted_all:
            return (f"the prompt has more than {self.prompt_tokens} tokens (counting stopped there), past the "
                    f"planned context of {self.context} tokens: shorten {prompt}")
        return (f"the prompt has {self.prompt_tokens} tokens; with max_tokens {self.max_tokens} it exceeds the "
                f"planned context of {self.context} tokens: shorten {prompt} or lower {max_tokens}")


class PromptTokenizer:
    """The coordinator's tokenizer for prompts (encode, apply_chat_template): a prompt that cannot
    leave `max_tokens` of the context is refused (ContextTooLong) before it is encoded whole."""

    def __init__(self, tokenizer, context: int, max_tokens: int = 1):
        self.tokenizer, self.context, self.max_tokens = tokenizer, context, max_tokens

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        limit = self.context - self.max_tokens
        if (past := count_past(self.tokenizer, text, limit)) is not None:
            raise ContextTooLong(past, self.max_tokens, self.context, counted_all=False)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(self, messages: list, **options) -> list:
        return self.encode(self.tokenizer.apply_chat_template(messages, tokenize=False, **options))


class GenerationLoop:
    """Starts generations on the coordinator's cluster and keeps what they add up to: requests
    generating now and done, and the last decode speed (for /v1/cluster)."""

    def __init__(self, tokenizer, context: int, sampling_defaults: dict, tokens: Callable,
                 chain_names: Callable[[], list], vocab_size: int):
        # tokens(prompt, max_tokens, sampling, stats, deadline, shaper, speculate, prediction, score_prompt)
        # yields (token id, logprob, top): Coordinator.generate
        self.tokenizer, self.context, self.sampling_defaults = tokenizer, context, sampling_defaults
        self.vocab_size = vocab_size  # the head's outputs: top_k must stay below it
        self.tokens, self.chain_names = tokens, chain_names
        self.in_flight = self.served = 0
        self.last_decode_tok_s = 0.0
        self._lock = threading.Lock()

    def start(self, request: GenerationRequest) -> "Generation":
        """A Generation for `request`, checked now (a bad request raises GenerateError here, before
        any response is started); it runs as it is iterated."""
        sampling = with_defaults(request.sampling, self.sampling_defaults)
        if error := sampling_error(sampling, self.vocab_size):
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, error)
        for name, ids in (("prompt", request.prompt), ("prediction", request.prediction)):
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{name} token ids must be in [0, {self.vocab_size})")
        if len(request.prediction) > self.context:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a prediction of {len(request.prediction)} tokens is longer than any reply can be "
                                f"(the planned context is {self.context} tokens)")
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(request.default_max_tokens, self.context - len(request.prompt)))
        if len(request.prompt) + max_tokens > self.context:
            raise ContextTooLong(len(request.prompt), max_tokens, self.context)
        return Generation(self, request, sampling, max_tokens, self.shaper(request, sampling))

    def shaper(self, request: GenerationRequest, sampling: pb.SamplingParams) -> Shaper | None:
        """The reply's grammar, penalties and thinking budget, kept here where its tokens are (None:
        none of them)."""
        penalties, spec = penalties_of(sampling), request.constraint
        try:
            check_step(pb.ForwardRequest(sampling=sampling), self.vocab_size)
        except ValueError as e:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        thinking = prompt_ends_thinking(self.tokenizer, request.prompt)
        budget = None
        if request.thinking_budget is not None and thinking:
            budget = ThinkingBudget(request.thinking_budget, self.tokenizer.convert_tokens_to_ids(THINK_END),
                                    self.vocab_size)
        constraint = None
        if spec is not None and spec.constrains:
            spec = dataclasses.replace(spec, thinking=thinking)
            try:
                constraint = Constraint.for_spec(spec, self.tokenizer, self.vocab_size, self.tokenizer.eos_token_ids)
            except ConstraintError as e:
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        if constraint is None and budget is None and not penalties.active:
            return None
        return Shaper(request.prompt, penalties, constraint, budget)

    def warm(self) -> None:
        """Build the grammar engine's tokenizer now (about 2 s for Kimi's 163,840 tokens on a slow
        CPU), so the first constrained request does not wait for it."""
        try:
            cached_llg_tokenizer(self.tokenizer, self.vocab_size, tuple(sorted(self.tokenizer.eos_token_ids)))
        except ConstraintError as e:
            log.warning("structured outputs and tool schemas are unavailable: %s", e)

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, result: GenerationResult, stats: dict) -> None:
        """The request's log line; its decode speed becomes the last one."""
        tokens = result.completion_tokens
        tok_s = (tokens - 1) / result.decode_s if tokens > 1 and result.decode_s > 0 else 0.0
        with self._lock:
            self.in_flight -= 1
            self.served += 1
            if tok_s:
                self.last_decode_tok_s = tok_s
        spec = stats.get("speculation")
        steps = (f"{spec.steps} steps ({spec.steps / max(spec.tokens, 1):.2f} per token), {spec.drafted} drafted, "
                 f"{spec.accepted} accepted" if spec else "no steps")
        log.info("request %s: %d prompt tokens (%d cached), %d generated (%s); TTFT %.0f ms, %.1f tok/s; nodes %s; %s",
                 stats.get("session_id", "-"), result.prompt_tokens, result.cached_tokens, tokens,
                 result.finish_reason, result.ttft_s * 1000, tok_s, ", ".join(self.chain_names()) or "-", steps)


class Generation:
    """One reply: iterate it for its Pieces; once it ends, `result` says why and what it cost.
    `cancel()` before closing it frees the conversation's caches instead of keeping them."""

    def __init__(self, loop: GenerationLoop, request: GenerationRequest, sampling: pb.SamplingParams,
                 max_tokens: int, shaper: Shaper | None = None):
        self.loop, self.request, self.sampling, self.max_tokens = loop, request, sampling, max_tokens
        self.shaper = shaper
        self.stats: dict = {}  # Scheduler.generate's: session id, cached tokens, cancelled
        self.result: GenerationResult | None = None
        self._pieces = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> Piece:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def cancel(self) -> None:
        self.stats["cancelled"] = True

    def _parser(self):
        tokenizer = self.loop.tokenizer
        if self.request.raw:
            return RawText(tokenizer)
        return ReplyParser(tokenizer, prompt_ends_thinking(tokenizer, self.request.prompt))

    def _run(self):
        request, loop = self.request, self.loop
        loop.started()
        parser, stop, eos = self._parser(), StopMatcher(request.stops), loop.tokenizer.eos_token_ids
        tokens = loop.tokens(request.prompt, self.max_tokens, self.sampling, self.stats, request.deadline,
                             self.shaper, request.speculate, request.prediction, request.score_prompt)
        count, first, last, ended, finish = 0, None, None, None, "error"
        try:
            for token, logprob, top in tokens:
                if self.stats.get("cancelled") or request.cancelled():
                    self.cancel()
                    return
                last = time.monotonic()
                first = first or last
                if token in eos:
                    ended = "stop"
                    break
                count += 1
                delta = parser.feed(token)
                delta.content = stop.push(delta.content)
                yield Piece(token, logprob, delta, top)
                if stop.stopped:
                    ended = "stop"
                    break
            tail = parser.finish()
            tail.content = stop.push(tail.content) + stop.flush()
            # a reply cut by max_tokens is `length` even with whole tool calls in it
            finish = "tool_calls" if ended == "stop" and parser.tool_calls and not stop.stopped else ended or "length"
            if tail:
                yield Piece(None, None, tail)
        finally:
            tokens.close()  # the scheduler keeps the session for the next turn, or frees it if cancelled
            now = time.monotonic()
            accepted = min(self.stats.get("accepted_prediction", 0), len(request.prediction))
            self.result = GenerationResult(
                finish_reason="cancelled" if self.stats.get("cancelled") else finish,
                prompt_tokens=len(request.prompt), completion_tokens=count,
                cached_tokens=self.stats.get("cached_tokens", 0),
                ttft_s=(first or now) - request.arrived, decode_s=(last - first) if first else 0.0,
                stop_sequence=stop.matched, prompt_logprobs=self.stats.get("prompt_logprobs"),
                reasoning_tokens=parser.reasoning_tokens, accepted_prediction_tokens=accepted,
                rejected_prediction_tokens=len(request.prediction) - accepted)
            loop.finished(self.result, self.stats)
