"""The ``amalgamate`` job method end to end through real gRPC parties on the digits: two
``vgg_cnn`` teachers of disjoint digit sets become one student for all ten, with features in
float16 from a cache that a second job reuses; and what the planner and the job checks say."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from amalgam.fusion.data import load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.train import fit
from amalgam.party.local import LocalTeacher
from amalgam.protocol.loading import ConfigError
from amalgam.protocol.schemas import LayersPolicy, Policy, PredictPolicy
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.plan import plan
from amalgam.server.simulation.parties import local_party, serving

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PARTS = {"low": ["0", "1", "2", "3", "4"], "high": ["5", "6", "7", "8", "9"]}
ARCH = dict(in_shape=(1, 8, 8), stages=((8,), (16,)), fc=(32,))
SHARING = Policy(
    predict=PredictPolicy(output="logits"),
    activations=LayersPolicy(layers=["*"]),
    sample_budget=None,
)
FAST = {"feature_samples": 300, "layer_epochs": 15, "autoencoder_epochs": 2}


@pytest.fixture(scope="module")
def models():
    trained = {}
    for shard, (name, classes) in enumerate(PARTS.items()):
        data = load_source(f"digits:private-{shard}").restrict(classes)
        torch.manual_seed(shard)
        model = create_model("vgg_cnn", num_classes=len(classes), **ARCH)
        fit(model, data.x, data.y, epochs=25, batch_size=32, progress=False)
        trained[name] = model.eval()
    return trained


def _handlers(folder, models, policies=None):
    policies = policies or {}
    return [
        local_party(name, models[name], PARTS[name], (1, 8, 8), policies.get(name, SHARING), folder)
        for name in PARTS
    ]


def _job(tmp_path, addresses: dict[str, str], params: dict, student: dict | None = None,
         **more):  # fmt: skip
    job = {
        "name": "amalgamate",
        "parties": [{"name": n, "address": a} for n, a in addresses.items()],
        "method": {"name": "amalgamate", "params": params},
        "student": student or {"arch": "vgg_cnn", "epochs": 25, "batch_size": 32},
        "data": {"unlabeled": "digits:train", "test": "digits:test"},
        "output_dir": str(tmp_path / "runs"),
        **more,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_amalgamation_job_over_grpc_reuses_its_feature_cache(models, tmp_path):
    handlers = _handlers(tmp_path, models)
    with serving(handlers[0]) as a0, serving(handlers[1]) as a1:
        spec = load_job(_job(tmp_path, {"low": a0, "high": a1}, FAST))
        run_dir = run_job(spec, connect(spec), progress=False, log=lambda message: None)
        again = run_job(spec, connect(spec), progress=False, log=lambda message: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    results, extra = metrics["results"], metrics["extra"]
    rows = ["ensemble", "ensemble_routed", "layerwise", "joint", "kd_concat_softmax",
            "kd_per_teacher", "kd_routed"]  # fmt: skip
    assert {"teacher:low", "teacher:high", "joint:part1", "joint:part2", *rows} <= set(results)
    assert results["teacher:low"] > 0.85 and results["teacher:high"] > 0.85
    assert results["joint"] > 0.6 and results["joint:part1"] > 0.8  # chance: 1/10, 1/5
    assert results["layerwise"] > 0.2
    params = extra["params"]
    assert params["teacher:low"] == sum(p.numel() for p in models["low"].parameters())
    assert params["teacher:low"] < params["student"] < params["teachers"]
    # every layer of both parties on 300 images, in float16: 8*8*8 + 16*4*4 + 16*4*4 ... values
    per_sample = 8 * 8 * 8 + 16 * 4 * 4 + 32
    assert extra["bytes_moved"]["features"] == {"low": 300 * per_sample * 2,
                                                "high": 300 * per_sample * 2}  # fmt: skip
    assert extra["widths"]["stages.1.0.bn"] == {"low": 16, "high": 16, "student": 20}
    student = json.loads((run_dir / "student.json").read_text())
    assert student["arch"] == "vgg_cnn" and "adapt" not in student["kwargs"]
    assert student["class_names"] == PARTS["low"] + PARTS["high"]
    report = (run_dir / "report.md").read_text()
    assert "| layer | low | high | student |" in report and "Parameters: student" in report
    repeated = json.loads((again / "metrics.json").read_text())["extra"]["bytes_moved"]
    assert repeated["features"] == {} and repeated["features_from_cache"]["low"] > 0
    assert json.loads((again / "metrics.json").read_text())["results"] == results


def test_a_job_amalgamates_into_a_timm_student_over_grpc(models, tmp_path):
    handlers = _handlers(tmp_path, models)
    student = {"arch": "timm:test_resnet", "epochs": 10, "batch_size": 32}
    with serving(handlers[0]) as a0, serving(handlers[1]) as a1:
        spec = load_job(_job(tmp_path, {"low": a0, "high": a1}, FAST, student, baselines=False))
        run_dir = run_job(spec, connect(spec), progress=False, log=lambda message: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    results, extra = metrics["results"], metrics["extra"]
    assert results["joint"] > 0.6 and results["layerwise"] > 0.2  # chance: 1/10
    # vgg_cnn teachers end units at 8x8, 4x4 and the hidden vector; test_resnet at 8x8 and
    # 4x4 (and 1x1): one point each
    assert extra["layers"] == {
        "body.layer1.0.act2": {"low": "stages.0.0.relu", "high": "stages.0.0.relu"},
        "body.layer2.0.act2": {"low": "stages.1.0.relu", "high": "stages.1.0.relu"},
    }
    assert extra["widths"]["body.layer2.0.act2"] == {"low": 16, "high": 16, "student": 48}
    assert set(extra["params"]) == {"student"}
    per_party = 300 * (8 * 8 * 8 + 16 * 4 * 4) * 2  # two layers, 300 images, float16
    assert extra["bytes_moved"]["features"] == {"low": per_party, "high": per_party}
    assert json.loads((run_dir / "student.json").read_text())["arch"] == "timm:test_resnet"
    report = (run_dir / "report.md").read_text()
    assert "| body.layer2.0.act2 | 16 (stages.1.0.relu) | 16 (stages.1.0.relu) | 48 |" in report
    assert "the parties' networks are not known to the coordinator" in report


def test_planner_drops_amalgamate_for_a_party_that_keeps_its_features(models, tmp_path):
    keeps = Policy(predict=PredictPolicy(output="logits"))
    some = Policy(predict=PredictPolicy(output="logits"),
                  activations=LayersPolicy(layers=["stages.1.0.bn", "fc.1"]))  # fmt: skip
    handlers = _handlers(tmp_path, models)
    infos = [LocalTeacher(h).info for h in handlers]
    assert {p.method: p for p in plan(infos)}["amalgamate"].possible
    for policy, reason in [
        (keeps, "high: activations is not granted"),
        (
            some,
            "high: activations does not release layer stages.0.0.bn and no layer that ends a "
            "unit of its network",
        ),
    ]:
        handlers = _handlers(tmp_path, models, {"high": policy})
        verdict = {p.method: p for p in plan([LocalTeacher(h).info for h in handlers])}
        assert not verdict["amalgamate"].possible
        assert verdict["amalgamate"].reasons == (reason,)


def test_a_job_against_a_party_that_keeps_its_features_names_it(models, tmp_path):
    keeps = Policy(predict=PredictPolicy(output="logits"), sample_budget=None)
    handlers = _handlers(tmp_path, models, {"high": keeps})
    with serving(handlers[0]) as a0, serving(handlers[1]) as a1:
        spec = load_job(_job(tmp_path, {"low": a0, "high": a1}, FAST))
        with pytest.raises(ValueError, match="^party high: Activations is not granted"):
            run_job(spec, connect(spec), progress=False, log=lambda message: None)


def test_job_checks_name_the_field(tmp_path):
    student = {"arch": "vgg_cnn", "epochs": 0}
    path = _job(tmp_path, {"a": "127.0.0.1:1", "b": "127.0.0.1:2"}, {}, student)
    with pytest.raises(ConfigError, match="student.epochs"):
        load_job(path)
