from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_ERROR: _ClassVar[Truncation]
    TRUNCATION_LEFT: _ClassVar[Truncation]
    TRUNCATION_RIGHT: _ClassVar[Truncation]

class ModelRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_ROLE_UNSPECIFIED: _ClassVar[ModelRole]
    MODEL_ROLE_REWARD: _ClassVar[ModelRole]
    MODEL_ROLE_REFERENCE: _ClassVar[ModelRole]
    MODEL_ROLE_REWARD_COMBINATION: _ClassVar[ModelRole]
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_ERROR: Truncation
TRUNCATION_LEFT: Truncation
TRUNCATION_RIGHT: Truncation
MODEL_ROLE_UNSPECIFIED: ModelRole
MODEL_ROLE_REWARD: ModelRole
MODEL_ROLE_REFERENCE: ModelRole
MODEL_ROLE_REWARD_COMBINATION: ModelRole

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "completion", "messages", "safety_prompt", "token_ids")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAFETY_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    safety_prompt: bool
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., safety_prompt: _Optional[bool] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "items", "truncation", "request_id", "tokenizer_fingerprint", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    truncation: Truncation
    request_id: str
    tokenizer_fingerprint: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., request_id: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ItemScore(_message.Message):
    __slots__ = ("score", "head_scores", "num_tokens", "truncated", "normalized_score", "has_normalized_score")
    class HeadScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCORE_FIELD_NUMBER: _ClassVar[int]
    HEAD_SCORES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_SCORE_FIELD_NUMBER: _ClassVar[int]
    HAS_NORMALIZED_SCORE_FIELD_NUMBER: _ClassVar[int]
    score: float
    head_scores: _containers.ScalarMap[str, float]
    num_tokens: int
    truncated: bool
    normalized_score: float
    has_normalized_score: bool
    def __init__(self, score: _Optional[float] = ..., head_scores: _Optional[_Mapping[str, float]] = ..., num_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., normalized_score: _Optional[float] = ..., has_normalized_score: _Optional[bool] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "tokenize_ms", "inference_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    tokenize_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., tokenize_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "model", "timing", "request_id", "status", "model_version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[ItemScore]
    model: str
    timing: Timing
    request_id: str
    status: RequestStatus
    model_version: str
    def __init__(self, scores: _Optional[_Iterable[_Union[ItemScore, _Mapping]]] = ..., model: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., request_id: _Optional[str] = ..., status: _Optional[_Union[RequestStatus, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class RequestStatus(_message.Message):
    __slots__ = ("code", "name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class TokenSequence(_message.Message):
    __slots__ = ("token_ids", "response_start")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_START_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_start: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., response_start: _Optional[int] = ...) -> None: ...

class ReferenceLogProbsRequest(_message.Message):
    __slots__ = ("model", "sequences", "temperature", "tokenizer_fingerprint", "request_id", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequences: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    temperature: float
    tokenizer_fingerprint: str
    request_id: str
    model_version: str
    def __init__(self, model: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ..., temperature: _Optional[float] = ..., tokenizer_fingerprint: _Optional[str] = ..., request_id: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class SequenceLogProbs(_message.Message):
    __slots__ = ("logprobs",)
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ReferenceLogProbsResponse(_message.Message):
    __slots__ = ("results", "model", "timing", "request_id", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SequenceLogProbs]
    model: str
    timing: Timing
    request_id: str
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[SequenceLogProbs, _Mapping]]] = ..., model: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., request_id: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "role", "heads", "tokenizer_fingerprint", "dtype", "backend", "device", "max_input_tokens", "is_default", "vocab_size", "source", "has_chat_template", "has_normalization", "combine", "quantization", "input_format", "model_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    HAS_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: ModelRole
    heads: _containers.RepeatedScalarFieldContainer[str]
    tokenizer_fingerprint: str
    dtype: str
    backend: str
    device: str
    max_input_tokens: int
    is_default: bool
    vocab_size: int
    source: str
    has_chat_template: bool
    has_normalization: bool
    combine: str
    quantization: str
    input_format: str
    model_version: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[ModelRole, str]] = ..., heads: _Optional[_Iterable[str]] = ..., tokenizer_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., max_input_tokens: _Optional[int] = ..., is_default: _Optional[bool] = ..., vocab_size: _Optional[int] = ..., source: _Optional[str] = ..., has_chat_template: _Optional[bool] = ..., has_normalization: _Optional[bool] = ..., combine: _Optional[str] = ..., quantization: _Optional[str] = ..., input_format: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "models", "max_items_per_request", "max_batch_tokens", "max_batch_items", "max_message_bytes", "default_reward_model", "default_reference_model", "default_truncation", "batch_invariant")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_REFERENCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    BATCH_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    version: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    max_items_per_request: int
    max_batch_tokens: int
    max_batch_items: int
    max_message_bytes: int
    default_reward_model: str
    default_reference_model: str
    default_truncation: Truncation
    batch_invariant: bool
    def __init__(self, version: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., max_items_per_request: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_batch_items: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., default_reward_model: _Optional[str] = ..., default_reference_model: _Optional[str] = ..., default_truncation: _Optional[_Union[Truncation, str]] = ..., batch_invariant: _Optional[bool] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("model", "source", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    source: str
    request_id: str
    def __init__(self, model: _Optional[str] = ..., source: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("model", "old_version", "new_version", "status", "source", "load_seconds", "transition_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    old_version: str
    new_version: str
    status: str
    source: str
    load_seconds: float
    transition_seconds: float
    def __init__(self, model: _Optional[str] = ..., old_version: _Optional[str] = ..., new_version: _Optional[str] = ..., status: _Optional[str] = ..., source: _Optional[str] = ..., load_seconds: _Optional[float] = ..., transition_seconds: _Optional[float] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("model", "tenant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    tenant: str
    def __init__(self, model: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class MemberRankStats(_message.Message):
    __slots__ = ("member_a", "member_b", "spearman")
    MEMBER_A_FIELD_NUMBER: _ClassVar[int]
    MEMBER_B_FIELD_NUMBER: _ClassVar[int]
    SPEARMAN_FIELD_NUMBER: _ClassVar[int]
    member_a: str
    member_b: str
    spearman: float
    def __init__(self, member_a: _Optional[str] = ..., member_b: _Optional[str] = ..., spearman: _Optional[float] = ...) -> None: ...

class ScoreWindowStats(_message.Message):
    __slots__ = ("model", "tenant", "window_items", "total_items", "span_seconds", "score_mean", "score_std", "score_min", "score_max", "length_mean", "length_correlation", "baseline_mean", "baseline_std", "drift_sigma", "histogram_edges", "histogram_counts", "member_rank_correlations")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SPAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_MEAN_FIELD_NUMBER: _ClassVar[int]
    SCORE_STD_FIELD_NUMBER: _ClassVar[int]
    SCORE_MIN_FIELD_NUMBER: _ClassVar[int]
    SCORE_MAX_FIELD_NUMBER: _ClassVar[int]
    LENGTH_MEAN_FIELD_NUMBER: _ClassVar[int]
    LENGTH_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    BASELINE_MEAN_FIELD_NUMBER: _ClassVar[int]
    BASELINE_STD_FIELD_NUMBER: _ClassVar[int]
    DRIFT_SIGMA_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_EDGES_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_COUNTS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_RANK_CORRELATIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    tenant: str
    window_items: int
    total_items: int
    span_seconds: float
    score_mean: float
    score_std: float
    score_min: float
    score_max: float
    length_mean: float
    length_correlation: float
    baseline_mean: float
    baseline_std: float
    drift_sigma: float
    histogram_edges: _containers.RepeatedScalarFieldContainer[float]
    histogram_counts: _containers.RepeatedScalarFieldContainer[int]
    member_rank_correlations: _containers.RepeatedCompositeFieldContainer[MemberRankStats]
    def __init__(self, model: _Optional[str] = ..., tenant: _Optional[str] = ..., window_items: _Optional[int] = ..., total_items: _Optional[int] = ..., span_seconds: _Optional[float] = ..., score_mean: _Optional[float] = ..., score_std: _Optional[float] = ..., score_min: _Optional[float] = ..., score_max: _Optional[float] = ..., length_mean: _Optional[float] = ..., length_correlation: _Optional[float] = ..., baseline_mean: _Optional[float] = ..., baseline_std: _Optional[float] = ..., drift_sigma: _Optional[float] = ..., histogram_edges: _Optional[_Iterable[float]] = ..., histogram_counts: _Optional[_Iterable[int]] = ..., member_rank_correlations: _Optional[_Iterable[_Union[MemberRankStats, _Mapping]]] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("windows", "window_max_items", "window_max_seconds", "max_tenants", "enabled")
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TENANTS_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    windows: _containers.RepeatedCompositeFieldContainer[ScoreWindowStats]
    window_max_items: int
    window_max_seconds: float
    max_tenants: int
    enabled: bool
    def __init__(self, windows: _Optional[_Iterable[_Union[ScoreWindowStats, _Mapping]]] = ..., window_max_items: _Optional[int] = ..., window_max_seconds: _Optional[float] = ..., max_tenants: _Optional[int] = ..., enabled: _Optional[bool] = ...) -> None: ...
