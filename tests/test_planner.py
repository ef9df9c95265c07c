import random
import re
from types import SimpleNamespace

import pytest

from cluster.generated import kimi_cluster_pb2 as pb
from cluster.loading import plan_for
from cluster.machine import memory_bandwidth
from cluster.planner import (
    ModelSizes,
    NodeCapacity,
    kv_cache_bytes,
    mac_default_usable_bytes,
    plan_partition,
    prefill_scratch_bytes,
    replan_after_loss,
    usable_from_wired_limit_mb,
)
from planner_oracle import (
    GB,
    GIB,
    check_against_brute_force,
    check_valid,
    expected_stage_bytes,
    heterogeneous_nodes,
    kimi_k25_sizes,
    random_case,
    toy_sizes,
)

MIB = 2**20


def test_scratch_reproduces_the_measured_kimi_figure_and_scales():
    sizes = kimi_k25_sizes()
    scratch = prefill_scratch_bytes(sizes, 32768, 2048)
    scores = 2048 * 32768 * 64 * 2  # one bf16 score matrix: 8.59 GB, the ~8.6 GB measured
    up_projected = 32768 * 64 * (128 + 128) * 2  # K and V of every position: 1.07 GB
    assert scratch == scores + up_projected + 2048 * 7168 * 2 * 16
    # Halving the chunk halves it; a longer context needs more; a chunk longer than the context is clamped.
    assert (prefill_scratch_bytes(sizes, 32768, 1024) - up_projected) * 2 == scratch - up_projected
    assert prefill_scratch_bytes(sizes, 65536, 2048) > 1.9 * scratch
    assert prefill_scratch_bytes(sizes, 1000, 4096) == prefill_scratch_bytes(sizes, 1000, 1000)
    assert prefill_scratch_bytes(sizes, 0, 2048) == 0


def test_kv_cache_bytes_match_the_facts():
    sizes = kimi_k25_sizes()
    assert kv_cache_bytes(sizes, 61, 1) == 70_272
    assert round(kv_cache_bytes(sizes, 61, 32768) / GB, 2) == 2.30
    assert round(kv_cache_bytes(sizes, 61, 131072) / GB, 2) == 9.21


def test_mac_default_and_wired_limit_usable():
    total = 192 * GIB
    assert mac_default_usable_bytes(total) == 144 * GIB
    assert mac_default_usable_bytes(total, reserve_bytes=4 * GIB) == 140 * GIB
    assert usable_from_wired_limit_mb(180000) == 180000 * MIB
    assert usable_from_wired_limit_mb(180000, reserve_bytes=MIB) == 179999 * MIB


def test_plan_covers_layers_contiguously_with_embed_first_and_head_last():
    sizes = toy_sizes([100] * 10, embed=40, head=70, kv=2, hidden=1, heads=1)
    nodes = [NodeCapacity("a", 1000), NodeCapacity("b", 900), NodeCapacity("c", 1200)]
    plan = plan_partition(sizes, nodes, context=16, prefill_chunk=8)
    check_against_brute_force(plan, sizes, nodes, 16, 8)
    first, last = plan.stages[0], plan.stages[-1]
    assert first.weight_bytes == sum(sizes.layer_bytes[: first.end]) + 40
    assert last.weight_bytes == sum(sizes.layer_bytes[last.start :]) + 70


@pytest.mark.parametrize("seed", range(300))
def test_matches_brute_force_on_small_cases(seed):
    sizes, nodes, context, chunk = random_case(random.Random(seed))
    plan = plan_partition(sizes, nodes, context=context, prefill_chunk=chunk)
    check_against_brute_force(plan, sizes, nodes, context, chunk)


# ---- re-planning after a node is lost: only the lost layers move --------------------------------------


def ranges(plan) -> dict:
    return {stage.node: (stage.start, stage.end) for stage in plan.stages}


def test_a_lost_stage_goes_whole_to_the_smallest_spare_that_holds_it():
    sizes = toy_sizes([10] * 6, embed=5, head=5)
    nodes = [NodeCapacity(n, 40) for n in ("a", "b", "c")]
    plan = plan_partition(sizes, nodes, context=0, prefill_chunk=1)
    check_against_brute_force(plan, sizes, nodes, 0, 1)
    assert ranges(plan) == {"a": (0, 2), "b": (2, 4), "c": (4, 6)}
    spares = [NodeCapacity("big", 100), NodeCapacity("small", 20), NodeCapacity("tiny", 19)]
    replanned = replan_after_loss(sizes, plan, [nodes[0], nodes[2], *spares], context=0, prefill_chunk=1)
    check_valid(replanned, sizes, [*nodes, *spares], 0, 1)
    assert ranges(replanned) == {"a": (0, 2), "small": (2, 4), "c": (4, 6)}
    assert [s.node for s in replanned.stages] == ["a", "small", "c"]


