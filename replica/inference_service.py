"""The Inference gRPC service of a replica: validate, admit, stream from vLLM, judge.

A failed engine (engine_health.py) ends every request UNAVAILABLE: those that arrive after,
those waiting on the engine when it fails, and those whose stream vLLM ends with
EngineDeadError (which also reports the fault, ahead of the watchdog's next look). Other
errors from the engine are INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from vllm import RequestOutput, SamplingParams
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.exceptions import EngineDeadError

from sloserve import errors
from sloserve.protoconv import budgets_to_proto, duration, outcome_to_proto
from sloserve.replica.intake import decide
from sloserve.replica.reports import VerdictRecord
from sloserve.replica.runtime import ReplicaRuntime
from sloserve.replica.scheduler import EXPIRED_STOP_REASON, REJECTED_PREFIX
from sloserve.replica.state import EngineFault, FaultKind
from sloserve.replica.validation import ValidRequest, validate_off_loop
from sloserve.slo import judge
from sloserve.v1 import inference_pb2, inference_pb2_grpc, slo_pb2

log = logging.getLogger(__name__)

_FINISH_REASONS = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
}


def _vllm_sampling(valid: ValidRequest) -> SamplingParams:
    s = valid.sampling
    return SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
        stop=list(s.stop) or None,
        ignore_eos=s.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        extra_args=valid.slo.to_extra_args(),
    )


class _EngineFailed(Exception):
    """The engine failed while a request waited on it (ReplicaRuntime.engine_failed)."""


async def _engine_output(
    pending: asyncio.Future[RequestOutput], failed: asyncio.Future[Any]
) -> RequestOutput:
    """The engine's next output for a request; _EngineFailed if the engine fails first."""
    if not pending.done():
        await asyncio.wait((pending, failed), return_when=asyncio.FIRST_COMPLETED)
        if not pending.done():
            raise _EngineFailed
    return pending.result()


