"""party/model_thread.py: every party's model runs on one thread of the process, with the
caller's intra-op thread count, whoever calls it (in process or over gRPC)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from amalgam.fusion.models import create_model
from amalgam.party.audit import AuditLog
from amalgam.party.handler import PartyHandler
from amalgam.party.local import LocalTeacher
from amalgam.party.model_thread import on_model_thread
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.remote import RemoteTeacher
from amalgam.server.simulation.parties import serving


def test_one_thread_for_every_caller():
    callers = [lambda: on_model_thread(threading.get_ident)] * 8
    with ThreadPoolExecutor(max_workers=4) as pool:
        idents = {future.result() for future in [pool.submit(c) for c in callers]}
    assert len(idents) == 1
    assert idents != {threading.get_ident()}  # not the caller's own thread


def test_errors_reach_the_caller_and_nested_calls_run_at_once():
    def fails():
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        on_model_thread(fails)
    inner = on_model_thread(lambda: on_model_thread(threading.get_ident))
    assert inner == on_model_thread(threading.get_ident)  # no deadlock, same thread


def test_follows_the_callers_thread_count():
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            assert on_model_thread(torch.get_num_threads) == threads
    finally:
        torch.set_num_threads(before)


def test_local_and_remote_calls_run_the_model_on_the_model_thread(tmp_path):
    model = create_model("mlp", in_shape=(1, 8, 8), num_classes=3).eval()
    seen = []
    model.register_forward_hook(lambda *_: seen.append(threading.get_ident()))
    policy = Policy(predict=PredictPolicy(output="probs"), sample_budget=None)
    handler = PartyHandler("p", model, ["a", "b", "c"], (1, 8, 8), policy,
                           AuditLog(tmp_path / "audit.jsonl"))  # fmt: skip
    seen.clear()  # the dry forward at start ran in this thread
    x = torch.rand(4, 1, 8, 8)
    local = LocalTeacher(handler).predict(x)
    with serving(handler) as address, RemoteTeacher("p", address) as remote:
        answered = remote.predict(x)
    torch.testing.assert_close(local, answered)
    assert set(seen) == {on_model_thread(threading.get_ident)} and len(seen) == 2
