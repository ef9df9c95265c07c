"""A stage driven in-process: the tiny checkpoint's whole model as one slice, a real compute thread.

Sessions' decode steps queued together run as one batched forward and still give mlx-lm's tokens;
a step before a session's end trims its caches back; a released session is gone; a row that fails
fails alone; requests a stage must refuse are refused (a chunk wider than the coordinator's);
ring replies, and a ring step's failure after its acceptance, go to the delivery hook, or to the
coordinator's Deliver (real gRPC), tried again with pauses while it is busy; and a token never
delivered is replayed by the scheduler driving the stage, with mlx-lm's tokens all the same; a step
with a draft keeps what verifies, and the next step trims the rest; several sessions' speculative
steps run as one forward.
"""

import logging
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from cluster import scheduler as scheduling
from cluster import delivery
from cluster.compute import ComputeWorker
from cluster.generated import kimi_cluster_pb2 as pb
from cluster.generated import kimi_cluster_pb2_grpc as pb_grpc
from cluster.link import StageError
from cluster.membership import Member
from cluster.scheduler import GenerateError, Scheduler
from cluster.sessions import Sessions
from cluster.stage import LocalStage, Stage
from cluster.wire import make_server, node_stub, open_channel
from harness import TEST_SECRET
from mlx_kimi.checkpoint import open_checkpoint
from mlx_kimi.slice import LayerRange, load_slice

TIMEOUT_S = 120.0
TOKENS = 6
GREEDY = pb.SamplingParams(temperature=0.0)
ADDRESS = "127.0.0.1:1"  # this stage's own address: the ring's replies to it go to its hook
BIG_BUDGET = 1 << 30


@pytest.fixture(scope="module")
def whole(tiny_dir):
    """(compute worker, the whole tiny model as one slice, its checkpoint)."""
    checkpoint = open_checkpoint(tiny_dir)
    worker = ComputeWorker()
    model_slice = worker.run(lambda: load_slice(checkpoint, LayerRange(0, checkpoint.num_layers)))
    return worker, model_slice, checkpoint


def _no_other_node(address: str):
    raise AssertionError(f"a one-stage test reaches no other node, not {address}")


def make_stage(whole, deliver=None, admit=None, budget=BIG_BUDGET) -> Stage:
    worker, model_slice, checkpoint = whole
    stage = Stage("solo", ADDRESS, worker, _no_other_node, deliver=deliver, admit=admit)
    stage.loaded = LocalStage(model_slice, checkpoint.model_id, checkpoint.name, checkpoint.num_layers, budget)
    return stage


def request(session_id: str, tokens: list, offset: int, max_positions: int, sample: bool = True,
            new_generation: bool = False, sampling: pb.SamplingParams = GREEDY) -> pb.ForwardRequest:
    r = pb.ForwardRequest(session_id=session_id, offset=offset, max_positions=max_positions, sample=sample,
                          new_generation=new_generation, sampling=sampling)
    r.tokens.extend(tokens)
    return r


def prefill(stage: Stage, session_id: str, prompt: list, max_positions: int,
            sampling: pb.SamplingParams = GREEDY) -> pb.ForwardReply:
    """The prompt but its last token as one chunk, then the last token, sampled (as the scheduler does)."""
    stage.forward(request(session_id, prompt[:-1], 0, max_positions, sample=False), TIMEOUT_S)
    return stage.forward(request(session_id, prompt[-1:], len(prompt) - 1, max_positions, new_generation=True,
                                 sampling=sampling), TIMEOUT_S)


def hold(worker: ComputeWorker) -> threading.Event:
    """Hold the compute thread (in a job of its own) until the returned event is set."""
    gate, running = threading.Event(), threading.Event()
    worker.submit(lambda: running.set() or gate.wait())
    running.wait(TIMEOUT_S)
    return gate


