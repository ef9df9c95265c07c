from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("exit",)
    EXIT_FIELD_NUMBER: _ClassVar[int]
    exit: bool
    def __init__(self, exit: _Optional[bool] = ...) -> None: ...

class StopReply(_message.Message):
    __slots__ = ("name", "freed_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    freed_bytes: int
    def __init__(self, name: _Optional[str] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class LoadedSlice(_message.Message):
    __slots__ = ("model_id", "model_name", "start", "end", "num_layers", "weight_bytes", "kv_budget_bytes", "next_address", "next_name", "source", "received_bytes", "cache_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NEXT_NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_name: str
    start: int
    end: int
    num_layers: int
    weight_bytes: int
    kv_budget_bytes: int
    next_address: str
    next_name: str
    source: str
    received_bytes: int
    cache_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., num_layers: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., next_address: _Optional[str] = ..., next_name: _Optional[str] = ..., source: _Optional[str] = ..., received_bytes: _Optional[int] = ..., cache_bytes: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "version", "backend", "chip", "total_bytes", "usable_bytes", "loaded", "kv_bytes", "sessions", "address", "coordinator", "is_coordinator", "memory_bandwidth")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    IS_COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    version: str
    backend: str
    chip: str
    total_bytes: int
    usable_bytes: int
    loaded: LoadedSlice
    kv_bytes: int
    sessions: int
    address: str
    coordinator: str
    is_coordinator: bool
    memory_bandwidth: int
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., backend: _Optional[str] = ..., chip: _Optional[str] = ..., total_bytes: _Optional[int] = ..., usable_bytes: _Optional[int] = ..., loaded: _Optional[_Union[LoadedSlice, _Mapping]] = ..., kv_bytes: _Optional[int] = ..., sessions: _Optional[int] = ..., address: _Optional[str] = ..., coordinator: _Optional[str] = ..., is_coordinator: _Optional[bool] = ..., memory_bandwidth: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model_id", "start", "end", "kv_budget_bytes", "next_address", "next_name", "coordinator", "drop_sessions", "sources", "coordinator_id", "owner", "take_over", "prefill_chunk")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NEXT_NAME_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    DROP_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TAKE_OVER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start: int
    end: int
    kv_budget_bytes: int
    next_address: str
    next_name: str
    coordinator: str
    drop_sessions: bool
    sources: _containers.RepeatedScalarFieldContainer[str]
    coordinator_id: str
    owner: str
    take_over: bool
    prefill_chunk: int
    def __init__(self, model_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., next_address: _Optional[str] = ..., next_name: _Optional[str] = ..., coordinator: _Optional[str] = ..., drop_sessions: _Optional[bool] = ..., sources: _Optional[_Iterable[str]] = ..., coordinator_id: _Optional[str] = ..., owner: _Optional[str] = ..., take_over: _Optional[bool] = ..., prefill_chunk: _Optional[int] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "message", "done", "phase")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    message: str
    done: bool
    phase: str
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., message: _Optional[str] = ..., done: _Optional[bool] = ..., phase: _Optional[str] = ...) -> None: ...

class ManifestRequest(_message.Message):
    __slots__ = ("model_id", "parts")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    parts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., parts: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PartManifest(_message.Message):
    __slots__ = ("name", "tensors", "chunk_bytes", "chunk_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    chunk_bytes: int
    chunk_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, name: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., chunk_bytes: _Optional[int] = ..., chunk_sha256: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ManifestReply(_message.Message):
    __slots__ = ("model_id", "model_name", "config_json", "parts")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_name: str
    config_json: str
    parts: _containers.RepeatedCompositeFieldContainer[PartManifest]
    def __init__(self, model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., config_json: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[PartManifest, _Mapping]]] = ...) -> None: ...

class FetchPartRequest(_message.Message):
    __slots__ = ("model_id", "part", "first_chunk", "end_chunk")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_CHUNK_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    part: str
    first_chunk: int
    end_chunk: int
    def __init__(self, model_id: _Optional[str] = ..., part: _Optional[str] = ..., first_chunk: _Optional[int] = ..., end_chunk: _Optional[int] = ...) -> None: ...

class PartChunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "presence_context", "frequency_context", "repetition_context", "logit_bias", "top_logprobs")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REPETITION_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    presence_context: int
    frequency_context: int
    repetition_context: int
    logit_bias: _containers.ScalarMap[int, float]
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_context: _Optional[int] = ..., frequency_context: _Optional[int] = ..., repetition_context: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "offset", "tokens", "hidden", "sample", "sampling", "max_positions", "new_generation", "seq", "time_left_s", "rng_state", "coordinator_id", "reply_to", "ticket", "allowed_tokens", "penalty_history", "draft", "targets")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    NEW_GENERATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    RNG_STATE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PENALTY_HISTORY_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    offset: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    sample: bool
    sampling: SamplingParams
    max_positions: int
    new_generation: bool
    seq: int
    time_left_s: float
    rng_state: int
    coordinator_id: str
    reply_to: str
    ticket: int
    allowed_tokens: bytes
    penalty_history: _containers.RepeatedScalarFieldContainer[int]
    draft: _containers.RepeatedScalarFieldContainer[int]
    targets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., offset: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_positions: _Optional[int] = ..., new_generation: _Optional[bool] = ..., seq: _Optional[int] = ..., time_left_s: _Optional[float] = ..., rng_state: _Optional[int] = ..., coordinator_id: _Optional[str] = ..., reply_to: _Optional[str] = ..., ticket: _Optional[int] = ..., allowed_tokens: _Optional[bytes] = ..., penalty_history: _Optional[_Iterable[int]] = ..., draft: _Optional[_Iterable[int]] = ..., targets: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("sampled", "token", "logprob", "seq", "failure", "rng_state", "ticket", "tokens", "logprobs", "top")
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    RNG_STATE_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    sampled: bool
    token: int
    logprob: float
    seq: int
    failure: StageFailure
    rng_state: int
    ticket: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    def __init__(self, sampled: _Optional[bool] = ..., token: _Optional[int] = ..., logprob: _Optional[float] = ..., seq: _Optional[int] = ..., failure: _Optional[_Union[StageFailure, _Mapping]] = ..., rng_state: _Optional[int] = ..., ticket: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., top: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("tokens", "logprobs")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class StageFailure(_message.Message):
    __slots__ = ("code", "message", "node")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    node: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("found", "freed_bytes")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    found: bool
    freed_bytes: int
    def __init__(self, found: _Optional[bool] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class DeliverReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("coordinator_id",)
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    def __init__(self, coordinator_id: _Optional[str] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("node_id", "loaded", "sessions", "kv_bytes", "queued", "busy_s", "coordinator_id", "owner", "owner_node_id", "max_batch", "batched_rows", "speculation")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    OWNER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCHED_ROWS_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    loaded: bool
    sessions: int
    kv_bytes: int
    queued: int
    busy_s: float
    coordinator_id: str
    owner: str
    owner_node_id: str
    max_batch: int
    batched_rows: int
    speculation: Speculation
    def __init__(self, node_id: _Optional[str] = ..., loaded: _Optional[bool] = ..., sessions: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., queued: _Optional[int] = ..., busy_s: _Optional[float] = ..., coordinator_id: _Optional[str] = ..., owner: _Optional[str] = ..., owner_node_id: _Optional[str] = ..., max_batch: _Optional[int] = ..., batched_rows: _Optional[int] = ..., speculation: _Optional[_Union[Speculation, _Mapping]] = ...) -> None: ...

class Speculation(_message.Message):
    __slots__ = ("steps", "tokens", "drafted", "accepted")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    steps: int
    tokens: int
    drafted: int
    accepted: int
    def __init__(self, steps: _Optional[int] = ..., tokens: _Optional[int] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("messages_json", "prompt_tokens", "tools_json", "thinking", "max_tokens", "sampling", "response_format_json", "tool_choice_json", "speculate", "prediction_tokens", "thinking_budget")
    MESSAGES_JSON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_JSON_FIELD_NUMBER: _ClassVar[int]
    THINKING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_JSON_FIELD_NUMBER: _ClassVar[int]
    TOOL_CHOICE_JSON_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    THINKING_BUDGET_FIELD_NUMBER: _ClassVar[int]
    messages_json: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    tools_json: str
    thinking: bool
    max_tokens: int
    sampling: SamplingParams
    response_format_json: str
    tool_choice_json: str
    speculate: bool
    prediction_tokens: _containers.RepeatedScalarFieldContainer[int]
    thinking_budget: int
    def __init__(self, messages_json: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., tools_json: _Optional[str] = ..., thinking: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., response_format_json: _Optional[str] = ..., tool_choice_json: _Optional[str] = ..., speculate: _Optional[bool] = ..., prediction_tokens: _Optional[_Iterable[int]] = ..., thinking_budget: _Optional[int] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("id", "text", "logprob", "top")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    top: TopLogprobs
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., top: _Optional[_Union[TopLogprobs, _Mapping]] = ...) -> None: ...

class DoneEvent(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "ttft_s", "decode_s")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float
    decode_s: float
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., decode_s: _Optional[float] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("token", "done")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    token: TokenEvent
    done: DoneEvent
    def __init__(self, token: _Optional[_Union[TokenEvent, _Mapping]] = ..., done: _Optional[_Union[DoneEvent, _Mapping]] = ...) -> None: ...

class MemoryMapRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: str
    def __init__(self, status: _Optional[str] = ...) -> None: ...

class RemoveNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveNodeReply(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class NodeEntry(_message.Message):
    __slots__ = ("name", "address", "backend", "total_bytes", "usable_bytes", "has_layers", "start", "end", "weight_bytes", "resident_bytes", "kv_bytes", "free_bytes", "status", "node_id", "chip", "source", "cache_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_LAYERS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    backend: str
    total_bytes: int
    usable_bytes: int
    has_layers: bool
    start: int
    end: int
    weight_bytes: int
    resident_bytes: int
    kv_bytes: int
    free_bytes: int
    status: str
    node_id: str
    chip: str
    source: str
    cache_bytes: int
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., backend: _Optional[str] = ..., total_bytes: _Optional[int] = ..., usable_bytes: _Optional[int] = ..., has_layers: _Optional[bool] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., status: _Optional[str] = ..., node_id: _Optional[str] = ..., chip: _Optional[str] = ..., source: _Optional[str] = ..., cache_bytes: _Optional[int] = ...) -> None: ...

class MemoryMapReply(_message.Message):
    __slots__ = ("state", "model", "model_id", "num_layers", "nodes", "message", "speculation")
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_FIELD_NUMBER: _ClassVar[int]
    state: str
    model: str
    model_id: str
    num_layers: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeEntry]
    message: str
    speculation: Speculation
    def __init__(self, state: _Optional[str] = ..., model: _Optional[str] = ..., model_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeEntry, _Mapping]]] = ..., message: _Optional[str] = ..., speculation: _Optional[_Union[Speculation, _Mapping]] = ...) -> None: ...
