"""The replicas the gateway can route to: one channel and one load watch per replica.

Each replica streams LoadReports (ReplicaControl.WatchLoad). A replica is in rotation while
its watch is connected, its latest report is fresh and says ready and not draining, and no
call to it has failed since that report. A broken watch is re-opened with exponential
backoff, so a replica that comes back is back in rotation with its first report.

Load reports arrive once per interval; between them the gateway adds what it sent itself
(`Outstanding`), so a burst within one interval does not all land on the same replica.

A replica whose latest report is older than two intervals (a slow or stuck watch, a replica
busy enough to report late) is asked directly before it is routed to: `Probe` answers with
its queue now, and a replica that answers is routed to on that answer. One that answers late
(a busy host answers everything late) is still routed to, ranked on its latest report plus
its silence since (`ReplicaHandle.lag_s`); one that refuses or cannot be reached is left out
until its next report (`ReplicaPool.routable`).

Failed calls take a replica out too (ReplicaHandle.call_failed): until its next report for an
error (the next report says whether it still serves), and for an exponential back-off for a
stall (a call that sent nothing for the stall timeout), however ready its reports say it is:
a replica whose engine hangs keeps reporting, and without the back-off every report would
bring it back to cost one more request the whole stall timeout. The back-off doubles with
each stall in a row and is forgotten at the replica's next successful request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from sloserve.gateway.replica_mux import ReplicaStreams
from sloserve.protoconv import duration, seconds
from sloserve.v1 import inference_pb2_grpc, replica_control_pb2, replica_control_pb2_grpc, slo_pb2

log = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0

# gRPC's own reconnect backoff grows to 120 s by default: far too slow to notice a replica
# that restarted. Ours is short, and the watch loop adds its own backoff on top.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000)),
)


@dataclass
class Outstanding:
    """What the gateway itself has sent to a replica and not seen finish."""

    in_flight: int = 0
    # Requests with no first token yet, and their (estimated) prompt tokens: work that is
    # ahead of the next request's first token, possibly not yet in a load report.
    awaiting_first_token: int = 0
    awaiting_prompt_tokens: int = 0
    # Of those prompt tokens, the ones sent since the latest report or probe answer: only
    # these are missing from the replica's own figure (counting the others again would make
    # a replica with a long prompt in prefill look twice as busy as it is).
    unreported_prompt_tokens: int = 0


@dataclass(frozen=True)
class StallBackoff:
    """How long a replica that stalled stays out of rotation: `first_s`, doubling with each
    stall in a row, at most `max_s`."""

    first_s: float = 10.0
    max_s: float = 300.0

    def after(self, stalls: int) -> float:
        """The back-off after the `stalls`-th stall in a row (1 for the first)."""
        return float(min(self.max_s, self.first_s * 2 ** max(0, stalls - 1)))


class ProbeResult(enum.Enum):
    ANSWERED = "answered"  # routed on its answer
    LATE = "late"  # no answer within the timeout: routed on its latest report
    REFUSED = "refused"  # draining: not routed to
    FAILED = "failed"  # an error: out of rotation until its next report


@dataclass(frozen=True)
class Probed:
    """A Probe answer: when it came, and the replica's predicted TTFT for a 1-token prompt
    (its queue of prefill work, as the replica itself measures its speed)."""

    at: float  # time.monotonic()
    queue_s: float


class Ticket:
    """One request on one replica; keeps the replica's `Outstanding` counts honest."""

    def __init__(self, handle: ReplicaHandle, prompt_tokens: int) -> None:
        self.replica = handle
        self._handle = handle
        self._prompt_tokens = prompt_tokens
        self._awaiting = True
        self._open = True
        self.sent_at = time.monotonic()
        self._epoch = handle.load_epoch  # the replica's figures do not include it yet
        o = handle.outstanding
        o.in_flight += 1
        o.awaiting_first_token += 1
        o.awaiting_prompt_tokens += prompt_tokens
        o.unreported_prompt_tokens += prompt_tokens

    def first_token(self) -> None:
        if self._awaiting:
            self._awaiting = False
            o = self._handle.outstanding
            o.awaiting_first_token -= 1
            o.awaiting_prompt_tokens -= self._prompt_tokens
            if self._epoch == self._handle.load_epoch:
                o.unreported_prompt_tokens -= self._prompt_tokens

    def served(self) -> None:
        """The request completed: the replica works (its stall back-off is forgotten)."""
        self._handle.served(self.sent_at)

    def close(self) -> None:
        if self._open:
            self.first_token()
            self._open = False
            self._handle.outstanding.in_flight -= 1
            self._handle.finished()