def one_round(stage: Stage, requests: list) -> list:
    """Queue `requests` while the compute thread is held, so they run in the same round; their futures."""
    gate = hold(stage.worker)
    futures = [stage.accept(r, TIMEOUT_S) for r in requests]
    gate.set()
    return futures


def stage_error(future) -> StageError:
    error = future.exception(TIMEOUT_S)
    assert isinstance(error, StageError), error
    return error


@pytest.fixture(scope="module")
def prompts(oracle, make_chat_prompt):
    return [make_chat_prompt(oracle[1], t) for t in ["Hi!", "Name a cat.", "What is two plus two?"]]


def test_decode_steps_of_several_sessions_run_as_one_batch_and_equal_mlx_lm(whole, oracle, oracle_tokens,
                                                                           prompts, monkeypatch):
    expected = [oracle_tokens(oracle[0], p, TOKENS) for p in prompts]
    assert len({tuple(e) for e in expected}) > 1  # the prompts lead to different replies
    stage, (worker, model_slice, _) = make_stage(whole), whole
    names = [f"s{i}" for i in range(len(prompts))]
    got = [[prefill(stage, name, p, len(p) + TOKENS).token] for name, p in zip(names, prompts)]
    rows = []  # the rows of each forward the slice runs
    forward = model_slice.forward
    monkeypatch.setattr(model_slice, "forward",
                        lambda x, caches, absorbed=None: rows.append(x.shape[0]) or forward(x, caches, absorbed))
    rows_before = worker.batched_rows
    for n in range(1, TOKENS):
        futures = one_round(stage, [request(name, [tokens[-1]], len(p) + n - 1, len(p) + TOKENS)
                                    for name, p, tokens in zip(names, prompts, got)])
        for tokens, future in zip(got, futures):
            tokens.append(future.result(TIMEOUT_S).token)
    assert got == expected
    assert rows == [len(prompts)] * (TOKENS - 1)  # one forward per round, every session's row in it
    assert worker.batched_rows - rows_before == len(prompts) * (TOKENS - 1)  # every decode step ran batched
    assert worker.max_batch >= len(prompts)
    assert [stage.sessions[name].position for name in names] == [len(p) + TOKENS - 1 for p in prompts]


def test_a_step_before_the_session_end_trims_its_caches_back(whole, oracle, oracle_tokens, prompts):
    stage = make_stage(whole)
    prompt = prompts[0]
    limit = len(prompt) + TOKENS
    expected = oracle_tokens(oracle[0], prompt, TOKENS)
    got = [prefill(stage, "s", prompt, limit).token]
    for n in range(1, 4):
        got.append(stage.forward(request("s", got[-1:], len(prompt) + n - 1, limit), TIMEOUT_S).token)
    assert stage.sessions["s"].position == len(prompt) + 3
    # A retry of the second decode step: the caches drop what came after it, and it gives the same token.
    again = stage.forward(request("s", got[1:2], len(prompt) + 1, limit), TIMEOUT_S)
    assert again.token == expected[2]
    assert stage.sessions["s"].position == len(prompt) + 2

    # A prompt that shares only a prefix with the session: only what follows the prefix is computed.
    other = prompts[1]
    shared = next(i for i, (a, b) in enumerate(zip(prompt, other)) if a != b)
    assert 0 < shared < len(prompt) - 1
    stage.forward(request("s", other[shared:-1], shared, len(other) + TOKENS, sample=False), TIMEOUT_S)
    first = stage.forward(request("s", other[-1:], len(other) - 1, len(other) + TOKENS, new_generation=True),
                          TIMEOUT_S)
    assert first.token == oracle_tokens(oracle[0], other, 1)[0]


