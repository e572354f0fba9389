"""The gateway's gRPC front door: the same Inference service as a replica's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from sloserve import errors
from sloserve.gateway.dispatch import Dispatcher
from sloserve.gateway.failures import GatewayError
from sloserve.v1 import inference_pb2, inference_pb2_grpc


class GatewayInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        # gRPC lower-cases metadata keys; the key travels as `authorization: Bearer <key>`.
        authorization = next(
            (
                str(value)
                for key, value in context.invocation_metadata() or ()
                if key == "authorization"
            ),
            None,
        )
        try:
            async for response in self._dispatcher.generate(request, authorization):
                yield response
        except GatewayError as error:
            await context.abort_with_status(errors.to_grpc_status(error.status))
