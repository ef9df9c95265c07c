"""What a cluster does when things go wrong: a node killed or stalled mid-reply, a node that does not share
the secret, a KV cache budget too small for a request. Real processes, real gRPC, real MLX; the
single-process mlx-lm model is the reference for every token."""

import json
import re
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from mlx_lm.sample_utils import make_sampler

from cluster.loading import checkpoint_sizes, prefill_chunk
from cluster.generated import kimi_cluster_pb2 as pb
from cluster.planner import kv_cache_bytes, prefill_scratch_bytes
from cluster.shaping import put_penalties
from cluster.wire import coordinator_stub, node_stub, open_channel
import harness
from harness import (TEST_SECRET, LocalCluster, oracle_reply, oracle_scores, poll, run_at_once, start_node, tight_memory,
                     wait_for_log)
from mlx_kimi.checkpoint import open_checkpoint
from mlx_kimi.constrain import Constraint, ConstraintSpec
from mlx_kimi.penalties import Penalties
from mlx_kimi.slice import LayerRange, load_slice

GREEDY_TOKENS = 48


# ---- 4. a node killed or stalled during generation ------------------------------------------------


def middle_of(cluster):
    """(the middle stage's node process, its name, the other node processes) of a 3-stage cluster."""
    stages = sorted(cluster.memory_map().nodes, key=lambda n: n.start)
    assert [(s.start, s.end) for s in stages] == [(0, 2), (2, 4), (4, 6)]
    middle = next(n for n in cluster.peers if n.name == stages[1].name)
    return middle, middle.name, [n for n in cluster.nodes if n is not middle]