def test_a_released_session_frees_its_bytes_and_fails_its_queued_steps(whole, prompts):
    stage = make_stage(whole)
    prompt = prompts[0]
    token = prefill(stage, "s", prompt, len(prompt) + TOKENS).token
    sessions, held = stage.usage()
    assert sessions == 1 and held >= stage.loaded.slice.kv_bytes(len(prompt) + TOKENS)

    gate = hold(stage.worker)
    queued = stage.accept(request("s", [token], len(prompt), len(prompt) + TOKENS), TIMEOUT_S)
    released = stage.release("s")
    gate.set()
    assert released.found and released.freed_bytes == stage.loaded.slice.kv_bytes(len(prompt) + TOKENS)
    error = stage_error(queued)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "was released" in error.message
    assert stage.usage() == (0, 0)
    assert not stage.release("s").found

    later = stage_error(stage.accept(request("s", [token], len(prompt), len(prompt) + TOKENS), TIMEOUT_S))
    assert later.code == grpc.StatusCode.FAILED_PRECONDITION and "was released" in later.message


def test_a_first_chunk_arriving_after_its_release_does_not_open_the_session_again(whole, prompts):
    # A client left while its prompt's first chunk was still on its way to this stage: the
    # coordinator's Release overtook it. The chunk must not open a session nobody will release.
    stage = make_stage(whole)
    prompt = prompts[0]
    assert not stage.release("gone").found
    late = stage_error(stage.accept(request("gone", prompt[:4], 0, len(prompt) + TOKENS, sample=False), TIMEOUT_S))
    assert late.code == grpc.StatusCode.FAILED_PRECONDITION and "was released" in late.message
    assert stage.usage() == (0, 0)
    assert prefill(stage, "other", prompt, len(prompt) + TOKENS).token >= 0  # other sessions still open


def test_a_row_that_fails_fails_only_itself_and_its_later_steps(whole, oracle, oracle_tokens, prompts):
    """A min_p outside [0, 1] (the coordinator refuses it; a stage checks only what guards its
    memory and the vocabulary) fails the stage's sampler: that row fails, its session's queued
    next step with it, and the other rows of its batch go on."""
    stage = make_stage(whole)
    good, bad = prompts[0], prompts[1]
    bad_sampling = pb.SamplingParams(temperature=1.0, min_p=1.5)
    first = prefill(stage, "good", good, len(good) + TOKENS).token
    stage.forward(request("bad", bad[:-1], 0, len(bad) + TOKENS, sample=False), TIMEOUT_S)
    futures = one_round(stage, [
        request("good", [first], len(good), len(good) + TOKENS),
        request("bad", bad[-1:], len(bad) - 1, len(bad) + TOKENS, new_generation=True, sampling=bad_sampling),
        request("bad", [0], len(bad), len(bad) + TOKENS, sampling=bad_sampling),  # waits for the step before
    ])
    assert futures[0].result(TIMEOUT_S).token == oracle_tokens(oracle[0], good, 2)[1]
    failed = stage_error(futures[1])
    assert failed.code == grpc.StatusCode.INTERNAL and "min_p" in failed.message and failed.node == "solo"
    assert stage_error(futures[2]).message == failed.message


