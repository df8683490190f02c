"""A real Flower deployment on loopback: a SuperLink with TLS and SuperNode authentication, two
registered SuperNodes each bridging over mutual TLS to its party's agent, and an Amalgam
composition job submitted with ``flwr run``. An unregistered SuperNode is refused; a SuperNode
killed during a job leaves it to finish degraded. Every process is stopped by pid at the end
(LoopbackFederation)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack

import pytest
import torch
import yaml
from parties import tiny_handler

from amalgam.fusion.data import DIGIT_NAMES, load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.train import fit
from amalgam.party.audit import read_records
from amalgam.protocol.schemas import Policy, PredictPolicy, TlsFiles
from amalgam.protocol.tls import server_credentials, write_federation
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.simulation.loopback import LoopbackFederation
from amalgam.server.simulation.parties import serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTIES = ["org0", "org1"]


def _teacher(k: int):
    data = load_source(f"digits:private-{k}")
    torch.manual_seed(k)
    model = create_model("mlp", in_shape=(1, 8, 8), num_classes=10, hidden=32)
    fit(model, data.x, data.y, epochs=30, batch_size=32, seed=k, progress=False)
    return model.eval()


def test_a_job_runs_over_an_authenticated_flower_deployment(tmp_path):
    federation = LoopbackFederation(tmp_path)
    federation.certificates(PARTIES, ["coordinator"])
    certs = federation.certs
    handlers = []
    with ExitStack() as stack:
        addresses = []
        for k, party in enumerate(PARTIES):
            callers = {f"{party}-node": ["predict"], "coordinator": ["predict"]}
            policy = Policy(predict=PredictPolicy(), max_batch=1024, callers=callers)
            handler = tiny_handler(
                tmp_path / party, policy, name=party, classes=DIGIT_NAMES, model=_teacher(k)
            )
            tls = TlsFiles(cert=str(certs / f"{party}.pem"), key=str(certs / f"{party}.key"),
                           ca=str(certs / "ca.pem"))  # fmt: skip
            handlers.append(handler)
            addresses.append(stack.enter_context(serving(handler, server_credentials(tls))))
        job = {
            "name": "deployed",
            "parties": [{"name": p, "address": a} for p, a in zip(PARTIES, addresses)],
            "method": {"name": "composition"},
            "student": {"arch": "small_cnn", "epochs": 5, "batch_size": 32},
            "data": {"unlabeled": "digits:public", "test": "digits:test"},
            "output_dir": str(tmp_path / "runs"),
            "baselines": False,
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        stack.enter_context(federation)
        federation.start_superlink()
        nodes = []
        for party, address in zip(PARTIES, addresses):
            federation.register(f"{party}-node")
            nodes.append(federation.start_supernode(f"{party}-node", address))
        write_federation(certs, [], [], supernodes=["intruder-node"])  # nobody registered it
        intruder = federation.start_supernode("intruder-node", addresses[0], max_retries=1)
        assert intruder.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (federation.logs / "intruder-node.log").read_text()
        federation.wait_online(2)
        status = federation.run(tmp_path / "job.yaml")
        assert status["status"].startswith("finished:completed"), status
        # the same job over direct gRPC, as the coordinator identity, for comparison
        direct_spec = load_job(tmp_path / "job.yaml").model_copy(
            update={
                "tls": TlsFiles(
                    cert=str(certs / "coordinator.pem"),
                    key=str(certs / "coordinator.key"),
                    ca=str(certs / "ca.pem"),
                ),
                "output_dir": str(tmp_path / "direct"),
            }  # fmt: skip
        )
        marks = [len(read_records(h.audit.path)) for h in handlers]
        direct = run_job(direct_spec, connect(direct_spec, log=lambda m: None), progress=False,
                         log=lambda m: None)  # fmt: skip
        # a second job, during which org1's SuperNode is killed while it answers Predict
        job.update(name="degraded", min_parties=1, deadline_s=10)
        (tmp_path / "degraded.yaml").write_text(yaml.safe_dump(job))
        killer = threading.Thread(
            target=_kill_at_first_predict, args=(nodes[1], handlers[1].audit.path), daemon=True
        )
        killer.start()
        degraded_status = federation.run(tmp_path / "degraded.yaml")
        killer.join(timeout=5)
    assert nodes[1].returncode == -9  # it was killed during the job
    assert degraded_status["status"].startswith("finished:completed"), degraded_status
    (degraded,) = (tmp_path / "runs").glob("degraded-*/")
    assert "teacher:org0" in json.loads((degraded / "metrics.json").read_text())["results"]
    assert "teacher:org1" not in json.loads((degraded / "metrics.json").read_text())["results"]
    assert "DEGRADED: party org1 was dropped" in (degraded / "report.md").read_text()
    (deployed,) = (tmp_path / "runs").glob("deployed-*/metrics.json")
    results = json.loads(deployed.read_text())["results"]
    reference = json.loads((direct / "metrics.json").read_text())["results"]
    for row in ("teacher:org0", "teacher:org1", "ensemble"):  # the same answers, bit for bit
        assert results[row] == reference[row]
    assert results["student"] > 0.5
    for party, handler, mark in zip(PARTIES, handlers, marks):
        flower_calls = read_records(handler.audit.path)[:mark]
        assert {r["caller"] for r in flower_calls} == {f"{party}-node"}  # the bridge's identity
        assert sum(r["samples"] for r in flower_calls if r["method"] == "Predict") == 854


def _kill_at_first_predict(node, audit_path, timeout_s: float = 300.0) -> None:
    """SIGKILL ``node`` as soon as its agent audits a new Predict call: the job has found the
    party and is collecting its predictions."""
    seen = len(read_records(audit_path))

    def predicted() -> bool:
        return any(r["method"] == "Predict" for r in read_records(audit_path)[seen:])

    deadline = time.monotonic() + timeout_s
    while not predicted() and time.monotonic() < deadline:
        time.sleep(0.05)
    node.kill()
