"""Split the decoder layers of a model into contiguous stages, one per node.

Pure functions over byte counts: no I/O and no MLX, so a plan can be made (and
explained) on any machine before a single weight is read.

What a stage must hold on its node:

    weights   its layers, plus the embedding on the first stage and the final
              norm + lm_head on the last stage
    KV cache  kv_bytes_per_token_per_layer * layers * context, reserved up front
              so the cache never grows past the plan
    scratch   activations for prefilling one chunk (`prefill_scratch_bytes`)

How the plan is chosen, in order of priority:

 1. Every stage fits: weights + KV + scratch <= the node's usable bytes.
 2. The slowest stage is as fast as possible. A stage's time is the bytes it
    reads per decoded token divided by its node's memory bandwidth (bandwidth 1
    for every node unless all nodes know theirs, which balances bytes). The
    embedding is a table lookup of one row per token, so it costs the first
    stage memory but not time; the lm_head is read in full and counts.
 3. Among plans with an equally fast slowest stage, fewer stages: each hop
    adds latency and gains nothing.
 4. Then the most free memory on the tightest stage.
 5. Then, for the chosen node order, the split that evens out stage times.
 6. Remaining ties go to nodes listed earlier.

Nodes with too little memory, or that would not make the slowest stage faster,
are left out. The search is exact: for a candidate bottleneck time, a dynamic
program over subsets of nodes finds the furthest layer that any ordering of a
subset can cover (covering the longest prefix is always best, because a stage
that starts later needs no more than one that starts earlier and ends at the
same layer), and a binary search over the candidate times finds the smallest
that covers every layer. With n <= 8 nodes that is 2**n * n steps per
candidate, a few milliseconds.
"""

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from fractions import Fraction

from .units import format_bytes

MIB = 2**20
GIB = 2**30

# macOS lets the GPU wire about 75% of unified memory by default (the measured
# value, mx.device_info()["max_recommended_working_set_size"], is better when known).
MAC_DEFAULT_WIRED_FRACTION = 0.75

# Never advise an iogpu.wired_limit_mb that leaves macOS less than this.
WIRED_LIMIT_OS_RESERVE_BYTES = 8 * GIB

# Advised wired limits leave at least this much free above the plan, rounded up to whole GiB.
WIRED_HEADROOM_BYTES = 2 * GIB

# A stage with less than this fraction of its usable memory free is called tight.
TIGHT_FREE_FRACTION = 0.05

# Prefill scratch, per chunk token, in units of the hidden width: the residual,
# the normed input, queries (1536 + 64*192 values for Kimi, ~2 widths), attention
# output (~1.2), the 8 routed expert outputs before they are summed (8) and the
# expert/shared intermediates (~2.6), rounded up.
ACTIVATION_HIDDEN_WIDTHS = 16

# Attention scores are materialised in the activation dtype (bf16).
ATTENTION_SCORE_BYTES = 2

# Prompt tokens per prefill step (at most; fewer when a message cannot hold them): chunks pipeline
# through the stages, and each stage runs its decode batch between two chunks, so a running reply
# waits at most one chunk's compute per stage for another's prompt. The scratch is planned for it.
DEFAULT_PREFILL_CHUNK = 256


@dataclass(frozen=True)
class ModelSizes:
    """Exact byte counts of the parts of a model, from checkpoint headers or a description."""

    layer_bytes: list[int]  # per decoder layer, in order
    embed_bytes: int  # embedding; goes with the first layer
    head_bytes: int  # final norm + lm_head; goes with the last layer
    kv_bytes_per_token_per_layer: int  # 1152 for Kimi: MLA latent (512 + 64) in bf16
    hidden_bytes_per_token: int  # activation width in bytes: 7168 * 2 for Kimi
    attention_heads: int = 64
    # K and V of one position as a prefill chunk's attention up-projects them from the latent
    # (mlx-lm's MLA prefill form): heads * (qk_nope_head_dim + v_head_dim) values, 32,768 bytes for Kimi
    up_projected_bytes_per_token: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.head_bytes


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    usable_bytes: int  # what this node may hold: GPU wired limit minus any reserve
    bandwidth_bytes_per_s: float | None = None  # memory bandwidth, for balancing
    total_bytes: int | None = None  # physical unified memory, for wired-limit advice
    wired_limit_bytes: int | None = None  # current GPU wired limit (macOS), if known


