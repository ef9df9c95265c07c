"""The coordinator: brings the cluster up and serves the Coordinator gRPC service.

It is itself a node (its NodeService may hold layers). The work is split by concern:
membership.py (who is present, lost, back), loading.py (the plan and loading the slices),
scheduler.py (how a request runs through the chain), sessions.py (the prompt cache) and
generation.py (where a reply ends, its timing and log line). This file wires them together,
keeps the cluster's state (waiting, loading, ready, degraded) and answers Generate and MemoryMap.
"""

import json
import logging
import threading
import time
import uuid

import grpc

from mlx_kimi.checkpoint import open_checkpoint, text_config
from mlx_kimi.kimi_tokenizer import load_tokenizer

from .generated import kimi_cluster_pb2 as pb
from .generated import kimi_cluster_pb2_grpc as pb_grpc
from .generation import GenerationLoop, GenerationRequest, PromptTokenizer
from .loading import checkpoint_sizes, load_member, load_request, plan_for, prefill_chunk, replan_for
from .identity import peer_name
from .membership import HEALTH_INTERVAL_S, Membership, NameTaken, Refused
from .node import NodeService
from .planner import DEFAULT_PREFILL_CHUNK, Plan
from .scheduler import GenerateError, Scheduler
from .sampling import generation_defaults
from .sessions import Sessions
from .structured import FieldError, constraint_spec
from .units import format_bytes
from .wire import canonical_address, handshake_failure

log = logging.getLogger("kimi_cluster.coordinator")


