"""Speculative decoding, the coordinator's side: drafting by prompt lookup and choosing how far
to draft. No model math and no extra weights.

The coordinator holds every session's token history, so it drafts: the tokens that followed the
latest earlier occurrence of the history's last n tokens (n from MAX_NGRAM down to MIN_NGRAM),
as agents copy a file or a tool result back. A decode step then carries [token, draft...] round
the ring as one step; the last stage verifies the draft (stage_session.Session.verify).

How far to draft (the cost model): with a drafted token accepted with probability a (measured
per session, on drafts sent and on the drafts it would have sent while it did not speculate), a
step drafting k tokens yields 1 + a + ... + a^k tokens on average and costs 1 + b*k one-position
steps, b being what one more position adds to a step (measured over the cluster's steps: on a
bandwidth-bound Mac near 0 for a dense layer, more on an MoE where every position may read other
experts; on a compute-bound CPU about the cost of a position). The session drafts the k that
gives the most tokens per step's cost, and nothing where no k gains MIN_GAIN.
"""

import bisect
import threading

from .generated import kimi_cluster_pb2 as pb

MAX_NGRAM = 3
MIN_NGRAM = 1
MAX_DRAFT = 12               # drafted tokens per step, at most
PRIOR_ACCEPTANCE = 0.3       # a new session's acceptance until it has drafted or guessed
PRIOR_WEIGHT = 2             # the prior counts as this many observations: a session learns from its first few
ACCEPTANCE_WINDOW = 16       # then the estimate follows about the last this many drafted tokens
PRIOR_POSITION_COST = 0.1    # b until measured (and always for a forced `on`, so seeded draws repeat)
COST_WEIGHT = 0.1            # of each new step in the running means of step times
COST_RELAX = 0.01            # of the prior, per one-position step, in the running mean of a position's cost
MIN_GAIN = 1.05              # tokens per step's cost below which speculating is not worth it
MODES = ("auto", "on", "off")


def speculation_mode(default: str, requested: bool | None, sampling: pb.SamplingParams,
                     constrained: bool = False, predicted: bool = False) -> str:
    """'on', 'off' or 'auto' for one request. `requested`: the request's own `speculate`.
    `constrained`: its logits are masked or penalised at the last stage per position (a grammar,
    a repetition penalty): the mask for position i+1 depends on token i, so a draft cannot be
    verified in one step, and it never speculates. `predicted`: the client sent what it expects
    the reply to be, which asks for speculation unless `requested` says otherwise. Under auto a
    seeded sampled request does not speculate, so its tokens stay those of mlx-lm's generation
    with that seed."""
    if constrained:
        return "off"
    if requested is None and predicted:
        requested = True
    if requested is not None:
        return "on" if requested else "off"
    if default == "auto" and sampling.temperature > 0 and sampling.HasField("seed"):
        return "off"
    return default