@dataclass(frozen=True)
class Stage:
    node: str
    start: int  # first layer
    end: int  # one past the last layer
    weight_bytes: int  # layers + embedding if first + head if last
    kv_bytes: int  # KV cache reserved for the planned context on these layers
    scratch_bytes: int  # prefill scratch reserved
    usable_bytes: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.scratch_bytes

    @property
    def free_bytes(self) -> int:
        return self.usable_bytes - self.needed_bytes


@dataclass(frozen=True)
class Plan:
    feasible: bool
    stages: list[Stage]  # in pipeline order; empty when infeasible
    context: int
    shortfall_bytes: int  # 0 when feasible
    advice: list[str] = field(default_factory=list)
    # Per node, the `sudo sysctl iogpu.wired_limit_mb=N` that makes the best plan
    # fit; only when infeasible, and only for nodes whose total_bytes is known.
    wired_limit_mb: dict[str, int] = field(default_factory=dict)


def sizes_for_model(layer_bytes: list, embed_bytes: int, head_bytes: int, text_config: dict,
                    itemsize: int = 2) -> ModelSizes:
    """ModelSizes of a DeepSeek-V3-architecture model: MLA caches its latent and rope key
    (kv_lora_rank + qk_rope_head_dim values) per layer per token in the activation dtype."""
    return ModelSizes(
        layer_bytes=list(layer_bytes), embed_bytes=embed_bytes, head_bytes=head_bytes,
        kv_bytes_per_token_per_layer=(text_config["kv_lora_rank"] + text_config["qk_rope_head_dim"]) * itemsize,
        hidden_bytes_per_token=text_config["hidden_size"] * itemsize,
        attention_heads=text_config["num_attention_heads"],
        up_projected_bytes_per_token=text_config["num_attention_heads"] * itemsize
        * (text_config["qk_nope_head_dim"] + text_config["v_head_dim"]),
    )


def mac_default_wired_limit_bytes(total_bytes: int) -> int:
    """The GPU wired limit macOS sets by default: about 75% of unified memory."""
    return int(total_bytes * MAC_DEFAULT_WIRED_FRACTION)


def mac_default_usable_bytes(total_bytes: int, reserve_bytes: int = 0) -> int:
    """Usable bytes on a Mac at the default wired limit, less a reserve."""
    return max(0, mac_default_wired_limit_bytes(total_bytes) - reserve_bytes)


def usable_from_wired_limit_mb(wired_limit_mb: int, reserve_bytes: int = 0) -> int:
    """Usable bytes at `iogpu.wired_limit_mb=N` (N counts MiB), less a reserve."""
    return max(0, wired_limit_mb * MIB - reserve_bytes)


def kv_cache_bytes(sizes: ModelSizes, layers: int, context: int) -> int:
    """KV cache for `context` tokens on `layers` layers."""
    return sizes.kv_bytes_per_token_per_layer * layers * context


