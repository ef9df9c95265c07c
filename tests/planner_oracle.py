"""The planner's test oracle: small cases, the checks every plan must pass, and brute force over
every subset, order and split of the nodes, which a plan must equal on every case small enough."""

import random
from fractions import Fraction
from itertools import combinations, permutations

from cluster.planner import ModelSizes, NodeCapacity, kv_cache_bytes, prefill_scratch_bytes
from cluster.units import format_bytes

GB = 10**9
GIB = 2**30


def kimi_k25_sizes() -> ModelSizes:
    """Kimi K2.5, routed experts 2-bit / rest 4-bit, from the facts table (approximate)."""
    return ModelSizes(
        layer_bytes=[int(0.280e9)] + [int(5.372e9)] * 60,
        embed_bytes=int(0.66e9),
        head_bytes=int(0.66e9),
        kv_bytes_per_token_per_layer=(512 + 64) * 2,
        hidden_bytes_per_token=7168 * 2,
        attention_heads=64,
        up_projected_bytes_per_token=64 * (128 + 128) * 2,
    )


def toy_sizes(layer_bytes, embed=0, head=0, kv=0, hidden=0, heads=0) -> ModelSizes:
    return ModelSizes(list(layer_bytes), embed, head, kv, hidden, heads)


def expected_stage_bytes(sizes, start, end, context):
    last = len(sizes.layer_bytes)
    weight = sum(sizes.layer_bytes[start:end])
    weight += sizes.embed_bytes if start == 0 else 0
    weight += sizes.head_bytes if end == last else 0
    return weight, sizes.kv_bytes_per_token_per_layer * (end - start) * context


def check_valid(plan, sizes, nodes, context, prefill_chunk):
    """Contiguous, covering, each node once, exact bytes, and every stage fits."""
    assert plan.feasible and plan.shortfall_bytes == 0 and plan.wired_limit_mb == {}
    assert plan.context == context
    by_name = {node.name: node for node in nodes}
    names = [stage.node for stage in plan.stages]
    assert len(names) == len(set(names))
    assert plan.stages[0].start == 0
    assert plan.stages[-1].end == len(sizes.layer_bytes)
    for before, after in zip(plan.stages, plan.stages[1:]):
        assert before.end == after.start
    scratch = prefill_scratch_bytes(sizes, context, prefill_chunk)
    for stage in plan.stages:
        assert stage.end > stage.start
        weight, kv = expected_stage_bytes(sizes, stage.start, stage.end, context)
        assert stage.weight_bytes == weight
        assert stage.kv_bytes == kv
        assert stage.scratch_bytes == scratch
        assert stage.usable_bytes == by_name[stage.node].usable_bytes
        assert stage.needed_bytes == weight + kv + scratch
        assert stage.needed_bytes <= stage.usable_bytes
        assert stage.free_bytes == stage.usable_bytes - stage.needed_bytes


def stage_time(sizes, node, start, end, all_know_bandwidth):
    """Bytes read per token (no embedding: it is a lookup) over bandwidth, exactly."""
    read = sum(sizes.layer_bytes[start:end]) + (sizes.head_bytes if end == len(sizes.layer_bytes) else 0)
    return Fraction(read) / (Fraction(node.bandwidth_bytes_per_s) if all_know_bandwidth else 1)


def brute_force(sizes, nodes, context, prefill_chunk):
    """Every subset, order and split: the best (bottleneck, stages, -min free), and for each
    node the least overflow of its stage over plans where every other stage fits."""
    count = len(sizes.layer_bytes)
    scratch = prefill_scratch_bytes(sizes, context, prefill_chunk)
    know = all(node.bandwidth_bytes_per_s for node in nodes)
    best = None
    least_overflow = [None] * len(nodes)
    for k in range(1, min(len(nodes), count) + 1):
        for order in permutations(range(len(nodes)), k):
            for cuts in combinations(range(1, count), k - 1):
                bounds = [0, *cuts, count]
                overflows, times, frees = [], [], []
                for position, index in enumerate(order):
                    start, end = bounds[position], bounds[position + 1]
                    weight, kv = expected_stage_bytes(sizes, start, end, context)
                    free = nodes[index].usable_bytes - (weight + kv + scratch)
                    overflows.append(max(0, -free))
                    frees.append(free)
                    times.append(stage_time(sizes, nodes[index], start, end, know))
                over = [p for p, o in enumerate(overflows) if o > 0]
                if not over:
                    key = (max(times), k, -min(frees))
                    best = key if best is None or key < best else best
                if len(over) == 1:
                    index = order[over[0]]
                    value = overflows[over[0]]
                    if least_overflow[index] is None or value < least_overflow[index]:
                        least_overflow[index] = value
    return best, least_overflow


def random_case(rng):
    count = rng.randint(2, 6)
    sizes = toy_sizes(
        [rng.randint(1, 100) for _ in range(count)],
        embed=rng.randint(0, 60),
        head=rng.randint(0, 60),
        kv=rng.randint(0, 3),
        hidden=rng.randint(0, 2),
        heads=rng.randint(0, 2),
    )
    with_bandwidth = rng.random() < 0.5
    nodes = [
        NodeCapacity(f"n{i}", rng.randint(30, 400), rng.choice([1.0, 2.0, 3.5]) if with_bandwidth else None)
        for i in range(rng.randint(1, 4))
    ]
    return sizes, nodes, rng.randint(1, 8), rng.randint(1, 4)


def check_against_brute_force(plan, sizes, nodes, context, prefill_chunk):
    """The plan is brute force's best: when something fits, a valid plan with the least
    (bottleneck, stages, -least free); otherwise no stages and the exact shortfall, named in the advice."""
    best, least_overflow = brute_force(sizes, nodes, context, prefill_chunk)
    assert plan.feasible == (best is not None)
    if plan.feasible:
        check_valid(plan, sizes, nodes, context, prefill_chunk)
        by_name = {node.name: node for node in nodes}
        know = all(node.bandwidth_bytes_per_s for node in nodes)
        bottleneck = max(stage_time(sizes, by_name[s.node], s.start, s.end, know) for s in plan.stages)
        min_free = min(stage.free_bytes for stage in plan.stages)
        assert (bottleneck, len(plan.stages), -min_free) == best
        return
    scratch = prefill_scratch_bytes(sizes, context, prefill_chunk)
    held = sum(sizes.layer_bytes) + sizes.embed_bytes + sizes.head_bytes
    held += kv_cache_bytes(sizes, len(sizes.layer_bytes), context)
    missing = held - sum(max(0, node.usable_bytes - scratch) for node in nodes)
    if missing > 0:
        assert plan.shortfall_bytes == missing
    else:
        assert plan.shortfall_bytes == min(o for o in least_overflow if o is not None)
    assert plan.stages == []
    assert any(format_bytes(plan.shortfall_bytes) in line for line in plan.advice)


def heterogeneous_nodes(count, usable_range, seed=7):
    rng = random.Random(seed)
    return [
        NodeCapacity(
            f"node{i}",
            rng.randint(*usable_range) * GB,
            rng.choice([400e9, 546e9, 800e9, 819e9]),
            rng.choice([64, 96, 128, 192, 256]) * GIB,
        )
        for i in range(count)
    ]
