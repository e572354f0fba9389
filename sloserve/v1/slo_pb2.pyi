import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdmissionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADMISSION_MODE_UNSPECIFIED: _ClassVar[AdmissionMode]
    ADMISSION_MODE_ADMITTED: _ClassVar[AdmissionMode]
    ADMISSION_MODE_BEST_EFFORT: _ClassVar[AdmissionMode]

class RejectReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_REASON_UNSPECIFIED: _ClassVar[RejectReason]
    REJECT_REASON_COMPUTE: _ClassVar[RejectReason]
    REJECT_REASON_MEMORY: _ClassVar[RejectReason]
    REJECT_REASON_QUEUE_FULL: _ClassVar[RejectReason]
    REJECT_REASON_DRAINING: _ClassVar[RejectReason]
ADMISSION_MODE_UNSPECIFIED: AdmissionMode
ADMISSION_MODE_ADMITTED: AdmissionMode
ADMISSION_MODE_BEST_EFFORT: AdmissionMode
REJECT_REASON_UNSPECIFIED: RejectReason
REJECT_REASON_COMPUTE: RejectReason
REJECT_REASON_MEMORY: RejectReason
REJECT_REASON_QUEUE_FULL: RejectReason
REJECT_REASON_DRAINING: RejectReason

class SloBudgets(_message.Message):
    __slots__ = ("ttft", "tpot", "thinking_tpot", "thinking_tokens")
    TTFT_FIELD_NUMBER: _ClassVar[int]
    TPOT_FIELD_NUMBER: _ClassVar[int]
    THINKING_TPOT_FIELD_NUMBER: _ClassVar[int]
    THINKING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ttft: _duration_pb2.Duration
    tpot: _duration_pb2.Duration
    thinking_tpot: _duration_pb2.Duration
    thinking_tokens: int
    def __init__(self, ttft: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., tpot: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., thinking_tpot: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., thinking_tokens: _Optional[int] = ...) -> None: ...

class SloSpec(_message.Message):
    __slots__ = ("class_name", "budgets")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    budgets: SloBudgets
    def __init__(self, class_name: _Optional[str] = ..., budgets: _Optional[_Union[SloBudgets, _Mapping]] = ...) -> None: ...

class SloClass(_message.Message):
    __slots__ = ("name", "budgets", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    budgets: SloBudgets
    description: str
    def __init__(self, name: _Optional[str] = ..., budgets: _Optional[_Union[SloBudgets, _Mapping]] = ..., description: _Optional[str] = ...) -> None: ...

class SloOutcome(_message.Message):
    __slots__ = ("ttft", "mean_tpot", "max_inter_token", "ttft_met", "tpot_met", "late_tokens", "attained")
    TTFT_FIELD_NUMBER: _ClassVar[int]
    MEAN_TPOT_FIELD_NUMBER: _ClassVar[int]
    MAX_INTER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTFT_MET_FIELD_NUMBER: _ClassVar[int]
    TPOT_MET_FIELD_NUMBER: _ClassVar[int]
    LATE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ATTAINED_FIELD_NUMBER: _ClassVar[int]
    ttft: _duration_pb2.Duration
    mean_tpot: _duration_pb2.Duration
    max_inter_token: _duration_pb2.Duration
    ttft_met: bool
    tpot_met: bool
    late_tokens: int
    attained: bool
    def __init__(self, ttft: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., mean_tpot: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_inter_token: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., ttft_met: _Optional[bool] = ..., tpot_met: _Optional[bool] = ..., late_tokens: _Optional[int] = ..., attained: _Optional[bool] = ...) -> None: ...