def prefill_scratch_bytes(sizes: ModelSizes, context: int, prefill_chunk: int) -> int:
    """Scratch for prefilling one chunk of `prefill_chunk` tokens against `context` tokens.

        chunk = min(prefill_chunk, context)
        scratch = hidden_bytes_per_token * chunk * ACTIVATION_HIDDEN_WIDTHS
                + chunk * context * attention_heads * ATTENTION_SCORE_BYTES
                + context * up_projected_bytes_per_token

    The second term is the attention score matrix of the last chunk, which
    attends to the whole context; the third, the K and V that chunk's attention
    up-projects from every cached position's latent (they feed the same
    attention call as the scores, so both are held at once). For Kimi (64
    heads, 14,336-byte hidden) at a 2,048-token chunk and 32K context that is
    8.59 GB of scores (the ~8.6 GB measured), 1.07 GB of K and V and 0.47 GB of
    activations: 10.13 GB; at the default 256-token chunk the K and V weigh as
    much as the scores (4.3 GB each at 128K). Only one layer runs at a time, so
    a stage reserves it once however many layers it holds.
    """
    chunk = min(prefill_chunk, context)
    if chunk <= 0:
        return 0
    activations = sizes.hidden_bytes_per_token * chunk * ACTIVATION_HIDDEN_WIDTHS
    scores = chunk * context * sizes.attention_heads * ATTENTION_SCORE_BYTES
    return activations + scores + context * sizes.up_projected_bytes_per_token


class _Layers:
    """Prefix sums over the layers for one (context, prefill_chunk), for O(log n) stage checks."""

    def __init__(self, sizes: ModelSizes, context: int, prefill_chunk: int):
        self.count = sizes.num_layers
        self.embed = sizes.embed_bytes
        self.head = sizes.head_bytes
        self.kv_per_layer = sizes.kv_bytes_per_token_per_layer * context
        self.scratch = prefill_scratch_bytes(sizes, context, prefill_chunk)
        self.weight_prefix = [0]
        for size in sizes.layer_bytes:
            self.weight_prefix.append(self.weight_prefix[-1] + size)
        # Weights plus KV cache up to layer j; scratch and embed/head are added per stage.
        self.held_prefix = [w + self.kv_per_layer * j for j, w in enumerate(self.weight_prefix)]

    def weight(self, start: int, end: int) -> int:
        head = self.head if end == self.count else 0
        embed = self.embed if start == 0 else 0
        return self.weight_prefix[end] - self.weight_prefix[start] + embed + head

    def read_bytes(self, start: int, end: int) -> int:
        """Bytes a stage reads per decoded token: its weights without the embedding."""
        head = self.head if end == self.count else 0
        return self.weight_prefix[end] - self.weight_prefix[start] + head

    def needed(self, start: int, end: int) -> int:
        return self.weight(start, end) + self.kv_per_layer * (end - start) + self.scratch

    def furthest_end(self, start: int, read_cap, need_cap) -> int:
        """The largest end such that [start, end) fits both caps; `start` when none does."""
        last = self.count
        if self.read_bytes(start, last) <= read_cap and self.needed(start, last) <= need_cap:
            return last
        embed = self.embed if start == 0 else 0
        by_read = bisect_right(self.weight_prefix, read_cap + self.weight_prefix[start], start + 1, last)
        by_need = bisect_right(
            self.held_prefix, need_cap - self.scratch - embed + self.held_prefix[start], start + 1, last
        )
        return min(by_read, by_need) - 1

    def earliest_start(self, end: int, read_cap, need_cap) -> int:
        """The smallest start such that [start, end) fits both caps; `end` when none does."""
        if self.read_bytes(0, end) <= read_cap and self.needed(0, end) <= need_cap:
            return 0
        head = self.head if end == self.count else 0
        by_read = bisect_left(self.weight_prefix, self.weight_prefix[end] + head - read_cap, 1, end)
        by_need = bisect_left(self.held_prefix, self.held_prefix[end] + head + self.scratch - need_cap, 1, end)
        return max(by_read, by_need)


def _bits(mask: int):
    index = 0
    while mask:
        if mask & 1:
            yield index
        mask >>= 1
        index += 1


