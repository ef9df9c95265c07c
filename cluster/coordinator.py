"""The coordinator: finds the nodes, plans the split, loads every slice, drives generation.

It is itself a node (its NodeService may hold layers). Generation sends each chunk of tokens
to the first stage; the stages pass hidden states along the chain and the sampled token comes
back as the reply. Health checks turn a lost node into a visible `degraded` state, and a node
that comes back (same name) is loaded again.
"""

import json
import logging
import threading
from collections import OrderedDict
import time
import uuid
from dataclasses import dataclass

import grpc
from mlx_lm.models.cache import KVCache

from mlx_kimi.checkpoint import open_checkpoint, text_config
from mlx_kimi.kimi_tokenizer import load_tokenizer

from .generated import kimi_cluster_pb2 as pb
from .generated import kimi_cluster_pb2_grpc as pb_grpc
from .auth import fingerprint
from .discovery import Browser
from .link import ForwardLink, StageError
from .node import NodeService
from .planner import ModelSizes, NodeCapacity, Plan, plan_partition, sizes_for_model
from .prompt_cache import CachedSession, pick_reusable
from .units import format_bytes
from .wire import CHUNK_PAYLOAD_BYTES, node_stub, open_channel

log = logging.getLogger("kimi_cluster.coordinator")

MDNS_QUIET_S = 5.0          # alone this long while browsing: say what may hide the other nodes
MAX_CACHED_SESSIONS = 16    # conversations whose KV caches stay on the nodes for their next turn
HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 2.0
DECODE_TIMEOUT_S = 8.0       # a node silent this long during a step is reported as lost
PREFILL_S_PER_TOKEN = 0.01   # extra time allowed per prompt token of a chunk
MLX_PREFILL_STEP = 2048      # mlx-lm's generate prefills in chunks of this many tokens


class GenerateError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Member:
    """A node as the coordinator sees it."""

    address: str
    stub: object
    info: pb.NodeInfo | None = None
    status: str = "waiting"  # waiting, loading, ready, lost, spare
    link: ForwardLink | None = None  # the data path, when this node is the first stage and not this process

    @property
    def name(self) -> str:
        return self.info.name if self.info else self.address


def model_sizes(checkpoint) -> ModelSizes:
    report = checkpoint.sizes()
    return sizes_for_model(report.layer_bytes, report.embed_bytes, report.head_bytes,
                           text_config(checkpoint.config), checkpoint.activation_itemsize)


def sampling_error(s: pb.SamplingParams) -> str | None:
    if not s.temperature >= 0:
        return f"temperature must be >= 0, got {s.temperature}"
    if not 0 <= s.top_p <= 1:
        return f"top_p must be in (0, 1] (0 turns it off), got {s.top_p}"
    if s.top_k < 0:
        return f"top_k must be >= 0, got {s.top_k}"
    if not 0 <= s.min_p <= 1:
        return f"min_p must be in [0, 1], got {s.min_p}"
    return None


