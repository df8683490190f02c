"""End to end on loopback: three party servers, a composition job over gRPC on the digits."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from amalgam.fusion.data import load_source
from amalgam.fusion.models import create_model
from amalgam.party.audit import read_records, verify_chain
from amalgam.party.config import load_party_config
from amalgam.party.handler import PartyHandler
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.simulation.demo_parties import DEMO_PARTIES, demo_job, demo_party_config
from amalgam.server.simulation.parties import serving

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def marketplace(tmp_path_factory):
    """Three demo parties served on port 0; yields {name: (address, audit path)}."""
    folder = tmp_path_factory.mktemp("marketplace")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AMALGAM_CACHE", str(folder / "cache"))
        handlers = [
            PartyHandler.from_config(load_party_config(demo_party_config(p, folder)))
            for p in DEMO_PARTIES
        ]
    with serving(handlers[0]) as a0, serving(handlers[1]) as a1, serving(handlers[2]) as a2:
        yield {h.name: (address, h.audit.path) for h, address in zip(handlers, (a0, a1, a2))}


@pytest.fixture(scope="module")
def finished_job(marketplace, tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    job = demo_job(
        {name: address for name, (address, _) in marketplace.items()},
        output_dir=str(folder / "runs"),
    )
    job["student"]["epochs"] = 20
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    spec = load_job(folder / "job.yaml")
    teachers = connect(spec)
    run_dir = run_job(spec, teachers, progress=False, log=lambda message: None)
    return run_dir, teachers


def test_composed_student_beats_every_teacher(finished_job):
    run_dir, _ = finished_job
    results = json.loads((run_dir / "metrics.json").read_text())["results"]
    assert results["student"] > results["best_teacher"] + 0.2  # each teacher knows 5-6 classes
    assert results["student"] >= 0.9
    assert results["student"] >= results["ensemble"] - 0.03
    assert results["student"] > results["vanilla_kd"]
    assert results["best_teacher"] < 0.65


def test_every_call_is_in_the_parties_audit_logs(finished_job, marketplace):
    run_dir, teachers = finished_job
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for teacher in teachers:
        records = read_records(marketplace[teacher.name][1])
        assert verify_chain(records)
        granted = [r for r in records if r["decision"] == "granted"]
        assert len(granted) == teacher.stats.calls == metrics["parties"][teacher.name]["calls"]
        predicted = sum(r["samples"] for r in granted if r["method"] == "Predict")
        assert predicted == teacher.stats.samples
        assert all(r["caller"] == "coordinator" for r in granted)


def test_run_folder_holds_a_loadable_student(finished_job):
    run_dir, _ = finished_job
    spec = json.loads((run_dir / "student.json").read_text())
    student = create_model(spec["arch"], **spec["kwargs"])
    student.load_state_dict(load_file(str(run_dir / "student.safetensors")))
    student.eval()
    test = load_source("digits:test")
    union = spec["class_names"]
    y = torch.tensor([union.index(test.class_names[i]) for i in test.y])
    with torch.no_grad():
        accuracy = (student(test.x).argmax(dim=1) == y).float().mean().item()
    results = json.loads((run_dir / "metrics.json").read_text())["results"]
    assert accuracy == pytest.approx(results["student"], abs=1e-6)
    assert "| student | fused student |" in (run_dir / "report.md").read_text()
    assert (run_dir / "accuracy.png").read_bytes().startswith(b"\x89PNG")
