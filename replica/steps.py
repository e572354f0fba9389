"""Step records: the engine core reports each executed step's shape and duration.

The scheduler runs in vLLM's engine-core process; the replica's metrics and the profiler live
in the front-end process. Each step is one small datagram over a Unix socket: the sender never
blocks the engine loop (a full or missing receiver drops records, which are counted).
"""

from __future__ import annotations

import contextlib
import errno
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

# tokens, requests, context_tokens, prefill_tokens, seconds
_FORMAT = struct.Struct("<IIQId")


@dataclass(frozen=True)
class StepRecord:
    shape: StepShape
    prefill_tokens: int  # of shape.tokens, those that are prompt tokens
    seconds: float  # from the scheduler handing the step over to its output coming back

    def encode(self) -> bytes:
        s = self.shape
        return _FORMAT.pack(
            s.tokens, s.requests, s.context_tokens, self.prefill_tokens, self.seconds
        )

    @classmethod
    def decode(cls, data: bytes) -> StepRecord:
        tokens, requests, context, prefill, seconds = _FORMAT.unpack(data)
        return cls(StepShape(tokens, requests, context), prefill, seconds)


class StepSender:
    """Engine-core side: sends records without ever blocking."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self.dropped = 0

    def send(self, record: StepRecord) -> None:
        try:
            self._socket.sendto(record.encode(), self._path)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ENOENT, errno.ECONNREFUSED, errno.ENOBUFS):
                raise
            self.dropped += 1


class StepReceiver:
    """Front-end side: binds the socket and hands each record to `on_record` in a thread."""

    def __init__(self, path: Path, on_record: Callable[[StepRecord], None]) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        # Room for bursts of steps while the front end is busy.
        with contextlib.suppress(OSError):
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._on_record = on_record
        self._thread = threading.Thread(target=self._run, name="step-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self._socket.recv(_FORMAT.size)
            except OSError:
                return  # closed
            if len(data) != _FORMAT.size:
                return  # shutdown wakes recv with an empty datagram
            try:
                self._on_record(StepRecord.decode(data))
            except Exception:
                log.exception("step record handler failed")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
