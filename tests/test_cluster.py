"""End to end: real `kimi-cluster up` processes on loopback, real gRPC, real MLX.

Every token a cluster produces is compared with the single-process mlx-lm model loaded from the
same checkpoint (the `oracle` fixture). The 3-stage cluster is shared by the tests of this module
that leave it as they found it; clusters of other shapes are started by the test that needs them.
"""

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import grpc
import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.sample_utils import make_sampler
from mlx.utils import tree_flatten

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.generated import kimi_cluster_pb2_grpc as pb_grpc
from cluster.link import ForwardLink, StageError
from cluster.wire import coordinator_stub, node_stub, open_channel
from harness import LocalCluster, oracle_reply, poll, run_at_once
from mlx_kimi.checkpoint import open_checkpoint, text_config
from mlx_kimi.tiny import TinyShape, make_tiny

GREEDY_TOKENS = 48
SYSTEM, USER = "Be brief.", "Hi!"


@pytest.fixture(scope="module")
def greedy_oracle(oracle):
    """Memoised greedy oracle replies: (prompt ids, max_tokens) -> ids."""
    cache = {}

    def get(prompt_ids, max_tokens=GREEDY_TOKENS):
        key = (tuple(prompt_ids), max_tokens)
        if key not in cache:
            cache[key] = oracle_reply(oracle, list(prompt_ids), max_tokens)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory, tiny_dir):
    """A coordinator and two peers, 2 layers each; shared by tests that do not disturb it."""
    with LocalCluster(tmp_path_factory.mktemp("cluster3"), tiny_dir, stages=3) as cluster:
        yield cluster


def node_by_name(cluster, name):
    return next(n for n in cluster.nodes if n.name == name)


def check_map(cluster, tiny_dir, stages):
    """n nodes, contiguous layer ranges covering [0, 6), everything ready, resident bytes exact."""
    reply = cluster.memory_map()
    sizes = open_checkpoint(tiny_dir).sizes()
    num_layers = len(sizes.layer_bytes)
    assert reply.state == "ready", reply
    assert reply.message == ""
    assert reply.num_layers == num_layers
    assert reply.model_id == open_checkpoint(tiny_dir).model_id
    assert len(reply.nodes) == stages
    assert {n.name for n in reply.nodes} == {n.name for n in cluster.nodes}
    assert {n.address for n in reply.nodes} == {n.address for n in cluster.nodes}
    ranges = sorted((n.start, n.end) for n in reply.nodes)
    assert all(n.has_layers for n in reply.nodes)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers, ranges
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end == start, f"layer ranges not contiguous: {ranges}"
    assert all(start < end for start, end in ranges), ranges
    for n in reply.nodes:
        assert n.status == "ready", n
        assert n.resident_bytes == sizes.range_bytes(n.start, n.end), n
        assert n.weight_bytes == n.resident_bytes
        assert n.free_bytes == n.usable_bytes - n.resident_bytes - n.kv_bytes
    return reply


# ---- 1. greedy tokens on 1, 2 and 3 stages --------------------------------------------------------


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_matches_mlx_lm(stages, request, tmp_path, tiny_dir, oracle, chat_prompt_ids, greedy_oracle):
    expected = greedy_oracle(chat_prompt_ids)
    assert len(expected) > 10, "the oracle reply is too short to say anything"
    with ExitStack() as stack:
        if stages == 3:
            cluster = request.getfixturevalue("cluster3")
        else:
            cluster = stack.enter_context(LocalCluster(tmp_path, tiny_dir, stages=stages))
        check_map(cluster, tiny_dir, stages)
        if stages == 1:  # the coordinator applies the chat template itself
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
            ids, done = cluster.generate(messages=messages, max_tokens=GREEDY_TOKENS)
        else:
            ids, done = cluster.generate(prompt_tokens=chat_prompt_ids, max_tokens=GREEDY_TOKENS)
        assert ids == expected
        assert done.prompt_tokens == len(chat_prompt_ids)
        assert done.completion_tokens == len(expected)
        assert done.finish_reason == ("length" if len(expected) == GREEDY_TOKENS else "stop")
        # the conversation stays cached on every node for its next turn...
        for node in cluster.nodes:
            health = cluster.node_stub(node).Health(pb.HealthRequest(), timeout=10)
            assert health.loaded and health.sessions >= 1 and health.kv_bytes > 0, (node.name, health)
        # ...so asking again recomputes only the last prompt token and gives the same reply
        again, done = cluster.generate(prompt_tokens=chat_prompt_ids, max_tokens=GREEDY_TOKENS)
        assert done.cached_tokens == len(chat_prompt_ids) - 1
        assert again == expected