def test_requests_a_stage_cannot_serve_are_refused(whole, prompts):
    prompt = prompts[0]
    stage = make_stage(whole, budget=whole[1].kv_bytes(len(prompt) + TOKENS))

    past = stage_error(stage.accept(request("s", prompt, 0, len(prompt) - 1), TIMEOUT_S))
    assert past.code == grpc.StatusCode.INVALID_ARGUMENT and "past max_positions" in past.message
    vocab = whole[1].args.vocab_size
    unknown = stage_error(stage.accept(request("s", [vocab], 0, 4), TIMEOUT_S))
    assert unknown.code == grpc.StatusCode.INVALID_ARGUMENT and f"[0, {vocab})" in unknown.message
    top_k = stage_error(stage.accept(request("s", [1], 0, 4, sampling=pb.SamplingParams(top_k=vocab)), TIMEOUT_S))
    assert top_k.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k must be below" in top_k.message
    masked = request("s", [1], 0, 4)
    masked.allowed_tokens = b"\xff" * 8  # a mask's length must be the vocabulary's (cluster/shaping.py)
    mask = stage_error(stage.accept(masked, TIMEOUT_S))
    assert mask.code == grpc.StatusCode.INVALID_ARGUMENT and "allowed_tokens must be" in mask.message
    assert stage.usage() == (0, 0)  # nothing refused took memory

    prefill(stage, "s", prompt, len(prompt) + TOKENS)
    full = stage_error(stage.accept(request("t", prompt, 0, len(prompt) + TOKENS), TIMEOUT_S))
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "budget full" in full.message
    # A step past what the session reserved is refused; one within it still runs.
    beyond = stage_error(stage.accept(request("s", [1, 2], len(prompt) + TOKENS - 1, len(prompt) + TOKENS),
                                      TIMEOUT_S))
    assert beyond.code == grpc.StatusCode.INVALID_ARGUMENT
    assert stage.forward(request("s", [1], len(prompt), len(prompt) + TOKENS), TIMEOUT_S).sampled

    stage.loaded = None
    unloaded = stage_error(stage.accept(request("s", [1], 0, 4), TIMEOUT_S))
    assert unloaded.code == grpc.StatusCode.FAILED_PRECONDITION and "no model loaded" in unloaded.message


def test_a_request_of_a_coordinator_that_does_not_own_the_node_is_refused(whole):
    def admit(coordinator_id: str):
        if coordinator_id != "owner":
            raise StageError(grpc.StatusCode.ABORTED, f"{coordinator_id} does not own node solo", "solo")

    stage = make_stage(whole, admit=admit)
    refused = stage_error(stage.accept(pb.ForwardRequest(session_id="s", tokens=[1], max_positions=4,
                                                         coordinator_id="stranger"), TIMEOUT_S))
    assert refused.code == grpc.StatusCode.ABORTED and stage.usage() == (0, 0)
    ok = pb.ForwardRequest(session_id="s", tokens=[1], max_positions=4, coordinator_id="owner", sample=True)
    assert stage.forward(ok, TIMEOUT_S).sampled


def stage_delivering_here(whole):
    """A stage whose ring replies to this node are collected: (stage, the replies, set at each)."""
    delivered, arrived = [], threading.Event()

    def deliver(reply: pb.ForwardReply):
        delivered.append(reply)
        arrived.set()

    return make_stage(whole, deliver=deliver), delivered, arrived


def test_ring_replies_to_this_node_go_to_its_delivery_hook(whole, oracle, oracle_tokens, prompts):
    stage, delivered, arrived = stage_delivering_here(whole)
    prompt = prompts[2]
    stage.forward(request("s", prompt[:-1], 0, len(prompt) + 1, sample=False), TIMEOUT_S)
    last = request("s", prompt[-1:], len(prompt) - 1, len(prompt) + 1, new_generation=True)
    last.reply_to, last.ticket = ADDRESS, 7
    accepted = stage.accept(last, TIMEOUT_S).result(TIMEOUT_S)
    assert accepted == pb.ForwardReply()  # the sender hears only that it went on
    assert arrived.wait(TIMEOUT_S)
    [reply] = delivered
    assert reply.ticket == 7 and reply.sampled and reply.token == oracle_tokens(oracle[0], prompt, 1)[0]


def test_a_ring_step_is_accepted_once_queued_and_its_later_failure_goes_to_the_coordinator(whole, prompts):
    stage, delivered, arrived = stage_delivering_here(whole)
    prompt = prompts[0]
    stage.forward(request("s", prompt[:-1], 0, len(prompt) + 1, sample=False), TIMEOUT_S)
    gap = request("s", prompt[-1:], len(prompt), len(prompt) + 1)  # one position past the session's end
    gap.reply_to, gap.ticket = ADDRESS, 9
    accepted = stage.accept(gap, 0.2)
    assert accepted.done() and accepted.result() == pb.ForwardReply()  # the sender waits on nothing
    assert arrived.wait(TIMEOUT_S)  # the step between never comes: its deadline passes on the queue
    [reply] = delivered
    assert reply.ticket == 9 and reply.failure.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "steps between never came" in reply.failure.message


