"""End to end on loopback: three party servers, a composition job over gRPC on the digits."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from amalgam.fusion.data import load_source
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
    run_dir = run_job(spec, teachers, progress=False, log=lambda message: None, exports=("onnx",))
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
    import amalgam

    run_dir, _ = finished_job
    student, card = amalgam.load_student(run_dir)
    assert card["input_shape"] == [1, 8, 8] and card["input_range"] == [0.0, 1.0]
    assert card["job"]["method"] == "composition" and card["job"]["id"] == run_dir.name
    test = load_source("digits:test")
    union = card["class_names"]
    y = torch.tensor([union.index(test.class_names[i]) for i in test.y])
    with torch.no_grad():
        accuracy = (student(test.x).argmax(dim=1) == y).float().mean().item()
    results = json.loads((run_dir / "metrics.json").read_text())["results"]
    assert accuracy == pytest.approx(results["student"], abs=1e-6)
    assert card["metrics"]["student"] == results["student"]


def test_the_exported_program_and_onnx_model_answer_like_the_student(finished_job):
    import onnxruntime

    import amalgam

    run_dir, _ = finished_job
    student, card = amalgam.load_student(run_dir)
    assert card["files"] == {"weights": "student.safetensors", "program": "student.pt2",
                             "onnx": "student.onnx"}  # fmt: skip
    x = load_source("digits:test").x[:37]  # a batch size the export never saw
    with torch.no_grad():
        expected = student(x)
        program = torch.export.load(str(run_dir / "student.pt2")).module()(x)
    session = onnxruntime.InferenceSession(str(run_dir / "student.onnx"))
    (onnx,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(program, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(onnx), expected, atol=1e-4, rtol=1e-4)


def test_amalgam_predict_names_the_class_of_image_files(finished_job, tmp_path, capsys):
    from torchvision.io import write_png

    from amalgam.server.cli import main

    run_dir, _ = finished_job
    test = load_source("digits:test")
    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"digit-{k}.png"))
        write_png((test.x[k] * 255).round().to(torch.uint8), paths[-1])  # (1, 8, 8)
    assert main(["predict", "--run", str(run_dir), *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == paths
    assert all(line.endswith("%") for line in lines)
    assert main(["predict", "--run", str(run_dir), str(tmp_path / "nothing.png")]) == 2
    assert capsys.readouterr().err.strip().endswith("nothing.png: no such file")

    report = (run_dir / "report.md").read_text()
    assert "| student | fused student |" in report
    aligned = next(line for line in report.splitlines() if "Class priors aligned" in line)
    assert all(f"{p.name} " in aligned for p in DEMO_PARTIES)  # each share, before and after
    assert (run_dir / "accuracy.png").read_bytes().startswith(b"\x89PNG")