def test_without_a_spare_the_neighbours_share_the_lost_layers():
    sizes = toy_sizes([10] * 6, embed=5, head=5)
    nodes = [NodeCapacity(n, 60) for n in ("a", "b", "c")]
    plan = plan_partition(sizes, nodes, context=0, prefill_chunk=1)
    check_against_brute_force(plan, sizes, nodes, 0, 1)
    survivors = [nodes[0], nodes[2], NodeCapacity("tiny", 15)]  # the spare cannot hold b's 20 bytes
    replanned = replan_after_loss(sizes, plan, survivors, context=0, prefill_chunk=1)
    check_valid(replanned, sizes, survivors, 0, 1)
    # a reads 30 bytes per token for [0, 3) (the embedding is a lookup), c 35 for [3, 6) with the head
    assert ranges(replanned) == {"a": (0, 3), "c": (3, 6)}
    # a neighbour three times as fast takes all of them: [0, 4) reads 40 bytes at 3, [4, 6) 25 at 1
    fast = [NodeCapacity("a", 60, 3.0), NodeCapacity("c", 60, 1.0)]
    assert ranges(replan_after_loss(sizes, plan, fast, context=0, prefill_chunk=1)) == {"a": (0, 4), "c": (4, 6)}
    # the first or last stage lost: its one neighbour takes it all
    for lost, expected in (("a", {"b": (0, 4), "c": (4, 6)}), ("c", {"a": (0, 2), "b": (2, 6)})):
        left = [n for n in nodes if n.name != lost]
        assert ranges(replan_after_loss(sizes, plan, left, context=0, prefill_chunk=1)) == expected


def test_when_nothing_holds_the_lost_layers_in_place_the_plan_is_made_afresh():
    sizes = toy_sizes([10] * 6, embed=5, head=5)
    nodes = [NodeCapacity("a", 25), NodeCapacity("b", 25), NodeCapacity("c", 80)]
    plan = plan_partition(sizes, nodes, context=0, prefill_chunk=1)
    check_against_brute_force(plan, sizes, nodes, 0, 1)
    lost = next(s.node for s in plan.stages if s.node != "c" and s.end < 6)
    left = [n for n in nodes if n.name != lost] + [NodeCapacity("d", 20)]  # holds no stage of 2 layers
    replanned = replan_after_loss(sizes, plan, left, context=0, prefill_chunk=1)
    assert replanned == plan_partition(sizes, left, context=0, prefill_chunk=1)
    check_against_brute_force(replanned, sizes, left, 0, 1)
    assert (lost, ranges(plan)["b"], ranges(replanned)["b"]) == ("a", (2, 4), (0, 2))  # a survivor's layers moved


@pytest.mark.parametrize("seed", range(200))
def test_replan_moves_only_lost_layers_whenever_that_fits(seed):
    """One stage of a random plan is lost and random spares join (besides the nodes the plan left
    out): the result is a valid plan in which every survivor keeps its layers (growing at most by
    the lost ones) whenever a spare or a split between the neighbours holds them, the smallest
    such spare taking them whole; otherwise it is the fresh plan."""
    rng = random.Random(seed)
    sizes, nodes, context, chunk = random_case(rng)
    plan = plan_partition(sizes, nodes, context=context, prefill_chunk=chunk)
    if not plan.feasible:
        return
    k = rng.randrange(len(plan.stages))
    lost = plan.stages[k]
    spares = [NodeCapacity(f"s{i}", rng.randint(30, 400)) for i in range(rng.randint(0, 2))]
    present = [n for n in nodes if n.name != lost.node] + spares
    replanned = replan_after_loss(sizes, plan, present, context=context, prefill_chunk=chunk)
    fresh = plan_partition(sizes, present, context=context, prefill_chunk=chunk)
    scratch = prefill_scratch_bytes(sizes, context, chunk)

    def fits(node, start, end):
        weight, kv = expected_stage_bytes(sizes, start, end, context)
        return weight + kv + scratch <= node.usable_bytes

    by_name = {n.name: n for n in present}
    before = plan.stages[k - 1] if k > 0 else None
    after = plan.stages[k + 1] if k + 1 < len(plan.stages) else None
    cuts = range(lost.start if after else lost.end, (lost.end if before else lost.start) + 1)
    split_fits = [c for c in cuts if (before is None or fits(by_name[before.node], before.start, c))
                  and (after is None or fits(by_name[after.node], c, after.end))]
    staged = {stage.node for stage in plan.stages}
    held_by_spare = [n for n in present if n.name not in staged and fits(n, lost.start, lost.end)]
    if not held_by_spare and not split_fits:
        assert replanned == fresh
        return
    check_valid(replanned, sizes, present, context, chunk)
    new = ranges(replanned)
    for stage in plan.stages:
        if stage is not lost:
            start, end = new[stage.node]
            assert start <= stage.start and stage.end <= end  # kept, at most grown by lost layers
    if held_by_spare:
        assert new[min(held_by_spare, key=lambda s: s.usable_bytes).name] == (lost.start, lost.end)
    else:
        assert len(replanned.stages) == len(plan.stages) - 1


