"""Amalgam on Flower's simulation engine (offline, Ray): the same job over Flower gives the same
student as over direct gRPC, every call still passes the party's own agent (policy, budget,
audit), a denial comes back as the party's error, and a node whose agent is down is left out
as min_parties allows."""

from __future__ import annotations

import json
import os
import socket
from contextlib import ExitStack

import pytest
import torch
import yaml
from parties import tiny_handler

from amalgam.fusion.data import DIGIT_NAMES, load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.train import fit
from amalgam.party.audit import read_records
from amalgam.protocol._generated import party_pb2
from amalgam.protocol.errors import PolicyDenied
from amalgam.protocol.rpcs import REQUESTS, RESPONSES, STREAMING
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.simulation.flower import simulate
from amalgam.server.simulation.parties import serving

pytestmark = pytest.mark.integration

SHARDS = ["digits:private-0", "digits:private-1", "digits:private-2"]
POLICY = Policy(predict=PredictPolicy(output="probs"), max_batch=128)


@pytest.fixture(scope="module")
def models():
    trained = []
    for k, shard in enumerate(SHARDS):
        data = load_source(shard)
        torch.manual_seed(k)
        model = create_model("mlp", in_shape=(1, 8, 8), num_classes=10, hidden=32)
        fit(model, data.x, data.y, epochs=30, batch_size=32, seed=k, progress=False)
        trained.append(model.eval())
    return trained


def _handlers(folder, models, policies=None):
    policies = policies or [POLICY] * len(models)
    return [
        tiny_handler(folder / f"org{k}", p, name=f"org{k}", classes=DIGIT_NAMES, model=m)
        for k, (m, p) in enumerate(zip(models, policies))
    ]


def _spec(folder, addresses, **overrides):
    job = {
        "name": "flower",
        "parties": [{"name": f"org{k}", "address": a} for k, a in enumerate(addresses)],
        "method": {"name": "composition"},
        "student": {"arch": "small_cnn", "epochs": 5, "batch_size": 32},
        "data": {"unlabeled": "digits:public", "test": "digits:test"},
        "output_dir": str(folder / "runs"),
        "baselines": False,
        **overrides,
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return load_job(folder / "job.yaml")


def test_the_rpc_table_matches_the_service():
    service = party_pb2.DESCRIPTOR.services_by_name["PartyService"]
    for method in service.methods:
        assert REQUESTS[method.name].DESCRIPTOR == method.input_type
        assert RESPONSES[method.name].DESCRIPTOR == method.output_type
        assert (method.name in STREAMING) == method.server_streaming
    assert len(REQUESTS) == len(service.methods)


def test_a_job_over_flower_equals_the_job_over_grpc(models, tmp_path):
    handlers = _handlers(tmp_path, models)
    with ExitStack() as stack:
        addresses = [stack.enter_context(serving(h)) for h in handlers]
        spec = _spec(tmp_path, addresses)
        direct = run_job(
            spec, connect(spec, log=lambda m: None), progress=False, log=lambda m: None
        )
        marks = [len(read_records(h.audit.path)) for h in handlers]
        pythonpath = os.environ.get("PYTHONPATH")
        over_flower, teachers = simulate(spec, addresses)
    assert os.environ.get("PYTHONPATH") == pythonpath  # Ray's workers' setting did not leak
    results = {
        name: json.loads((run / "metrics.json").read_text())["results"]
        for name, run in {"grpc": direct, "flower": over_flower}.items()
    }
    assert results["flower"] == results["grpc"]
    assert results["flower"]["student"] > 0.5  # it learned (chance: 0.1)
    for handler, mark, teacher in zip(handlers, marks, teachers):
        records = read_records(handler.audit.path)[mark:]  # the Flower run's calls
        granted = [r for r in records if r["decision"] == "granted"]
        # every call reached the agent, and the Describe that found which node serves it
        assert len(granted) == teacher.stats.calls + 1
        assert {r["caller"] for r in granted} == {"coordinator"}
        assert sum(r["samples"] for r in granted if r["method"] == "Predict") == 854
        # the unlabeled set (314) and the test set (540) in chunks of at most 128: each set's
        # chunks travelled as separate calls in one message; the Describe that found the
        # party's node also gave its teacher the party's description
        predicts = [r["samples"] for r in granted if r["method"] == "Predict"]
        assert predicts == [128, 128, 58, 128, 128, 128, 128, 28]
        assert (teacher.stats.calls, teacher.stats.messages) == (8, 2)


def test_a_denial_comes_back_through_flower_as_the_partys_error(models, tmp_path):
    policies = [POLICY, Policy(max_batch=128), POLICY]  # org1 grants nothing
    handlers = _handlers(tmp_path, models, policies)
    with ExitStack() as stack:
        addresses = [stack.enter_context(serving(h)) for h in handlers]
        with pytest.raises(PolicyDenied, match="party org1: Predict is not granted"):
            simulate(_spec(tmp_path, addresses), addresses)
    assert read_records(handlers[1].audit.path)[-1]["decision"] == "denied"


def _closed_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_a_node_whose_agent_is_down_is_left_out_as_min_parties_allows(models, tmp_path):
    handlers = _handlers(tmp_path, models[:2])
    with ExitStack() as stack:
        addresses = [stack.enter_context(serving(h)) for h in handlers] + [_closed_address()]
        spec = _spec(tmp_path, addresses, min_parties=2, deadline_s=5)
        run_dir, teachers = simulate(spec, addresses)
    assert [t.name for t in teachers] == ["org0", "org1"]
    assert (
        "DEGRADED: party org2 was not reached at the start" in (run_dir / "report.md").read_text()
    )


def test_a_ray_start_that_times_out_is_tried_again_and_other_failures_are_not(monkeypatch, capsys):
    import ray

    from amalgam.server.simulation import flower

    failures = [RuntimeError("Timed out waiting for file gcs_server_port"),
                Exception("The current node timed out during startup.")]  # fmt: skip
    started: list[dict] = []

    def init(**options):
        if failures:
            raise failures.pop(0)
        started.append(options)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    flower.start_ray()
    assert len(started) == 1 and started[0]["include_dashboard"] is False
    assert capsys.readouterr().err.count("Ray did not start in time") == 2
    failures[:] = [RuntimeError("Timed out")] * flower.RAY_START_ATTEMPTS  # every attempt
    with pytest.raises(RuntimeError, match="Timed out"):
        flower.start_ray()
    failures[:] = [ValueError("bad option")]  # not a timeout: raised at once
    with pytest.raises(ValueError, match="bad option"):
        flower.start_ray()
    assert failures == []
