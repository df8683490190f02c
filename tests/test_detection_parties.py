"""Detection parties behind real gRPC agents: Describe says what they are, Predict carries
boxes under the owner's policy (confidence floor, detections per image, rounding), answers
equal the in-process ones, malformed answers are refused by field, and a composition job of
two detector parties with different categories runs end to end, fine-tuning included."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
import torch
import yaml

from amalgam.fusion.data import load_source
from amalgam.fusion.detection.canvas import load_canvases, make_canvases
from amalgam.fusion.detection.models import create_detector
from amalgam.fusion.detection.train import fit_detector
from amalgam.fusion.run import RunContext
from amalgam.party.audit import read_records
from amalgam.party.handler import PartyHandler
from amalgam.party.local import LocalTeacher
from amalgam.protocol._generated import party_pb2
from amalgam.protocol.codec import CodecError, detections_from_proto, detections_to_proto
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.jobspec import JobSpec
from amalgam.server.methods import METHODS
from amalgam.server.remote import RemoteTeacher
from amalgam.server.simulation.parties import local_party, serving

SIZE = 48
SKILLS = {"evens": ["0", "2", "4", "6", "8"], "low": ["0", "1", "2", "3", "4"]}


@pytest.fixture(scope="module")
def canvases():
    glyphs = load_source("digits:public")
    return make_canvases(glyphs, 48, size=SIZE, digits=(1, 3), scale=(0.35, 0.5), seed=0)


def _handler(folder, name, classes, canvases, policy: PredictPolicy, epochs=1) -> PartyHandler:
    torch.manual_seed(0)
    model = create_detector("frcnn", len(classes), size=SIZE, width=16, score_thresh=0.0)
    fit_detector(model, canvases.restrict(classes), epochs=epochs, batch_size=16, progress=False)
    policy = Policy(predict=policy, max_batch=20)
    return local_party(name, model, classes, (1, SIZE, SIZE), policy, folder)


def test_a_detection_party_answers_with_boxes_under_its_policy(tmp_path, canvases):
    rule = PredictPolicy(score_threshold=0.0, max_detections=3, round_decimals=1)
    handler = _handler(tmp_path, "evens", SKILLS["evens"], canvases, rule)
    images = canvases.images[:30]  # two calls: max_batch is 20
    with serving(handler) as address, RemoteTeacher("evens", address) as remote:
        assert remote.info.task == "detection" and remote.info.output_form == "detections"
        over_grpc = remote.detect(images)
        assert remote.stats.calls == 3  # Describe + two chunks
    local = LocalTeacher(handler).detect(images)
    assert len(over_grpc) == len(local) == 30
    for a, b in zip(over_grpc, local):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.scores, b.scores)
        assert len(a) == 3  # an untrained-enough detector returns 20; the policy keeps 3
        assert (a.scores[:-1] >= a.scores[1:]).all()  # the most confident ones
        assert torch.equal(a.boxes, torch.round(a.boxes, decimals=1))
        assert ((a.labels >= 0) & (a.labels < 5)).all()
    predicts = [r for r in read_records(handler.audit.path) if r["method"] == "Predict"]
    assert sum(r["samples"] for r in predicts) == 60  # gRPC and local, 30 each


def test_malformed_detections_are_refused_by_field():
    boxes, scores = torch.zeros(3, 4), torch.ones(3)
    labels, counts = torch.tensor([0, 1, 2]), torch.tensor([1, 1])
    wire = detections_to_proto(boxes, scores, labels, counts)
    with pytest.raises(CodecError, match="detections.counts"):
        detections_from_proto(wire, batch=2, classes=3)  # 2 counts summing to 2, not 3
    wire = detections_to_proto(boxes, scores, labels, torch.tensor([2, 1]))
    with pytest.raises(CodecError, match=r"detections.labels.*outside 0\.\.1"):
        detections_from_proto(wire, batch=2, classes=2)
    wire = detections_to_proto(boxes, torch.tensor([1.0, float("nan"), 0.5]), labels,
                               torch.tensor([2, 1]))  # fmt: skip
    with pytest.raises(CodecError, match="detections.scores"):
        detections_from_proto(wire, batch=2, classes=3)
    assert isinstance(party_pb2.PredictResponse(detections=wire).detections, party_pb2.Detections)


def test_a_composition_job_of_two_detector_parties_over_grpc(tmp_path, canvases):
    rule = PredictPolicy(score_threshold=0.05, max_detections=10)
    handlers = [_handler(tmp_path, n, c, canvases, rule, epochs=8) for n, c in SKILLS.items()]
    with ExitStack() as stack:
        addresses = [stack.enter_context(serving(h)) for h in handlers]
        job = {
            "name": "detect",
            "parties": [{"name": h.name, "address": a} for h, a in zip(handlers, addresses)],
            "method": {
                "name": "composition",
                "params": {
                    "score_threshold": 0.1,
                    "finetune_fraction": 0.25,
                    "finetune_epochs": 1,
                    "finetune_interpolation": 0.75,
                },
            },
            "student": {"arch": "fcos", "epochs": 1, "batch_size": 16},
            "data": {"unlabeled": "canvases:digits:public", "test": "canvases:digits:test"},
            "output_dir": str(tmp_path / "runs"),
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        spec = load_job(tmp_path / "job.yaml")
        run_dir = run_job(spec, connect(spec, log=lambda m: None), progress=False,
                          log=lambda m: None)  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["results"]) == {"teacher:evens", "teacher:low", "student"}
    assert all(0.0 <= v <= 1.0 for v in metrics["results"].values())
    stats = metrics["extra"]["aggregation"]
    assert stats["objects"] > 0
    assert stats["detections"] >= stats["confident"] >= stats["boxes"]
    kept = stats["per_rule"]
    assert kept["unanimous"] <= kept["consensus"] <= kept["affirmative"] == stats["objects"]
    assert stats["kept_objects"] == kept["consensus"]  # the default rule
    assert set(metrics["extra"]["student_per_category"]) <= set("0123468")
    report = (run_dir / "report.md").read_text()
    assert "## MAP" not in report and "## mAP" in report and "| row | what | mAP % |" in report
    assert f"consensus {kept['consensus']}" in report
    assert f"({stats['conflicts']} dropped for a higher-scoring box of another" in report
    canvases_used = len(load_canvases("canvases:digits:public", size=SIZE))
    labelled = round(0.25 * canvases_used)
    assert metrics["extra"]["finetune_samples"] == labelled
    assert (
        f"Fine-tuning: the true boxes of {labelled} of the {canvases_used} unlabeled "
        f"canvases, together with the pseudo-labels of the other "
        f"{canvases_used - labelled} (labelled share at least 25%), 1 epochs; the student "
        "kept is 0.75 of the way from its weights before to those after."
    ) in report
    assert (run_dir / "pseudo-labels.png").stat().st_size > 1000
    architecture = json.loads((run_dir / "student.json").read_text())
    assert architecture["arch"] == "fcos"
    assert architecture["class_names"] == ["0", "2", "4", "6", "8", "1", "3"]  # first seen


def test_a_job_that_mixes_detection_and_classification_parties_is_refused(tmp_path, canvases):
    from parties import tiny_handler

    detector = _handler(tmp_path, "evens", SKILLS["evens"], canvases, PredictPolicy())
    classifier = tiny_handler(tmp_path, name="acme")
    teachers = [LocalTeacher(detector), LocalTeacher(classifier)]
    job = {
        "name": "mixed", "parties": [{"name": "evens", "address": "x:1"},
                                     {"name": "acme", "address": "x:2"}],
        "method": {"name": "composition"},
        "data": {"unlabeled": "canvases:digits:public", "test": "canvases:digits:test"},
        "output_dir": str(tmp_path),
    }  # fmt: skip
    with pytest.raises(ValueError, match="parties: evens detect and the others classify"):
        METHODS["composition"].run(JobSpec.model_validate(job), teachers, RunContext())
    # a detection-only parameter in a composition of classifiers
    job["parties"] = job["parties"][1:]
    for name, value in (("finetune_mix", False), ("finetune_interpolation", 1.0)):
        job["method"] = {"name": "composition", "params": {name: value}}
        with pytest.raises(ValueError, match=rf"method.params.{name}: applies to detection"):
            METHODS["composition"].run(JobSpec.model_validate(job), teachers[1:], RunContext())