class ReplicaHandle:
    """One replica: its stubs, latest load report, and what the gateway has on it."""

    def __init__(
        self,
        endpoint: str,
        on_finished: Callable[[], None],
        stall_backoff: StallBackoff | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        # Requests go over one multiplexed call (replica_mux.py); `inference` stays for
        # callers that want a call per request.
        self.streams = ReplicaStreams(endpoint, self.channel)
        self.control = replica_control_pb2_grpc.ReplicaControlStub(self.channel)
        self.report: replica_control_pb2.LoadReport | None = None
        self.report_at = 0.0  # time.monotonic() of the latest report
        # The latest Probe answer newer than the latest report, when there is one.
        self.probed: Probed | None = None
        # Counts reports and probe answers: tickets older than the latest one are in the
        # replica's own figures (Outstanding.unreported_prompt_tokens).
        self.load_epoch = 0
        self.watching = False
        self.failure = "no load report yet"  # why it is out of rotation; "" when it is not
        # Its latest Probe got no answer within the timeout (none since the latest report).
        self.probe_late = False
        # Stalls in a row, the latest one's time.monotonic(), and the end of its back-off.
        self.stalls = 0
        self.stalled_at = -math.inf
        self.ejected_until = -math.inf
        self.stall_backoff = stall_backoff or StallBackoff()
        self.outstanding = Outstanding()
        self.removed = False
        self._on_finished = on_finished
        self._probing: asyncio.Task[ProbeResult] | None = None

    def accept(self, report: replica_control_pb2.LoadReport) -> None:
        self.report = report
        self.report_at = time.monotonic()
        self.probed = None
        self.probe_late = False
        self._new_epoch()
        self.watching = True
        self.failure = ""

    def _new_epoch(self) -> None:
        self.load_epoch += 1
        self.outstanding.unreported_prompt_tokens = 0

    @property
    def heard_at(self) -> float:
        """time.monotonic() of the latest report or probe answer."""
        return max(self.report_at, self.probed.at if self.probed is not None else 0.0)

    @property
    def lag_s(self) -> float:
        """What routing adds to the predicted TTFT for what it does not know: a replica whose
        Probe went unanswered may have queued up anything since its latest report."""
        return time.monotonic() - self.heard_at if self.probe_late else 0.0

    async def probe(self, timeout_s: float) -> ProbeResult:
        """Asks the replica for its queue now (one Probe at a time per replica; concurrent
        callers share it)."""
        if self._probing is None or self._probing.done():
            self._probing = asyncio.create_task(self._probe(timeout_s))
        return await asyncio.shield(self._probing)

    async def _probe(self, timeout_s: float) -> ProbeResult:
        # The smallest request of the default class: its predicted TTFT is the replica's
        # queue ahead of any new request, by the replica's own measured prefill speed.
        request = replica_control_pb2.ProbeRequest(prompt_tokens=1, max_tokens=1)
        sent_epoch = self.load_epoch
        try:
            answer = await self.control.Probe(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            # A slow answer is no failure (a busy replica on a loaded host answers late, and
            # so does every other then); an unreachable one is out until its next report.
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                if self.load_epoch == sent_epoch:
                    self.probe_late = True
                return ProbeResult.LATE
            self.call_failed(f"probe failed: {error.code().name}")
            return ProbeResult.FAILED
        if answer.reason == slo_pb2.REJECT_REASON_DRAINING:
            return ProbeResult.REFUSED
        if self.load_epoch == sent_epoch:  # no report overtook the answer
            self.probed = Probed(time.monotonic(), seconds(answer.predicted_ttft))
            self.probe_late = False
            self._new_epoch()
        return ProbeResult.ANSWERED

    def lose(self, why: str) -> None:
        """The watch broke or a call found the replica unreachable: out of rotation until
        the next load report."""
        self.watching = False
        self.failure = why

    def call_failed(self, why: str) -> None:
        """Out of rotation until its next load report."""
        self.failure = why

    def stalled(self) -> float:
        """A call to it sent nothing for the stall timeout: out of rotation for a back-off,
        whatever its reports say; returns the back-off. Calls that stall together (one hang
        caught them all) count as one stall."""
        now = time.monotonic()
        if now < self.ejected_until:
            return self.ejected_until - now
        self.stalls += 1
        self.stalled_at = now
        backoff = self.stall_backoff.after(self.stalls)
        self.ejected_until = now + backoff
        return backoff

    def served(self, sent_at: float) -> None:
        """A request sent at `sent_at` completed; one sent after its latest stall proves the
        replica works again."""
        if self.stalls and sent_at > self.stalled_at:
            log.info(
                "replica %s served a request again after %d stall(s)", self.endpoint, self.stalls
            )
            self.stalls = 0

    def finished(self) -> None:
        self._on_finished()

    def out_of_rotation_because(self, now: float, stale_after_s: float) -> str:
        """Why the replica takes no new requests now; "" when it is in rotation."""
        if self.removed:
            return "removed"
        if self.failure:
            return self.failure
        if now < self.ejected_until:
            return f"stalled ({self.stalls} in a row); back in {self.ejected_until - now:.1f} s"
        if self.report is None or not self.watching:
            return "no load report"
        if now - self.heard_at > stale_after_s:
            return f"no load report for {now - self.report_at:.1f} s"
        if not self.report.ready:
            return "engine not ready"
        if self.report.draining:
            return "draining"
        return ""


class ReplicaPool:
    """All replicas, their load watches, and the listeners told when capacity may have
    changed (a new report, a finished request, a replica joining or leaving)."""

    def __init__(
        self, report_interval_s: float = 0.25, stall_backoff: StallBackoff | None = None
    ) -> None:
        self.report_interval_s = report_interval_s
        self.stall_backoff = stall_backoff or StallBackoff()
        # A replica silent for a few intervals (hung, or a partitioned network) is out.
        self.stale_after_s = max(1.0, 4 * report_interval_s)
        # A report older than this is asked about (Probe) before the replica is routed to:
        # one interval late is jitter, two is a replica worth asking.
        self.probe_after_s = 2 * report_interval_s
        # A replica that cannot answer a probe this fast is routed to on its latest report,
        # its silence counted against it (ReplicaHandle.lag_s).
        self.probe_timeout_s = max(0.05, min(0.2, report_interval_s))
        self._replicas: dict[str, ReplicaHandle] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._closing: set[asyncio.Task[None]] = set()  # channels closing once idle

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    @property
    def endpoints(self) -> list[str]:
        return sorted(self._replicas)

    def get(self, endpoint: str) -> ReplicaHandle | None:
        return self._replicas.get(endpoint)

    def all(self) -> list[ReplicaHandle]:
        return [self._replicas[e] for e in self.endpoints]

    def in_rotation(self) -> list[ReplicaHandle]:
        now = time.monotonic()
        return [h for h in self.all() if not h.out_of_rotation_because(now, self.stale_after_s)]

    async def routable(self, exclude: Iterable[str] = ()) -> list[ReplicaHandle]:
        """The replicas a request may go to now, in endpoint order: those in rotation with a
        fresh report, and those whose report is stale (but whose watch is still open) that
        are asked with a Probe: ranked on their queue as of now when they answer in time, on
        their latest report and its age when they answer late, and left out when they
        refuse or fail."""
        now, skip = time.monotonic(), set(exclude)
        fresh: list[ReplicaHandle] = []
        stale: list[ReplicaHandle] = []
        for handle in self.all():
            if handle.endpoint in skip:
                continue
            # Out for any reason but silence: not asked.
            if handle.out_of_rotation_because(now, math.inf):
                continue
            if now - handle.heard_at <= self.probe_after_s:
                fresh.append(handle)
            else:
                stale.append(handle)
        if not stale:
            return fresh
        results = await asyncio.gather(*(h.probe(self.probe_timeout_s) for h in stale))
        if ProbeResult.FAILED in results:
            self._notify()  # a failed probe took a replica out of rotation
        usable = (ProbeResult.ANSWERED, ProbeResult.LATE)
        probed = [h for h, result in zip(stale, results, strict=True) if result in usable]
        return sorted([*fresh, *probed], key=lambda h: h.endpoint)

    def ticket(self, handle: ReplicaHandle, prompt_tokens: int) -> Ticket:
        return Ticket(handle, prompt_tokens)

    def add(self, endpoint: str) -> None:
        if endpoint in self._replicas:
            return
        handle = ReplicaHandle(endpoint, self._notify, self.stall_backoff)
        self._replicas[endpoint] = handle
        self._watches[endpoint] = asyncio.create_task(self._watch(handle), name=f"watch {endpoint}")
        log.info("replica %s added", endpoint)
        self._notify()

    async def remove(self, endpoint: str) -> None:
        """Takes a replica out for good; its requests in flight finish first."""
        handle = self._replicas.pop(endpoint, None)
        if handle is None:
            return
        handle.removed = True
        watch = self._watches.pop(endpoint)
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        log.info("replica %s removed", endpoint)
        self._notify()
        # grace=None would cut the streams still in flight; they keep the channel alive.
        closing = asyncio.create_task(self._close_when_idle(handle))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def apply(self, endpoints: Iterable[str]) -> None:
        """Makes the pool hold exactly `endpoints` (what discovery says exists now)."""
        wanted = set(endpoints)
        for endpoint in sorted(wanted - set(self._replicas)):
            self.add(endpoint)
        for endpoint in sorted(set(self._replicas) - wanted):
            await self.remove(endpoint)

    async def close(self) -> None:
        for endpoint in list(self._replicas):
            handle = self._replicas.pop(endpoint)
            handle.removed = True
            watch = self._watches.pop(endpoint)
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            await handle.channel.close()

    async def _close_when_idle(self, handle: ReplicaHandle) -> None:
        while handle.outstanding.in_flight > 0:
            await asyncio.sleep(0.1)
        await handle.channel.close()

    async def _watch(self, handle: ReplicaHandle) -> None:
        backoff = MIN_BACKOFF_S
        request = replica_control_pb2.WatchLoadRequest(interval=duration(self.report_interval_s))
        while True:
            call = handle.control.WatchLoad(request)
            try:
                async for response in call:
                    if handle.failure:
                        log.info("replica %s in rotation", handle.endpoint)
                    handle.accept(response.report)
                    backoff = MIN_BACKOFF_S
                    self._notify()
                why = "load watch ended"
            except grpc.aio.AioRpcError as error:
                why = f"load watch failed: {error.code().name}"
            finally:
                call.cancel()
            if not handle.failure:
                log.warning("replica %s out of rotation: %s", handle.endpoint, why)
            handle.lose(why)
            self._notify()
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, MAX_BACKOFF_S)