def test_infeasible_total_shortfall_is_exact():
    sizes = toy_sizes([1000] * 4, embed=300, head=400, kv=1, hidden=1, heads=1)
    nodes = [NodeCapacity("a", 2000), NodeCapacity("b", 2000)]
    plan = plan_partition(sizes, nodes, context=8, prefill_chunk=4)
    check_against_brute_force(plan, sizes, nodes, 8, 4)
    # By hand: scratch = 1 B * 4 tokens * 16 + 4 * 8 * 1 head * 2 B = 128 per stage,
    # KV = 1 B * 4 layers * 8 tokens = 32, weights = 4700; 2 * 2000 usable.
    assert prefill_scratch_bytes(sizes, 8, 4) == 128
    assert not plan.feasible and plan.stages == []
    assert plan.shortfall_bytes == 4700 + 32 + 2 * 128 - 4000 == 988
    assert "988 B" in plan.advice[0]
    assert plan.wired_limit_mb == {}  # no total memory known: no sysctl advice
    assert not any("iogpu" in line for line in plan.advice)
    assert any("add a node" in line for line in plan.advice)
    assert any("quantization" in line for line in plan.advice)


def test_fragmentation_shortfall_is_the_least_extra_on_one_node():
    # 300 bytes of layers, 320 usable, but each node holds only one 100-byte layer.
    sizes = toy_sizes([100, 100, 100])
    nodes = [NodeCapacity("a", 160), NodeCapacity("b", 170)]
    plan = plan_partition(sizes, nodes, context=4, prefill_chunk=4)
    check_against_brute_force(plan, sizes, nodes, 4, 4)
    assert not plan.feasible
    assert plan.shortfall_bytes == 30  # b needs 200 to hold two layers
    assert "30 B" in plan.advice[0]
    tight = next(line for line in plan.advice if line.startswith("Tight"))
    assert tight.index("b +30 B") < tight.index("a +40 B")


def test_smaller_node_gets_fewer_layers():
    sizes = toy_sizes([10 * GB] * 10, embed=GB, head=GB, kv=1152, hidden=14336, heads=8)
    nodes = [NodeCapacity("big", 200 * GB), NodeCapacity("small", 40 * GB)]
    plan = plan_partition(sizes, nodes, context=4096, prefill_chunk=512)
    check_against_brute_force(plan, sizes, nodes, 4096, 512)
    layers = {stage.node: stage.num_layers for stage in plan.stages}
    assert layers["small"] < layers["big"]
    assert layers["small"] >= 1
    assert 5 * 10 * GB > 40 * GB  # an even split would not fit the small node


def test_slower_node_gets_fewer_layers_when_memory_is_not_binding():
    sizes = toy_sizes([GB] * 12)
    nodes = [NodeCapacity("slow", 1000 * GB, 400e9), NodeCapacity("fast", 1000 * GB, 800e9)]
    plan = plan_partition(sizes, nodes, context=1024, prefill_chunk=256)
    check_against_brute_force(plan, sizes, nodes, 1024, 256)
    layers = {stage.node: stage.num_layers for stage in plan.stages}
    assert layers == {"fast": 8, "slow": 4}  # 8 GB / 800 GB/s == 4 GB / 400 GB/s
    # Unless every node knows its bandwidth, bytes are balanced instead.
    nodes[1] = NodeCapacity("fast", 1000 * GB, None)
    plan = plan_partition(sizes, nodes, context=1024, prefill_chunk=256)
    check_against_brute_force(plan, sizes, nodes, 1024, 256)
    assert [stage.num_layers for stage in plan.stages] == [6, 6]