def _covered_prefixes(layers: _Layers, caps: list[tuple]) -> list[int]:
    """For every subset of nodes (a bit mask), the furthest layer some ordering of
    some of its nodes covers from layer 0, each node within its (read, need) caps."""
    count = layers.count
    reach = [dict() for _ in caps]
    covered = [0] * (1 << len(caps))
    for mask in range(1, len(covered)):
        best = 0
        for node in _bits(mask):
            before = covered[mask ^ (1 << node)]
            if before > best:
                best = before
            if before < count:
                end = reach[node].get(before)
                if end is None:
                    end = layers.furthest_end(before, *caps[node])
                    reach[node][before] = end
                if end > best:
                    best = end
        covered[mask] = best
    return covered


def _covered_suffixes(layers: _Layers, caps: list[tuple]) -> list[int]:
    """Mirror of `_covered_prefixes`: the earliest layer from which a subset covers to the end."""
    reach = [dict() for _ in caps]
    covered = [layers.count] * (1 << len(caps))
    for mask in range(1, len(covered)):
        best = layers.count
        for node in _bits(mask):
            after = covered[mask ^ (1 << node)]
            if after < best:
                best = after
            if after > 0:
                start = reach[node].get(after)
                if start is None:
                    start = layers.earliest_start(after, *caps[node])
                    reach[node][after] = start
                if start < best:
                    best = start
        covered[mask] = best
    return covered


def _memory_caps(nodes: list[NodeCapacity], margin: int = 0) -> list[tuple]:
    return [(math.inf, node.usable_bytes - margin) for node in nodes]


def _fits(layers: _Layers, nodes: list[NodeCapacity]) -> bool:
    if not nodes:
        return False
    return _covered_prefixes(layers, _memory_caps(nodes))[-1] == layers.count


def _bandwidths(nodes: list[NodeCapacity]) -> list[Fraction]:
    if all(node.bandwidth_bytes_per_s for node in nodes):
        return [Fraction(node.bandwidth_bytes_per_s) for node in nodes]
    return [Fraction(1)] * len(nodes)


def _candidate_times(layers: _Layers, nodes: list[NodeCapacity], bandwidths: list[Fraction]):
    """Every stage time that some stage fitting its node could have, as (seconds, bytes, node)."""
    by_value = {}
    for index, node in enumerate(nodes):
        speed = float(bandwidths[index])
        for start in range(layers.count):
            for end in range(start + 1, layers.count + 1):
                if layers.needed(start, end) > node.usable_bytes:
                    break  # needs only grow with the end
                read = layers.read_bytes(start, end)
                by_value.setdefault(read / speed, (read, index))
    return sorted((seconds, read, index) for seconds, (read, index) in by_value.items())