# ---- 2. seeded sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_p,seed", [(0.8, 0.0, 7), (0.8, 0.9, 1234)])
def test_seeded_sampling_matches_mlx_lm(cluster3, oracle, chat_prompt_ids, greedy_oracle, temperature, top_p, seed):
    sampler = make_sampler(temperature, top_p=top_p)
    expected = oracle_reply(oracle, chat_prompt_ids, GREEDY_TOKENS, sampler=sampler, seed=seed)
    assert expected != greedy_oracle(chat_prompt_ids), "sampling should differ from greedy here"
    ids, _ = cluster3.generate(prompt_tokens=chat_prompt_ids, max_tokens=GREEDY_TOKENS,
                               temperature=temperature, top_p=top_p, seed=seed)
    assert ids == expected
    # the same seed again gives the same tokens (no state leaks between sessions)
    again, _ = cluster3.generate(prompt_tokens=chat_prompt_ids, max_tokens=GREEDY_TOKENS,
                                 temperature=temperature, top_p=top_p, seed=seed)
    assert again == expected


# ---- 3. concurrent sessions -----------------------------------------------------------------------


def test_concurrent_sessions_do_not_disturb_each_other(cluster3, oracle, make_chat_prompt, greedy_oracle):
    tokenizer = oracle[1]
    prompts = [make_chat_prompt(tokenizer, "Hi!"), make_chat_prompt(tokenizer, "Name a cat.")]
    expected = [greedy_oracle(p) for p in prompts]
    assert expected[0] != expected[1]
    alone = [cluster3.generate(prompt_tokens=p, max_tokens=GREEDY_TOKENS)[0] for p in prompts]
    assert alone == expected

    def run(prompt):
        ids, times = [], []
        request = pb.GenerateRequest(prompt_tokens=prompt, max_tokens=GREEDY_TOKENS)
        for event in cluster3.client.Generate(request, timeout=120):
            if event.HasField("token") and event.token.id >= 0:
                ids.append(event.token.id)
                times.append(time.monotonic())
        return ids, times

    results = run_at_once([lambda p=p: run(p) for p in prompts], timeout=180)
    assert [r[0] for r in results] == expected
    # they really ran at the same time: each streamed tokens while the other was streaming
    (_, ta), (_, tb) = results
    assert ta[0] < tb[-1] and tb[0] < ta[-1], "the two sessions did not overlap"


# ---- 5. trust (client side; the untrusted peer is in test_cluster_failures.py) --------------------


