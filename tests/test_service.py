"""The party's gRPC face: malformed requests get INVALID_ARGUMENT naming the field and the
server keeps serving; the standard health service answers; SIGTERM stops a party cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from parties import INPUT_SHAPE, serving, tiny_handler
from safetensors.torch import save_file

from fusion.models import create_model
from party.audit import read_records
from protocol._generated import party_pb2, party_pb2_grpc
from protocol.codec import tensor_to_proto


@pytest.fixture
def party(tmp_path):
    handler = tiny_handler(tmp_path)
    with serving(handler) as address, grpc.insecure_channel(address) as channel:
        yield handler, party_pb2_grpc.PartyServiceStub(channel), channel


def _predict(stub, tensor):
    return stub.Predict(party_pb2.PredictRequest(request_id="r1", inputs=tensor), timeout=10)


def _good():
    return tensor_to_proto(torch.rand(2, *INPUT_SHAPE))


@pytest.mark.parametrize(
    ("tensor", "field"),
    [
        (party_pb2.Tensor(dtype="complex64", shape=[1, 1, 8, 8], data=b"\0" * 512), "inputs.dtype"),
        (party_pb2.Tensor(dtype="float32", shape=[2, 1, 8, 8], data=b"\0" * 7), "inputs.data"),
        (tensor_to_proto(torch.rand(17, *INPUT_SHAPE)), "inputs.shape"),  # over max_batch 16
        (tensor_to_proto(torch.rand(2, 3, 8, 8)), "inputs.shape"),
        (tensor_to_proto(torch.full((2, *INPUT_SHAPE), float("nan"))), "inputs.data"),
    ],
    ids=["unknown-dtype", "short-data", "over-size-batch", "wrong-shape", "nan"],
)
def test_malformed_request_is_invalid_argument_and_server_keeps_serving(party, tensor, field):
    handler, stub, _ = party
    with pytest.raises(grpc.RpcError) as raised:
        _predict(stub, tensor)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(field)
    assert read_records(handler.audit.path)[-1]["decision"] == "invalid"
    reply = _predict(stub, _good())  # still serving
    assert list(reply.outputs.shape) == [2, 3]
    assert reply.request_id == "r1"


def test_health_service_reports_serving(party):
    _, _, channel = party
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "amalgam.party.v1.PartyService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_party_serve_stops_gracefully_on_sigterm(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", in_shape=INPUT_SHAPE, num_classes=2, hidden=8)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    config = {
        "name": "solo",
        "model": {
            "arch": "mlp",
            "kwargs": {"in_shape": [1, 8, 8], "num_classes": 2, "hidden": 8},
            "weights": "w.safetensors",
        },
        "class_names": ["a", "b"],
        "input_shape": [1, 8, 8],
        "policy": {"predict": {"output": "label"}},
    }
    (tmp_path / "party.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "party",
            "serve",
            "--config",
            str(tmp_path / "party.yaml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()  # blocks until the party has bound its port
        assert line.startswith("party solo serving on 127.0.0.1:")
        address = line.split()[-1]
        with grpc.insecure_channel(address) as channel:
            stub = party_pb2_grpc.PartyServiceStub(channel)
            reply = _predict(stub, tensor_to_proto(torch.rand(3, *INPUT_SHAPE)))
        assert reply.output_form == "label"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "party solo stopped" in process.stderr.read()
    finally:
        process.kill()
    records = read_records(tmp_path / "audit.jsonl")
    assert [r["decision"] for r in records] == ["granted"]
