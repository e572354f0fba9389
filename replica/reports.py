"""Reports from the engine core to the front end: executed steps and admission verdicts.

The scheduler runs in vLLM's engine-core process; the replica's gRPC services, metrics and the
profiler live in the front-end process. Each report is one small datagram over a Unix socket,
tagged by its first byte. The sender never blocks the engine loop (a full or missing receiver
drops reports, which are counted); the front end never depends on a verdict arriving (see
inference_service.py), so a dropped one costs a label, not a hang.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sloserve.stepmodel import StepShape

log = logging.getLogger(__name__)

# tokens, requests, context_tokens, prefill_tokens, seconds, planner seconds
_STEP = struct.Struct("<IIQIdd")
_STEP_TAG = b"S"
_VERDICT_TAG = b"V"
_MAX_DATAGRAM = 4096


@dataclass(frozen=True)
class StepRecord:
    shape: StepShape
    prefill_tokens: int  # of shape.tokens, those that are prompt tokens
    seconds: float  # from the scheduler handing the step over to its output coming back
    planner_s: float = 0.0  # time the SLO planner took to plan the step

    def encode(self) -> bytes:
        s = self.shape
        return _STEP_TAG + _STEP.pack(
            s.tokens, s.requests, s.context_tokens, self.prefill_tokens, self.seconds,
            self.planner_s,
        )  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> StepRecord:
        tokens, requests, context, prefill, seconds, planner = _STEP.unpack(data)
        return cls(StepShape(tokens, requests, context), prefill, seconds, planner)


@dataclass(frozen=True)
class VerdictRecord:
    """What the SLO policy decided about one request.

    event: "admitted", "best_effort" or "rejected" at arrival; "demoted" or "aborted" when it
    expired later. reason: COMPUTE, MEMORY or EXPIRED ("" when admitted).
    """

    request_id: str  # the front end's id (RequestSlo.request_id)
    event: str
    reason: str
    class_name: str

    def encode(self) -> bytes:
        fields = [self.request_id, self.event, self.reason, self.class_name]
        return _VERDICT_TAG + json.dumps(fields).encode()

    @classmethod
    def decode(cls, data: bytes) -> VerdictRecord:
        request_id, event, reason, class_name = json.loads(data)
        return cls(str(request_id), str(event), str(reason), str(class_name))


Report = StepRecord | VerdictRecord


def decode(data: bytes) -> Report | None:
    """The report in a datagram; None for an unknown tag."""
    tag, body = data[:1], data[1:]
    if tag == _STEP_TAG and len(body) == _STEP.size:
        return StepRecord.decode(body)
    if tag == _VERDICT_TAG:
        return VerdictRecord.decode(body)
    return None


class ReportSender:
    """Engine-core side: sends reports without ever blocking."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self.dropped = 0

    def send(self, record: Report) -> None:
        try:
            self._socket.sendto(record.encode(), self._path)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ENOENT, errno.ECONNREFUSED, errno.ENOBUFS):
                raise
            self.dropped += 1


class ReportReceiver:
    """Front-end side: binds the socket and hands each report to its handler, in a thread."""

    def __init__(
        self,
        path: Path,
        on_step: Callable[[StepRecord], None],
        on_verdict: Callable[[VerdictRecord], None] | None = None,
    ) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        # Room for bursts of steps while the front end is busy.
        with contextlib.suppress(OSError):
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._on_step = on_step
        self._on_verdict = on_verdict
        self._thread = threading.Thread(target=self._run, name="step-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self._socket.recv(_MAX_DATAGRAM)
            except OSError:
                return  # closed
            if not data:
                return  # shutdown wakes recv with an empty datagram
            try:
                report = decode(data)
                if isinstance(report, StepRecord):
                    self._on_step(report)
                elif isinstance(report, VerdictRecord) and self._on_verdict is not None:
                    self._on_verdict(report)
            except Exception:
                log.exception("engine report handler failed")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