def test_known_macs_feed_their_memory_bandwidth_to_the_coordinators_plan():
    assert memory_bandwidth("Apple M2 Ultra", 24) == 800 * GB
    assert memory_bandwidth("Apple M3 Ultra", 32) == 819 * GB
    assert (memory_bandwidth("Apple M4 Max", 14), memory_bandwidth("Apple M4 Max", 16)) == (410 * GB, 546 * GB)
    assert memory_bandwidth("Apple M4 Max", 12) is None and memory_bandwidth("AMD EPYC 7B13", 2) is None

    def member(name, bandwidth):
        return SimpleNamespace(info=pb.NodeInfo(name=name, backend="metal", total_bytes=2000 * GB,
                                                usable_bytes=1000 * GB, memory_bandwidth=bandwidth))

    sizes = toy_sizes([GB] * 12)
    plan = plan_for(sizes, [member("max", 410 * GB), member("ultra", 819 * GB)], context=1024, chunk=256)
    known = [NodeCapacity("max", 1000 * GB, 410 * GB), NodeCapacity("ultra", 1000 * GB, 819 * GB)]
    check_against_brute_force(plan, sizes, known, plan.context, 256)
    layers = {stage.node: stage.num_layers for stage in plan.stages}
    assert layers == {"ultra": 8, "max": 4}  # 8 GB / 819 GB/s > 4 GB / 410 GB/s, the least bottleneck
    # A node of an unknown chip (0 on the wire) leaves every node's bandwidth out: bytes balance.
    plan = plan_for(sizes, [member("max", 410 * GB), member("other", 0)], context=1024, chunk=256)
    check_against_brute_force(plan, sizes, [known[0], NodeCapacity("other", 1000 * GB)], plan.context, 256)
    assert [stage.num_layers for stage in plan.stages] == [6, 6]


def test_node_that_cannot_hold_embedding_or_head_goes_in_the_middle():
    sizes = toy_sizes([1000] * 10, embed=6000, head=6000, kv=1, hidden=1, heads=1)
    nodes = [NodeCapacity("small", 7000), NodeCapacity("b1", 100_000), NodeCapacity("b2", 100_000)]
    plan = plan_partition(sizes, nodes, context=4, prefill_chunk=4)
    check_against_brute_force(plan, sizes, nodes, 4, 4)
    order = [stage.node for stage in plan.stages]
    assert order[1] == "small"  # used, since it lowers the bottleneck, but not first or last
    # By hand: the last stage reads the 6000-byte head plus at least one layer, so 7000 is
    # the least bottleneck; without "small" it would be 8000 (8 layers | 2 layers + head).
    reads = [s.weight_bytes - (sizes.embed_bytes if s.start == 0 else 0) for s in plan.stages]
    assert max(reads) == 7000


def test_node_that_cannot_hold_the_head_is_not_last():
    sizes = toy_sizes([1000] * 10, embed=500, head=6000, kv=1, hidden=1, heads=1)
    nodes = [NodeCapacity("big", 100_000), NodeCapacity("small", 5000)]  # listed first: big
    plan = plan_partition(sizes, nodes, context=4, prefill_chunk=4)
    check_against_brute_force(plan, sizes, nodes, 4, 4)
    assert [stage.node for stage in plan.stages] == ["small", "big"]


def test_fewer_stages_when_more_do_not_lower_the_bottleneck():
    sizes = toy_sizes([100, 1, 1])
    nodes = [NodeCapacity(name, 1000) for name in "abc"]
    plan = plan_partition(sizes, nodes, context=1, prefill_chunk=1)
    check_against_brute_force(plan, sizes, nodes, 1, 1)
    assert [(s.start, s.end) for s in plan.stages] == [(0, 1), (1, 3)]
    assert [s.node for s in plan.stages] == ["a", "b"]  # ties keep the listed order
    assert any(line.startswith("c is left out") for line in plan.advice)