def _reject_reason(verdict: VerdictRecord | None) -> slo_pb2.RejectReason:
    if verdict is None or not verdict.reason:
        return slo_pb2.REJECT_REASON_UNSPECIFIED
    return slo_pb2.RejectReason.Value(f"REJECT_REASON_{verdict.reason}")  # type: ignore[return-value]


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, runtime: ReplicaRuntime) -> None:
        self._rt = runtime

    def _undelivered_text(self, token_ids: list[int], streamed: str) -> str:
        """Text the incremental detokenizer held back at the end of the stream.

        vLLM withholds trailing bytes that do not yet form a whole UTF-8 character; when the
        stream ends there, the full decode shows them (as U+FFFD). Sending that tail keeps the
        invariant that the streamed text is the decode of the streamed tokens.
        """
        full: str = self._rt.tokenizer.decode(token_ids, skip_special_tokens=True)
        return full[len(streamed) :] if full.startswith(streamed) else ""

    async def _reject(
        self, context: grpc.aio.ServicerContext, class_name: str, reason: str, retry_s: float
    ) -> None:
        """Answers RESOURCE_EXHAUSTED for a request the SLO policy turned away."""
        self._rt.metrics.rejections.labels(class_name, reason).inc()
        await context.abort_with_status(
            errors.to_grpc_status(
                errors.resource_exhausted(
                    reason,
                    f"not admitted: the replica cannot meet this SLO now ({reason.lower()})",
                    # By then the requests ahead of it have had their first tokens.
                    max(0.1, retry_s),
                )
            )
        )

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        arrival = time.time()
        rt, state = self._rt, self._rt.state
        limits = rt.limits
        if state.fault is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{state.fault}; the replica exits")
        if not state.ready or limits is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is starting")
            return  # not reached: abort raises
        if state.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica is draining")
        try:
            valid = await validate_off_loop(request, state.catalog, limits, rt.tokenize, arrival)
        except errors.FieldError as bad:
            rt.metrics.requests.labels(request.slo.class_name, "invalid").inc()
            await context.abort_with_status(
                errors.to_grpc_status(errors.invalid_argument(bad.field, bad.description))
            )
        slo = valid.slo
        if slo.request_id in state.in_flight:
            await context.abort_with_status(
                errors.to_grpc_status(errors.invalid_argument("request_id", "already in flight"))
            )
        decision = decide(state, len(valid.prompt_token_ids))
        if not decision.admit:
            rt.metrics.requests.labels(slo.class_name, "rejected").inc()
            rt.metrics.rejections.labels(slo.class_name, decision.reason_name).inc()
            await context.abort_with_status(
                errors.to_grpc_status(
                    errors.resource_exhausted(
                        decision.reason_name,
                        f"not admitted: {decision.reason_name.lower()}",
                        decision.retry_after_s,
                    )
                )
            )

        entry = state.start(slo, len(valid.prompt_token_ids))
        outcome_label, attained = "error", None
        completion_sent = False
        prompt_tokens = len(valid.prompt_token_ids)
        verdict_wait = rt.verdicts.expect(slo.request_id)
        outputs = rt.engine.generate(
            {"prompt_token_ids": valid.prompt_token_ids}, _vllm_sampling(valid), slo.request_id
        )
        next_output = asyncio.ensure_future(anext(outputs))
        engine_failed = asyncio.ensure_future(rt.engine_failed.wait())
        try:
            # The Admission message carries the engine's verdict; its first output stands in
            # for a verdict that was lost (reports.py), so this wait always ends (and a failed
            # engine ends it too).
            await asyncio.wait(
                {verdict_wait, next_output, engine_failed}, return_when=asyncio.FIRST_COMPLETED
            )
            if engine_failed.done():
                raise _EngineFailed
            verdict = verdict_wait.result() if verdict_wait.done() else None
            if verdict is not None and verdict.event == "rejected":
                outcome_label = "rejected"
                await self._reject(context, slo.class_name, verdict.reason, slo.budgets.ttft_s)
            best_effort = verdict is not None and verdict.event == "best_effort"
            yield inference_pb2.GenerateResponse(
                admission=inference_pb2.Admission(
                    request_id=slo.request_id,
                    mode=slo_pb2.ADMISSION_MODE_BEST_EFFORT
                    if best_effort
                    else slo_pb2.ADMISSION_MODE_ADMITTED,
                    class_name=slo.class_name,
                    budgets=budgets_to_proto(slo.budgets),
                    prompt_tokens=prompt_tokens,
                    best_effort_reason=_reject_reason(verdict),
                )
            )
            token_times: list[float] = []
            token_ids: list[int] = []
            streamed_text = ""
            finish_reason: str | None = None
            stop_reason: object = None
            demoted = False
            first: asyncio.Future[RequestOutput] | None = next_output
            while True:
                try:
                    if first is not None:
                        output, first = await _engine_output(first, engine_failed), None
                    else:
                        # Awaited in this task, no future of its own: a cancelled call aborts
                        # the request in vLLM, and a failed engine ends it (fail_engine).
                        output = await anext(outputs)
                except StopAsyncIteration:
                    break
                now = time.time()
                later = rt.verdicts.take_later(slo.request_id)
                if later is not None and later.event == "demoted" and not demoted:
                    demoted = True
                    yield inference_pb2.GenerateResponse(
                        demotion=inference_pb2.Demotion(
                            reason=later.reason, tokens_delivered=len(token_times)
                        )
                    )
                completion = output.outputs[0]
                if completion.token_ids:
                    if entry.first_token_time is None:
                        state.first_token(entry, now)
                    token_times.extend([now] * len(completion.token_ids))
                    token_ids.extend(completion.token_ids)
                    streamed_text += completion.text
                    yield inference_pb2.GenerateResponse(
                        delta=inference_pb2.TokenDelta(
                            token_ids=completion.token_ids, text=completion.text
                        )
                    )
                if output.finished:
                    finish_reason = completion.finish_reason
                    stop_reason = completion.stop_reason
                    break
            if isinstance(stop_reason, str) and stop_reason.startswith(REJECTED_PREFIX):
                outcome_label = "rejected"
                reason = stop_reason.removeprefix(REJECTED_PREFIX)
                await self._reject(context, slo.class_name, reason, slo.budgets.ttft_s)
            if stop_reason == EXPIRED_STOP_REASON:
                outcome_label = "expired"
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the request can no longer meet its SLO and asked for strict SLOs; "
                    f"ended after {len(token_times)} tokens",
                )
            if finish_reason not in _FINISH_REASONS:
                await context.abort(
                    grpc.StatusCode.ABORTED,
                    f"the engine ended the request ({finish_reason}) after "
                    f"{len(token_times)} tokens",
                )
            tail = self._undelivered_text(token_ids, streamed_text)
            if tail:
                yield inference_pb2.GenerateResponse(delta=inference_pb2.TokenDelta(text=tail))
            # Judged from the request's arrival upstream (its time in a gateway and on
            # replicas that turned it away included), like its deadlines here: the TTFT the
            # client sees. The Completion's latency below stays this replica's own time.
            outcome = judge(slo.origin_time, token_times, slo.budgets)
            in_class = not (best_effort or demoted)
            attained = outcome.met and in_class
            outcome_label = (
                "attained" if attained else ("best_effort" if not in_class else "missed")
            )
            rt.metrics.ttft.labels(slo.class_name).observe(outcome.ttft_s)
            if len(token_times) > 1:
                rt.metrics.tpot.labels(slo.class_name).observe(outcome.mean_tpot_s)
            last = inference_pb2.GenerateResponse(
                completion=inference_pb2.Completion(
                    finish_reason=_FINISH_REASONS[finish_reason or ""],
                    usage=inference_pb2.Usage(
                        prompt_tokens=prompt_tokens,
                        completion_tokens=len(token_times),
                    ),
                    slo_outcome=outcome_to_proto(outcome, admitted=in_class),
                    latency=duration(time.time() - arrival),
                )
            )
            # Set before the yield: a client that ends the call on receiving the Completion
            # raises GeneratorExit at the yield itself.
            completion_sent = True
            yield last
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away; the engine has aborted the request. A client that ends
            # the call once it has the Completion (the gateway does) cancelled nothing.
            if not completion_sent:
                outcome_label = "cancelled"
            raise
        except grpc.aio.AbortError:
            raise
        except (EngineDeadError, _EngineFailed) as error:
            if isinstance(error, EngineDeadError):
                rt.fail_engine(EngineFault(FaultKind.DEAD, f"a request's stream ended: {error}"))
            # UNAVAILABLE: the request is not at fault, and another replica can serve it.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{state.fault}; the replica exits")
        except Exception as error:
            log.exception("request %s failed", slo.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {error}")
        finally:
            engine_failed.cancel()
            # Cancelling a pending read of the engine stream aborts the request in the engine
            # (vLLM aborts on cancellation), freeing its KV cache at once.
            if not next_output.done():
                next_output.cancel()
                with contextlib.suppress(
                    asyncio.CancelledError, StopAsyncIteration, EngineDeadError
                ):
                    await next_output
            await outputs.aclose()
            rt.verdicts.forget(slo.request_id)
            state.finish(entry, attained)
            rt.metrics.requests.labels(slo.class_name, outcome_label).inc()
