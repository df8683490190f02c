"""Fuzzing a live party: 10,000 generated requests, malformed in every field a caller controls
(dtype, shape, byte length, values, layer names, objective weights), sent over real gRPC.
The party must answer each one with OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED, never crash,
and stay healthy."""

from __future__ import annotations

import math
from collections import Counter

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parties import INPUT_SHAPE, tiny_handler

from amalgam.protocol._generated import party_pb2, party_pb2_grpc
from amalgam.protocol.codec import tensor_to_proto
from amalgam.protocol.schemas import BnFeedbackPolicy, LayersPolicy, Policy, PredictPolicy
from amalgam.server.simulation.parties import serving

pytestmark = pytest.mark.integration

EXAMPLES, REQUESTS_PER_EXAMPLE = 200, 50  # 10,000 requests
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
INT64 = st.integers(-(2**63), 2**63 - 1)

garbage_tensors = st.builds(
    party_pb2.Tensor,
    dtype=st.sampled_from(["float32", "float16", "float64", "int64", "uint8", "bool"])
    | st.text(max_size=10),
    shape=st.lists(st.one_of(st.integers(-2, 40), INT64), max_size=6),
    data=st.binary(max_size=1024),
)


@st.composite
def near_valid_tensors(draw):
    """Right dtype and matching bytes, but a batch, shape or values that may be off."""
    batch = draw(st.integers(0, 20))  # max_batch is 16
    shape = draw(st.sampled_from([(batch, *INPUT_SHAPE), (batch, 1, 8), (batch, 2, 8, 8)]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.rand(shape, generator=generator) * draw(st.sampled_from([1.0, 1e30, -1.0]))
    poison = draw(st.sampled_from([None, math.nan, math.inf, -math.inf]))
    if poison is not None and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = poison
    return tensor_to_proto(x)


tensors = st.one_of(garbage_tensors, near_valid_tensors())
layer_lists = st.lists(st.sampled_from(["body.1", "head", "penultimate"]) | st.text(max_size=12),
                       max_size=4)  # fmt: skip
objectives = st.builds(
    party_pb2.GeneratorObjective,
    bn=st.floats(width=32),
    instance_entropy=st.floats(width=32),
    batch_entropy=st.floats(width=32),
    adversarial=st.floats(width=32),
    adversary_logits=tensors,
    temperature=st.floats(width=32),
)
requests = st.one_of(
    st.tuples(st.just("Predict"), st.builds(party_pb2.PredictRequest, inputs=tensors)),
    st.tuples(
        st.just("BatchNormFeedback"),
        st.builds(
            party_pb2.BatchNormFeedbackRequest,
            inputs=tensors,
            grad_logits=tensors,
            objective=objectives,
            half=st.booleans(),
        ),
    ),
    st.tuples(
        st.sampled_from(["Activations", "Gram"]),
        st.builds(party_pb2.LayersRequest, inputs=tensors, layers=layer_lists, half=st.booleans()),
    ),
)


@pytest.fixture(scope="module")
def party(tmp_path_factory):
    policy = Policy(
        predict=PredictPolicy(output="probs"),
        bn_feedback=BnFeedbackPolicy(),
        activations=LayersPolicy(layers=["*"]),
        gram=LayersPolicy(layers=["*"]),
        max_batch=16,
        sample_budget=150,  # runs out part-way: RESOURCE_EXHAUSTED is among the answers
    )
    torch.set_num_threads(1)
    handler = tiny_handler(tmp_path_factory.mktemp("fuzz"), policy)
    with serving(handler) as address, grpc.insecure_channel(address) as channel:
        yield party_pb2_grpc.PartyServiceStub(channel), channel, Counter()


def test_ten_thousand_malformed_requests_get_only_the_expected_codes(party):
    stub, channel, codes = party

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(requests, min_size=REQUESTS_PER_EXAMPLE, max_size=REQUESTS_PER_EXAMPLE))
    def check(batch):
        for method, request in batch:
            try:
                getattr(stub, method)(request, timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            codes[code] += 1
            assert code in EXPECTED, (method, code)

    check()
    print(f"status codes of {sum(codes.values())} requests: {dict(codes)}")
    assert sum(codes.values()) >= 10_000
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 0
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0 and codes[grpc.StatusCode.OK] > 0
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
