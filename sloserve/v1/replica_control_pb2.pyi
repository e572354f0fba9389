import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from sloserve.v1 import slo_pb2 as _slo_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProbeRequest(_message.Message):
    __slots__ = ("prompt_tokens", "max_tokens", "slo")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    max_tokens: int
    slo: _slo_pb2.SloSpec
    def __init__(self, prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., slo: _Optional[_Union[_slo_pb2.SloSpec, _Mapping]] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("admissible", "reason", "predicted_ttft", "slack")
    ADMISSIBLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_FIELD_NUMBER: _ClassVar[int]
    SLACK_FIELD_NUMBER: _ClassVar[int]
    admissible: bool
    reason: _slo_pb2.RejectReason
    predicted_ttft: _duration_pb2.Duration
    slack: _duration_pb2.Duration
    def __init__(self, admissible: _Optional[bool] = ..., reason: _Optional[_Union[_slo_pb2.RejectReason, str]] = ..., predicted_ttft: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., slack: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WatchLoadRequest(_message.Message):
    __slots__ = ("interval",)
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    interval: _duration_pb2.Duration
    def __init__(self, interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ClassLoad(_message.Message):
    __slots__ = ("class_name", "in_flight", "finished", "attained")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ATTAINED_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    in_flight: int
    finished: int
    attained: int
    def __init__(self, class_name: _Optional[str] = ..., in_flight: _Optional[int] = ..., finished: _Optional[int] = ..., attained: _Optional[int] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("time", "ready", "draining", "running", "waiting", "kv_cache_usage", "pending_prefill_tokens", "classes")
    TIME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    PENDING_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    ready: bool
    draining: bool
    running: int
    waiting: int
    kv_cache_usage: float
    pending_prefill_tokens: int
    classes: _containers.RepeatedCompositeFieldContainer[ClassLoad]
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ready: _Optional[bool] = ..., draining: _Optional[bool] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., pending_prefill_tokens: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[ClassLoad, _Mapping]]] = ...) -> None: ...

class WatchLoadResponse(_message.Message):
    __slots__ = ("report",)
    REPORT_FIELD_NUMBER: _ClassVar[int]
    report: LoadReport
    def __init__(self, report: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...

class ConfigureRequest(_message.Message):
    __slots__ = ("classes", "default_class")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CLASS_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[_slo_pb2.SloClass]
    default_class: str
    def __init__(self, classes: _Optional[_Iterable[_Union[_slo_pb2.SloClass, _Mapping]]] = ..., default_class: _Optional[str] = ...) -> None: ...

class ConfigureResponse(_message.Message):
    __slots__ = ("classes", "default_class")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CLASS_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[_slo_pb2.SloClass]
    default_class: str
    def __init__(self, classes: _Optional[_Iterable[_Union[_slo_pb2.SloClass, _Mapping]]] = ..., default_class: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("in_flight",)
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    def __init__(self, in_flight: _Optional[int] = ...) -> None: ...