def test_wrong_or_missing_secret_is_refused(cluster3, chat_prompt_ids):
    """Without the cluster's secret there is no certificate the nodes accept: the TLS handshake
    fails before any call is read, on the coordinator's service, a node's and the data path."""
    peer = cluster3.peers[0]
    wrong_secret = bytes(range(100, 132))
    wrong = open_channel(cluster3.coordinator.address, wrong_secret)
    plain = grpc.insecure_channel(cluster3.coordinator.address)
    wrong_peer = open_channel(peer.address, wrong_secret)
    try:
        request = pb.GenerateRequest(prompt_tokens=chat_prompt_ids, max_tokens=4)
        for channel in (wrong, plain):
            with pytest.raises(grpc.RpcError) as info:
                list(coordinator_stub(channel).Generate(request, timeout=30))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as info:
                node_stub(channel).Info(pb.InfoRequest(), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as info:
            node_stub(wrong_peer).Info(pb.InfoRequest(), timeout=30)
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.NodeStub(grpc.insecure_channel(peer.address)).Forward(
                pb.ForwardRequest(session_id="x", tokens=[1]), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # the data path's stream too, with the wrong secret
        link = ForwardLink(node_stub(wrong_peer), peer.name, peer.address)
        try:
            with pytest.raises(StageError) as failed:
                link.call(pb.ForwardRequest(session_id="x", tokens=[1]), 30.0)
            assert failed.value.code == grpc.StatusCode.UNAVAILABLE, failed.value
        finally:
            link.close()
    finally:
        for c in (wrong, plain, wrong_peer):
            c.close()
    # the right secret still works on the same server
    info = cluster3.node_stub(cluster3.coordinator).Info(pb.InfoRequest(), timeout=30)
    assert info.is_coordinator and info.name == "coord"


# ---- 6. malformed activations ---------------------------------------------------------------------


def test_malformed_forward_is_rejected_without_disturbing_others(cluster3, tiny_dir, chat_prompt_ids, greedy_oracle):
    expected = greedy_oracle(chat_prompt_ids)
    stages = sorted(cluster3.memory_map().nodes, key=lambda n: n.start)
    first, second = node_by_name(cluster3, stages[0].name), node_by_name(cluster3, stages[1].name)
    config = text_config(open_checkpoint(tiny_dir).config)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    ok_data = bytes(4 * hidden)

    bad = {
        "shape": (pb.Tensor(data=bytes(4 * 128), shape=[1, 1, 128], dtype="float32"), "shape [1, 1, 128]"),
        "rank": (pb.Tensor(data=ok_data, shape=[1, hidden], dtype="float32"), "shape"),
        "dtype": (pb.Tensor(data=ok_data, shape=[1, 1, hidden], dtype="int8"), "dtype 'int8'"),
        "bytes": (pb.Tensor(data=ok_data[:-4], shape=[1, 1, hidden], dtype="float32"),
                  f"carries {4 * hidden - 4} bytes"),
    }

    # a normal generation runs while the bad requests arrive
    result = {}
    started = threading.Event()

    def generate():
        request = pb.GenerateRequest(prompt_tokens=chat_prompt_ids, max_tokens=GREEDY_TOKENS)
        ids = []
        try:
            for event in cluster3.client.Generate(request, timeout=120):
                if event.HasField("token") and event.token.id >= 0:
                    ids.append(event.token.id)
                    started.set()
            result["ids"] = ids
        except Exception as e:
            result["error"] = e
        started.set()

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        assert started.wait(60), "the normal generation never streamed a token"
        stub = cluster3.node_stub(second)
        for what, (tensor, says) in bad.items():
            request = pb.ForwardRequest(session_id=f"bad-{what}", offset=0, hidden=tensor, max_positions=8)
            with pytest.raises(grpc.RpcError) as info:
                stub.Forward(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, info.value)
            assert says in info.value.details(), (what, info.value.details())
            assert second.name in info.value.details()
            # nothing was reserved for the refused request
            assert not stub.Release(pb.ReleaseRequest(session_id=f"bad-{what}"), timeout=30).found
        # the same on the chain's data path: one ForwardStream answers each with the failure
        link = ForwardLink(stub, second.name, second.address)
        try:
            for what, (tensor, says) in bad.items():
                request = pb.ForwardRequest(session_id=f"bad-{what}", offset=0, hidden=tensor, max_positions=8)
                with pytest.raises(StageError) as failed:
                    link.call(request, 30.0)
                assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT, (what, failed.value)
                assert says in failed.value.message and failed.value.node == second.name, (what, failed.value)
        finally:
            link.close()
        with pytest.raises(grpc.RpcError) as info:
            stub.Forward(pb.ForwardRequest(session_id="bad-none", offset=0, max_positions=8), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hidden state" in info.value.details()

        first_stub = cluster3.node_stub(first)
        for tokens in ([1, vocab], [-1]):
            request = pb.ForwardRequest(session_id="bad-tokens", offset=0, tokens=tokens, max_positions=8)
            with pytest.raises(grpc.RpcError) as info:
                first_stub.Forward(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"token ids must be in [0, {vocab})" in info.value.details()
        assert not first_stub.Release(pb.ReleaseRequest(session_id="bad-tokens"), timeout=30).found
    finally:
        thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result["ids"] == expected
    # and the next one too
    assert cluster3.generate(prompt_tokens=chat_prompt_ids, max_tokens=GREEDY_TOKENS)[0] == expected


# ---- 9. the CLI -----------------------------------------------------------------------------------


def test_cli_chat_json_matches_mlx_lm(cluster3, oracle, greedy_oracle):
    text = "Hello there"
    tokenizer = oracle[1]
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
    expected = greedy_oracle(prompt, 16)
    out = cluster3.cli("chat", "--coordinator", cluster3.coordinator.address, "--prompt", text,
                       "--max-tokens", "16", "--json")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert {"text", "token_ids", "prompt_tokens", "ttft_s", "decode_tok_s"} <= set(reply)
    assert reply["token_ids"] == expected
    assert reply["prompt_tokens"] == len(prompt)
    assert reply["text"] == tokenizer.decode(expected)
    assert reply["ttft_s"] > 0
    assert reply["decode_tok_s"] > 0


def test_cli_map(cluster3, tiny_dir):
    coordinator, peer = cluster3.coordinator.address, cluster3.peers[-1].address
    # the three commands are independent; each spends seconds importing, so run them at once
    with ThreadPoolExecutor(3) as pool:
        as_json, via_peer, table = pool.map(lambda args: cluster3.cli(*args), [
            ("map", "--coordinator", coordinator, "--json"),
            ("map", "--coordinator", peer, "--json"),
            ("map", "--coordinator", coordinator),
        ])
    assert as_json.returncode == 0, as_json.stderr
    m = json.loads(as_json.stdout)
    assert m["state"] == "ready"
    assert m["model"] == open_checkpoint(tiny_dir).name
    sizes = open_checkpoint(tiny_dir).sizes()
    keys = {"name", "address", "backend", "total_bytes", "usable_bytes", "layers", "weight_bytes", "kv_bytes",
            "free_bytes"}
    assert {n["name"] for n in m["nodes"]} == {n.name for n in cluster3.nodes}
    for n in m["nodes"]:
        assert keys <= set(n), n
        assert n["address"] == node_by_name(cluster3, n["name"]).address
        assert n["backend"] == "cpu"
        assert n["usable_bytes"] == 10**9 and n["total_bytes"] > 0
        start, end = n["layers"]
        assert n["weight_bytes"] == sizes.range_bytes(start, end)
        assert n["free_bytes"] == n["usable_bytes"] - n["weight_bytes"] - n["kv_bytes"]
    assert sorted(b for n in m["nodes"] for b in n["layers"]) == [0, 2, 2, 4, 4, 6]

    # against a peer: it follows the node's coordinator
    assert via_peer.returncode == 0, via_peer.stderr
    m2 = json.loads(via_peer.stdout)
    assert m2["state"] == "ready"
    assert [(n["name"], n["layers"]) for n in m2["nodes"]] == [(n["name"], n["layers"]) for n in m["nodes"]]

    assert table.returncode == 0, table.stderr
    for node in cluster3.nodes:
        assert node.name in table.stdout, table.stdout
    assert "ready" in table.stdout


# ---- 8. bf16 activations on the wire --------------------------------------------------------------


def test_bf16_two_stages_match_mlx_lm(tmp_path):
    ckpt = make_tiny(tmp_path / "bf16", TinyShape(layers=6, shard_files=3), model_type="kimi_k25", dtype="bfloat16")
    model, tokenizer = mlx_lm.load(str(ckpt))
    assert any(v.dtype == mx.bfloat16 for _, v in tree_flatten(model.parameters()))
    prompt = list(tokenizer.encode("Hey!"))
    assert len(prompt) == 4, prompt
    expected = oracle_reply((model, tokenizer), prompt, 8)
    assert expected
    (tmp_path / "run").mkdir()
    with LocalCluster(tmp_path / "run", ckpt, stages=2) as cluster:
        reply = cluster.memory_map()
        assert reply.state == "ready" and len(reply.nodes) == 2
        ids, done = cluster.generate(prompt_tokens=prompt, max_tokens=8)
    assert ids == expected
    assert done.prompt_tokens == 4


def test_token_ring_no_stage_waits_on_the_stages_after_it(cluster3, chat_prompt_ids):
    """With `reply_to` set, the first stage answers its sender as soon as it has passed the request
    on: with the last stage paused (SIGSTOP) the acceptance still comes back at once, carrying no
    token; the token goes from the last stage straight to the coordinator (Deliver, which ignores
    this test's ticket) once that stage runs again."""
    stages = sorted(cluster3.memory_map().nodes, key=lambda n: n.start)
    first, last = node_by_name(cluster3, stages[0].name), node_by_name(cluster3, stages[-1].name)
    stub = cluster3.node_stub(first)
    owner = stub.Health(pb.HealthRequest(), timeout=10).coordinator_id
    request = pb.ForwardRequest(session_id="ring-test", offset=0, max_positions=len(chat_prompt_ids),
                                tokens=chat_prompt_ids, sample=True, new_generation=True, coordinator_id=owner,
                                reply_to=cluster3.coordinator.address, ticket=2**63)
    link = ForwardLink(stub, first.name, first.address)
    last_stub = cluster3.node_stub(last)
    sessions_before = last_stub.Health(pb.HealthRequest(), timeout=10).sessions
    last.kill(signal.SIGSTOP)
    try:
        reply = link.call(request, 5.0)
        assert not reply.sampled and not reply.HasField("failure"), reply
    finally:
        last.kill(signal.SIGCONT)
        link.close()
    # the request reaches the last stage once it runs again (a Release before that would make the
    # stage refuse it: released ids stay released); then free the test's session everywhere
    poll(lambda: last_stub.Health(pb.HealthRequest(), timeout=10).sessions, lambda n: n > sessions_before, 30,
         "the last stage to hold the test's session")
    for node in cluster3.nodes:
        cluster3.node_stub(node).Release(pb.ReleaseRequest(session_id="ring-test"), timeout=10)
