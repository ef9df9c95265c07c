"""Planning and loading: which node holds which layers, and getting them there.

The plan comes from the checkpoint's exact sizes and each node's usable memory (planner.py);
loading sends every stage its LoadRequest at once and follows the progress each streams back.
"""

import logging

import grpc
from mlx_lm.models.cache import KVCache

from mlx_kimi.checkpoint import text_config

from .generated import kimi_cluster_pb2 as pb
from .membership import Member
from .planner import (DEFAULT_PREFILL_CHUNK, ModelSizes, NodeCapacity, Plan, plan_partition, replan_after_loss,
                      sizes_for_model)
from .transfer import CANNOT_RECEIVE
from .wire import CHUNK_PAYLOAD_BYTES

log = logging.getLogger("kimi_cluster.loading")

MLX_PREFILL_STEP = 2048  # mlx-lm's generate prefills in chunks of this many tokens
LOAD_TIMEOUT_S = 3600


def checkpoint_sizes(checkpoint) -> ModelSizes:
    report = checkpoint.sizes()
    return sizes_for_model(report.layer_bytes, report.embed_bytes, report.head_bytes,
                           text_config(checkpoint.config), checkpoint.activation_itemsize)


def prefill_chunk(sizes: ModelSizes, limit: int = DEFAULT_PREFILL_CHUNK) -> int:
    """Prompt tokens per Forward: `limit` (the --prefill-chunk setting) at most mlx-lm's step, or
    fewer when their hidden states would not fit a message."""
    return max(1, min(limit, MLX_PREFILL_STEP, CHUNK_PAYLOAD_BYTES // sizes.hidden_bytes_per_token))


def _capacities(present: list) -> list:
    # Physical memory only for Macs: the wired-limit advice (sudo sysctl iogpu...) is for macOS alone.
    return [NodeCapacity(m.info.name, m.info.usable_bytes, m.info.memory_bandwidth or None,
                         total_bytes=m.info.total_bytes if m.info.backend == "metal" else None) for m in present]


def _allocated(context: int) -> int:
    # Nodes allocate KV caches in whole KVCache steps; plan for what they will reserve.
    return -(-context // KVCache.step) * KVCache.step


def plan_for(sizes: ModelSizes, present: list, context: int, chunk: int) -> Plan:
    return plan_partition(sizes, _capacities(present), context=_allocated(context), prefill_chunk=chunk)


def replan_for(sizes: ModelSizes, plan: Plan, present: list, context: int, chunk: int) -> Plan:
    """`plan` again over the members `present` after some of its nodes were lost, moving only
    what must move (planner.replan_after_loss)."""
    return replan_after_loss(sizes, plan, _capacities(present), context=_allocated(context), prefill_chunk=chunk)


def load_request(checkpoint, plan: Plan, chain: list, index: int, coordinator: str, coordinator_id: str,
                 owner: str, prefill_chunk: int, take_over: bool = False, drop_sessions: bool = False) -> pb.LoadRequest:
    stage = plan.stages[index]
    after = chain[index + 1] if index + 1 < len(chain) else None
    # Any other node of the chain may hold parts of the slice (in its cache, from an earlier plan).
    peers = [m.address for i, m in enumerate(chain) if i != index and m.address != coordinator]
    return pb.LoadRequest(
        model_id=checkpoint.model_id, sources=[coordinator, *peers],
        start=stage.start, end=stage.end,
        kv_budget_bytes=max(0, stage.usable_bytes - stage.weight_bytes - stage.scratch_bytes),
        next_address=after.address if after else "", next_name=after.name if after else "",
        coordinator=coordinator, coordinator_id=coordinator_id, drop_sessions=drop_sessions, owner=owner,
        take_over=take_over, prefill_chunk=prefill_chunk,
    )


def load_member(member: Member, request: pb.LoadRequest, on_progress) -> str | None:
    """Load `member`'s slice, following its progress; None when done, else what went wrong
    (the member is then `lost` when unreachable, `cannot receive` when it cannot take its slice's
    parts, `failed` otherwise)."""
    member.status = "loading"
    try:
        for update in member.stub.Load(request, timeout=LOAD_TIMEOUT_S):
            on_progress(member.name, update)
    except grpc.RpcError as e:
        if e.code() == CANNOT_RECEIVE:
            member.status = "cannot receive"
        else:
            lost = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)  # gone, or serves another
            member.status = "lost" if lost else "failed"
        message = f"loading {member.name} failed: {e.details()}"
        log.error(message)
        return message
    member.refresh()
    member.status = "ready"
    return None