def generate_during(cluster, requests: list, interrupt, after_tokens: int = 5) -> list:
    """Run every pb.GenerateRequest of `requests` at once, call `interrupt()` once each has streamed
    `after_tokens` tokens, and return each one's token ids (or its error)."""
    streamed = [threading.Event() for _ in requests]
    results = [None] * len(requests)

    def generate(i, request):
        ids = []
        try:
            for event in cluster.client.Generate(request, timeout=180):
                if event.HasField("token") and event.token.id >= 0:
                    ids.append(event.token.id)
                    if len(ids) >= after_tokens:
                        streamed[i].set()
            results[i] = ids
        except grpc.RpcError as e:
            results[i] = e
        streamed[i].set()

    threads = [threading.Thread(target=generate, args=(i, r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    try:
        for event in streamed:
            assert event.wait(120), "no tokens streamed"
        assert not any(isinstance(r, grpc.RpcError) for r in results), results
        assert None in results, "every reply finished before the interruption"
        interrupt()
    finally:
        for t in threads:
            t.join(timeout=180)
    assert not any(t.is_alive() for t in threads)
    return results


ANSWER = {"type": "object", "additionalProperties": False, "required": ["name", "count"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}}}


@pytest.fixture(scope="module")
def eight_generations(oracle, make_chat_prompt):
    """([pb.GenerateRequest] of 8 requests, greedy and
    seeded, and the tokens of each from the oracle): the last two with penalties and a JSON schema
    (an instant-mode prompt, so the grammar holds the reply from its first token), whose grammar
    state and penalty history a replay must rebuild exactly."""
    prompts = [make_chat_prompt(oracle[1], text) for text in ("Hi!", "Hello there", "Why?")]
    requests, expected = [], []
    for i, prompt in enumerate(prompts):
        for temperature, seed in ((0.0, None), (0.8, 100 + i)):
            sampling = pb.SamplingParams(temperature=temperature)
            if seed is not None:
                sampling.seed = seed
            sampler = make_sampler(temperature) if temperature else None
            requests.append(pb.GenerateRequest(prompt_tokens=prompt, sampling=sampling, max_tokens=GREEDY_TOKENS))
            expected.append(oracle_reply(oracle, prompt, GREEDY_TOKENS, sampler=sampler, seed=seed))
    tokenizer = oracle[1]
    instant = list(tokenizer.apply_chat_template([{"role": "user", "content": "Go on"}], add_generation_prompt=True,
                                                 thinking=False))
    penalties = Penalties(presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.2, logit_bias={7: 2.0})
    for seed in (200, 201):
        sampling = pb.SamplingParams(temperature=0.8, seed=seed)
        put_penalties(sampling, penalties)
        constraint = Constraint.for_spec(ConstraintSpec(json_schema=ANSWER), tokenizer, 512, tokenizer.eos_token_ids)
        fmt = json.dumps({"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}})
        requests.append(pb.GenerateRequest(prompt_tokens=instant, sampling=sampling, max_tokens=GREEDY_TOKENS,
                                            response_format_json=fmt))
        expected.append(oracle_reply(oracle, instant, GREEDY_TOKENS, sampler=make_sampler(0.8), seed=seed,
                                     logits_processors=penalties.processors() + [constraint.processor(len(instant))]))
    return requests, expected


def stage_ranges(reply) -> dict:
    """{node name: (start, end)} of the nodes holding layers in a memory map."""
    return {n.name: (n.start, n.end) for n in reply.nodes if n.has_layers}


def loads(node) -> int:
    """How many slices the node has loaded since it started (its log says each)."""
    return len(re.findall(r"loaded \S+ layers", node.log()))


def test_killed_node_layers_move_and_every_generation_keeps_its_tokens(tmp_path, tiny_dir, eight_generations):
    """kill -9 of the last stage during concurrent generations, greedy and seeded, with no spare:
    the stage before it can hold its layers too, so it takes them (the first stage keeps its own
    and is not loaded again); each session is replayed on the new chain and every reply equals an
    uninterrupted run. The killed node, restarted, is a spare."""
    requests, expected = eight_generations
    with LocalCluster(tmp_path, tiny_dir, stages=3) as cluster:
        before = stage_ranges(cluster.memory_map())
        last = next(n for n in cluster.peers if before[n.name] == (4, 6))
        middle = next(n for n in cluster.peers if before[n.name] == (2, 4))
        assert before[cluster.coordinator.name] == (0, 2)
        port = int(last.address.rsplit(":", 1)[1])
        coordinator_loads = loads(cluster.coordinator)
        results = generate_during(cluster, requests, lambda: last.kill(signal.SIGKILL), after_tokens=3)
        for got, want in zip(results, expected):
            assert got == want
        reply = cluster.memory_map()
        assert reply.state == "ready", reply
        status = {n.name: (n.status, n.has_layers) for n in reply.nodes}
        assert status[last.name][0] == "lost" and not status[last.name][1], status
        assert stage_ranges(reply) == {cluster.coordinator.name: (0, 2), middle.name: (2, 6)}
        assert loads(cluster.coordinator) == coordinator_loads
        assert "layers [2, 6)" in middle.log() and "layers [2, 4) were in memory already" in middle.log()
        assert "moving its layers" in cluster.coordinator.log()

        restarted = start_node(tmp_path, last.name, "1GB", env=cluster.env, port=port)
        cluster.peers[cluster.peers.index(last)] = restarted
        poll(cluster.memory_map, lambda m: {n.name: n.status for n in m.nodes}[last.name] == "spare", 30,
             "the restarted node to be a spare")
        ids, _ = cluster.generate(prompt_tokens=requests[0].prompt_tokens, max_tokens=GREEDY_TOKENS)
        assert ids == expected[0]


def test_any_stage_killed_is_replaced_by_a_spare_and_no_generation_is_lost(tmp_path, tiny_dir, eight_generations):
    """Three stages and a spare that joins the running cluster with `--peer COORDINATOR`; the
    coordinator holds no layers (too little memory). kill -9 of the last, then the first stage
    (a middle one lost: test_stalled_node_the_others_cannot_replace_is_waited_for), each during 8
    concurrent generations (greedy and seeded): the spare takes the lost stage's layers whole, no
    other node loads anything, and every reply equals an uninterrupted run. Each killed node,
    restarted on another port with only its --name (no --peer, no mDNS), finds the coordinator
    that loaded it and is the next spare."""
    requests, expected = eight_generations
    with LocalCluster(tmp_path, tiny_dir, stages=4, coordinator_extra=["--memory", "50MB"]) as cluster:
        ranges = stage_ranges(cluster.memory_map())
        assert sorted(ranges.values()) == [(0, 2), (2, 4), (4, 6)] and cluster.coordinator.name not in ranges
        spare = start_node(tmp_path, "spare", env=cluster.env, extra=["--peer", cluster.coordinator.address])
        cluster.peers.append(spare)
        poll(cluster.memory_map, lambda m: {n.name: n.status for n in m.nodes}.get("spare") == "spare", 30,
             "the node started with --peer to be a spare")
        for layers in ((4, 6), (0, 2)):
            victim = next(n for n in cluster.peers if ranges.get(n.name) == layers)
            survivors = [n for n in cluster.peers if n.name in ranges and n is not victim]
            survivor_loads = [loads(n) for n in survivors]
            results = generate_during(cluster, requests, lambda: victim.kill(signal.SIGKILL), after_tokens=3)
            assert results == expected, layers
            reply = cluster.memory_map()
            assert reply.state == "ready", reply
            moved = {name: r for name, r in ranges.items() if name != victim.name} | {spare.name: layers}
            ranges = stage_ranges(reply)
            assert ranges == moved, layers
            assert [loads(n) for n in survivors] == survivor_loads, layers  # only re-pointed
            for node in [*survivors, spare]:  # the 8 replies stay cached; nothing of the broken chain is left
                assert cluster.node_stub(node).Health(pb.HealthRequest(), timeout=10).sessions == 8, node.name

            back = start_node(tmp_path, victim.name, env=cluster.env)
            assert back.address != victim.address
            cluster.peers[cluster.peers.index(victim)] = back
            poll(cluster.memory_map, lambda m: any(n.name == back.name and n.address == back.address
                                                   and n.status == "spare" for n in m.nodes), 30,
                 f"{back.name}, back on another port, to be a spare")
            spare = back
        spare.kill(signal.SIGKILL)  # a spare that goes away is shown lost
        poll(cluster.memory_map, lambda m: {n.name: n.status for n in m.nodes}[spare.name] == "lost", 30,
             f"the killed spare {spare.name} to be lost")


def test_stalled_node_the_others_cannot_replace_is_waited_for(tmp_path, tiny_dir, oracle, chat_prompt_ids):
    """A node that stops answering without closing its connections (SIGSTOP: a hung process, a
    sleeping Mac) is lost after a few silent seconds; the other two cannot hold the model, so the
    cluster is degraded, new requests are refused naming it, and the reply in flight waits. When
    the node answers again it is loaded again (none of the broken chain's sessions kept), and the
    waiting reply is replayed there and finishes with the oracle's tokens."""
    context = 1024
    expected = oracle_reply(oracle, chat_prompt_ids, GREEDY_TOKENS)
    memory = tight_memory(tiny_dir, 3, context)
    with LocalCluster(tmp_path, tiny_dir, stages=3, memory=memory, extra=["--context", str(context)]) as cluster:
        middle, middle_name, survivors = middle_of(cluster)

        def stall_until_degraded():
            middle.kill(signal.SIGSTOP)
            try:
                reply = poll(cluster.memory_map, lambda m: "cannot hold the model" in m.message, 30,
                             "a map saying the others cannot hold the model")
                assert reply.state == "degraded" and middle_name in reply.message, reply
                assert {n.name: n.status for n in reply.nodes}[middle_name] == "lost"
                with pytest.raises(grpc.RpcError) as info:
                    cluster.generate(prompt_tokens=chat_prompt_ids, max_tokens=4)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "degraded" in info.value.details()
            finally:
                middle.kill(signal.SIGCONT)

        request = pb.GenerateRequest(prompt_tokens=chat_prompt_ids, max_tokens=GREEDY_TOKENS)
        [ids] = generate_during(cluster, [request], stall_until_degraded)
        assert ids == expected
        reply = cluster.memory_map()
        assert reply.state == "ready" and {n.name: n.status for n in reply.nodes}[middle_name] == "ready"
        assert "replaying" in cluster.coordinator.log()
        for node in cluster.nodes:  # only the finished reply's session is left (cached for a next turn)
            health = cluster.node_stub(node).Health(pb.HealthRequest(), timeout=10)
            assert health.sessions == 1, (node.name, health)


def test_a_prompt_being_scored_when_a_node_is_lost_is_scored_again_as_mlx_lm(tmp_path, tiny_dir, oracle):
    """/v1/completions scoring a prompt of two prefill chunks (`echo`, `logprobs`) while the last
    stage is paused, then killed: the first stage has the prompt, the last never answers; the
    layers move and the prompt is scored again from its start, every logprob mlx-lm's, and the
    reply after it too."""
    model, tokenizer = oracle
    ids = tokenizer.encode(" ".join(map(str, range(100, 220))), add_special_tokens=False)
    _, want = oracle_scores(oracle, ids)
    reply_ids = oracle_reply(oracle, ids, 3)
    key = secrets.token_hex(8)
    with harness.ApiCluster(tmp_path, tiny_dir, stages=2,
                            coordinator_extra=["--api-port", "0", "--api-key", key, "--context", "1024"]) as api:
        client = harness.openai_client(api, key).with_options(timeout=120)
        [last] = api.peers
        first = api.node_stub(api.coordinator)
        assert first.Health(pb.HealthRequest(), timeout=10).sessions == 0
        last.kill(signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(1) as pool:
                scored = pool.submit(client.completions.create, model=api.model_name, prompt=[ids], max_tokens=3,
                                     temperature=0, echo=True, logprobs=1)
                poll(lambda: first.Health(pb.HealthRequest(), timeout=10).sessions, lambda n: n == 1, 30,
                     "the first stage to hold the prompt's session")
                last.kill(signal.SIGKILL)
                reply = scored.result()
        finally:
            last.kill(signal.SIGCONT)
        assert "replaying" in api.coordinator.log()
    choice = reply.choices[0]
    assert choice.text == tokenizer.decode(ids) + tokenizer.decode(reply_ids)
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)


def test_a_node_started_with_peer_coordinator_joins_it(tmp_path, tiny_dir, oracle, chat_prompt_ids):
    """Without mDNS, a coordinator started alone (--nodes 2) learns of a node only from the node
    itself: `up --peer COORDINATOR` joins it, the two are planned and reply like mlx-lm."""
    coordinator = start_node(tmp_path, "coord", model=tiny_dir, extra=["--nodes", "2"])
    worker = None
    try:
        wait_for_log(coordinator, r"waiting for 2 nodes", 60)
        worker = start_node(tmp_path, "worker", extra=["--peer", coordinator.address])
        coordinator.wait_for("cluster ready")
        wait_for_log(worker, rf"joined the coordinator at {coordinator.address} \(this node's status there: waiting\)")
        client = coordinator_stub(open_channel(coordinator.address, bytes.fromhex(TEST_SECRET)))
        reply = client.MemoryMap(pb.MemoryMapRequest(), timeout=30)
        assert {n.name: n.has_layers for n in reply.nodes} == {"coord": True, "worker": True}, reply
        request = pb.GenerateRequest(prompt_tokens=chat_prompt_ids, max_tokens=16)
        ids = [e.token.id for e in client.Generate(request, timeout=120) if e.HasField("token") and e.token.id >= 0]
        assert ids == oracle_reply(oracle, chat_prompt_ids, 16)
    finally:
        for node in (worker, coordinator):
            if node:
                node.kill()


def test_node_back_on_another_port_without_mdns_is_attached_again(tmp_path, tiny_dir, oracle, chat_prompt_ids):
    """Two nodes the model needs both of, the peer named with --peer and no mDNS. It is killed -9
    during a reply and restarted on another port with only its --name: it finds the coordinator
    that loaded it (saved in its config dir) and says where it is now; the coordinator attaches
    it there and loads its layers again, and the waiting reply finishes with the oracle's tokens."""
    expected = oracle_reply(oracle, chat_prompt_ids, GREEDY_TOKENS)
    memory = tight_memory(tiny_dir, 2)
    with LocalCluster(tmp_path, tiny_dir, stages=2, memory=memory) as cluster:
        [peer] = cluster.peers

        def kill_and_restart_elsewhere():
            peer.kill(signal.SIGKILL)
            poll(cluster.memory_map, lambda m: m.state == "degraded", 30, "the cluster to be degraded")
            back = start_node(tmp_path, peer.name, memory, env=cluster.env)
            assert back.address != peer.address
            cluster.peers[0] = back

        request = pb.GenerateRequest(prompt_tokens=chat_prompt_ids, max_tokens=GREEDY_TOKENS)
        [ids] = generate_during(cluster, [request], kill_and_restart_elsewhere)
        assert ids == expected
        reply = cluster.memory_map()
        entry = next(n for n in reply.nodes if n.name == peer.name)
        assert reply.state == "ready" and (entry.status, entry.address) == ("ready", cluster.peers[0].address), reply
        assert f"{peer.name} moved from {peer.address} to {cluster.peers[0].address}" in cluster.coordinator.log()
        # what a Join that cannot be right is told
        with pytest.raises(grpc.RpcError) as info:
            cluster.client.Join(pb.JoinRequest(address="no-port"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "HOST:PORT" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            cluster.client.Join(pb.JoinRequest(address=peer.address), timeout=10)  # nothing listens there now
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and peer.address in info.value.details()
        # another node (another machine's id) under the name of a live one does not take its place
        other = start_node(tmp_path, peer.name, memory, env=harness.node_env(tmp_path / "other-machine"),
                           extra=["--peer", cluster.coordinator.address])
        cluster.peers.append(other)
        wait_for_log(other, rf"cannot join the coordinator at \S+: a node named {peer.name} .* already serves at "
                            rf"{cluster.peers[0].address}; start the one at {other.address} .* with another --name", 30)
        assert {n.name: n.address for n in cluster.memory_map().nodes}[peer.name] == cluster.peers[0].address


def test_peer_with_another_secret_is_never_used(tmp_path, tiny_dir, chat_prompt_ids):
    other_env = harness.node_env(tmp_path / "other-home", secret=secrets.token_hex(32))
    intruder = start_node(tmp_path, "intruder", env=other_env)
    coordinator = None
    channel = None
    try:
        coordinator = start_node(tmp_path, "coord", model=tiny_dir, peers=[intruder.address],
                                 env=harness.node_env(tmp_path / "home"))
        channel = open_channel(coordinator.address, bytes.fromhex(TEST_SECRET))
        client = coordinator_stub(channel)

        def memory_map():
            return client.MemoryMap(pb.MemoryMapRequest(), timeout=30)

        reply = poll(memory_map, lambda m: intruder.address in m.message, 30, "the map to name the peer")
        assert reply.state == "waiting"
        assert "waiting for" in reply.message
        # the coordinator keeps asking (each map refreshes every member) and keeps being refused
        for _ in range(3):
            reply = memory_map()
            assert reply.state == "waiting", reply
            assert intruder.address in reply.message
            entry = next(n for n in reply.nodes if n.address == intruder.address)
            assert entry.status == "waiting" and not entry.has_layers
        assert "cluster ready" not in coordinator.log()
        assert intruder.proc.poll() is None and coordinator.proc.poll() is None
        with pytest.raises(grpc.RpcError) as info:
            list(client.Generate(pb.GenerateRequest(prompt_tokens=chat_prompt_ids, max_tokens=4), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "waiting" in info.value.details()
        # nothing was loaded on the coordinator either
        assert not node_stub(channel).Health(pb.HealthRequest(), timeout=10).loaded
    finally:
        if channel:
            channel.close()
        for node in (coordinator, intruder):
            if node:
                node.kill()


# ---- 7. the KV cache budget -----------------------------------------------------------------------

CONTEXT = 1024
HELD_POSITIONS = 768


def test_kv_budget_and_context_limits(tmp_path, tiny_dir, oracle, chat_prompt_ids):
    """One node with just the memory the planner needs for a 1024-token context: weights, prefill
    scratch and the KV cache of 1024 positions. Its budget then holds one session of 768 positions
    but not two, while a short session still fits beside the long one; two requests of 768 at once
    run one after the other."""
    checkpoint = open_checkpoint(tiny_dir)
    sizes = checkpoint_sizes(checkpoint)
    chunk = prefill_chunk(sizes)
    scratch = prefill_scratch_bytes(sizes, CONTEXT, chunk)
    planned_kv = kv_cache_bytes(sizes, checkpoint.num_layers, CONTEXT)
    memory = sizes.total_bytes + scratch + planned_kv
    whole = load_slice(checkpoint, LayerRange(0, checkpoint.num_layers))
    one = whole.kv_bytes(HELD_POSITIONS)
    short = whole.kv_bytes(len(chat_prompt_ids) + 16)
    assert whole.kv_bytes(CONTEXT) == planned_kv  # node and planner count the same bytes
    assert one <= planned_kv < 2 * one and one + short <= planned_kv
    prompt = chat_prompt_ids
    with LocalCluster(tmp_path, tiny_dir, stages=1, memory=f"{memory}B", extra=["--context", str(CONTEXT)]) as cluster:
        node = cluster.node_stub(cluster.coordinator)
        info = node.Info(pb.InfoRequest(), timeout=10)
        assert info.usable_bytes == memory
        assert info.loaded.kv_budget_bytes == planned_kv

        def held():
            health = node.Health(pb.HealthRequest(), timeout=10)
            return health.sessions, health.kv_bytes

        # over the planned context: refused before anything is reserved
        with pytest.raises(grpc.RpcError) as err:
            cluster.generate(prompt_tokens=prompt, max_tokens=CONTEXT - len(prompt) + 1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"exceeds the planned context of {CONTEXT}" in err.value.details()
        assert held() == (0, 0)

        # one session of 768 positions fits ...
        holder = pb.ForwardRequest(session_id="holder", offset=0, tokens=prompt, sample=False,
                                   max_positions=HELD_POSITIONS,
                                   coordinator_id=node.Health(pb.HealthRequest(), timeout=10).coordinator_id)  # as the owner
        assert not node.Forward(holder, timeout=60).sampled
        assert held() == (1, one)
        # ... but a second one does not
        with pytest.raises(grpc.RpcError) as err:
            cluster.generate(prompt_tokens=prompt, max_tokens=HELD_POSITIONS - len(prompt))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV cache budget" in err.value.details()
        assert f"hold {one:,} of {planned_kv:,} bytes and this one needs {one:,}" in err.value.details()
        assert held() == (1, one)
        mem = cluster.memory_map().nodes[0]
        assert mem.kv_bytes == one and mem.free_bytes == memory - sizes.total_bytes - one

        # a short reply still fits beside it, and is right
        ids, _ = cluster.generate(prompt_tokens=prompt, max_tokens=16)
        assert ids == oracle_reply(oracle, prompt, 16)
        assert held() == (2, one + short)  # the short conversation stays cached for its next turn

        released = node.Release(pb.ReleaseRequest(session_id="holder"), timeout=10)
        assert released.found and released.freed_bytes == one
        assert held() == (1, short)

        # two requests whose sessions do not fit together: the second waits for the first to end
        # (its session cached, then evicted) instead of failing, and both are right
        long_prompts = [(prompt * HELD_POSITIONS)[i:i + HELD_POSITIONS - 16] for i in (0, 1)]  # no shared prefix
        expected = [oracle_reply(oracle, p, 16) for p in long_prompts]
        got = run_at_once([lambda p=p: cluster.generate(prompt_tokens=p, max_tokens=16)[0] for p in long_prompts])
        assert got == expected
        assert "waiting for one of the 1 other requests to end" in cluster.coordinator.log()


def test_paused_node_is_busy_not_lost_and_a_new_coordinator_frees_orphans(tmp_path, tiny_dir, oracle,
                                                                          chat_prompt_ids):
    """A node paused for 3 s (SIGSTOP: a busy or briefly sleeping machine) costs a pause, not the
    reply: the generation finishes with the oracle's tokens and the node is never marked lost.
    Then the coordinator dies with a session cached on the peer; its successor frees that orphan
    as soon as it loads the peer, instead of after the session TTL."""
    expected = oracle_reply(oracle, chat_prompt_ids, GREEDY_TOKENS * 4)
    peer = start_node(tmp_path, "peer1", "1GB")
    coordinator = start_node(tmp_path, "coord", "1GB", model=tiny_dir, peers=[peer.address])
    try:
        coordinator.wait_for("cluster ready")
        client = coordinator_stub(open_channel(coordinator.address, bytes.fromhex(TEST_SECRET)))
        peer_stub = node_stub(open_channel(peer.address, bytes.fromhex(TEST_SECRET)))
        request = pb.GenerateRequest(prompt_tokens=chat_prompt_ids, max_tokens=len(expected))
        ids = []
        for event in client.Generate(request, timeout=120):
            if event.HasField("token") and event.token.id >= 0:
                ids.append(event.token.id)
                if len(ids) == 5:
                    peer.kill(signal.SIGSTOP)
                    time.sleep(3.0)  # the pause under test
                    peer.kill(signal.SIGCONT)
        assert ids == expected
        assert "lost node" not in coordinator.log()
        assert peer_stub.Health(pb.HealthRequest(), timeout=10).sessions == 1  # cached for a next turn

        coordinator.kill(signal.SIGKILL)
        successor = start_node(tmp_path, "coord2", "1GB", model=tiny_dir, peers=[peer.address])
        try:
            successor.wait_for("cluster ready")
            assert peer_stub.Health(pb.HealthRequest(), timeout=10).sessions == 0
            assert "freeing 1 sessions of a previous coordinator" in peer.log()
        finally:
            successor.kill()
    finally:
        peer.kill(signal.SIGCONT)
        peer.kill()
        coordinator.kill()
