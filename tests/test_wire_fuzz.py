"""An outsider's flood: a client process whose only knowledge of the agent is ``party.proto``
(stubs generated from it into a temporary folder, not the project's stubs or codec) sends
random and mutated request bytes to every RPC, as an admitted and as an unlisted caller. The
agent answers each with a code that says what was wrong, audits each, and stays healthy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from parties import tiny_handler

from amalgam.party.audit import read_records, verify_chain
from amalgam.protocol.schemas import (
    BnFeedbackPolicy,
    LayersPolicy,
    Policy,
    PredictPolicy,
    SynthesizePolicy,
    WeightsPolicy,
)
from amalgam.server.simulation.parties import serving

pytestmark = pytest.mark.integration

PROTO = Path(__file__).resolve().parent.parent / "protocol" / "party.proto"
CALLS = 20_000
ALLOWED = {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"}

CLIENT = r"""
import collections, json, random, struct, sys
import grpc
sys.path.insert(0, sys.argv[1])
import party_pb2

address, calls = sys.argv[2], int(sys.argv[3])
rng = random.Random(0)
service = party_pb2.DESCRIPTOR.services_by_name["PartyService"]

def tensor(shape, low=0.0, high=1.0):
    count = 1
    for d in shape:
        count *= d
    data = struct.pack(f"<{count}f", *(rng.uniform(low, high) for _ in range(count)))
    return party_pb2.Tensor(dtype="float32", shape=shape, data=data)

def examples():
    x = lambda: tensor([rng.randint(1, 4), 1, 8, 8])
    return {
        "Describe": party_pb2.DescribeRequest(request_id="d"),
        "Predict": party_pb2.PredictRequest(request_id="p", inputs=x()),
        "BatchNormFeedback": party_pb2.BatchNormFeedbackRequest(
            request_id="b", inputs=x(), objective=party_pb2.GeneratorObjective(bn=1.0)),
        "Synthesize": party_pb2.SynthesizeRequest(request_id="s", session="s", steps=1,
                                                  samples=2),
        "Activations": party_pb2.LayersRequest(request_id="a", inputs=x(), layers=["body.1"]),
        "Gram": party_pb2.LayersRequest(request_id="g", inputs=x(), layers=["penultimate"]),
        "ExportWeights": party_pb2.ExportWeightsRequest(request_id="w"),
    }

def mutate(data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        if op < 0.4 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op < 0.7:
            data.insert(rng.randint(0, len(data)), rng.randrange(256))
        elif data:
            del data[rng.randrange(len(data))]
    return bytes(data)

codes = collections.Counter()
with grpc.insecure_channel(address) as channel:
    for i in range(calls):
        method = rng.choice(list(service.methods_by_name))
        streaming = service.methods_by_name[method].server_streaming
        roll = rng.random()
        if roll < 0.25:
            payload = bytes(rng.randrange(256) for _ in range(rng.randint(0, 600)))
        else:
            payload = examples()[method].SerializeToString()
            payload = mutate(payload) if roll < 0.9 else payload
        caller = "coordinator" if rng.random() < 0.8 else "stranger"
        path = f"/{service.full_name}/{method}"
        try:
            if streaming:
                call = channel.unary_stream(path)
                list(call(payload, metadata=[("x-amalgam-caller", caller)], timeout=30))
            else:
                channel.unary_unary(path)(payload, metadata=[("x-amalgam-caller", caller)],
                                          timeout=30)
            codes["OK"] += 1
        except grpc.RpcError as error:
            codes[error.code().name] += 1
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def outsider_stubs(tmp_path_factory) -> Path:
    """``party_pb2`` generated from ``party.proto`` alone, in a folder of its own."""
    folder = tmp_path_factory.mktemp("outsider")
    generated = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}",
         f"--python_out={folder}", str(PROTO)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    return folder


def test_a_flood_of_random_and_mutated_bytes_is_answered_audited_and_survived(
    tmp_path, outsider_stubs
):
    torch.set_num_threads(1)
    policy = Policy(
        predict=PredictPolicy(output="probs"),
        bn_feedback=BnFeedbackPolicy(),
        synthesize=SynthesizePolicy(max_steps=2, max_samples=4),
        activations=LayersPolicy(layers=["*"]),
        gram=LayersPolicy(layers=["*"]),
        weights=WeightsPolicy(),
        max_batch=4,
        sample_budget=3000,  # runs out part-way: RESOURCE_EXHAUSTED is among the answers
        callers={"coordinator": ["predict", "bn_feedback", "synthesize", "activations",
                                 "gram", "weights"]},
    )  # fmt: skip
    handler = tiny_handler(tmp_path, policy)
    before = len(read_records(handler.audit.path))
    with serving(handler) as address:
        flood = subprocess.run(
            [sys.executable, "-c", CLIENT, str(outsider_stubs), address, str(CALLS)],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert flood.returncode == 0, flood.stderr[-2000:]
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    codes = json.loads(flood.stdout)
    print(f"status codes of {CALLS} calls: {codes}")
    assert sum(codes.values()) == CALLS
    assert set(codes) <= ALLOWED, codes
    assert {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"} <= set(codes)
    records = read_records(handler.audit.path)
    assert len(records) - before == CALLS  # every call, one line each
    assert verify_chain(records)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
