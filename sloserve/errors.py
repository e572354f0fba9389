"""Rich gRPC errors: how the server says *which* field is bad or *why* it rejects.

Servers attach google.rpc details (BadRequest, ErrorInfo, RetryInfo) to the status; clients
turn a failed call back into one of the exceptions below.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "sloserve.dev"


class FieldError(ValueError):
    """Bad input or configuration; `field` names the culprit in proto path form
    (`sampling.max_tokens`, `classes[2].ttft`), as INVALID_ARGUMENT details do."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def invalid_argument(field: str, description: str) -> status_pb2.Status:
    """INVALID_ARGUMENT naming `field` in the message and in a BadRequest detail."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            ]
        )
    )
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message=f"{field}: {description}", details=[detail]
    )


def resource_exhausted(reason: str, message: str, retry_after_s: float) -> status_pb2.Status:
    """RESOURCE_EXHAUSTED with a machine-readable reason and a retry-after hint."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    retry = any_pb2.Any()
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_s * 1e9))
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[info, retry]
    )


def to_grpc_status(status: status_pb2.Status) -> grpc.Status:
    return rpc_status.to_status(status)


class SloserveError(Exception):
    """A call to a sloserve server failed; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgumentError(SloserveError):
    """The request was malformed; `field` names the offending field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)
        self.field = field


class RejectedError(SloserveError):
    """The server could not take the request: `reason` (e.g. QUEUE_FULL) and a retry hint."""

    def __init__(self, message: str, reason: str, retry_after_s: float | None) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class UnavailableError(SloserveError):
    """The server is starting, draining or unreachable."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


@dataclass(frozen=True)
class StatusDetails:
    """What a rich google.rpc.Status says beyond its code and message."""

    field: str = ""  # BadRequest: the first field violation
    reason: str = ""  # ErrorInfo
    retry_after_s: float | None = None  # RetryInfo


_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def status_of(status: grpc.Status) -> status_pb2.Status:
    """The google.rpc.Status that to_grpc_status (or grpc's own code) put in `status`."""
    for key, value in status.trailing_metadata or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return status_pb2.Status(code=status.code.value[0], message=status.details or "")


def rich_status(error: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status a server attached (sync and asyncio errors alike); without one,
    a plain status of the error's code and message."""
    for key, value in error.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return status_pb2.Status(code=error.code().value[0], message=error.details() or "")


def status_details(status: status_pb2.Status) -> StatusDetails:
    field = reason = ""
    retry_after = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return StatusDetails(field, reason, retry_after)


def from_rpc_error(error: grpc.RpcError) -> SloserveError:
    """The typed exception for a failed call, with the details the server attached."""
    code = error.code()
    message = error.details() or ""
    details = status_details(rich_status(error))
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgumentError(message, details.field)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RejectedError(message, details.reason, details.retry_after_s)
    if code == grpc.StatusCode.UNAVAILABLE:
        return UnavailableError(message)
    return SloserveError(code, message)
