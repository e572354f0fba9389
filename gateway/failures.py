"""How the gateway says that a request failed: one exception carrying a google.rpc.Status,
which the gRPC front door sends as it is and the HTTP front door maps to a status code."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from sloserve import errors


class GatewayError(Exception):
    """A request ends with `status`; `outcome` is its label in metrics."""

    def __init__(self, status: status_pb2.Status, outcome: str) -> None:
        super().__init__(status.message)
        self.status = status
        self.outcome = outcome

    @property
    def code(self) -> grpc.StatusCode:
        return next(c for c in grpc.StatusCode if c.value[0] == self.status.code)

    @property
    def details(self) -> errors.StatusDetails:
        return errors.status_details(self.status)


def unavailable(message: str, reason: str = "", **metadata: str) -> GatewayError:
    """UNAVAILABLE, with an ErrorInfo (reason, metadata) when a reason is given."""
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message)
    if reason:
        info = any_pb2.Any()
        info.Pack(
            error_details_pb2.ErrorInfo(
                reason=reason, domain=errors.ERROR_DOMAIN, metadata=metadata
            )
        )
        status.details.append(info)
    return GatewayError(status, "unavailable")


def rejected(reason: str, message: str, retry_after_s: float, outcome: str) -> GatewayError:
    return GatewayError(errors.resource_exhausted(reason, message, retry_after_s), outcome)


def invalid(field: str, description: str) -> GatewayError:
    return GatewayError(errors.invalid_argument(field, description), "invalid")


def _with_reason(code: int, message: str, reason: str) -> status_pb2.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=errors.ERROR_DOMAIN))
    return status_pb2.Status(code=code, message=message, details=[info])


def unauthenticated(message: str, reason: str) -> GatewayError:
    """UNAUTHENTICATED (HTTP 401): no API key, or one the gateway does not know."""
    return GatewayError(_with_reason(code_pb2.UNAUTHENTICATED, message, reason), "unauthenticated")


def permission_denied(message: str, reason: str) -> GatewayError:
    """PERMISSION_DENIED (HTTP 403): the tenant may not use what the request asks for."""
    return GatewayError(_with_reason(code_pb2.PERMISSION_DENIED, message, reason), "denied")