def test_a_chunk_wider_than_the_coordinators_prefill_chunk_is_refused_before_it_runs(whole, prompts):
    stage = make_stage(whole)
    stage.loaded.prefill_chunk = 8
    prompt = prompts[0]
    wide = stage_error(stage.accept(request("s", prompt[:9], 0, len(prompt) + TOKENS, sample=False), TIMEOUT_S))
    assert wide.code == grpc.StatusCode.INVALID_ARGUMENT and "1 to 8 positions" in wide.message
    assert stage.usage() == (0, 0)
    assert stage.forward(request("s", prompt[:8], 0, len(prompt) + TOKENS, sample=False), TIMEOUT_S)


class BusyCoordinator(pb_grpc.NodeServicer):
    """A coordinator's Deliver over real gRPC that answers RESOURCE_EXHAUSTED to its first `busy` calls."""

    def __init__(self, busy: int):
        self.busy, self.calls, self.delivered, self.arrived = busy, [], [], threading.Event()

    def Deliver(self, request, context):
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy: every ring slot in use")
        self.delivered.append(request)
        self.arrived.set()
        return pb.DeliverReply()


@pytest.fixture
def coordinator_at():
    """coordinator_at(busy) -> (its address, its BusyCoordinator); the servers stop after the test."""
    servers = []

    def start(busy: int):
        server, port = make_server("127.0.0.1", 0, bytes.fromhex(TEST_SECRET), "coordinator")
        servicer = BusyCoordinator(busy)
        pb_grpc.add_NodeServicer_to_server(servicer, server)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for server in servers:
        server.stop(0)


def ring_stage(whole, prompt: list, address: str) -> tuple:
    """A stage whose next step's token goes to the coordinator at `address`; (stage, that step)."""
    stage = Stage("solo", ADDRESS, whole[0], lambda a: node_stub(open_channel(a, bytes.fromhex(TEST_SECRET))))
    stage.loaded = LocalStage(whole[1], whole[2].model_id, whole[2].name, whole[2].num_layers, BIG_BUDGET)
    stage.forward(request("s", prompt[:-1], 0, len(prompt) + 1, sample=False), TIMEOUT_S)
    last = request("s", prompt[-1:], len(prompt) - 1, len(prompt) + 1, new_generation=True)
    last.reply_to, last.ticket = address, 11
    return stage, last


def test_a_token_the_coordinator_is_too_busy_to_take_is_delivered_after_pauses(whole, oracle, oracle_tokens,
                                                                               prompts, coordinator_at):
    address, coordinator = coordinator_at(busy=4)
    stage, last = ring_stage(whole, prompts[0], address)
    stage.accept(last, TIMEOUT_S).result(TIMEOUT_S)
    assert coordinator.arrived.wait(TIMEOUT_S)
    [reply] = coordinator.delivered
    assert reply.ticket == 11 and reply.token == oracle_tokens(oracle[0], prompts[0], 1)[0]
    pauses = [b - a for a, b in zip(coordinator.calls, coordinator.calls[1:])]
    assert len(pauses) == 4 and pauses[-1] > 2 * pauses[0]  # each pause longer than the one before


def test_a_token_that_cannot_be_delivered_is_given_up_saying_so(whole, prompts, coordinator_at, monkeypatch,
                                                                caplog):
    monkeypatch.setattr(delivery, "DELIVER_GIVE_UP_S", 1.0)
    address, coordinator = coordinator_at(busy=10**6)
    stage, last = ring_stage(whole, prompts[0], address)
    with caplog.at_level(logging.WARNING, logger="kimi_cluster.stage"):
        stage.accept(last, TIMEOUT_S).result(TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while "could not deliver ticket 11" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)  # pacing between reads of the log; the line is what we wait on
    assert "the coordinator replays the step" in caplog.text
    tries = len(coordinator.calls)
    assert 3 <= tries <= 8 and coordinator.calls[-1] - coordinator.calls[0] < 1.0 + delivery.DELIVER_TIMEOUT_S
    assert not coordinator.delivered


