"""The party's gRPC face: malformed requests get INVALID_ARGUMENT naming the field and the
server keeps serving; the standard health service answers; SIGTERM stops a party cleanly."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from parties import INPUT_SHAPE, tiny_handler
from safetensors.torch import save_file

from amalgam.fusion.models import create_model
from amalgam.party.audit import read_records
from amalgam.party.service import create_server
from amalgam.protocol._generated import party_pb2, party_pb2_grpc
from amalgam.protocol.codec import tensor_to_proto
from amalgam.server.simulation.demo import serve_command
from amalgam.server.simulation.parties import serving


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
        serve_command(tmp_path / "party.yaml", insecure=True),
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


def _blocking_predict(handler) -> tuple[threading.Event, threading.Event]:
    """Make ``handler.predict`` signal ``entered`` and wait for ``release``."""
    entered, release = threading.Event(), threading.Event()
    predict = handler.predict

    def slow_predict(*args, **kwargs):
        entered.set()
        assert release.wait(timeout=30)
        return predict(*args, **kwargs)

    handler.predict = slow_predict
    return entered, release


def _becomes_not_serving(health_servicer, timeout_s: float) -> bool:
    """Poll the health servicer until the party reports NOT_SERVING, or give up."""
    request = health_pb2.HealthCheckRequest(service="")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = health_servicer.Check(request, None).status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            return True
        time.sleep(0.01)
    return False


def test_stopping_turns_health_not_serving_and_lets_in_flight_calls_finish(tmp_path):
    handler = tiny_handler(tmp_path)
    entered, release = _blocking_predict(handler)
    server = create_server(handler, "127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{server.port}"
    replies: list = []
    with grpc.insecure_channel(address) as channel:
        stub = party_pb2_grpc.PartyServiceStub(channel)
        in_flight = threading.Thread(target=lambda: replies.append(_predict(stub, _good())))
        in_flight.start()
        assert entered.wait(timeout=30)
        stopper = threading.Thread(target=server.stop, args=(30,))
        stopper.start()
        assert _becomes_not_serving(server.health, timeout_s=10)
        release.set()
        in_flight.join(timeout=30)
        stopper.join(timeout=30)
    assert list(replies[0].outputs.shape) == [2, 3]  # the in-flight call finished


def test_calls_beyond_max_concurrent_rpcs_are_refused_not_queued(tmp_path):
    handler = tiny_handler(tmp_path)
    entered, release = _blocking_predict(handler)
    server = create_server(handler, "127.0.0.1:0", max_concurrent_rpcs=1)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = party_pb2_grpc.PartyServiceStub(channel)
            first = threading.Thread(target=lambda: _predict(stub, _good()))
            first.start()
            assert entered.wait(timeout=30)
            with pytest.raises(grpc.RpcError) as refused:
                _predict(stub, _good())
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            first.join(timeout=30)
    finally:
        release.set()
        server.stop(None)


def test_the_same_request_again_is_answered_again_but_charged_once(tmp_path):
    from amalgam.party.audit import read_records

    handler = tiny_handler(tmp_path)
    asked, other = _good(), _good()
    with serving(handler) as address, grpc.insecure_channel(address) as channel:
        stub = party_pb2_grpc.PartyServiceStub(channel)
        first, again = _predict(stub, asked), _predict(stub, asked)  # a retry, a resumed job
        _predict(stub, other)
    assert first == again
    assert handler.samples_used("anonymous") == 4  # two distinct requests of two samples
    decisions = [r["decision"] for r in read_records(handler.audit.path)]
    assert decisions == ["granted", "replayed", "granted"]


def test_an_agent_keeps_freed_memory_where_the_c_library_is_glibc():
    import platform

    from amalgam.party.allocator import keep_freed_memory

    assert keep_freed_memory(0) is False  # 0: the C library's own defaults
    assert keep_freed_memory(64) is (platform.libc_ver()[0] == "glibc")
