"""Authorization per capability and per caller identity, over a real gRPC party: every cell of
the role x RPC matrix answers as the policy says; a policy that names an unknown or ungranted
capability, or serves TLS without naming its callers, never starts (fail closed)."""

from __future__ import annotations

import itertools

import grpc
import pytest
import torch
from parties import INPUT_SHAPE, tiny_handler
from pydantic import ValidationError

from amalgam.party.audit import read_records
from amalgam.party.config import PartyConfig
from amalgam.protocol import CALLER_METADATA_KEY
from amalgam.protocol._generated import party_pb2, party_pb2_grpc
from amalgam.protocol.codec import tensor_to_proto
from amalgam.protocol.schemas import LayersPolicy, Policy, PredictPolicy, WeightsPolicy
from amalgam.server.simulation.parties import serving

pytestmark = pytest.mark.integration

CALLERS = {
    "coordinator": ["predict", "activations", "gram", "weights"],
    "analyst": ["gram"],
    "auditor": [],  # may only Describe
}
ROLES = [*CALLERS, "stranger"]  # the stranger is not listed at all
POLICY = Policy(
    predict=PredictPolicy(output="probs"),
    activations=LayersPolicy(layers=["*"]),
    gram=LayersPolicy(layers=["*"]),
    weights=WeightsPolicy(),
    max_batch=16,
    sample_budget=None,
    callers=CALLERS,
)  # bn_feedback and synthesize are not granted to anyone
RPCS = {  # name: (capability, request)
    "Describe": (None, lambda: party_pb2.DescribeRequest()),
    "Predict": ("predict", lambda: party_pb2.PredictRequest(inputs=_x())),
    "BatchNormFeedback": ("bn_feedback", lambda: party_pb2.BatchNormFeedbackRequest(inputs=_x())),
    "Synthesize": ("synthesize", lambda: party_pb2.SynthesizeRequest(steps=1, samples=1)),
    "Activations": ("activations", lambda: party_pb2.LayersRequest(inputs=_x(), layers=["body.1"])),
    "Gram": ("gram", lambda: party_pb2.LayersRequest(inputs=_x(), layers=["body.1"])),
    "ExportWeights": ("weights", lambda: party_pb2.ExportWeightsRequest()),
}


def _x():
    return tensor_to_proto(torch.rand(4, *INPUT_SHAPE))


def _expected(role: str, capability: str | None) -> bool:
    if role not in CALLERS:
        return False
    return capability is None or capability in CALLERS[role]


@pytest.fixture(scope="module")
def party(tmp_path_factory):
    handler = tiny_handler(tmp_path_factory.mktemp("authz"), POLICY)
    with serving(handler) as address, grpc.insecure_channel(address) as channel:
        yield handler, party_pb2_grpc.PartyServiceStub(channel)


def _call(stub, rpc: str, role: str):
    request = RPCS[rpc][1]()
    response = getattr(stub, rpc)(request, timeout=10, metadata=((CALLER_METADATA_KEY, role),))
    return list(response) if rpc == "ExportWeights" else response


@pytest.mark.parametrize(("role", "rpc"), list(itertools.product(ROLES, RPCS)))
def test_every_cell_of_the_matrix_is_as_the_policy_says(party, role, rpc):
    handler, stub = party
    before = len(read_records(handler.audit.path))
    if _expected(role, RPCS[rpc][0]):
        assert _call(stub, rpc, role)
        decision = "granted"
    else:
        with pytest.raises(grpc.RpcError) as raised:
            _call(stub, rpc, role)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value.details()
        assert role in raised.value.details() or "not granted" in raised.value.details()
        decision = "denied"
    (record,) = read_records(handler.audit.path)[before:]
    assert (record["caller"], record["method"], record["decision"]) == (role, rpc, decision)


def test_the_matrix_covers_every_rpc_of_the_service():
    service = party_pb2.DESCRIPTOR.services_by_name["PartyService"]
    assert set(RPCS) == {method.name for method in service.methods}


@pytest.mark.parametrize(
    ("callers", "message"),
    [
        ({"coordinator": ["predcit"]}, "callers.coordinator: unknown capability 'predcit'"),
        ({"coordinator": ["bn_feedback"]}, "callers.coordinator: bn_feedback is not granted"),
    ],
)
def test_a_policy_naming_what_it_does_not_grant_is_refused(callers, message):
    with pytest.raises(ValidationError, match=message):
        Policy(predict=PredictPolicy(), callers=callers)


def test_tls_without_named_callers_fails_closed():
    config = {
        "name": "p",
        "model": {"arch": "mlp", "weights": "w.safetensors"},
        "class_names": ["a"],
        "input_shape": [1, 8, 8],
        "policy": {"predict": {}},
        "tls": {"cert": "p.pem", "key": "p.key", "ca": "ca.pem"},
    }
    with pytest.raises(ValidationError, match="policy.callers: with tls, list the identities"):
        PartyConfig.model_validate(config)
    config["policy"]["callers"] = {"coordinator": ["predict"]}
    assert PartyConfig.model_validate(config).policy.allows("coordinator", "predict")


def test_without_callers_every_caller_may_use_what_is_granted():
    policy = Policy(predict=PredictPolicy())
    assert policy.allows("anyone", "predict") and policy.allows("anyone", None)
    assert not policy.allows("anyone", "gram")  # not granted: denied to everyone
