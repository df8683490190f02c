"""A real Flower deployment on loopback: a SuperLink with TLS and SuperNode authentication, two
registered SuperNodes each bridging over mutual TLS to its party's agent, and an Amalgam
composition job submitted with ``flwr run``. An unregistered SuperNode is refused. Every
process is stopped by pid at the end (LoopbackFederation)."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
import torch
import yaml
from parties import tiny_handler

from fusion.data import DIGIT_NAMES, load_source
from fusion.models import create_model
from fusion.train import fit
from party.audit import read_records
from party.service import create_server
from protocol.schemas import Policy, PredictPolicy, TlsFiles
from protocol.tls import server_credentials, write_federation
from server.job import connect, load_job, run_job
from server.loopback import LoopbackFederation

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
            server = create_server(handler, "127.0.0.1:0", credentials=server_credentials(tls))
            server.start()
            stack.callback(server.stop, None)
            handlers.append(handler)
            addresses.append(f"127.0.0.1:{server.port}")
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
        for party, address in zip(PARTIES, addresses):
            federation.register(f"{party}-node")
            federation.start_supernode(f"{party}-node", address)
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