def test_slack_below_the_bottleneck_is_spread_evenly():
    # 10 layers on 4 nodes: the bottleneck is 3 layers either way, but 3+3+2+2 beats 3+3+3+1.
    sizes = toy_sizes([GB] * 10)
    nodes = [NodeCapacity(name, 100 * GB) for name in "abcd"]
    plan = plan_partition(sizes, nodes, context=1, prefill_chunk=1)
    check_against_brute_force(plan, sizes, nodes, 1, 1)
    assert sorted(stage.num_layers for stage in plan.stages) == [2, 2, 3, 3]


def test_too_small_node_is_left_out_when_the_rest_suffices():
    sizes = toy_sizes([10 * GB] * 6, embed=GB, head=GB)
    nodes = [NodeCapacity("tiny", 5 * GB), NodeCapacity("a", 50 * GB), NodeCapacity("b", 50 * GB)]
    plan = plan_partition(sizes, nodes, context=1, prefill_chunk=1)
    check_against_brute_force(plan, sizes, nodes, 1, 1)
    assert "tiny" not in [stage.node for stage in plan.stages]
    assert any("tiny" in line and "cannot hold" in line for line in plan.advice)


def test_tight_stage_is_reported():
    sizes = toy_sizes([100] * 4)
    nodes = [NodeCapacity("a", 200), NodeCapacity("b", 250)]
    plan = plan_partition(sizes, nodes, context=1, prefill_chunk=1)
    check_against_brute_force(plan, sizes, nodes, 1, 1)
    assert any(line.startswith("a is tight") for line in plan.advice)
    assert not any(line.startswith("b is tight") for line in plan.advice)


def test_context_advice_fits_when_followed_and_names_only_flags_that_exist():
    sizes = kimi_k25_sizes()
    nodes = [NodeCapacity(f"m{i}", 172 * GB) for i in range(2)]
    plan = plan_partition(sizes, nodes, context=131072, prefill_chunk=2048)
    check_against_brute_force(plan, sizes, nodes, 131072, 2048)
    assert not plan.feasible
    line = next(line for line in plan.advice if "--context to" in line)
    context = int(re.search(r"--context to ([\d,]+)", line).group(1).replace(",", ""))
    assert 0 < context < 131072
    followed = plan_partition(sizes, nodes, context=context, prefill_chunk=2048)
    assert followed.feasible
    check_against_brute_force(followed, sizes, nodes, context, 2048)
    flags = {flag for line in plan.advice for flag in re.findall(r"--[a-z-]+", line)}
    assert flags == {"--context"}, plan.advice  # kimi-cluster up/plan have no --prefill-chunk


def test_advice_when_kv_cache_and_scratch_alone_do_not_fit():
    """A tiny model on nodes smaller than the prefill scratch: the figures count the one node that
    must take part, and smaller weights are not offered as a fix."""
    sizes = toy_sizes([10, 20], embed=5, head=5, kv=1, hidden=1, heads=1)
    nodes = [NodeCapacity("a", 8), NodeCapacity("b", 9)]
    plan = plan_partition(sizes, nodes, context=2, prefill_chunk=4)
    check_against_brute_force(plan, sizes, nodes, 2, 4)
    assert not plan.feasible
    text = "\n".join(plan.advice)
    # the figures add up: missing = weights + KV cache - what the nodes have beyond the scratch (nothing)
    assert f"Does not fit: {plan.shortfall_bytes} B missing. Weights 40 B + KV cache 4 B for 2 tokens = 44 B" in text
    assert plan.shortfall_bytes == 44 and "reserves: 0 B (of 17 B usable)" in text
    assert "smaller quantization" not in text and "Smaller weights cannot make it fit" in text


