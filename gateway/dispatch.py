"""One request's life in the gateway: route, forward, retry, spill, and account for it.

0. With API keys on: the key (UNAUTHENTICATED), then, once the SLO is known, the tenant's
   classes (PERMISSION_DENIED) and rate limit (RESOURCE_EXHAUSTED, RATE_LIMITED). Refused
   requests are never queued nor sent to a replica.
1. Validate what the gateway can without a tokenizer (SLO, prompt presence, request id);
   the rest is the replica's, whose INVALID_ARGUMENT is passed on unchanged.
2. Try the replicas in rotation in the router's order (a session's replica first while it is
   feasible: session affinity), asking each for SLO admission
   (allow_best_effort off). A rejection, or an unreachable replica, before any token has
   been sent to the client moves on to the next replica: nothing was delivered, so the retry
   is invisible. (The replica's Admission message is held back until the first token for
   exactly this reason.) A retry is the same request, SLO class intact, with
   `already_waited` set to the time since the gateway's arrival: the replica counts that
   against the TTFT budget (its deadlines are the client's) and still serves and counts the
   request in its class. Replicas whose load report is stale are probed first
   (ReplicaPool.routable).
3. No replica admits it: a request that accepts best effort waits in the spillover queue
   until a replica has room, then runs there as best effort; any other gets the rejection,
   with the first replica's reason and the soonest retry-after.
4. Once tokens have been sent, a replica failure ends the stream with UNAVAILABLE saying how
   many tokens were delivered (a generation cannot be resumed elsewhere).

The gateway judges every stream against its budgets on its own clock, from its own arrival
time, and puts that outcome in the Completion it forwards.
"""

from __future__ import annotations

import asyncio
import logging
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


class _Retry(Exception):
    """This replica will not serve the request, and nothing was sent to the client yet."""

    def __init__(self, why: str, reason: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(why)
        self.why = why  # "rejected" or "unreachable"
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
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

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

    async def generate(
        self, request: inference_pb2.GenerateRequest, authorization: str | None = None
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The response stream for `request`; raises GatewayError for an explicit error.
        `authorization` is the caller's `Bearer <key>`, checked when API keys are on."""
        received = time.time()
        # Metrics labels: only known classes, so bad input cannot grow the label set.
        requested = request.slo.class_name
        class_name = requested if self.catalog.get(requested) is not None else "unknown"
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
            rejections: list[_Retry] = []
            async for response in self._route(forward, shape, stream, rejections):
                yield response
            if stream.started:
                outcome = self._outcome(stream)
                return
            if not rejections:
                raise failures.unavailable(self._no_replica_message(), "NO_REPLICA")
            if not request.allow_best_effort or not self._may_spill(class_name):
                raise self._rejection(rejections, class_name)
            async for response in self._spill(forward, shape, stream, rejections[0].reason):
                yield response
            outcome = self._outcome(stream)
        except GatewayError as error:
            outcome = error.outcome
            if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.metrics.rejections.labels(class_name, error.details.reason).inc()
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
        rejections: list[_Retry],
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Tries replicas in order until one serves the request; fills `rejections`."""
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
                self.metrics.rerouted.labels(retry.why).inc()
                if retry.why == "rejected":
                    self.metrics.replica_rejections.labels(replica.endpoint, retry.reason).inc()
                    rejections.append(retry)

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
                self.metrics.rerouted.labels(retry.why).inc()
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
        call = replica.inference.Generate(forward)
        responses = aiter(call)
        try:
            while True:
                try:
                    response = await asyncio.wait_for(
                        anext(responses), self.settings.stall_timeout_s
                    )
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    replica.call_failed("stalled")
                    self._fail(
                        replica, stream, f"sent nothing for {self.settings.stall_timeout_s} s"
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
        self._fail(replica, stream, "ended the stream without a completion")

    def _replica_error(
        self, error: grpc.aio.AioRpcError, replica: ReplicaHandle, stream: _Stream
    ) -> NoReturn:
        """Raises _Retry for errors that are safe to retry elsewhere, else GatewayError."""
        code = error.code()
        status = errors.rich_status(error)  # passed on unchanged, rich details included
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not stream.started:
            details = errors.status_details(status)
            raise _Retry("rejected", details.reason, details.retry_after_s)
        # A replica process that dies shows as UNAVAILABLE (connection lost) or CANCELLED
        # (the server cancelled the call on its way down); the gateway never cancels a call
        # it is still reading.
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            replica.call_failed(f"call failed: {error.details()}")
            self._fail(replica, stream, f"is unavailable ({error.details()})")
        outcome = _PASSED_ON_OUTCOMES.get(code, "error")
        raise GatewayError(status, outcome)  # the replica's own answer, unchanged

    def _fail(self, replica: ReplicaHandle, stream: _Stream, what: str) -> NoReturn:
        """A replica failed: retry elsewhere if nothing was sent, else end the stream."""
        if not stream.started:
            log.warning("replica %s %s; re-routing %s", replica.endpoint, what, stream.request_id)
            raise _Retry("unreachable")
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