@pytest.fixture
def scheduler_over():
    """scheduler_over(stage): the coordinator's scheduler over a chain of one node, `stage` (this
    process's own), whose health (what its compute thread runs and queues) is checked every 50 ms."""
    checking = threading.Event()

    def make(stage: Stage) -> Scheduler:
        member = Member(ADDRESS, SimpleNamespace(Release=lambda r, timeout: stage.release(r.session_id)),
                        status="ready")

        def check():
            while not checking.wait(0.05):
                member.answered(pb.HealthReply(queued=stage.worker.queued, busy_s=stage.worker.busy_s()))

        threading.Thread(target=check, daemon=True).start()
        chain = [member]
        ready = threading.Event()
        ready.set()
        return Scheduler(SimpleNamespace(address=ADDRESS, stage=stage), SimpleNamespace(chain=chain, coordinator_id=""),
                         Sessions(lambda: chain), 256, lambda name: None, ready)

    yield make
    checking.set()


@pytest.fixture
def quick_silence(monkeypatch):
    monkeypatch.setattr(scheduling, "SILENT_FLOOR_S", 1.0)
    monkeypatch.setattr(scheduling, "SILENT_IDLE_S", 0.5)


def test_a_token_never_delivered_is_replayed_with_the_same_tokens(whole, oracle, oracle_tokens, prompts,
                                                                   scheduler_over, quick_silence):
    prompt, dropped, tokens = prompts[1], [], []

    def lossy(reply: pb.ForwardReply):
        if reply.token:
            tokens.append(reply.ticket)
        if reply.token and len(tokens) in (2, 4):  # the second and fourth lost on their way back
            dropped.append(reply.ticket)
            return
        scheduler.deliver(reply)

    stage = make_stage(whole, deliver=lossy)
    scheduler = scheduler_over(stage)
    got = [token for token, _, _ in scheduler.generate(prompt, TOKENS, GREEDY, deadline=time.monotonic() + TIMEOUT_S)]
    assert len(dropped) == 2 and got == oracle_tokens(oracle[0], prompt, TOKENS)


def test_a_request_whose_tokens_never_arrive_fails_saying_so(whole, prompts, scheduler_over, quick_silence):
    stage = make_stage(whole, deliver=lambda reply: None)
    with pytest.raises(GenerateError, match="lost on its way back"):
        list(scheduler_over(stage).generate(prompts[0], TOKENS, GREEDY, deadline=time.monotonic() + TIMEOUT_S))