class Coordinator(pb_grpc.CoordinatorServicer):
    def __init__(self, local: NodeService, model_path: str, secret: bytes, peers: list[str],
                 context: int = 32768, min_nodes: int | None = None, zeroconf=None):
        self.local, self.secret, self.context = local, secret, context
        self.checkpoint = open_checkpoint(model_path)
        self.sizes = model_sizes(self.checkpoint)
        self.tokenizer = load_tokenizer(self.checkpoint.path)
        hidden_bytes = self.sizes.hidden_bytes_per_token
        self.prefill_chunk = max(1, min(MLX_PREFILL_STEP, CHUNK_PAYLOAD_BYTES // hidden_bytes))
        local.is_coordinator = True
        local.coordinator_address = local.address
        self.members = {local.address: Member(local.address, node_stub(open_channel(local.address, secret)))}
        for address in peers:
            self.members[address] = Member(address, node_stub(open_channel(address, secret)))
        self.static = set(self.members)  # nodes named on the command line must all answer
        self.min_nodes = min_nodes
        self.plan: Plan | None = None
        self.chain: list[Member] = []
        self.prompt_cache: OrderedDict[str, CachedSession] = OrderedDict()  # LRU first
        self.state, self.message = "waiting", "waiting for nodes"
        self._waiting_since = time.monotonic()  # started waiting for nodes (see _discovery_hint)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Event()
        self.ready = threading.Event()
        self.on_status = lambda message: log.info("%s", message)
        self.browser = Browser(zeroconf, fingerprint(secret), self._on_discovery) if zeroconf else None

    # ---- bring-up --------------------------------------------------------------------------

    def start(self):
        threading.Thread(target=self._run, name="coordinator", daemon=True).start()

    def stop(self):
        self._stop.set()
        self._changed.set()
        if self.browser:
            self.browser.close()

    def _run(self):
        present = self._wait_for_members()
        if self._stop.is_set():
            return
        self._plan(present)
        self._load_all()
        self._watch()

    def _on_discovery(self, kind: str, found):
        """A node of this cluster joined, changed or left (mDNS)."""
        lost_name = None
        with self._lock:
            member = self.members.get(found.address)
            if kind == "leave":
                if member and member not in self.chain and found.address not in self.static:
                    del self.members[found.address]
                elif member:
                    lost_name = member.name
            elif member is None:
                stub = node_stub(open_channel(found.address, self.secret))
                back = next((m for m in self.chain if m.name == found.name), None)
                if back:  # a planned node restarted on a new address (names are unique): load it there
                    del self.members[back.address]
                    back.address, back.stub, back.status = found.address, stub, "lost"
                    self.members[found.address] = back
                    lost_name = back.name
                else:
                    self.members[found.address] = Member(found.address, stub, status="spare" if self.plan else "waiting")
            log.info("mDNS: %s %s at %s", found.name, kind, found.address)
        if lost_name:
            self._mark_lost(lost_name)
        self._changed.set()

    def _status(self, message: str):
        if message != self.message:
            self.message = message
            self.on_status(message)

    def _enough(self, present: list) -> tuple:
        """Whether to plan now, and why not."""
        usable = sum(m.info.usable_bytes for m in present)
        found = f"found {len(present)} node{'s' * (len(present) != 1)} ({', '.join(m.name for m in present)}), " \
                f"{format_bytes(usable)} usable of {format_bytes(self.sizes.total_bytes)} of weights"
        if self.min_nodes:
            enough, why = len(present) >= self.min_nodes, f"{found}; waiting for {self.min_nodes} nodes"
        else:
            plan = self._plan_for(present)
            enough, why = plan.feasible, f"{found}; waiting for more: {plan.advice[0] if plan.advice else 'does not fit'}"
        return enough, why + self._discovery_hint(len(present))

    def _discovery_hint(self, present: int) -> str:
        """What may keep other nodes from being found (said while waiting for them)."""
        if self.browser is None:
            return ""
        others = sorted(f"{a.name} ({a.address})" for a in self.browser.ignored_nodes())
        hint = ""
        if others:
            hint += (f"; ignoring {', '.join(others)}: another cluster secret, copy this cluster's secret "
                     "there (see `kimi-cluster up` output) if it should join")
        if present <= 1 and time.monotonic() - self._waiting_since > MDNS_QUIET_S:
            hint += ("; no other node answered over mDNS: multicast may be blocked (some Wi-Fi and switches), or "
                     "macOS has not yet allowed the terminal 'Local Network' access; bind every node with "
                     "--host to the same network, or name them with --peer HOST:PORT")
        return hint

    def _wait_for_members(self) -> list:
        while not self._stop.is_set():
            self._changed.clear()
            with self._lock:
                members = list(self.members.values())
            present = [m for m in members if self._refresh(m)]
            missing = [m.address for m in members if m not in present and m.address in self.static]
            enough, why = self._enough(present)
            if not missing and enough:
                return present
            self._status(f"waiting for {', '.join(missing)} to answer" if missing else why)
            self._changed.wait(HEALTH_INTERVAL_S)
        return []

    def _refresh(self, member: Member) -> bool:
        try:
            member.info = member.stub.Info(pb.InfoRequest(), timeout=HEALTH_TIMEOUT_S)
            return True
        except grpc.RpcError:
            return False

    def _plan_for(self, present: list) -> Plan:
        nodes = [NodeCapacity(m.info.name, m.info.usable_bytes, total_bytes=m.info.total_bytes) for m in present]
        # Nodes allocate KV caches in whole KVCache steps; plan for what they will reserve.
        allocated = -(-self.context // KVCache.step) * KVCache.step
        return plan_partition(self.sizes, nodes, context=allocated, prefill_chunk=self.prefill_chunk)

    def _plan(self, present: list):
        plan = self._plan_for(present)
        with self._lock:
            self.plan = plan
            if not plan.feasible:
                self.state = "waiting"
                self._status("the model does not fit: " + " ".join(plan.advice))
                return
            by_name = {m.info.name: m for m in present}
            self.chain = [by_name[s.node] for s in plan.stages]
            for m in self.members.values():
                m.status = "loading" if m in self.chain else "spare"

    def _load_request(self, index: int, drop_sessions: bool = False) -> pb.LoadRequest:
        stage = self.plan.stages[index]
        after = self.chain[index + 1] if index + 1 < len(self.chain) else None
        return pb.LoadRequest(
            model_path=str(self.checkpoint.path.resolve()), model_id=self.checkpoint.model_id,
            start=stage.start, end=stage.end,
            kv_budget_bytes=max(0, stage.usable_bytes - stage.weight_bytes - stage.scratch_bytes),
            next_address=after.address if after else "", next_name=after.name if after else "",
            coordinator=self.local.address, drop_sessions=drop_sessions,
        )

    def _load(self, index: int, on_progress=None, drop_sessions: bool = False) -> bool:
        member = self.chain[index]
        member.status = "loading"
        try:
            for update in member.stub.Load(self._load_request(index, drop_sessions), timeout=3600):
                if on_progress:
                    on_progress(member.name, update)
        except grpc.RpcError as e:
            member.status = "lost" if e.code() == grpc.StatusCode.UNAVAILABLE else "failed"
            self.message = f"loading {member.name} failed: {e.details()}"
            log.error(self.message)
            return False
        self._refresh(member)
        member.status = "ready"
        return True

    def _load_all(self, on_progress=None):
        if not self.chain:
            return
        with self._lock:
            self.state, self.message = "loading", "loading slices"
        results = [False] * len(self.chain)

        def load(i):
            results[i] = self._load(i, on_progress or self.on_load_progress)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(len(self.chain))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._update_state()

    def on_load_progress(self, name: str, update: pb.LoadProgress):
        if update.done:
            log.info("%s: %s", name, update.message)

    def _update_state(self):
        with self._lock:
            if all(m.status == "ready" for m in self.chain):
                self.state, self.message = "ready", ""
                self.ready.set()
            elif any(m.status in ("lost", "failed") for m in self.chain):
                lost = [m.name for m in self.chain if m.status in ("lost", "failed")]
                self.state = "degraded"
                self.message = f"lost {', '.join(lost)}; restart it and it will be loaded again"
                self.ready.clear()

    def _watch(self):
        """Health-check every member; reload a planned node that comes back."""
        while not self._stop.wait(HEALTH_INTERVAL_S):
            for i, member in enumerate(list(self.chain)):
                try:
                    health = member.stub.Health(pb.HealthRequest(), timeout=HEALTH_TIMEOUT_S)
                except grpc.RpcError:
                    if member.status != "lost":
                        self._mark_lost(member.name)
                    continue
                if member.status == "lost" or (member.status == "ready" and not health.loaded):
                    log.info("%s is back at %s; loading layers %d-%d again", member.name, member.address,
                             self.plan.stages[i].start, self.plan.stages[i].end - 1)
                    self._refresh(member)
                    self._load(i, drop_sessions=True)
                    if i > 0 and self.chain[i - 1].info.loaded.next_address != member.address:
                        self._load(i - 1)  # same slice: the node only re-points its next stage
                    self._update_state()

    def _mark_lost(self, name: str):
        for m in self.chain:
            if m.name == name and m.status != "lost":
                log.warning("lost node %s (%s)", m.name, m.address)
                m.status = "lost"
        self._update_state()
        # Cached conversations lost their caches on that node: free them everywhere else.
        while self._evict_one():
            pass

    # ---- generation ------------------------------------------------------------------------

    def _forward(self, request: pb.ForwardRequest, timeout: float) -> pb.ForwardReply:
        first = self.chain[0]
        if first.address == self.local.address:
            return self.local.forward(request, timeout)
        if first.link is None or first.link.address != first.address:
            if first.link:
                first.link.close()
            first.link = ForwardLink(first.stub, first.name, first.address)
        return first.link.call(request, timeout)

    def release(self, session_id: str):
        for m in self.chain:
            if m.status == "ready":
                try:
                    m.stub.Release(pb.ReleaseRequest(session_id=session_id), timeout=HEALTH_TIMEOUT_S)
                except grpc.RpcError:
                    pass

    def _claim_cached(self, prompt: list) -> tuple:
        """(session id, positions to keep): the cached session `prompt` continues, taken out of
        the cache while in use, or a new session."""
        with self._lock:
            best, keep = pick_reusable(self.prompt_cache, prompt)
            if best is None:
                return uuid.uuid4().hex, 0
            del self.prompt_cache[best]
            return best, keep

    def _keep_cached(self, session_id: str, cached: CachedSession):
        with self._lock:
            self.prompt_cache[session_id] = cached
        while len(self.prompt_cache) > MAX_CACHED_SESSIONS and self._evict_one():
            pass

    def _evict_one(self) -> bool:
        """Free the least recently used cached session on every node."""
        with self._lock:
            if not self.prompt_cache:
                return False
            session_id, _ = self.prompt_cache.popitem(last=False)
        self.release(session_id)
        return True

    def forget(self, session_id: str):
        """Drop a session from the prompt cache and free it on every node."""
        with self._lock:
            self.prompt_cache.pop(session_id, None)
        self.release(session_id)

    def generate(self, prompt: list, max_tokens: int, sampling: pb.SamplingParams, stats: dict | None = None):
        """Yield (token id, logprob) like mlx-lm's generate_step: prefill prompt[:-1] in chunks,
        then the last prompt token, then one token at a time.

        When `prompt` continues a cached conversation (prompt_cache.pick_reusable), the nodes'
        caches for the shared prefix are reused and only the rest is prefilled; afterwards the
        session stays cached for the next turn unless `stats["cancelled"]` is set (a client that
        went away). `stats` receives the session id and the number of cached prompt tokens."""
        if self.state != "ready":
            raise GenerateError(grpc.StatusCode.UNAVAILABLE, f"cluster is {self.state}: {self.message}")
        stats = {} if stats is None else stats
        session_id, cached = self._claim_cached(prompt)
        stats.update(session_id=session_id, cached_tokens=cached)
        max_positions = len(prompt) + max_tokens
        generated, kept = [], False

        def step(tokens: list, offset: int, sample: bool, new_generation: bool = False):
            request = pb.ForwardRequest(session_id=session_id, sampling=sampling, max_positions=max_positions,
                                        offset=offset, sample=sample, new_generation=new_generation)
            request.tokens.extend(tokens)
            timeout = DECODE_TIMEOUT_S + PREFILL_S_PER_TOKEN * len(tokens)
            while True:
                try:
                    return self._forward(request, timeout)
                except StageError as e:
                    if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self._evict_one():
                        continue  # retrying is safe: every stage trims back to `offset`
                    if e.code == grpc.StatusCode.UNAVAILABLE and e.node:
                        self._mark_lost(e.node)
                    raise GenerateError(e.code, e.message) from e

        def prefill(offset: int) -> pb.ForwardReply:
            while len(prompt) - offset > 1:
                n = min(self.prefill_chunk, len(prompt) - offset - 1)
                step(prompt[offset:offset + n], offset, sample=False)
                offset += n
            return step(prompt[offset:], offset, sample=True, new_generation=True)

        try:
            try:
                reply = prefill(cached)
            except GenerateError as e:
                if not cached or e.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # A node no longer holds the cached session (it freed it after --session-ttl idle
                # seconds): free what is left of it elsewhere and start this prompt afresh.
                log.info("cached session %s is gone on a node (%s); prefilling from scratch", session_id, e.message)
                self.release(session_id)
                session_id, cached = uuid.uuid4().hex, 0
                stats.update(session_id=session_id, cached_tokens=cached)
                reply = prefill(0)
            offset = len(prompt)
            for n in range(1, max_tokens + 1):
                generated.append(reply.token)
                yield reply.token, reply.logprob
                if n == max_tokens:
                    break
                reply = step([reply.token], offset, sample=True)
                offset += 1
            kept = not stats.get("cancelled")
        except GeneratorExit:  # the consumer stopped reading (an EOS, a stop string, or it went away)
            kept = not stats.get("cancelled")
            raise
        finally:
            if kept:  # the caches hold the prompt and every token but the last one sampled
                self._keep_cached(session_id, CachedSession(prompt + generated[:-1], len(prompt)))
            else:
                self.release(session_id)

    def prompt_tokens(self, request: pb.GenerateRequest) -> list:
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
        return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **extra)

    # ---- gRPC handlers ---------------------------------------------------------------------

    def Generate(self, request, context):
        started = time.perf_counter()
        try:
            if error := sampling_error(request.sampling):
                raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, error)
            prompt = self.prompt_tokens(request)
            max_tokens = request.max_tokens or 256
            if len(prompt) + max_tokens > self.context:
                raise GenerateError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the planned context "
                    f"of {self.context} tokens; shorten the prompt or start the coordinator with a larger --context",
                )
            detokenizer = self.tokenizer.detokenizer
            detokenizer.reset()
            eos = self.tokenizer.eos_token_ids
            count, first_at, finish = 0, None, "length"
            stats = {}
            for token, logprob in self.generate(prompt, max_tokens, request.sampling, stats):
                if not context.is_active():
                    stats["cancelled"] = True
                    return
                if first_at is None:
                    first_at = time.perf_counter()
                if token in eos:
                    finish = "stop"
                    break
                count += 1
                detokenizer.add_token(token)
                yield pb.GenerateEvent(token=pb.TokenEvent(id=token, text=detokenizer.last_segment, logprob=logprob))
            detokenizer.finalize()
            if tail := detokenizer.last_segment:
                yield pb.GenerateEvent(token=pb.TokenEvent(id=-1, text=tail))
            now = time.perf_counter()
            yield pb.GenerateEvent(done=pb.DoneEvent(
                finish_reason=finish, prompt_tokens=len(prompt), completion_tokens=count,
                cached_tokens=stats.get("cached_tokens", 0),
                ttft_s=(first_at or now) - started, decode_s=now - (first_at or now),
            ))
        except GenerateError as e:
            context.abort(e.code, e.message)

    def memory_map(self) -> pb.MemoryMapReply:
        reply = pb.MemoryMapReply(state=self.state, model=self.checkpoint.name, model_id=self.checkpoint.model_id,
                                  num_layers=self.checkpoint.num_layers, message=self.message)
        stages = {s.node: s for s in (self.plan.stages if self.plan else [])}
        with self._lock:  # discovery changes members from zeroconf's threads
            chain, members = list(self.chain), list(self.members.values())
        in_order = sorted(members, key=lambda m: chain.index(m) if m in chain else len(chain))
        for m in in_order:
            if m.status != "lost":
                self._refresh(m)
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
            entry.free_bytes = max(0, info.usable_bytes - entry.resident_bytes - entry.kv_bytes)
            reply.nodes.append(entry)
        return reply

    def MemoryMap(self, request, context):
        return self.memory_map()
