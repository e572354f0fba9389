"""One request's life in the gateway: route, forward, retry, spill, and account for it.

0. With API keys on: the key (UNAUTHENTICATED), then, once the SLO is known, the tenant's
   classes (PERMISSION_DENIED) and rate limit (RESOURCE_EXHAUSTED, RATE_LIMITED). Refused
   requests are never queued nor sent to a replica.
1. Validate what the gateway can without a tokenizer (SLO, prompt presence, request id);
   the rest is the replica's, whose INVALID_ARGUMENT is passed on unchanged.
2. Try the replicas in rotation in the router's order (a session's replica first while it is
   feasible: session affinity), asking each for SLO admission
   (allow_best_effort off). A rejection, or a replica that fails (unreachable, an error of
   its own such as INTERNAL, or a stall: nothing sent for the stall timeout), before any
   token has been sent to the client moves on to the next replica: nothing was delivered,
   so the retry is invisible. (The replica's Admission message is held back until the first
   token for exactly this reason.) A failed replica is out of rotation until its next load
   report, a stalled one for a back-off (ReplicaPool). A retry is the same request, SLO
   class intact, with `already_waited` set to the time since the gateway's arrival: the
   replica counts that against the TTFT budget (its deadlines are the client's) and still
   serves and counts the request in its class. Replicas whose load report is stale are
   probed first (ReplicaPool.routable).
3. No replica admits it: a request that accepts best effort waits in the spillover queue
   until a replica has room, then runs there as best effort; any other gets the rejection,
   with the first replica's reason and the soonest retry-after. No replica served it and
   none rejected it: UNAVAILABLE, reason REPLICA_FAILED when replicas were tried and failed
   (or its TTFT budget ran out on them), NO_REPLICA when none could be tried at all.
4. Once tokens have been sent, a replica failure ends the stream with UNAVAILABLE saying how
   many tokens were delivered (a generation cannot be resumed elsewhere).

Every request that ends with an error is counted by reason and logged, at most one line per
reason a second (failure_log.py).

The gateway judges every stream against its budgets on its own clock, from its own arrival
time, and puts that outcome in the Completion it forwards.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

import grpc

from sloserve import errors
from sloserve.gateway import failures
from sloserve.gateway.affinity import AffinityTable, SessionKey
from sloserve.gateway.auth import ApiKeys, Tenant
from sloserve.gateway.failure_log import ThrottledLog
from sloserve.gateway.failures import GatewayError
from sloserve.gateway.metrics import GatewayMetrics
from sloserve.gateway.replica_pool import ReplicaHandle, ReplicaPool, Ticket
from sloserve.gateway.routing import Candidate, RequestShape, Router, estimate_prompt_tokens
from sloserve.gateway.slo_summary import ATTAINED, BEST_EFFORT, MISSED, SloSummary
from sloserve.gateway.spillover import QueueFull, Spilled, SpilloverDrainer, SpilloverQueue
from sloserve.protoconv import duration, outcome_to_proto
from sloserve.replica.validation import MAX_REQUEST_ID_LENGTH, already_waited_s, resolve_slo
from sloserve.slo import Budgets, SloCatalog, judge
from sloserve.v1 import inference_pb2, slo_pb2

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Candidate)


@dataclass(frozen=True)
class DispatchSettings:
    # A replica that sends nothing for this long during a call is treated as failed (a hung
    # process keeps its connection open; without this its clients would wait forever).
    stall_timeout_s: float = 60.0


# A retry with less TTFT budget left than this is not sent: no replica could prefill in time.
MIN_RETRY_TTFT_S = 0.001


def with_already_waited(
    request: inference_pb2.GenerateRequest, waited_s: float
) -> inference_pb2.GenerateRequest:
    """`request`, its SLO untouched, telling the replica it already waited `waited_s`.

    The replica moves the request's deadlines that much earlier and judges it from the
    gateway's arrival, while serving and counting it in its own SLO class (a class name
    cannot carry a shorter budget, and explicit budgets would lose the class).
    """
    retry = inference_pb2.GenerateRequest()
    retry.CopyFrom(request)
    retry.already_waited.CopyFrom(duration(waited_s))
    return retry


# The label a request's session id is carried in (gRPC: GenerateRequest.labels; HTTP: the
# x-sloserve-session header or the body's session_id).
SESSION_LABEL = "session"
MAX_SESSION_ID_LENGTH = 256


# Metrics labels of replica errors the gateway passes on as they are.
_PASSED_ON_OUTCOMES = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.DEADLINE_EXCEEDED: "expired",  # a strict request that missed its SLO
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
}


# Errors of a replica itself (not of the request): retried elsewhere before the first token,
# and never shown to a client as the replica's own answer. UNAVAILABLE: the replica or its
# engine is gone; CANCELLED: the server cancelled the call on its way down (the gateway never
# cancels a call it is still reading); INTERNAL, UNKNOWN: it failed the call.
_REPLICA_FAULTS = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}

# An ErrorInfo reason is a metrics label only in this shape (a bounded set in practice).
_REASON_LABEL = re.compile(r"[A-Z][A-Z0-9_]{0,39}")
# Failures the operator must look at (the others are the client's or the SLO's doing).
_SERVER_FAULTS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


class Reroute(enum.Enum):
    """Why a request was sent on to another replica (the label of the rerouted counter)."""

    REJECTED = "rejected"  # not admitted with its SLO
    UNREACHABLE = "unreachable"  # connection lost, or the replica is going away
    FAILED = "failed"  # an error of the replica's own (INTERNAL), or a broken stream
    STALLED = "stalled"  # nothing for the stall timeout


class _Retry(Exception):
    """This replica will not serve the request, and nothing was sent to the client yet."""

    def __init__(
        self,
        why: Reroute,
        replica: str,
        what: str = "",
        reason: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(what or why.value)
        self.why = why
        self.replica = replica
        self.what = what
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class _Stream:
    """What the client has been sent so far."""

    request_id: str
    class_name: str
    budgets: Budgets
    # Where its SLO clock starts: the gateway's arrival, earlier by what the client says the
    # request already waited upstream (GenerateRequest.already_waited).
    arrival: float
    received: float  # when the gateway received it, for the Completion's latency
    spilled_reason: str = ""  # set when the request went through the spillover queue
    admission: inference_pb2.GenerateResponse | None = None
    started: bool = False  # something was sent to the client: no more transparent retries
    token_times: list[float] = field(default_factory=list)
    best_effort: bool = False
    demoted: bool = False

    def admission_to_send(self) -> inference_pb2.GenerateResponse:
        """The held-back Admission, marked best effort when the request was spilled."""
        admission = self.admission or inference_pb2.GenerateResponse(
            admission=inference_pb2.Admission(request_id=self.request_id)
        )
        if self.spilled_reason:
            admission.admission.mode = slo_pb2.ADMISSION_MODE_BEST_EFFORT
            name = f"REJECT_REASON_{self.spilled_reason}"
            if name in slo_pb2.RejectReason.keys():  # noqa: SIM118 (an enum wrapper)
                reason = slo_pb2.RejectReason.Value(name)
                admission.admission.best_effort_reason = reason  # type: ignore[assignment]
        self.best_effort = admission.admission.mode == slo_pb2.ADMISSION_MODE_BEST_EFFORT
        return admission


class Dispatcher:
    def __init__(
        self,
        pool: ReplicaPool,
        router: Router,
        catalog: SloCatalog,
        queue: SpilloverQueue,
        drainer: SpilloverDrainer,
        metrics: GatewayMetrics,
        summary: SloSummary,
        settings: DispatchSettings | None = None,
        api_keys: ApiKeys | None = None,
        affinity: AffinityTable | None = None,
    ) -> None:
        self.pool = pool
        self.router = router
        self.catalog = catalog
        self.queue = queue
        self.drainer = drainer
        self.metrics = metrics
        self.summary = summary
        self.settings = settings or DispatchSettings()
        self.api_keys = api_keys  # None: no API keys, every request is served
        self.affinity = affinity or AffinityTable()
        self.draining = False  # new requests get UNAVAILABLE (DRAINING)
        # Shutting down, not yet draining: health says NOT_SERVING so that load balancers stop
        # sending, while what they still send is served (--shutdown-delay).
        self.leaving = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._log = ThrottledLog(log)

    # -- validation ----------------------------------------------------------------------

    def _may_spill(self, class_name: str) -> bool:
        """Whether the class lets its requests go to the best-effort queue (explicit budgets
        do: the client's allow_best_effort decides)."""
        slo_class = self.catalog.get(class_name) if class_name else None
        return slo_class is None or slo_class.best_effort

    def _check(self, request: inference_pb2.GenerateRequest) -> tuple[str, Budgets, float]:
        """(class name, budgets, seconds already waited upstream), or FieldError naming the
        first bad field."""
        if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
            raise errors.FieldError(
                "request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters"
            )
        if len(request.labels.get(SESSION_LABEL, "")) > MAX_SESSION_ID_LENGTH:
            raise errors.FieldError(
                f"labels[{SESSION_LABEL}]", f"must be at most {MAX_SESSION_ID_LENGTH} characters"
            )
        class_name, budgets = resolve_slo(request.slo, self.catalog, "slo")
        waited = already_waited_s(request, budgets)
        kind = request.prompt.WhichOneof("kind")
        if kind is None:
            raise errors.FieldError("prompt", "is required: set text or token_ids")
        if kind == "text" and not request.prompt.text.strip():
            raise errors.FieldError("prompt.text", "must not be empty")
        if kind == "token_ids" and not request.prompt.token_ids.ids:
            raise errors.FieldError("prompt.token_ids", "must not be empty")
        return class_name, budgets, waited

    # -- the request's life --------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The caller's tenant when API keys are on (None when off); UNAUTHENTICATED if the
        key is missing or unknown. For front-door routes other than generation."""
        if self.api_keys is None:
            return None
        try:
            return self.api_keys.authenticate(authorization)
        except GatewayError as error:
            self.metrics.requests.labels("unknown", error.outcome).inc()
            raise

    def _admit_tenant(self, tenant: Tenant, class_name: str) -> None:
        """The tenant's class permission and rate limit. Refused requests are answered at
        once: never queued, never sent to a replica."""
        assert self.api_keys is not None
        try:
            self.api_keys.authorize(tenant, class_name)
            self.api_keys.admit(tenant)
        except GatewayError as error:
            if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.metrics.rejections.labels(class_name, error.details.reason).inc()
            self.metrics.tenant_requests.labels(tenant.name, error.outcome).inc()
            self._record(class_name, error.outcome, None)
            raise

    def serving(self) -> bool:
        """What health says: some replica in rotation, and not on the way down."""
        return bool(self.pool.in_rotation()) and not (self.draining or self.leaving)

    async def generate(
        self,
        request: inference_pb2.GenerateRequest,
        authorization: str | None = None,
        received_at: float | None = None,
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The response stream for `request`; raises GatewayError for an explicit error.
        `authorization` is the caller's `Bearer <key>`, checked when API keys are on.
        `received_at` (time.time()) is when the front door first saw the request, where its
        SLO clock starts; default: now."""
        received = time.time() if received_at is None else received_at
        # Metrics labels: only known classes, so bad input cannot grow the label set.
        requested = request.slo.class_name
        class_name = requested if self.catalog.get(requested) is not None else "unknown"
        try:
            if self.draining:
                raise failures.unavailable("the gateway is draining", "DRAINING")
            tenant = self.authenticate(authorization)  # before anything else is looked at
            try:
                class_name, budgets, waited = self._check(request)
            except errors.FieldError as bad:
                self._record(class_name, "invalid", None)
                raise failures.invalid(bad.field, bad.description) from None
            if tenant is not None:
                self._admit_tenant(tenant, class_name)
        except GatewayError as error:
            self._failed(error, request.request_id or "(no id)")
            raise
        forward = inference_pb2.GenerateRequest()
        forward.CopyFrom(request)
        if tenant is not None:
            forward.tenant = tenant.name  # the key's tenant, whatever the request claimed
        # One id across every replica tried, so logs line up.
        forward.request_id = request.request_id or f"gw-{uuid.uuid4().hex[:16]}"
        forward.allow_best_effort = False  # best effort is the gateway's call (spillover)
        arrival = received - waited
        stream = _Stream(forward.request_id, class_name, budgets, arrival, received)
        # The router weighs what is left of the TTFT budget (all of it, unless the client says
        # the request already waited upstream).
        shape = RequestShape(estimate_prompt_tokens(request.prompt), budgets.ttft_s - waited)

        self.in_flight += 1
        self.idle.clear()
        outcome = "error"
        try:
            retries: list[_Retry] = []
            async for response in self._route(forward, shape, stream, retries):
                yield response
            if stream.started:
                outcome = self._outcome(stream)
                return
            rejections = [r for r in retries if r.why is Reroute.REJECTED]
            if not rejections:
                raise self._unserved(retries)
            if not request.allow_best_effort or not self._may_spill(class_name):
                raise self._rejection(rejections, class_name)
            async for response in self._spill(forward, shape, stream, rejections[0].reason):
                yield response
            outcome = self._outcome(stream)
        except GatewayError as error:
            outcome = error.outcome
            if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.metrics.rejections.labels(class_name, error.details.reason).inc()
            self._failed(error, stream.request_id)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            ttft = stream.token_times[0] - arrival if stream.token_times else None
            self._record(class_name, outcome, ttft, spilled=bool(stream.spilled_reason))
            if tenant is not None:
                self.metrics.tenant_requests.labels(tenant.name, outcome).inc()
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def _route(
        self,
        forward: inference_pb2.GenerateRequest,
        shape: RequestShape,
        stream: _Stream,
        retries: list[_Retry],
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Tries replicas in order until one serves the request; fills `retries` with why
        each replica tried did not."""
        tried: set[str] = set()
        session = _session_key(forward)
        while True:
            candidates = await self.pool.routable(exclude=tried)
            attempt, attempt_shape = forward, shape
            if tried:
                # A retry: the replica would count its TTFT from when it gets the request, so
                # it is told how long the request already waited, and plans for the true
                # deadline with what is left of the budget, in the request's own class.
                waited = time.time() - stream.arrival
                left = stream.budgets.ttft_s - waited
                if left < MIN_RETRY_TTFT_S:
                    return  # no replica could make the first token in time now
                attempt = with_already_waited(forward, waited)
                attempt_shape = RequestShape(shape.prompt_tokens, left)
            ranked = self.router.rank(candidates, attempt_shape, retry=bool(tried))
            if not ranked:
                return
            if session is not None and not tried:
                ranked = self._prefer_pinned(session, ranked, shape)
            replica = ranked[0]
            tried.add(replica.endpoint)
            ticket = self.pool.ticket(replica, shape.prompt_tokens)
            try:
                async for response in self._attempt(ticket, attempt, stream):
                    yield response
                return
            except _Retry as retry:
                self.metrics.rerouted.labels(retry.why.value).inc()
                if retry.why is Reroute.REJECTED:
                    self.metrics.replica_rejections.labels(replica.endpoint, retry.reason).inc()
                retries.append(retry)

    def _prefer_pinned(self, session: SessionKey, ranked: list[C], shape: RequestShape) -> list[C]:
        """`ranked` with the session's pinned replica first, while it is in rotation and its
        predicted TTFT still fits the budget; else as the router ranked them (the session is
        re-pinned to whichever replica serves this round)."""
        pinned = self.affinity.get(session)
        if pinned is None:
            self.metrics.session_routes.labels("new").inc()
            return ranked
        replica = next((r for r in ranked if r.endpoint == pinned), None)
        if replica is None or self.router.costs.slack_s(replica, shape) < 0:
            self.metrics.session_routes.labels("moved").inc()
            return ranked
        self.metrics.session_routes.labels("kept").inc()
        return [replica, *(r for r in ranked if r is not replica)]

    async def _spill(
        self,
        forward: inference_pb2.GenerateRequest,
        shape: RequestShape,
        stream: _Stream,
        reason: str,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Waits in the best-effort queue for a replica with room, then runs there."""
        entry = Spilled(
            request_id=stream.request_id,
            class_name=stream.class_name,
            deadline=stream.arrival + stream.budgets.ttft_s,
            expires_at=time.monotonic() + self.queue.ttl_s,
            shape=shape,
            reason=reason or "UNSPECIFIED",
        )
        try:
            self.queue.push(entry)
        except QueueFull as full:
            raise failures.rejected(
                "QUEUE_FULL", str(full), full.retry_after_s, "queue_full"
            ) from None
        self.metrics.set_queue_depths(self.queue.depths())
        stream.spilled_reason = entry.reason
        self.metrics.spilled.labels(stream.class_name).inc()
        best_effort = inference_pb2.GenerateRequest()
        best_effort.CopyFrom(forward)
        best_effort.allow_best_effort = True
        self.drainer.poke()
        while True:
            ticket = await self._wait_for_room(entry)
            try:
                async for response in self._attempt(ticket, best_effort, stream):
                    yield response
                return
            except _Retry as retry:
                # The replica filled up (or went away) since it reported room: back in line,
                # keeping its place (deadline) and its TTL.
                self.metrics.rerouted.labels(retry.why.value).inc()
                entry.granted = asyncio.get_running_loop().create_future()
                self.queue.requeue(entry)
                self.drainer.poke()

    async def _wait_for_room(self, entry: Spilled) -> Ticket:
        timeout = entry.expires_at - time.monotonic()
        try:
            return await asyncio.wait_for(entry.granted, max(0.0, timeout))
        except TimeoutError:
            self.queue.withdraw(entry)
            raise failures.rejected(
                "QUEUE_TIMEOUT",
                f"waited {self.queue.ttl_s:.0f} s in the best-effort queue and no replica had room",
                self.queue.ttl_s / 2,
                "queue_timeout",
            ) from None
        except asyncio.CancelledError:
            self.queue.withdraw(entry)
            raise
        finally:
            self.metrics.set_queue_depths(self.queue.depths())

    async def _attempt(
        self, ticket: Ticket, forward: inference_pb2.GenerateRequest, stream: _Stream
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Streams from one replica. Raises _Retry when it can be retried elsewhere."""
        replica = ticket.replica
        call = replica.streams.generate(forward)
        responses = aiter(call)
        try:
            while True:
                try:
                    # A timer, not a task per message (wait_for's): this runs for every token.
                    async with asyncio.timeout(self.settings.stall_timeout_s):
                        response = await anext(responses)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    backoff = replica.stalled()
                    self.metrics.replica_stalls.labels(replica.endpoint).inc()
                    self._fail(
                        replica,
                        stream,
                        f"sent nothing for {self.settings.stall_timeout_s:g} s (out of "
                        f"rotation for {backoff:.0f} s)",
                        Reroute.STALLED,
                    )
                event = response.WhichOneof("event")
                if event == "admission" and not stream.started:
                    stream.admission = response  # held until the first token: see the top
                    continue
                if not stream.started:
                    stream.started = True
                    if (session := _session_key(forward)) is not None:
                        self.affinity.pin(session, replica.endpoint)
                    yield stream.admission_to_send()
                if event == "delta" and response.delta.token_ids:
                    ticket.first_token()
                    now = time.time()
                    stream.token_times.extend([now] * len(response.delta.token_ids))
                elif event == "demotion":
                    stream.demoted = True
                elif event == "completion":
                    ticket.served()
                    self._judge_completion(response, stream)
                    yield response
                    return
                yield response
        except grpc.aio.AioRpcError as error:
            self._replica_error(error, replica, stream)
        finally:
            call.cancel()
            ticket.close()
        # A stream that ends without a Completion is a broken replica.
        self._fail(replica, stream, "ended the stream without a completion", Reroute.FAILED)

    def _replica_error(
        self, error: grpc.aio.AioRpcError, replica: ReplicaHandle, stream: _Stream
    ) -> NoReturn:
        """Raises _Retry for errors that are safe to retry elsewhere, else GatewayError."""
        code = error.code()
        status = errors.rich_status(error)  # passed on unchanged, rich details included
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not stream.started:
            details = errors.status_details(status)
            raise _Retry(
                Reroute.REJECTED, replica.endpoint, "", details.reason, details.retry_after_s
            )
        if code in _REPLICA_FAULTS:
            # Out until its next load report, which says whether it still serves (a replica
            # whose engine died reports not ready, then exits).
            replica.call_failed(f"call failed: {code.name}: {error.details()}")
            gone = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            why = Reroute.UNREACHABLE if gone else Reroute.FAILED
            self._fail(replica, stream, f"failed: {code.name}: {error.details()}", why)
        outcome = _PASSED_ON_OUTCOMES.get(code, "error")
        raise GatewayError(status, outcome)  # the replica's own answer, unchanged

    def _fail(self, replica: ReplicaHandle, stream: _Stream, what: str, why: Reroute) -> NoReturn:
        """A replica failed: retry elsewhere if nothing was sent, else end the stream."""
        if not stream.started:
            self._log.log(
                logging.WARNING,
                f"reroute {why.value} {replica.endpoint}",
                f"replica {replica.endpoint} {what}; re-routing {stream.request_id}",
            )
            raise _Retry(why, replica.endpoint, what)
        delivered = len(stream.token_times)
        raise failures.unavailable(
            f"replica {replica.endpoint} failed mid-stream ({what}) after {delivered} tokens "
            "were delivered; the generation cannot be resumed",
            "REPLICA_FAILED",
            tokens_delivered=str(delivered),
            replica=replica.endpoint,
        )

    def _judge_completion(self, response: inference_pb2.GenerateResponse, stream: _Stream) -> None:
        """Replaces the replica's SLO outcome with the gateway's, from the gateway's arrival."""
        outcome = judge(stream.arrival, stream.token_times, stream.budgets)
        in_class = not (stream.best_effort or stream.demoted)
        completion = response.completion
        completion.slo_outcome.CopyFrom(outcome_to_proto(outcome, admitted=in_class))
        completion.latency.CopyFrom(duration(time.time() - stream.received))
        class_name = stream.class_name
        self.metrics.ttft.labels(class_name).observe(outcome.ttft_s)
        if len(stream.token_times) > 1:
            self.metrics.tpot.labels(class_name).observe(outcome.mean_tpot_s)

    def _outcome(self, stream: _Stream) -> str:
        if stream.best_effort or stream.demoted:
            return BEST_EFFORT
        outcome = judge(stream.arrival, stream.token_times, stream.budgets)
        return ATTAINED if outcome.met else MISSED

    def _rejection(self, rejections: list[_Retry], class_name: str) -> GatewayError:
        """The first (best-ranked) replica's reason, and the soonest retry-after."""
        hints = [r.retry_after_s for r in rejections if r.retry_after_s is not None]
        reason = rejections[0].reason or "UNSPECIFIED"
        return failures.rejected(
            reason,
            f"not admitted: no replica can meet this SLO now ({len(rejections)} tried; "
            f"{reason.lower()})",
            min(hints) if hints else 1.0,
            "rejected",
        )

    def _unserved(self, retries: list[_Retry]) -> GatewayError:
        """UNAVAILABLE for a request that no replica served nor rejected: REPLICA_FAILED when
        replicas were tried (and failed, or its TTFT budget ran out on them), else
        NO_REPLICA."""
        if not retries:
            return failures.unavailable(self._no_replica_message(), "NO_REPLICA")
        tried = "; ".join(f"{r.replica} {r.what}" for r in retries)
        return failures.unavailable(
            f"no replica served the request before its first token ({tried})",
            "REPLICA_FAILED",
            tokens_delivered="0",
            replica=retries[-1].replica,
        )

    def _failed(self, error: GatewayError, request_id: str) -> None:
        """Counts and logs (throttled) a request that ends with `error`."""
        reason = error.details.reason
        if not _REASON_LABEL.fullmatch(reason):
            reason = error.code.name
        self.metrics.failed.labels(reason).inc()
        level = logging.WARNING if error.code in _SERVER_FAULTS else logging.INFO
        self._log.log(
            level,
            f"failed {reason}",
            f"request {request_id} failed ({error.code.name}, {reason}): {error.status.message}",
        )

    def _no_replica_message(self) -> str:
        now = time.monotonic()
        replicas = self.pool.all()
        if not replicas:
            return "no replica is known"
        why = ", ".join(
            f"{r.endpoint}: {r.out_of_rotation_because(now, self.pool.stale_after_s) or 'failed'}"
            for r in replicas
        )
        return f"no replica can take the request ({why})"

    def _record(
        self, class_name: str, outcome: str, ttft_s: float | None, spilled: bool = False
    ) -> None:
        self.metrics.requests.labels(class_name, outcome).inc()
        attainment = self.summary.record(class_name, outcome, ttft_s, spilled)
        if attainment is not None:
            self.metrics.attainment.labels(class_name).set(attainment)


def _session_key(request: inference_pb2.GenerateRequest) -> SessionKey | None:
    """(tenant, session id) of a request that names a session, else None."""
    session = request.labels.get(SESSION_LABEL, "")
    return (request.tenant, session) if session else None
