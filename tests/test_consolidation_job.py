"""The ``consolidate`` job method end to end through real gRPC parties on the digits: a
generalist that shares its weights, a task-specific teacher that shares predictions and its
features, few-shot probes on a held-out task, and the refusals a user can meet."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from amalgam.fusion.data import load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.train import fit
from amalgam.party.audit import read_records
from amalgam.protocol.loading import ConfigError
from amalgam.protocol.schemas import LayersPolicy, Policy, PredictPolicy, WeightsPolicy
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.simulation.parties import local_party, serving

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GENERAL, EXPERT = ["0", "1", "2", "3", "4"], ["5", "6", "7"]
TASK = {
    "name": "d89",
    "train": "digits:private-2",
    "test": "digits:test",
    "classes": ["8", "9"],
    "related": True,
}
FAST = {"epochs": 12, "backbone_lr": 0.01, "head_lr": 0.1, "draws": 4, "tasks": [TASK]}


def _train(model, shard: int, classes: list[str], epochs: int):
    data = load_source(f"digits:private-{shard}").restrict(classes)
    fit(model, data.x, data.y, epochs=epochs, batch_size=32, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    generalist = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=5, width=8)
    _train(generalist, 0, GENERAL, 30)
    expert = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=3, width=8)
    state = {k: v for k, v in generalist.state_dict().items() if not k.startswith("head")}
    expert.load_state_dict(state, strict=False)  # fine-tuned from the generalist
    _train(expert, 1, EXPERT, 20)
    return generalist, expert


def _handlers(folder, models, expert_policy: Policy):
    generalist, expert = (copy.deepcopy(m) for m in models)
    general_policy = Policy(predict=PredictPolicy(output="logits"), weights=WeightsPolicy())
    return [
        local_party("general", generalist, GENERAL, (1, 8, 8), general_policy, folder),
        local_party("expert", expert, EXPERT, (1, 8, 8), expert_policy, folder),
    ]


def _job(tmp_path, addresses: dict[str, str], params: dict, data: dict | None = None):
    job = {
        "name": "consolidate",
        "parties": [{"name": n, "address": a} for n, a in addresses.items()],
        "method": {"name": "consolidate", "params": {"generalist": "general", **params}},
        "data": data or {"unlabeled": "digits:public", "test": "digits:test"},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _run(tmp_path, handlers, params):
    with serving(handlers[0]) as a0, serving(handlers[1]) as a1:
        spec = load_job(_job(tmp_path, {"general": a0, "expert": a1}, params))
        return run_job(spec, connect(spec), progress=False, log=lambda message: None)


SHARING = Policy(
    predict=PredictPolicy(output="probs"),
    activations=LayersPolicy(layers=["penultimate"]),
    sample_budget=None,
)


def test_consolidation_job_over_grpc(models, tmp_path):
    handlers = _handlers(tmp_path, models, SHARING)
    run_dir = _run(tmp_path, handlers, FAST)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    results = metrics["results"]
    representations = ["generalist", "teacher:expert", "kd", "consolidated"]
    assert {f"{r}:d89" for r in representations} <= set(results)
    assert all(0.5 < results[f"{r}:d89"] <= 1.0 for r in representations)  # 2 classes
    upstream = {
        r: results[f"{r}:upstream-expert"] for r in ["teacher:expert", "kd", "consolidated"]
    }
    assert upstream["teacher:expert"] > 0.8
    assert upstream["consolidated"] > 0.6 and upstream["kd"] > 0.6  # chance: 1/3
    heads = load_file(str(run_dir / "heads.safetensors"))
    assert heads["expert.weight"].shape == (3, 128)
    student = json.loads((run_dir / "student.json").read_text())
    assert student["arch"] == "small_cnn" and student["class_names"] == GENERAL
    methods = {h.name: {r["method"] for r in read_records(h.audit.path)} for h in handlers}
    assert "ExportWeights" in methods["general"]
    assert {"Predict", "Activations"} <= methods["expert"]
    report = (run_dir / "report.md").read_text()
    assert "| representation | d89 (related) |" in report
    losses = metrics["extra"]["losses"]
    assert losses["consolidated"][-1] < losses["consolidated"][0]


def test_a_teacher_that_keeps_its_features_gets_no_feature_row(models, tmp_path):
    policy = Policy(predict=PredictPolicy(output="logits"), sample_budget=None)
    handlers = _handlers(tmp_path, models, policy)
    run_dir = _run(tmp_path, handlers, {**FAST, "epochs": 1, "draws": 1})
    results = json.loads((run_dir / "metrics.json").read_text())["results"]
    assert "teacher:expert:d89" not in results and "consolidated:d89" in results
    assert (
        "No feature rows for expert: penultimate not released."
        in (run_dir / "report.md").read_text()
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"generalist": "nobody"}, r"method.params.generalist: 'nobody' is not one of the"),
        ({"teacher_weights": [0.5, 0.5]}, r"teacher_weights: 2 given for 1 teachers"),
        ({"tasks": [TASK, TASK]}, r"method.params.tasks: names must be unique, repeated: d89"),
    ],
)
def test_job_file_errors_name_the_field(tmp_path, params, message):
    path = _job(tmp_path, {"general": "127.0.0.1:1", "expert": "127.0.0.1:2"}, {**FAST, **params})
    with pytest.raises(ConfigError, match=message):
        load_job(path)


def test_a_task_class_the_data_lacks_is_named_before_any_work(models, tmp_path):
    handlers = _handlers(tmp_path, models, SHARING)
    task = {**TASK, "classes": ["8", "nine"]}
    with pytest.raises(ValueError, match=r"tasks \(d89\): digits:private-2 has no class 'nine'"):
        _run(tmp_path, handlers, {**FAST, "tasks": [task]})
    asked = {r["method"] for h in handlers for r in read_records(h.audit.path)}
    assert asked == {"Describe"}  # no weights exported, no prediction asked
