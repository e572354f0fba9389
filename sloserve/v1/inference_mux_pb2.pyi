from google.rpc import status_pb2 as _status_pb2
from sloserve.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MuxControl(_message.Message):
    __slots__ = ("stream_id", "start", "cancel")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    start: _inference_pb2.GenerateRequest
    cancel: bool
    def __init__(self, stream_id: _Optional[int] = ..., start: _Optional[_Union[_inference_pb2.GenerateRequest, _Mapping]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class MuxFrame(_message.Message):
    __slots__ = ("stream_id", "response", "end")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    response: _inference_pb2.GenerateResponse
    end: _status_pb2.Status
    def __init__(self, stream_id: _Optional[int] = ..., response: _Optional[_Union[_inference_pb2.GenerateResponse, _Mapping]] = ..., end: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class MuxBatch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[MuxFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[MuxFrame, _Mapping]]] = ...) -> None: ...
