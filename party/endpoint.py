"""The party's answers, whatever carries them: decode a request, ask the handler, encode the
response. The gRPC servicer and the Flower ClientApp both call :class:`PartyEndpoint`, so a
party behaves the same over either transport.
"""

from __future__ import annotations

import hashlib
import json

from amalgam.fusion.teacher import GeneratorObjective
from amalgam.party.handler import PartyHandler
from amalgam.protocol._generated import party_pb2
from amalgam.protocol.codec import (
    CodecError,
    detections_to_proto,
    objective_from_proto,
    party_info_to_proto,
    synthesis_params_from_proto,
    tensor_from_proto,
    tensor_to_proto,
    tensors_to_proto,
)


class PartyEndpoint:
    """Every RPC of the PartyService for an already authenticated and admitted ``caller``.

    :meth:`answer` returns the response message (for ExportWeights, the list of chunks) or
    raises the handler's :class:`amalgam.protocol.errors.PartyError`.
    """

    def __init__(self, handler: PartyHandler, max_elements: int) -> None:
        self.handler = handler
        self.max_elements = max_elements

    def answer(self, method: str, request, caller: str):
        return getattr(self, "_" + method)(request, caller)

    def _decoded(self, message, field: str, method: str, caller: str, request_id: str):
        try:
            return tensor_from_proto(message, field, max_elements=self.max_elements)
        except CodecError as error:
            self.handler.reject_malformed(method, caller, request_id, error.field, error.problem)

    def _Describe(self, request, caller):  # noqa: N802
        info = self.handler.describe(caller, request.request_id)
        return party_pb2.DescribeResponse(
            request_id=request.request_id, info=party_info_to_proto(info)
        )

    def _Predict(self, request, caller):  # noqa: N802
        x = self._decoded(request.inputs, "inputs", "Predict", caller, request.request_id)
        if self.handler.task == "detection":
            rows = self.handler.detect(x, caller, request.request_id)
            return party_pb2.PredictResponse(
                request_id=request.request_id,
                output_form="detections",
                detections=detections_to_proto(*rows),
            )
        out = self.handler.predict(x, caller, request.request_id)
        return party_pb2.PredictResponse(
            request_id=request.request_id,
            outputs=tensor_to_proto(out),
            output_form=self.handler.policy.predict.output,
        )

    def _BatchNormFeedback(self, request, caller):  # noqa: N802
        method = "BatchNormFeedback"
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
        return party_pb2.BatchNormFeedbackResponse(
            request_id=request.request_id,
            logits=tensor_to_proto(feedback.logits),
            losses=feedback.losses,
            input_grad=tensor_to_proto(feedback.input_grad),
        )

    def _Synthesize(self, request, caller):  # noqa: N802
        result = self.handler.synthesize(
            caller,
            request.session,
            synthesis_params_from_proto(request.params),
            request.steps,
            request.samples,
            request.half,
            request.request_id,
        )
        return party_pb2.SynthesizeResponse(
            request_id=request.request_id,
            samples=tensor_to_proto(result.samples),
            losses=result.losses,
            steps_done=result.steps_done,
        )

    def _layers(self, request, caller, gram: bool):
        method = "Gram" if gram else "Activations"
        x = self._decoded(request.inputs, "inputs", method, caller, request.request_id)
        out = self.handler.layers(
            x, list(request.layers), caller, gram=gram, half=request.half,
            request_id=request.request_id,
        )  # fmt: skip
        return party_pb2.LayersResponse(
            request_id=request.request_id, outputs=tensors_to_proto(out)
        )

    def _Activations(self, request, caller):  # noqa: N802
        return self._layers(request, caller, gram=False)

    def _Gram(self, request, caller):  # noqa: N802
        return self._layers(request, caller, gram=True)

    def _ExportWeights(self, request, caller):  # noqa: N802
        """The chunks of the safetensors payload, the first with the architecture, the total
        length and the SHA-256 (at most the policy's ``chunk_bytes`` each)."""
        arch, payload = self.handler.export_weights(caller, request.request_id)
        limit = self.handler.policy.weights.chunk_bytes
        chunk = min(request.chunk_bytes, limit) if request.chunk_bytes > 0 else limit
        chunks = []
        for start in range(0, max(len(payload), 1), chunk):
            message = party_pb2.WeightsChunk(
                request_id=request.request_id, data=payload[start : start + chunk]
            )
            if start == 0:
                message.architecture = json.dumps(arch)
                message.total_bytes = len(payload)
                message.sha256 = hashlib.sha256(payload).hexdigest()
            chunks.append(message)
        return chunks