def _time_caps(read: int, node: int, bandwidths: list[Fraction]) -> list[int]:
    """Bytes each node may read per token so that its stage is no slower than `read` on `node`."""
    return [(read * speed) // bandwidths[node] for speed in bandwidths]


def _best_stages(sizes: ModelSizes, nodes: list[NodeCapacity], context: int, prefill_chunk: int):
    """The best plan's stages as (node index, start, end), or None when nothing fits."""
    layers = _Layers(sizes, context, prefill_chunk)
    if not _fits(layers, nodes):
        return None
    count = layers.count
    bandwidths = _bandwidths(nodes)
    candidates = _candidate_times(layers, nodes, bandwidths)

    def caps_for(candidate: int, margin: int = 0):
        _, read, node = candidates[candidate]
        reads = _time_caps(read, node, bandwidths)
        return [(reads[i], nodes[i].usable_bytes - margin) for i in range(len(nodes))]

    # 2. The smallest bottleneck time at which some ordering of some nodes covers all layers.
    low, high = 0, len(candidates) - 1  # the largest candidate only caps memory, which fits
    while low < high:
        middle = (low + high) // 2
        if _covered_prefixes(layers, caps_for(middle))[-1] == count:
            high = middle
        else:
            low = middle + 1
    bottleneck = low

    # 3. Fewest stages at that bottleneck.
    covered = _covered_prefixes(layers, caps_for(bottleneck))
    fewest = min(mask.bit_count() for mask, end in enumerate(covered) if end == count)

    def covering_mask(margin: int):
        covered = _covered_prefixes(layers, caps_for(bottleneck, margin))
        for mask, end in enumerate(covered):
            if end == count and mask.bit_count() == fewest:
                return mask, covered
        return None, covered

    # 4. The most free memory on the tightest stage (binary search on the margin).
    low, high = 0, max(node.usable_bytes for node in nodes)
    while low < high:
        middle = (low + high + 1) // 2
        if covering_mask(middle)[0] is not None:
            low = middle
        else:
            high = middle - 1
    margin = low
    mask, covered = covering_mask(margin)
    caps = caps_for(bottleneck, margin)

    # The node order behind covered[mask], walked back from the last layer.
    order = []
    target = count
    while target > 0:
        # Walking back from the last stage, later-listed nodes first, so that ties
        # keep the listed order along the pipeline.
        for node in reversed(list(_bits(mask))):
            before = covered[mask ^ (1 << node)]
            if before == target:  # this node is not needed
                mask ^= 1 << node
                break
            if before < target and layers.furthest_end(before, *caps[node]) == target:
                order.append(node)
                mask ^= 1 << node
                target = before
                break
        else:  # pragma: no cover - covered[] guarantees a predecessor
            raise AssertionError("no node order reproduces the covered prefix")
    order.reverse()

    # 5. For that order, the split that minimises the sum of squared stage times.
    speeds = [float(bandwidths[node]) for node in order]
    best = [0.0] + [math.inf] * count
    choices = []
    for position, node in enumerate(order):
        read_cap, need_cap = caps[node]
        current = [math.inf] * (count + 1)
        came_from = [0] * (count + 1)
        stages_after = len(order) - position - 1
        for end in range(position + 1, count - stages_after + 1):
            for start in range(position, end):
                if best[start] == math.inf:
                    continue
                read = layers.read_bytes(start, end)
                if read > read_cap or layers.needed(start, end) > need_cap:
                    continue
                cost = best[start] + (read / speeds[position]) ** 2
                if cost < current[end]:
                    current[end] = cost
                    came_from[end] = start
        best = current
        choices.append(came_from)
    ends = [count]
    for came_from in reversed(choices):
        ends.append(came_from[ends[-1]])
    ends.reverse()
    return [(node, ends[i], ends[i + 1]) for i, node in enumerate(order)]


def _make_stages(sizes, nodes, context, prefill_chunk, placed) -> list[Stage]:
    layers = _Layers(sizes, context, prefill_chunk)
    return [
        Stage(
            node=nodes[node].name,
            start=start,
            end=end,
            weight_bytes=layers.weight(start, end),
            kv_bytes=kv_cache_bytes(sizes, end - start, context),
            scratch_bytes=layers.scratch,
            usable_bytes=nodes[node].usable_bytes,
        )
        for node, start, end in placed
    ]


def plan_partition(
    sizes: ModelSizes,
    nodes: list[NodeCapacity],
    context: int = 32768,
    prefill_chunk: int = 2048,
) -> Plan:
    """The fastest plan that fits (see the module docstring), or why none does."""
    if sizes.num_layers == 0:
        raise ValueError("the model has no decoder layers")
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    names = [node.name for node in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be unique, got {names}")
    for node in nodes:
        if node.bandwidth_bytes_per_s is not None and node.bandwidth_bytes_per_s <= 0:
            raise ValueError(f"{node.name}: bandwidth must be positive, got {node.bandwidth_bytes_per_s}")

    placed = _best_stages(sizes, nodes, context, prefill_chunk) if nodes else None
    if placed is None:
        return _infeasible_plan(sizes, nodes, context, prefill_chunk)
    stages = _make_stages(sizes, nodes, context, prefill_chunk, placed)
    return Plan(
        feasible=True,
        stages=stages,
        context=context,
        shortfall_bytes=0,
        advice=_feasible_advice(sizes, nodes, stages, context, prefill_chunk),
    )


def replan_after_loss(sizes: ModelSizes, plan: Plan, nodes: list[NodeCapacity], context: int = 32768,
                      prefill_chunk: int = 2048) -> Plan:
    """Plan again over `nodes` (the survivors of `plan`'s stages and any spares) moving only the
    layers of the lost stages (those whose node is not among `nodes`), so that every survivor
    keeps what it holds: a lost stage goes whole to the spare with the least memory that holds
    it, else it is split between its surviving neighbours (each grows by the layers next to it,
    cut where the slower of the two is fastest, see the module docstring's stage time). When neither fits, the plan is made afresh
    (plan_partition), which may move any layer."""
    layers = _Layers(sizes, context, prefill_chunk)
    index = {node.name: i for i, node in enumerate(nodes)}
    staged = {stage.node for stage in plan.stages}
    spares = sorted((i for i, node in enumerate(nodes) if node.name not in staged), key=lambda i: nodes[i].usable_bytes)
    placed = [[index.get(stage.node), stage.start, stage.end] for stage in plan.stages]
    speeds = _bandwidths(nodes)

    def fits(node, start, end):
        return layers.needed(start, end) <= nodes[node].usable_bytes

    while (k := next((k for k, p in enumerate(placed) if p[0] is None), None)) is not None:
        _, start, end = placed[k]
        if (spare := next((i for i in spares if fits(i, start, end)), None)) is not None:
            spares.remove(spare)
            placed[k][0] = spare
            continue
        left = placed[k - 1] if k > 0 and placed[k - 1][0] is not None else None
        right = placed[k + 1] if k + 1 < len(placed) and placed[k + 1][0] is not None else None
        if left is None and right is None:
            return plan_partition(sizes, nodes, context, prefill_chunk)
        # Where the lost range is cut: the left neighbour takes [start, cut), the right one [cut, end).
        cuts = range(start if right else end, (end if left else start) + 1)
        ok = [c for c in cuts
              if (left is None or fits(left[0], left[1], c)) and (right is None or fits(right[0], c, right[2]))]
        if not ok:
            return plan_partition(sizes, nodes, context, prefill_chunk)
        cut = min(ok, key=lambda c: max(layers.read_bytes(left[1], c) / speeds[left[0]] if left else 0,
                                        layers.read_bytes(c, right[2]) / speeds[right[0]] if right else 0))
        if left:
            left[2] = cut
        if right:
            right[1] = cut
        del placed[k]
    stages = _make_stages(sizes, nodes, context, prefill_chunk, [tuple(p) for p in placed])
    return Plan(feasible=True, stages=stages, context=context, shortfall_bytes=0,
                advice=_feasible_advice(sizes, nodes, stages, context, prefill_chunk))


def _smallest_stage_need(layers: _Layers) -> int:
    return min(layers.needed(i, i + 1) for i in range(layers.count))


def _feasible_advice(sizes, nodes, stages, context, prefill_chunk) -> list[str]:
    advice = []
    for stage in stages:
        if stage.free_bytes < TIGHT_FREE_FRACTION * stage.usable_bytes:
            advice.append(
                f"{stage.node} is tight: {format_bytes(stage.free_bytes)} free of "
                f"{format_bytes(stage.usable_bytes)} usable."
            )
    used = {stage.node for stage in stages}
    smallest = _smallest_stage_need(_Layers(sizes, context, prefill_chunk))
    for node in nodes:
        if node.name in used:
            continue
        if node.usable_bytes < smallest:
            advice.append(
                f"{node.name} is left out: its {format_bytes(node.usable_bytes)} usable cannot hold "
                f"one layer with its KV cache and prefill scratch ({format_bytes(smallest)})."
            )
        else:
            advice.append(f"{node.name} is left out: the plan is no faster with it.")
    return advice


# --- Infeasible plans: how much is missing, and what would help ------------------


def _one_node_fixes(layers: _Layers, nodes: list[NodeCapacity]) -> list[int]:
    """For each node, the fewest extra bytes on that node alone that make a plan fit.

    Exact: the node takes the layers between what some nodes cover from the front
    and what other nodes cover from the back; the best such pair leaves it least.
    """
    caps = _memory_caps(nodes)
    prefixes = _covered_prefixes(layers, caps)
    suffixes = _covered_suffixes(layers, caps)
    everyone = (1 << len(nodes)) - 1
    fixes = []
    for node in range(len(nodes)):
        others = everyone ^ (1 << node)
        fixes.append(max(0, _least_gap_need(layers, prefixes, suffixes, others) - nodes[node].usable_bytes))
    return fixes


def _least_gap_need(layers: _Layers, prefixes: list[int], suffixes: list[int], pool: int) -> int:
    """The least a further node must hold to fill the gap left between a front and a
    back made of disjoint subsets of `pool` (0 when they already meet)."""
    least = None
    front = pool
    while True:
        rest = pool ^ front
        start = prefixes[front]
        back = rest
        while True:
            end = suffixes[back]
            need = 0 if start >= end else layers.needed(start, end)
            if least is None or need < least:
                least = need
            if back == 0:
                break
            back = (back - 1) & rest
        if front == 0:
            break
        front = (front - 1) & pool
    return least


def _largest_fitting(low: int, high: int, fits) -> int | None:
    """The largest value in [low, high] for which fits(value) holds (fits is monotone), or None."""
    if high < low or not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _raised_nodes(nodes: list[NodeCapacity]):
    """Nodes with their wired limits raised to the highest safe value, and per node
    (current wired limit, reserve kept below it, highest safe limit in MiB) when known."""
    raised, limits = [], {}
    for node in nodes:
        if node.total_bytes is None:
            raised.append(node)
            continue
        current = node.wired_limit_bytes or mac_default_wired_limit_bytes(node.total_bytes)
        reserve = max(0, current - node.usable_bytes)
        highest_mb = max(0, node.total_bytes - WIRED_LIMIT_OS_RESERVE_BYTES) // MIB
        usable = max(node.usable_bytes, highest_mb * MIB - reserve)
        raised.append(NodeCapacity(node.name, usable, node.bandwidth_bytes_per_s, node.total_bytes))
        limits[node.name] = (current, reserve, highest_mb)
    return raised, limits


def _wired_limit_advice(sizes, nodes, context, prefill_chunk):
    """(iogpu.wired_limit_mb per node that makes the best plan fit, advice lines)."""
    raised, limits = _raised_nodes(nodes)
    if not limits:
        return {}, []
    placed = _best_stages(sizes, raised, context, prefill_chunk)
    safe = f"total memory - {WIRED_LIMIT_OS_RESERVE_BYTES // GIB} GiB kept for macOS"
    if placed is None:
        named = ", ".join(limits)
        return {}, [f"Raising the GPU wired limit to the safe maximum, {safe}, on {named} is not enough."]
    wired = {}
    for stage in _make_stages(sizes, raised, context, prefill_chunk, placed):
        original = next(node for node in nodes if node.name == stage.node)
        if stage.node not in limits or stage.needed_bytes <= original.usable_bytes:
            continue
        current, reserve, highest_mb = limits[stage.node]
        needed_gib = -(-(stage.needed_bytes + reserve + WIRED_HEADROOM_BYTES) // GIB)
        wired[stage.node] = min(needed_gib * 1024, highest_mb)
    lines = [
        f"On {name}: sudo sysctl iogpu.wired_limit_mb={mb} (now {limits[name][0] // MIB}; "
        f"at most {limits[name][2]}, {safe}; resets on reboot)."
        for name, mb in wired.items()
    ]
    return wired, lines


def _infeasible_plan(sizes, nodes, context, prefill_chunk) -> Plan:
    """Shortfall and advice when no plan fits.

    shortfall_bytes: every node that takes part reserves prefill scratch once, so a
    node offers max(0, usable - scratch) for weights and KV cache. When that total
    is short of all weights + KV cache, the shortfall is the difference. When it is
    enough but layers cannot be split to fit (they do not divide at the right
    bytes), it is the fewest extra bytes on one node that make a split fit.
    """
    layers = _Layers(sizes, context, prefill_chunk)
    kv_total = kv_cache_bytes(sizes, layers.count, context)
    held = sizes.total_bytes + kv_total
    offered = sum(max(0, node.usable_bytes - layers.scratch) for node in nodes)
    fixes = _one_node_fixes(layers, nodes) if nodes else []
    missing = held - offered
    if not nodes:
        shortfall = held + layers.scratch
    else:
        shortfall = missing if missing > 0 else min(fixes)

    advice = []
    if not nodes:
        advice.append(f"No nodes: the model needs {format_bytes(shortfall)} on one or more nodes.")
    elif missing > 0:
        advice.append(
            f"Does not fit: {format_bytes(shortfall)} missing. Weights {format_bytes(sizes.total_bytes)}"
            f" + KV cache {format_bytes(kv_total)} for {context:,} tokens = {format_bytes(held)} must fit in what"
            f" the nodes have beyond the {format_bytes(layers.scratch)} of prefill scratch each node that takes"
            f" part reserves: {format_bytes(offered)} (of {format_bytes(sum(node.usable_bytes for node in nodes))}"
            f" usable)."
        )
    else:
        advice.append(
            f"Does not fit: the memory adds up ({format_bytes(held)} needed, {format_bytes(offered)} offered"
            f" after prefill scratch), but no contiguous split of the layers fits;"
            f" {format_bytes(shortfall)} more on one node would make one."
        )
    if nodes:
        by_fix = sorted(range(len(nodes)), key=lambda i: fixes[i])
        advice.append(
            "Tight nodes, with the extra each alone would need: "
            + ", ".join(
                f"{nodes[i].name} +{format_bytes(fixes[i])} ({format_bytes(nodes[i].usable_bytes)} usable)"
                for i in by_fix
            )
            + "."
        )
        smallest = _smallest_stage_need(layers)
        for node in nodes:
            if node.usable_bytes < smallest:
                advice.append(
                    f"{node.name} cannot hold even one layer with its KV cache and prefill scratch"
                    f" ({format_bytes(smallest)}); it is left out."
                )

    # Options.
    caps = _memory_caps(nodes)
    prefixes, suffixes = _covered_prefixes(layers, caps), _covered_suffixes(layers, caps)
    extra_node = _least_gap_need(layers, prefixes, suffixes, (1 << len(nodes)) - 1)
    advice.append(f"Option: add a node with at least {format_bytes(extra_node)} usable.")
    fitting_context = _largest_fitting(
        1, context - 1, lambda c: _fits(_Layers(sizes, c, prefill_chunk), nodes)
    )
    if fitting_context is not None:
        shown = fitting_context - fitting_context % 1024 if fitting_context >= 1024 else fitting_context
        advice.append(f"Option: lower --context to {shown:,} tokens.")
    else:
        advice.append("A shorter --context alone does not make it fit.")
    if shortfall < sizes.total_bytes:
        advice.append(
            f"Option: use a smaller quantization: the weights would have to shrink by at least"
            f" {format_bytes(shortfall)} ({100 * shortfall / sizes.total_bytes:.1f}%)."
        )
    else:
        advice.append(
            f"Smaller weights cannot make it fit: {format_bytes(shortfall)} is missing, more than all the weights"
            f" ({format_bytes(sizes.total_bytes)}); the KV cache and prefill scratch need the room."
        )
    wired, wired_lines = _wired_limit_advice(sizes, nodes, context, prefill_chunk)
    advice.extend(wired_lines)
    return Plan(
        feasible=False,
        stages=[],
        context=context,
        shortfall_bytes=shortfall,
        advice=advice,
        wired_limit_mb=wired,
    )