def test_kimi_k25_on_two_192gb_macs_needs_a_higher_wired_limit():
    sizes = kimi_k25_sizes()
    total = 192 * GIB
    nodes = [NodeCapacity(f"mac{i}", mac_default_usable_bytes(total), 800e9, total) for i in range(2)]
    plan = plan_partition(sizes, nodes, context=32768)
    check_against_brute_force(plan, sizes, nodes, 32768, 2048)
    assert not plan.feasible
    scratch = prefill_scratch_bytes(sizes, 32768, 2048)
    needed = sizes.total_bytes + kv_cache_bytes(sizes, 61, 32768) + 2 * scratch
    assert plan.shortfall_bytes == needed - 2 * mac_default_usable_bytes(total) > 0
    assert set(plan.wired_limit_mb) == {"mac0", "mac1"}
    for name, mb in plan.wired_limit_mb.items():
        assert 144 * 1024 < mb <= (192 - 8) * 1024  # above the default, leaving macOS 8 GiB
        assert f"On {name}: sudo sysctl iogpu.wired_limit_mb={mb}" in "\n".join(plan.advice)
    # Following the advice makes it fit.
    raised = [
        NodeCapacity(n.name, usable_from_wired_limit_mb(plan.wired_limit_mb[n.name]), 800e9, total) for n in nodes
    ]
    check_against_brute_force(plan_partition(sizes, raised, context=32768), sizes, raised, 32768, 2048)
    # And so does 180000 MiB each (about 377 GB together).
    raised = [NodeCapacity(n.name, usable_from_wired_limit_mb(180000), 800e9, total) for n in nodes]
    plan = plan_partition(sizes, raised, context=32768)
    check_against_brute_force(plan, sizes, raised, 32768, 2048)
    assert [stage.node for stage in plan.stages] == ["mac0", "mac1"]
    assert abs(plan.stages[0].num_layers - plan.stages[1].num_layers) <= 1


def test_wired_limit_advice_says_when_even_the_safe_maximum_is_not_enough():
    sizes = kimi_k25_sizes()
    total = 128 * GIB
    nodes = [NodeCapacity(f"mac{i}", mac_default_usable_bytes(total), 800e9, total) for i in range(2)]
    plan = plan_partition(sizes, nodes)
    check_against_brute_force(plan, sizes, nodes, 32768, 2048)
    assert not plan.feasible and plan.wired_limit_mb == {}
    assert any("not enough" in line and "8 GiB" in line for line in plan.advice)


def test_heterogeneous_nodes_plan_is_the_best():
    """Four Macs of different memory and bandwidth over Kimi K2.5's layers grouped five by five
    (brute force cannot enumerate 61 layers on more than three nodes)."""
    kimi = kimi_k25_sizes()
    grouped = [sum(kimi.layer_bytes[i:i + 5]) for i in range(0, 61, 5)]
    sizes = ModelSizes(grouped, kimi.embed_bytes, kimi.head_bytes, 5 * kimi.kv_bytes_per_token_per_layer,
                       kimi.hidden_bytes_per_token, kimi.attention_heads)
    nodes = heterogeneous_nodes(4, (80, 200))  # together they hold it: the best plan uses all four
    check_against_brute_force(plan_partition(sizes, nodes), sizes, nodes, 32768, 2048)


def test_eight_heterogeneous_nodes_plan():
    """At full size (too large for brute force): a valid plan."""
    sizes = kimi_k25_sizes()
    nodes = heterogeneous_nodes(8, (40, 200))
    check_valid(plan_partition(sizes, nodes), sizes, nodes, 32768, 2048)


def test_eight_nodes_infeasible_with_advice():
    sizes = kimi_k25_sizes()
    nodes = heterogeneous_nodes(8, (20, 45))
    plan = plan_partition(sizes, nodes)
    assert not plan.feasible and plan.shortfall_bytes > 0 and plan.advice


def test_rejects_bad_input():
    sizes = toy_sizes([1, 2])
    with pytest.raises(ValueError, match="node names must be unique"):
        plan_partition(sizes, [NodeCapacity("a", 10), NodeCapacity("a", 10)])
    with pytest.raises(ValueError, match="no decoder layers"):
        plan_partition(toy_sizes([]), [NodeCapacity("a", 10)])
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1, got 0"):
        plan_partition(sizes, [NodeCapacity("a", 10)], prefill_chunk=0)
    with pytest.raises(ValueError, match="context must be >= 0, got -1"):
        plan_partition(sizes, [NodeCapacity("a", 10)], context=-1)
    with pytest.raises(ValueError, match="a: bandwidth must be positive, got -1.0"):
        plan_partition(sizes, [NodeCapacity("a", 10, bandwidth_bytes_per_s=-1.0)])


def test_no_nodes_is_infeasible_with_the_whole_model_missing():
    sizes = toy_sizes([10, 20], embed=5, head=5, kv=1, hidden=1, heads=1)
    plan = plan_partition(sizes, [], context=2, prefill_chunk=1)
    assert not plan.feasible and plan.stages == []
    # weights 40 + KV 1 B * 2 layers * 2 tokens + scratch (1 B * 1 * 16 + 1 * 2 * 1 head * 2 B)
    assert plan.shortfall_bytes == 40 + 4 + 20
    assert any("64 B" in line for line in plan.advice)
