"""The token ring's replies come only from the stage they were sent to: a member of the cluster
(it holds the secret and has its own node identity) that forges Delivers for live tickets while
generations run changes no reply and is refused."""

import re
import threading

import grpc

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.wire import node_stub, open_channel
from harness import LocalCluster, oracle_reply, run_at_once

FORGER = "forger-node-id"
GENERATIONS = 4
TOKENS = 16


def test_forged_delivers_are_refused_and_change_no_reply(tmp_path, tiny_dir, oracle, chat_prompt_ids):
    expected = oracle_reply(oracle, chat_prompt_ids, TOKENS)
    with LocalCluster(tmp_path, tiny_dir, stages=3, coordinator_extra=["--log-level", "debug"]) as cluster:
        forger = node_stub(open_channel(cluster.coordinator.address, cluster.secret, FORGER))
        denied, accepted, done = [], [], threading.Event()

        def forge():
            """Deliver a wrong token, and a failure, for every ticket the coordinator sends."""
            seen = set()
            while not done.is_set():
                for ticket in map(int, re.findall(r"rides ticket (\d+)", cluster.coordinator.log())):
                    if ticket in seen:
                        continue
                    seen.add(ticket)
                    for reply in (pb.ForwardReply(ticket=ticket, sampled=True, token=1, logprob=0.0),
                                  pb.ForwardReply(ticket=ticket, failure=pb.StageFailure(
                                      code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="forged"))):
                        try:
                            forger.Deliver(reply, timeout=10)
                            accepted.append(ticket)  # a ticket already answered: ignored
                        except grpc.RpcError as e:
                            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, (e.code(), e.details())
                            denied.append(e.details())

        forging = threading.Thread(target=forge, daemon=True)
        forging.start()
        try:
            replies = run_at_once([lambda: cluster.generate(chat_prompt_ids, max_tokens=TOKENS)[0]] * GENERATIONS)
        finally:
            done.set()
            forging.join(30)
        assert replies == [expected] * GENERATIONS
        assert denied, f"no forged Deliver reached a live ticket ({len(accepted)} came too late)"
        assert "only the stage its request was sent through" in denied[0]
        # refused every time, logged once
        assert cluster.coordinator.log().count(f"refused a Deliver from node {FORGER}") == 1
        # the cluster still serves
        assert cluster.generate(chat_prompt_ids, max_tokens=TOKENS)[0] == expected