def test_a_step_with_a_draft_keeps_what_verifies_and_the_next_step_trims_the_rest(whole, oracle, oracle_tokens,
                                                                                  prompts):
    """Speculative decoding on one stage: a draft of the right tokens is kept whole with a bonus
    token; a wrong one is corrected at its first token, and the next step's offset drops the
    rejected positions from the caches; a draft the stage cannot verify is refused."""
    stage = make_stage(whole)
    prompt = prompts[0]
    limit = len(prompt) + 12
    expected = oracle_tokens(oracle[0], prompt, 9)
    first = prefill(stage, "s", prompt, limit).token

    def verify(tokens, offset, draft, sample=True):
        r = request("s", tokens + draft, offset, limit, sample=sample)
        r.draft.extend(draft)
        return r

    kept = stage.forward(verify([first], len(prompt), expected[1:4]), TIMEOUT_S)
    assert list(kept.tokens) == expected[1:5] and kept.token == expected[4] and len(kept.logprobs) == 4
    wrong = [t + 1 for t in expected[6:8]]
    corrected = stage.forward(verify([expected[4]], len(prompt) + 4, [expected[5], *wrong]), TIMEOUT_S)
    assert list(corrected.tokens) == expected[5:7]
    assert stage.sessions["s"].position == len(prompt) + 8  # the rejected positions are still there...
    after = stage.forward(request("s", [expected[6]], len(prompt) + 6, limit), TIMEOUT_S)
    assert after.token == expected[7] and stage.sessions["s"].position == len(prompt) + 7  # ...until trimmed
    assert (stage.speculation.drafted, stage.speculation.accepted) == (6, 4)

    not_sampled = verify([1], len(prompt), [2, 3], sample=False)
    too_long, not_the_end = request("s", [1, 2], len(prompt), limit), request("s", [1, 2, 3], len(prompt), limit)
    too_long.draft.extend([1, 2])
    not_the_end.draft.extend([2])
    for bad, words in ((not_sampled, "set `sample`"), (too_long, "at least 3 positions"),
                       (not_the_end, "must end with the draft")):
        refused = stage_error(stage.accept(bad, TIMEOUT_S))
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and words in refused.message, refused.message


def test_speculative_steps_of_several_sessions_run_as_one_forward(whole, oracle, oracle_tokens, prompts,
                                                                  monkeypatch):
    """Speculative steps of different widths, of sessions at different positions, queued together
    run as one forward (the narrower rows padded) beside the round's decode batch; each keeps what
    verifies, as mlx-lm's tokens say, and each session's caches hold only its own positions."""
    stage, (worker, model_slice, _) = make_stage(whole), whole
    names = [f"v{i}" for i in range(len(prompts))]
    limits = [len(p) + 12 for p in prompts]
    expected = [oracle_tokens(oracle[0], p, 8) for p in prompts]
    for name, p, limit, want in zip(names, prompts, limits, expected):
        assert prefill(stage, name, p, limit).token == want[0]
    # v0 drafts 3 right tokens, v1 one right and one wrong, v2 takes a plain decode step.
    drafts = [expected[0][1:4], [expected[1][1], expected[1][2] + 1], []]
    steps = []
    for name, p, limit, want, draft in zip(names, prompts, limits, expected, drafts):
        r = request(name, [want[0], *draft], len(p), limit)
        r.draft.extend(draft)
        steps.append(r)
    rows = []  # ((rows, positions), absorbed) of each forward the slice runs
    forward = model_slice.forward
    monkeypatch.setattr(model_slice, "forward", lambda x, caches, absorbed=None:
                        rows.append((x.shape[:2], absorbed)) or forward(x, caches, absorbed))
    batched = worker.batched_rows
    replies = [f.result(TIMEOUT_S) for f in one_round(stage, steps)]
    # the decode alone, in the form the slice picks (one position: mlx-lm's); both speculative
    # steps in one forward, attending in MLA's absorbed form
    assert sorted(rows) == [((1, 1), None), ((2, 4), True)]
    assert worker.batched_rows - batched == 2
    assert list(replies[0].tokens) == expected[0][1:5]  # three drafted tokens kept, and a bonus one
    assert list(replies[1].tokens) == expected[1][1:3]  # one kept, the wrong one corrected
    assert replies[2].token == expected[2][1] and not replies[2].tokens
    # The caches hold each step's own positions, the padding trimmed: v1's step was 3 wide, not 4.
    assert [stage.sessions[n].position for n in names] == [len(p) + w for p, w in zip(prompts, (4, 3, 1))]
    after = [f.result(TIMEOUT_S) for f in one_round(stage, [
        request(names[0], [expected[0][4]], len(prompts[0]) + 4, limits[0]),
        request(names[1], [expected[1][2]], len(prompts[1]) + 2, limits[1])])]
    assert [a.token for a in after] == [expected[0][5], expected[1][3]]
