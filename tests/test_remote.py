"""RemoteTeacher's client behaviour: retries on UNAVAILABLE and, for a slow party, on
DEADLINE_EXCEEDED; micro-batching; packing many calls into one message."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from parties import INPUT_SHAPE, tiny_handler

from amalgam.party.audit import read_records
from amalgam.party.service import create_server
from amalgam.protocol._generated import party_pb2_grpc
from amalgam.protocol.errors import PolicyDenied
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.remote import PartyUnavailable, RemoteTeacher


class UnavailableFirst(grpc.ServerInterceptor):
    """Answers the first ``count`` calls with UNAVAILABLE, then lets calls through."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.refused = 0

    def intercept_service(self, continuation, handler_call_details):
        if self.left > 0:
            self.left -= 1
            self.refused += 1

            def refuse(request, context):
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

            return grpc.unary_unary_rpc_method_handler(refuse)
        return continuation(handler_call_details)


def _serve(handler, interceptor=None):
    server = create_server(
        handler, "127.0.0.1:0", interceptors=[interceptor] if interceptor else []
    )
    server.start()
    return server, f"127.0.0.1:{server.port}"


def test_unavailable_is_retried_until_the_party_answers(tmp_path):
    interceptor = UnavailableFirst(3)  # three failures, then answers: within the 5 attempts
    server, address = _serve(tiny_handler(tmp_path), interceptor)
    try:
        with RemoteTeacher("acme", address, backoff_s=0.01) as teacher:  # default retries
            out = teacher.predict(torch.rand(4, *INPUT_SHAPE))
        assert out.shape == (4, 3)
        assert interceptor.refused == 3
        assert teacher.stats.calls == 2  # Describe and Predict, each answered once
    finally:
        server.stop(None)


def test_retries_give_up_after_five_attempts_with_the_party_named(tmp_path):
    interceptor = UnavailableFirst(10)
    server, address = _serve(tiny_handler(tmp_path), interceptor)
    try:
        teacher = RemoteTeacher("acme", address, backoff_s=0.01)
        with pytest.raises(PartyUnavailable, match=f"party acme at {address} is unreachable"):
            teacher.info  # noqa: B018
        assert interceptor.refused == 5
    finally:
        server.stop(None)


def test_a_refusal_is_not_retried(tmp_path):
    handler = tiny_handler(tmp_path, Policy())
    server, address = _serve(handler)
    try:
        with RemoteTeacher("acme", address, retries=3, backoff_s=0.01) as teacher:
            with pytest.raises(PolicyDenied):
                teacher.predict(torch.rand(2, *INPUT_SHAPE))
        decisions = [r["decision"] for r in read_records(handler.audit.path)]
        assert decisions == ["granted", "denied"]  # Describe, then one Predict
    finally:
        server.stop(None)


def test_batches_are_split_under_the_message_limit(tmp_path):
    handler = tiny_handler(tmp_path)  # max_batch 16
    server, address = _serve(handler)
    try:
        # 1 MiB limit -> at most 512 KiB of inputs per call: 2048 samples of 256 bytes; the
        # party's max_batch (16) is the tighter bound here, so check both bounds directly
        with RemoteTeacher("acme", address, max_message_mb=1) as teacher:
            big = torch.rand(4096, *INPUT_SHAPE)
            assert teacher.chunk_size(big) == 16
            wide = torch.rand(2, 1, 256, 256)  # 256 KiB a sample -> 2 per call
            assert teacher.chunk_size(wide) == 2
            out = teacher.predict(big[:40])
        assert out.shape == (40, 3)
        samples = [
            r["samples"] for r in read_records(handler.audit.path) if r["method"] == "Predict"
        ]
        assert samples == [16, 16, 8]
    finally:
        server.stop(None)


class PackingStub:
    """A stub that carries several calls in one message (as Flower's does), over a real gRPC
    stub; records the requests of each message."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = party_pb2_grpc.PartyServiceStub(self.channel)
        self.messages: list[list] = []

    def __getattr__(self, method: str):
        return getattr(self.stub, method)

    def call_many(self, method, requests, timeout=None, metadata=None):
        self.messages.append(list(requests))
        rpc = getattr(self.stub, method)
        return [rpc(request, timeout=timeout, metadata=metadata) for request in requests]


def test_a_packing_transport_carries_many_calls_per_message_within_the_limit(tmp_path):
    handler = tiny_handler(tmp_path, Policy(predict=PredictPolicy(output="probs"), max_batch=512))
    server, address = _serve(handler)
    stub = PackingStub(address)
    try:
        x = torch.rand(6000, *INPUT_SHAPE)  # 256 bytes a sample: 12 calls of at most 512
        with RemoteTeacher("acme", address) as direct:
            expected = direct.predict(x)
        with RemoteTeacher("acme", "packed", stub=stub, max_message_mb=1) as packed:
            out = packed.predict(x)
    finally:
        stub.channel.close()
        server.stop(None)
    torch.testing.assert_close(out, expected)  # the same answers, in order
    assert [len(message) for message in stub.messages] == [7, 5]  # 7 x 131 KB fit in 1 MiB
    assert all(sum(r.ByteSize() for r in m) <= 1 << 20 for m in stub.messages)
    # Describe went alone; each Predict is still its own call to the agent
    assert (packed.stats.calls, packed.stats.messages) == (1 + 12, 1 + 2)
    assert (direct.stats.calls, direct.stats.messages) == (1 + 12, 1 + 12)


def test_a_slow_party_is_asked_again_with_a_longer_deadline_and_charged_once(tmp_path):
    handler = tiny_handler(tmp_path)
    answer, calls = handler.predict, []

    def slow_first(x, caller, request_id=""):
        calls.append(request_id)
        if len(calls) == 1:
            time.sleep(1.0)  # simulated slowness: past the 0.4 s deadline, within 0.8 s more
        return answer(x, caller, request_id)

    handler.predict = slow_first
    server, address = _serve(handler)
    try:
        with RemoteTeacher("acme", address, deadline_s=0.4) as teacher:
            out = teacher.predict(torch.rand(4, *INPUT_SHAPE))
    finally:
        server.stop(None)
    assert out.shape == (4, 3)
    predicts = [r for r in read_records(handler.audit.path) if r["method"] == "Predict"]
    # the retry waited for the first answer instead of being answered, and charged, again
    assert [r["decision"] for r in predicts] == ["granted"] + ["replayed"] * (len(predicts) - 1)
    assert len(calls) == 1 and sum(r["charged"] for r in predicts) == 4
