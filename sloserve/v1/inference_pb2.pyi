import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from sloserve.v1 import slo_pb2 as _slo_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "sampling", "slo", "allow_best_effort", "tenant", "labels", "strict", "already_waited")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BEST_EFFORT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    ALREADY_WAITED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: Prompt
    sampling: SamplingParams
    slo: _slo_pb2.SloSpec
    allow_best_effort: bool
    tenant: str
    labels: _containers.ScalarMap[str, str]
    strict: bool
    already_waited: _duration_pb2.Duration
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., slo: _Optional[_Union[_slo_pb2.SloSpec, _Mapping]] = ..., allow_best_effort: _Optional[bool] = ..., tenant: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., strict: _Optional[bool] = ..., already_waited: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Admission(_message.Message):
    __slots__ = ("request_id", "mode", "class_name", "budgets", "prompt_tokens", "best_effort_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BEST_EFFORT_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    mode: _slo_pb2.AdmissionMode
    class_name: str
    budgets: _slo_pb2.SloBudgets
    prompt_tokens: int
    best_effort_reason: _slo_pb2.RejectReason
    def __init__(self, request_id: _Optional[str] = ..., mode: _Optional[_Union[_slo_pb2.AdmissionMode, str]] = ..., class_name: _Optional[str] = ..., budgets: _Optional[_Union[_slo_pb2.SloBudgets, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., best_effort_reason: _Optional[_Union[_slo_pb2.RejectReason, str]] = ...) -> None: ...

class Demotion(_message.Message):
    __slots__ = ("reason", "tokens_delivered")
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    reason: str
    tokens_delivered: int
    def __init__(self, reason: _Optional[str] = ..., tokens_delivered: _Optional[int] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("finish_reason", "usage", "slo_outcome", "latency")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SLO_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    usage: Usage
    slo_outcome: _slo_pb2.SloOutcome
    latency: _duration_pb2.Duration
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., slo_outcome: _Optional[_Union[_slo_pb2.SloOutcome, _Mapping]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("admission", "delta", "completion", "demotion")
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    DEMOTION_FIELD_NUMBER: _ClassVar[int]
    admission: Admission
    delta: TokenDelta
    completion: Completion
    demotion: Demotion
    def __init__(self, admission: _Optional[_Union[Admission, _Mapping]] = ..., delta: _Optional[_Union[TokenDelta, _Mapping]] = ..., completion: _Optional[_Union[Completion, _Mapping]] = ..., demotion: _Optional[_Union[Demotion, _Mapping]] = ...) -> None: ...
