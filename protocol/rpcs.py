"""The PartyService's RPCs by name, with their request and response messages, for transports
that carry the serialized messages themselves (the Flower bridge)."""

from __future__ import annotations

from amalgam.protocol._generated import party_pb2

SERVICE_NAME = "amalgam.party.v1.PartyService"
REQUESTS = {
    "Describe": party_pb2.DescribeRequest,
    "Predict": party_pb2.PredictRequest,
    "BatchNormFeedback": party_pb2.BatchNormFeedbackRequest,
    "Synthesize": party_pb2.SynthesizeRequest,
    "Activations": party_pb2.LayersRequest,
    "Gram": party_pb2.LayersRequest,
    "ExportWeights": party_pb2.ExportWeightsRequest,
}
RESPONSES = {  # ExportWeights answers with a stream of WeightsChunk
    "Describe": party_pb2.DescribeResponse,
    "Predict": party_pb2.PredictResponse,
    "BatchNormFeedback": party_pb2.BatchNormFeedbackResponse,
    "Synthesize": party_pb2.SynthesizeResponse,
    "Activations": party_pb2.LayersResponse,
    "Gram": party_pb2.LayersResponse,
    "ExportWeights": party_pb2.WeightsChunk,
}
STREAMING = {"ExportWeights"}


def query_type(method: str) -> str:
    """The Flower message type that carries ``method`` (``query.predict``, ...)."""
    return f"query.{method.lower()}"