class Coordinator(pb_grpc.CoordinatorServicer):
    def __init__(self, local: NodeService, model_path: str, secret: bytes, peers: list[str],
                 context: int = 32768, min_nodes: int | None = None, zeroconf=None, take_over: bool = False,
                 max_prefill_chunk: int = DEFAULT_PREFILL_CHUNK, speculate: str = "off"):
        self.local, self.context, self.min_nodes = local, context, min_nodes
        # This process's identity: nodes it loads serve it alone (and free a predecessor's sessions);
        # every Load, Forward and health check carries it. take_over: load nodes another live one owns.
        self.id, self.take_over = uuid.uuid4().hex, take_over
        self.checkpoint = open_checkpoint(model_path)
        self.sizes = checkpoint_sizes(self.checkpoint)
        self.prefill_chunk = prefill_chunk(self.sizes, max_prefill_chunk)
        self.tokenizer = load_tokenizer(self.checkpoint.path)
        self.membership = Membership(local.address, secret, peers, self.id, local.node_id, zeroconf, take_over)
        self.membership.on_lost = self._node_lost
        self.sessions = Sessions(lambda: self.membership.chain)
        self.ready = threading.Event()
        self.scheduler = Scheduler(local, self.membership, self.sessions, self.prefill_chunk, self._node_lost,
                                   self.ready, speculate)
        local.serve_coordinator(self.scheduler.deliver)  # the token ring ends here
        self.plan: Plan | None = None
        self.state, self.message = "waiting", "waiting for nodes"
        self._stop = threading.Event()
        self._lost = threading.Event()  # wakes the health watch (set on stop too)
        self.on_status = lambda message: log.info("%s", message)
        self.generation = GenerationLoop(self.tokenizer, context, generation_defaults(self.checkpoint.path),
                                         self.generate, lambda: [m.name for m in self.chain],
                                         text_config(self.checkpoint.config)["vocab_size"])
        threading.Thread(target=self.generation.warm, name="grammar-tokenizer", daemon=True).start()

    @property
    def chain(self) -> list:
        return self.membership.chain

    # ---- bring-up --------------------------------------------------------------------------

    def start(self):
        threading.Thread(target=self._run, name="coordinator", daemon=True).start()

    def stop(self):
        self.scheduler.stop()
        self._stop.set()
        self._lost.set()
        self.membership.close()

    def _run(self):
        present = self.membership.wait_for_members(self._enough, self._stop, self._status)
        if self._stop.is_set():
            return
        self._plan(present)
        self._load_all()
        self._watch()

    def _watch(self):
        """Health-check the chain each second; while degraded, move the lost layers if the
        nodes present can hold them."""
        while not self._stop.is_set():
            self._lost.wait(HEALTH_INTERVAL_S)  # a lost node is handled at once, not at the next round
            self._lost.clear()
            if self._stop.is_set():
                return
            self.membership.check(self._node_back)
            if self.state == "degraded":
                self._replan()

    def _status(self, message: str):
        if message != self.message:
            self.message = message
            self.on_status(message)

    def _enough(self, present: list) -> tuple:
        """Whether to plan now, and why not. A set of nodes the model does not fit is never planned:
        the coordinator keeps waiting, and plans again when another node joins."""
        usable = sum(m.info.usable_bytes for m in present)
        found = f"found {len(present)} node{'s' * (len(present) != 1)} ({', '.join(m.name for m in present)}), " \
                f"{format_bytes(usable)} usable for {format_bytes(self.sizes.total_bytes)} of weights"
        plan = plan_for(self.sizes, present, self.context, self.prefill_chunk)
        if self.min_nodes and len(present) < self.min_nodes:
            fits = "the model would fit on them" if plan.feasible else "not enough for the model yet"
            return False, f"{found} ({fits}); waiting for {self.min_nodes} nodes (--nodes {self.min_nodes})"
        if plan.feasible:
            return True, found
        return False, f"{found}; the model does not fit: {' '.join(plan.advice)} Waiting for another node to join."

    def _plan(self, present: list):
        plan = plan_for(self.sizes, present, self.context, self.prefill_chunk)
        with self.membership.lock:
            self.plan = plan
            if not plan.feasible:
                self.state = "waiting"
                self._status("the model does not fit: " + " ".join(plan.advice))
                return
            by_name = {m.info.name: m for m in present}
            self.membership.chain = [by_name[s.node] for s in plan.stages]
            for m in self.membership.members.values():
                m.status = "loading" if m in self.chain else "spare"

    def _replan(self):
        """Plan again over the nodes that answer (the chain's survivors and the spares) and load
        it, when the model fits them; otherwise keep waiting for the lost node to come back.
        Only the lost layers move when a spare or the neighbours hold them (replan_for): a node
        keeping its layers is only re-pointed, one that grows reads only the layers it lacks.
        Requests in flight wait on `ready` and replay their sessions on the new chain."""
        chain, members = self.membership.snapshot()
        lost = [m.name for m in chain if m.down]
        present = [m for m in chain if not m.down]
        present += [m for m in members if m.status == "spare" and m not in chain and m.refresh()]
        plan = replan_for(self.sizes, self.plan, present, self.context, self.prefill_chunk)
        if not plan.feasible:
            self._status(f"lost {', '.join(lost)}; the other nodes cannot hold the model, so requests wait "
                         "for it to come back: restart it (same --name) or add a node")
            return
        before = {s.node: (s.start, s.end) for s in self.plan.stages}
        log.warning("lost %s; moving its layers: %s", ", ".join(lost),
                    ", ".join(f"{s.node} [{s.start}, {s.end})"
                              + (" kept" if before.get(s.node) == (s.start, s.end) else "") for s in plan.stages))
        self.ready.clear()
        by_name = {m.info.name: m for m in present}
        with self.membership.lock:
            self.plan = plan
            self.membership.chain = [by_name[s.node] for s in plan.stages]
            for m in self.membership.members.values():
                if m.status != "lost":
                    m.status = "loading" if m in self.chain else "spare"
        self._load_all()
        if self.state == "ready":
            self.on_status(f"cluster ready again: {self.checkpoint.name} on "
                           + ", ".join(f"{s.node} [{s.start}, {s.end})" for s in plan.stages))

    def _load(self, index: int, drop_sessions: bool = False) -> bool:
        request = load_request(self.checkpoint, self.plan, self.chain, index, self.local.address, self.id,
                               self.local.node_id, self.prefill_chunk, self.take_over, drop_sessions)
        if error := load_member(self.chain[index], request, self.on_load_progress):
            self._status(error)
            return False
        return True

    def _load_all(self):
        if not self.chain:
            return
        with self.membership.lock:
            self.state, self.message = "loading", "loading slices"
        threads = [threading.Thread(target=self._load, args=(i,)) for i in range(len(self.chain))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._update_state()

    def on_load_progress(self, name: str, update: pb.LoadProgress):
        if update.done:
            log.info("%s: %s", name, update.message)

    def _update_state(self):
        with self.membership.lock:
            if all(m.status == "ready" for m in self.chain):
                self.state, self.message = "ready", ""
                self.ready.set()
            elif any(m.status == "cannot receive" for m in self.chain):
                self.state = "waiting"  # for that node to be given room (its load named it and the reason)
                self.ready.clear()
            elif any(m.down for m in self.chain):
                lost = [m.name for m in self.chain if m.down]
                self.state = "degraded"
                self.message = f"lost {', '.join(lost)}; restart it and it will be loaded again"
                self.ready.clear()

    def _node_lost(self, name: str):
        self.membership.mark_lost(name)
        self._update_state()
        self._lost.set()
        # Cached conversations lost their caches on that node: free them everywhere else.
        self.sessions.evict_all()

    def _node_back(self, index: int, member):
        """A planned node answers again: load its slice, and re-point the stage before it."""
        stage = self.plan.stages[index]
        log.info("%s is back at %s; loading layers %d-%d again", member.name, member.address,
                 stage.start, stage.end - 1)
        self._load(index, drop_sessions=True)
        if index > 0 and self.chain[index - 1].info.loaded.next_address != member.address:
            self._load(index - 1)  # same slice: the node only re-points its next stage
        self._update_state()

    # ---- generation ------------------------------------------------------------------------

    def generate(self, prompt: list, max_tokens: int, sampling: pb.SamplingParams, stats: dict | None = None,
                 deadline: float | None = None, shaper=None, speculate: bool | None = None, prediction: list = (),
                 score_prompt: bool = False):
        """Yield (token id, logprob, TopLogprobs or None) for `prompt`: Scheduler.generate, once the
        cluster is ready."""
        if self.state != "ready":
            raise GenerateError(grpc.StatusCode.UNAVAILABLE, f"cluster is {self.state}: {self.message}")
        yield from self.scheduler.generate(prompt, max_tokens, sampling, stats, deadline, shaper, speculate, prediction,
                                           score_prompt)

    def prompt_tokens(self, request: pb.GenerateRequest, max_tokens: int) -> list:
        if request.prompt_tokens:
            return list(request.prompt_tokens)
        try:
            messages = json.loads(request.messages_json or "[]")
            tools = json.loads(request.tools_json) if request.tools_json else None
        except json.JSONDecodeError as e:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, f"messages_json is not JSON: {e}") from e
        if not messages:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, "messages: give at least one message")
        extra = {"thinking": request.thinking} if request.HasField("thinking") else {}
        tokenizer = PromptTokenizer(self.tokenizer, self.context, max_tokens)
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **extra)
        except GenerateError:
            raise
        except Exception as e:  # the template refused these messages
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, f"messages_json cannot be rendered with the "
                                f"model's chat template: {type(e).__name__}: {e}") from e

    @staticmethod
    def constraint(request: pb.GenerateRequest):
        """The reply's grammar from response_format_json, tools_json and tool_choice_json (None: none)."""
        fields = {}
        for name, text in (("response_format", request.response_format_json), ("tools", request.tools_json),
                           ("tool_choice", request.tool_choice_json)):
            try:
                fields[name] = json.loads(text) if text else None
            except json.JSONDecodeError as e:
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}_json is not JSON: {e}") from e
        try:
            return constraint_spec(fields, thinking=False)  # the loop reads the thinking from the prompt
        except FieldError as e:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, e.message) from e

    # ---- gRPC handlers ---------------------------------------------------------------------

    def Generate(self, request, context):
        arrived = time.monotonic()
        try:
            left = context.time_remaining()  # the client's deadline, if it set one
            max_tokens = request.max_tokens or 256
            generation = self.generation.start(GenerationRequest(
                self.prompt_tokens(request, max_tokens), max_tokens, request.sampling, arrived=arrived,
                deadline=arrived + left if left is not None and left < 1e6 else None,
                cancelled=lambda: not context.is_active(), constraint=self.constraint(request),
                speculate=request.speculate if request.HasField("speculate") else None,
                prediction=list(request.prediction_tokens),
                thinking_budget=request.thinking_budget if request.HasField("thinking_budget") else None))
            for piece in generation:
                token = pb.TokenEvent(id=-1 if piece.token is None else piece.token, text=piece.delta.content,
                                      logprob=piece.logprob or 0.0, top=piece.top)
                yield pb.GenerateEvent(token=token)
            done = generation.result
            if done.finish_reason != "cancelled":
                yield pb.GenerateEvent(done=pb.DoneEvent(
                    finish_reason=done.finish_reason, prompt_tokens=done.prompt_tokens,
                    completion_tokens=done.completion_tokens, cached_tokens=done.cached_tokens,
                    ttft_s=done.ttft_s, decode_s=done.decode_s))
        except GenerateError as e:
            context.abort(e.code, e.message)

    def memory_map(self) -> pb.MemoryMapReply:
        reply = pb.MemoryMapReply(state=self.state, model=self.checkpoint.name, model_id=self.checkpoint.model_id,
                                  num_layers=self.checkpoint.num_layers, message=self.message,
                                  speculation=self.scheduler.speculation)
        stages = {s.node: s for s in (self.plan.stages if self.plan else [])}
        chain, members = self.membership.snapshot()
        in_order = sorted(members, key=lambda m: chain.index(m) if m in chain else len(chain))
        for m in in_order:
            if m.status != "lost":
                m.refresh()
            info = m.info or pb.NodeInfo(name=m.address, address=m.address)
            entry = pb.NodeEntry(
                name=info.name, address=m.address, backend=info.backend, chip=info.chip, node_id=info.node_id,
                total_bytes=info.total_bytes, usable_bytes=info.usable_bytes, status=m.status,
            )
            if stage := stages.get(info.name):
                entry.has_layers, entry.start, entry.end = True, stage.start, stage.end
                entry.weight_bytes = stage.weight_bytes
            if m.status != "lost" and info.HasField("loaded"):
                entry.resident_bytes = info.loaded.weight_bytes
                entry.kv_bytes = info.kv_bytes
                entry.source, entry.cache_bytes = info.loaded.source, info.loaded.cache_bytes
            entry.free_bytes = max(0, info.usable_bytes - entry.resident_bytes - entry.kv_bytes)
            reply.nodes.append(entry)
        return reply

    def MemoryMap(self, request, context):
        return self.memory_map()

    def Join(self, request, context):
        try:
            address = canonical_address(request.address)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if address == canonical_address(self.local.address):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.address} is this coordinator's own node")
        try:
            return pb.JoinReply(status=self.membership.join(address, peer_name(context)))
        except NameTaken as e:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except Refused as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except grpc.RpcError as e:
            why = handshake_failure(e, address, self.membership.secret) or e.details()
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the coordinator cannot reach {address} to ask who it is: {why}")

    def RemoveNode(self, request, context):
        try:
            return pb.RemoveNodeReply(node_id=self.membership.remove(request.name))
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no node named {request.name!r} in this cluster; "
                          "`kimi-cluster map` lists them")