class PromptLookup:
    """A session's tokens, indexed by n-gram as they grow; drafts the continuation of the latest
    earlier occurrence of the longest suffix found (a continuation that reaches the end goes on
    repeating what it copied, so a reply in a loop is drafted k tokens ahead).

    With a `prediction` (what the client expects the reply to be: OpenAI's predicted outputs, a
    file to be returned with a few edits), the reply is first drafted from it: its start, then
    what follows the place in it the reply's last tokens match (the longest suffix, at or after
    where the reply last stood in it, so an edit is stepped over and the copy picks up after it)."""

    def __init__(self, tokens: list, prediction: list = ()):
        self.tokens: list = []
        self._after: dict = {}  # n-gram -> the position after its latest occurrence
        self._indexed = 0       # n-grams ending before this position are in _after
        self.extend(tokens)
        self.reply_start = len(self.tokens)
        self.prediction = list(prediction)
        self._predicted: dict = {}  # n-gram -> the positions after its occurrences in the prediction, in order
        for e in range(1, len(self.prediction) + 1):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, e) + 1):
                self._predicted.setdefault(tuple(self.prediction[e - n:e]), []).append(e)
        self._at = 0  # where in the prediction the reply's end stands, or last stood when it is lost
        self._placed = True  # the reply's end is at _at (False: it left the prediction there)
        self._seen = len(self.tokens)  # the session's tokens when it was placed
        self.predicted = False  # the last draft came from the prediction

    def extend(self, tokens):
        self.tokens.extend(tokens)

    def draft(self, k: int) -> list:
        """Up to k tokens that may come next ([] where nothing predicts them)."""
        predicted = self._from_prediction(k) if self.prediction else []
        self.predicted = bool(predicted)
        return predicted or self._looked_up(k)

    def _from_prediction(self, k: int) -> list:
        came, self._seen = self.tokens[self._seen:], len(self.tokens)
        if self._placed and self.prediction[self._at:self._at + len(came)] == came:
            self._at += len(came)
        else:  # an edit, or it had lost its place
            at = self._place_in_prediction()
            self._placed = at is not None
            self._at = at if self._placed else self._at
        return self.prediction[self._at:self._at + k] if self._placed else []

    def _place_in_prediction(self) -> int | None:
        """Where in the prediction the reply's last tokens end: the first occurrence of the longest
        suffix found at or after where the reply last stood (a reply never goes back in it), or None."""
        replied = len(self.tokens) - self.reply_start
        for n in range(min(MAX_NGRAM, replied), MIN_NGRAM - 1, -1):
            positions = self._predicted.get(tuple(self.tokens[-n:]), [])
            if (i := bisect.bisect_left(positions, self._at)) < len(positions):
                return positions[i]
        return None

    def _looked_up(self, k: int) -> list:
        t, end = self.tokens, len(self.tokens)
        for e in range(self._indexed, end):  # every n-gram ending before the last token's end
            for n in range(MIN_NGRAM, min(MAX_NGRAM, e) + 1):
                self._after[tuple(t[e - n:e])] = e
        self._indexed = end
        for n in range(min(MAX_NGRAM, end), MIN_NGRAM - 1, -1):
            if (after := self._after.get(tuple(t[end - n:]))) is not None:
                draft = t[after:after + k]
                while len(draft) < k:  # copying runs into the suffix itself: a loop goes on (as LZ77 copies)
                    draft.append(draft[len(draft) - (end - after)])
                return draft
        return []


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a step drafting k yields on average: the accepted prefix, then one more."""
    return sum(acceptance ** i for i in range(k + 1))


def best_draft(acceptance: float, position_cost: float, limit: int) -> tuple:
    """(k, tokens per one-position step's cost) for the best k in 0..limit."""
    return max(((expected_tokens(acceptance, k) / (1 + position_cost * k), k) for k in range(limit + 1)),
               key=lambda gain_k: (gain_k[0], -gain_k[1]))[::-1]


class StepCost:
    """What the cluster's sampling steps take, by width: running means of a one-position step
    and of what each further position adds (measured at the coordinator, every stage and hop
    included). The latter starts at the prior and, while no step drafts, drifts back to it, so
    a few slow steps (a busy machine) do not turn speculation off for good."""

    def __init__(self):
        self.single_s: float | None = None
        self.per_position_s: float | None = None
        self._lock = threading.Lock()

    def record(self, width: int, seconds: float):
        with self._lock:
            if width == 1:
                self.single_s = seconds if self.single_s is None else _toward(self.single_s, seconds, COST_WEIGHT)
                if self.per_position_s is not None:
                    self.per_position_s = _toward(self.per_position_s, PRIOR_POSITION_COST * self.single_s,
                                                  COST_RELAX)
            elif self.single_s is not None:
                extra = max(0.0, seconds - self.single_s) / (width - 1)
                start = PRIOR_POSITION_COST * self.single_s if self.per_position_s is None else self.per_position_s
                self.per_position_s = _toward(start, extra, COST_WEIGHT)

    @property
    def position_cost(self) -> float:
        """b: one more position's cost as a fraction of a one-position step."""
        with self._lock:
            if self.single_s is None or self.per_position_s is None or self.single_s <= 0:
                return PRIOR_POSITION_COST
            return self.per_position_s / self.single_s


def _toward(mean: float, value: float, weight: float) -> float:
    return mean + weight * (value - mean)


class Speculator:
    """One session's choice of how far to draft, from its measured acceptance."""

    def __init__(self, mode: str, cost: StepCost):
        self.mode, self.cost = mode, cost
        self.acceptance = PRIOR_ACCEPTANCE
        self.observed = 0

    def draft_length(self, room: int) -> int:
        """Tokens to draft at the next step; `room`: how many more the reply may take after it."""
        if self.mode == "off" or room < 1:
            return 0
        cost = PRIOR_POSITION_COST if self.mode == "on" else self.cost.position_cost
        k, gain = best_draft(self.acceptance, cost, min(MAX_DRAFT, room))
        if self.mode == "on":
            return max(k, 1)
        return k if gain >= MIN_GAIN else 0

    def observe(self, guess: list, produced: list):
        """Update the acceptance from a draft (sent, or only guessed) and the tokens that came:
        each drafted token up to the first that differs is one observation. Until the window
        fills, the estimate is the mean of the observations and the prior (weighed as
        PRIOR_WEIGHT of them): a session whose drafts fail stops drafting after a few steps, not
        after a window of them, and one whose drafts hold drafts further soon."""
        for drafted, came in zip(guess, produced):
            self.observed += 1
            self.acceptance += ((drafted == came) - self.acceptance) / min(self.observed + PRIOR_WEIGHT,
                                                                            ACCEPTANCE_WINDOW)
            if drafted != came:
                break
