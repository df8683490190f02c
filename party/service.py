"""The gRPC face of a party: a thin servicer over :class:`party.handler.PartyHandler`.

Decode -> handler -> encode; domain errors map to status codes: a bad tensor or request ->
INVALID_ARGUMENT, a denied capability -> PERMISSION_DENIED, an exhausted budget ->
RESOURCE_EXHAUSTED. The server also serves the standard ``grpc.health.v1`` service.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fusion.datafree.losses import GeneratorObjective
from party.handler import PartyHandler
from protocol import CALLER_METADATA_KEY
from protocol._generated import party_pb2, party_pb2_grpc
from protocol.codec import (
    CodecError,
    objective_from_proto,
    party_info_to_proto,
    synthesis_params_from_proto,
    tensor_from_proto,
    tensor_to_proto,
    tensors_to_proto,
)
from protocol.errors import PartyError, status_code

SERVICE_NAME = "amalgam.party.v1.PartyService"


def _caller(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == CALLER_METADATA_KEY:
            return value
    return "anonymous"


class PartyServicer(party_pb2_grpc.PartyServiceServicer):
    def __init__(self, handler: PartyHandler, max_elements: int) -> None:
        self.handler = handler
        self.max_elements = max_elements

    def Describe(self, request, context):  # noqa: N802 (gRPC method name)
        info = self.handler.describe(_caller(context), request.request_id)
        return party_pb2.DescribeResponse(
            request_id=request.request_id, info=party_info_to_proto(info)
        )

    def Predict(self, request, context):  # noqa: N802
        caller = _caller(context)
        try:
            try:
                x = tensor_from_proto(request.inputs, "inputs", max_elements=self.max_elements)
            except CodecError as error:
                self.handler.reject_malformed(
                    "Predict", caller, request.request_id, error.field, error.problem
                )
            out = self.handler.predict(x, caller, request.request_id)
        except PartyError as error:
            context.abort(status_code(error), str(error))
        return party_pb2.PredictResponse(
            request_id=request.request_id,
            outputs=tensor_to_proto(out),
            output_form=self.handler.policy.predict.output,
        )

    def BatchNormFeedback(self, request, context):  # noqa: N802
        caller = _caller(context)
        method = "BatchNormFeedback"
        try:
            try:
                x = tensor_from_proto(request.inputs, "inputs", max_elements=self.max_elements)
                grad_logits = None
                if request.HasField("grad_logits"):
                    grad_logits = tensor_from_proto(
                        request.grad_logits, "grad_logits", max_elements=self.max_elements
                    )
                weights, adversary = objective_from_proto(
                    request.objective, max_elements=self.max_elements
                )
                objective = GeneratorObjective(**weights)
            except (CodecError, ValueError) as error:
                field = getattr(error, "field", "objective")
                problem = getattr(error, "problem", str(error))
                self.handler.reject_malformed(method, caller, request.request_id, field, problem)
            feedback = self.handler.bn_feedback(
                x, caller, objective, adversary, grad_logits, request.half, request.request_id
            )
        except PartyError as error:
            context.abort(status_code(error), str(error))
        return party_pb2.BatchNormFeedbackResponse(
            request_id=request.request_id,
            logits=tensor_to_proto(feedback.logits),
            losses=feedback.losses,
            input_grad=tensor_to_proto(feedback.input_grad),
        )

    def Synthesize(self, request, context):  # noqa: N802
        caller = _caller(context)
        try:
            result = self.handler.synthesize(
                caller,
                request.session,
                synthesis_params_from_proto(request.params),
                request.steps,
                request.samples,
                request.half,
                request.request_id,
            )
        except PartyError as error:
            context.abort(status_code(error), str(error))
        return party_pb2.SynthesizeResponse(
            request_id=request.request_id,
            samples=tensor_to_proto(result.samples),
            losses=result.losses,
            steps_done=result.steps_done,
        )

    def _layers(self, request, context, gram: bool):
        caller = _caller(context)
        method = "Gram" if gram else "Activations"
        try:
            try:
                x = tensor_from_proto(request.inputs, "inputs", max_elements=self.max_elements)
            except CodecError as error:
                self.handler.reject_malformed(
                    method, caller, request.request_id, error.field, error.problem
                )
            out = self.handler.layers(
                x,
                list(request.layers),
                caller,
                gram=gram,
                half=request.half,
                request_id=request.request_id,
            )
        except PartyError as error:
            context.abort(status_code(error), str(error))
        return party_pb2.LayersResponse(
            request_id=request.request_id, outputs=tensors_to_proto(out)
        )

    def Activations(self, request, context):  # noqa: N802
        return self._layers(request, context, gram=False)

    def Gram(self, request, context):  # noqa: N802
        return self._layers(request, context, gram=True)

    def ExportWeights(self, request, context):  # noqa: N802
        try:
            arch, payload = self.handler.export_weights(_caller(context), request.request_id)
        except PartyError as error:
            context.abort(status_code(error), str(error))
        limit = self.handler.policy.weights.chunk_bytes
        chunk = min(request.chunk_bytes, limit) if request.chunk_bytes > 0 else limit
        for start in range(0, max(len(payload), 1), chunk):
            message = party_pb2.WeightsChunk(
                request_id=request.request_id, data=payload[start : start + chunk]
            )
            if start == 0:
                message.architecture = json.dumps(arch)
                message.total_bytes = len(payload)
                message.sha256 = hashlib.sha256(payload).hexdigest()
            yield message


def create_server(
    handler: PartyHandler,
    address: str = "127.0.0.1:0",
    *,
    max_message_mb: int = 64,
    max_workers: int = 4,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int]:
    """Build (not start) a server for ``handler``; returns it and the bound port.

    Message limits are raised deliberately to ``max_message_mb`` in both directions, and the
    element cap of decoded tensors follows from it.
    """
    limit = max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    party_pb2_grpc.add_PartyServiceServicer_to_server(
        PartyServicer(handler, max_elements=limit // 2), server
    )
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port


def serve(handler: PartyHandler, address: str, max_message_mb: int = 64, grace_s: float = 5.0):
    """Serve until SIGTERM or SIGINT, then stop gracefully (in-flight calls get ``grace_s``)."""
    server, port = create_server(handler, address, max_message_mb=max_message_mb)
    server.start()
    host = address.rsplit(":", 1)[0]
    print(f"party {handler.name} serving on {host}:{port}", flush=True)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    server.stop(grace_s).wait()
    print(f"party {handler.name} stopped", file=sys.stderr, flush=True)
