"""The ReplicaControl gRPC service: probe, load reports, SLO configuration, drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2

from sloserve import errors
from sloserve.protoconv import budgets_to_proto, duration
from sloserve.replica.intake import decide
from sloserve.replica.runtime import ReplicaRuntime
from sloserve.replica.validation import budgets_from_proto, resolve_slo
from sloserve.slo import SloCatalog, SloClass
from sloserve.v1 import replica_control_pb2 as pb
from sloserve.v1 import replica_control_pb2_grpc, slo_pb2

MIN_REPORT_INTERVAL_S = 0.05


class ControlService(replica_control_pb2_grpc.ReplicaControlServicer):
    def __init__(self, runtime: ReplicaRuntime) -> None:
        self._rt = runtime

    async def _invalid(self, context: grpc.aio.ServicerContext, bad: errors.FieldError) -> None:
        await context.abort_with_status(
            errors.to_grpc_status(errors.invalid_argument(bad.field, bad.description))
        )

    async def Probe(
        self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProbeResponse:
        state = self._rt.state
        if state.fault is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{state.fault}; the replica exits")
        if not state.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is starting")
        try:
            if request.max_tokens < 1:
                raise errors.FieldError("max_tokens", "must be at least 1")
            if request.prompt_tokens < 1:
                raise errors.FieldError("prompt_tokens", "must be at least 1")
            _, budgets = resolve_slo(request.slo, state.catalog, "slo")
        except errors.FieldError as bad:
            await self._invalid(context, bad)
        decision = decide(state, request.prompt_tokens)
        return pb.ProbeResponse(
            admissible=decision.admit,
            reason=decision.reason,
            predicted_ttft=duration(decision.predicted_ttft_s),
            slack=duration(budgets.ttft_s - decision.predicted_ttft_s),
        )

    def load_report(self) -> pb.LoadReport:
        state, engine_load = self._rt.state, self._rt.listener.snapshot()
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        in_flight = state.in_flight_by_class()
        names = sorted(set(in_flight) | set(state.tallies))
        return pb.LoadReport(
            time=now,
            ready=state.ready,
            draining=state.draining,
            running=engine_load.running,
            waiting=engine_load.waiting,
            kv_cache_usage=engine_load.kv_cache_usage,
            pending_prefill_tokens=state.pending_prefill_tokens,
            classes=[
                pb.ClassLoad(
                    class_name=name,
                    in_flight=in_flight.get(name, 0),
                    finished=state.tallies[name].finished if name in state.tallies else 0,
                    attained=state.tallies[name].attained if name in state.tallies else 0,
                )
                for name in names
            ],
        )

    async def WatchLoad(
        self, request: pb.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchLoadResponse]:
        interval = request.interval.ToNanoseconds() / 1e9 if request.HasField("interval") else 0
        interval = max(MIN_REPORT_INTERVAL_S, interval or 1.0)
        while True:
            yield pb.WatchLoadResponse(report=self.load_report())
            await asyncio.sleep(interval)

    async def Configure(
        self, request: pb.ConfigureRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConfigureResponse:
        try:
            classes: dict[str, SloClass] = {}
            for i, c in enumerate(request.classes):
                if c.name in classes:
                    raise errors.FieldError(f"classes[{i}].name", f"duplicate class {c.name!r}")
                budgets = budgets_from_proto(c.budgets, f"classes[{i}].budgets")
                classes[c.name] = SloClass(c.name, budgets, c.description)
            catalog = SloCatalog(classes, request.default_class)
        except errors.FieldError as bad:
            await self._invalid(context, bad)
        self._rt.state.catalog = catalog
        return self.configuration()

    def configuration(self) -> pb.ConfigureResponse:
        catalog = self._rt.state.catalog
        return pb.ConfigureResponse(
            classes=[
                slo_pb2.SloClass(
                    name=c.name, budgets=budgets_to_proto(c.budgets), description=c.description
                )
                for c in catalog.classes.values()
            ],
            default_class=catalog.default_class,
        )

    async def Drain(
        self, request: pb.DrainRequest, context: grpc.aio.ServicerContext
    ) -> pb.DrainResponse:
        return pb.DrainResponse(in_flight=self._rt.start_drain())
