"""The VID term of data-free fusion (paper 003, Eq. 1-2): the Gaussian likelihood it computes,
and the feature maps it reads from the parties that release them through real gRPC."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.fusion.data import load_source
from amalgam.fusion.datafree.party_side import PartySideFusion
from amalgam.fusion.datafree.trainer import DataFreeConfig, DataFreeFusion
from amalgam.fusion.datafree.vid import VIDRegressor, VIDTerm
from amalgam.fusion.models import create_model
from amalgam.fusion.run import RunContext
from amalgam.fusion.train import fit
from amalgam.party.audit import read_records
from amalgam.party.local import LocalTeacher
from amalgam.protocol.schemas import (
    BnFeedbackPolicy,
    LayersPolicy,
    Policy,
    PredictPolicy,
    SynthesizePolicy,
)
from amalgam.server.remote import RemoteTeacher
from amalgam.server.simulation.parties import local_party, serving

DIGITS = [str(d) for d in range(10)]
TINY = dict(warmup=2, iterations=3, student_steps=2, batch_size=16, generator_width=8)


def test_vid_is_the_gaussian_negative_log_likelihood():
    torch.manual_seed(0)
    regressor = VIDRegressor(student_channels=4, teacher_channels=3, init_variance=5.0)
    student = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        mean = regressor.mean(torch.nn.functional.avg_pool2d(student, 2))  # (2, 3, 4, 4)
    # the teacher's map at the predicted mean: only the log-variance term is left
    assert regressor(student, mean).item() == pytest.approx(0.5 * math.log(5.0), rel=1e-5)
    # one unit away from the mean everywhere adds 1 / (2 var)
    shifted = regressor(student, mean + 1).item()
    assert shifted == pytest.approx(0.5 * math.log(5.0) + 1 / (2 * 5.0), rel=1e-5)


def test_vid_learns_to_predict_the_teacher_map():
    torch.manual_seed(0)
    student = torch.randn(64, 4, 4, 4)
    teacher = 2 * student[:, :2] + 1  # a function of the student's map
    regressor = VIDRegressor(4, 2)
    optimizer = torch.optim.Adam(regressor.parameters(), lr=1e-2)
    first = regressor(student, teacher).item()
    for _ in range(300):
        loss = regressor(student, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 1.0  # the mean fits and the variance shrinks


def _party(name, model, folder, layers):
    policy = Policy(
        predict=PredictPolicy(output="logits"),
        bn_feedback=BnFeedbackPolicy(cost=1),
        activations=LayersPolicy(layers=layers) if layers else None,
        sample_budget=None,
    )
    return local_party(name, model, DIGITS, (1, 8, 8), policy, folder)


@pytest.fixture(scope="module")
def models():
    made = []
    for i in range(2):
        data = load_source(f"digits:private-{i}")
        torch.manual_seed(i)
        model = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=10, width=8)
        fit(model, data.x, data.y, epochs=2, batch_size=32, progress=False)
        made.append(model)
    return made


def test_dfmf_with_vid_reads_the_released_feature_maps(models, tmp_path):
    """Party p0 releases its layers, p1 does not: the student and p0's assistant learn p0's
    last feature map, p1 is left out (and the log says so)."""
    handlers = [_party("p0", models[0], tmp_path, ["*"]), _party("p1", models[1], tmp_path, [])]
    lines = []
    with serving(handlers[0]) as a0, serving(handlers[1]) as a1:
        teachers = [RemoteTeacher("p0", a0), RemoteTeacher("p1", a1)]
        config = DataFreeConfig(variant="dfmf", beta=1.0, **TINY)
        context = RunContext(progress=False, log=lines.append)
        result = DataFreeFusion(teachers, config, context=context).run()
        for t in teachers:
            t.close()
    steps = TINY["iterations"] * TINY["student_steps"]
    history = result.history
    assert len(history["student/vid"]) == len(history["student/kl"]) == steps
    assistant_steps = TINY["iterations"] * config.assistant_steps  # M_GA per iteration
    assert len(history["assistant0/vid"]) == len(history["assistant0/kl"]) == assistant_steps
    assert "assistant1/vid" not in history and "assistant1/kl" in history
    assert all(math.isfinite(v) for v in history["student/vid"])
    assert "party p1 releases no feature map: VID leaves it out" in lines
    released = [r for r in read_records(handlers[0].audit.path) if r["method"] == "Activations"]
    # every student batch, and every assistant batch of p0's generator
    assert sum(r["samples"] for r in released) == (steps + assistant_steps) * TINY["batch_size"]
    assert not [r for r in read_records(handlers[1].audit.path) if r["method"] == "Activations"]


def test_vid_without_any_released_feature_map_is_refused(models, tmp_path):
    teachers = [LocalTeacher(_party(f"q{i}", m, tmp_path, [])) for i, m in enumerate(models)]
    with pytest.raises(ValueError, match="beta > 0: VID needs a party that releases"):
        DataFreeFusion(teachers, DataFreeConfig(beta=1.0, **TINY))
    student = create_model("mlp", in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="convolutional feature map"):
        VIDTerm(student, (1, 8, 8), [teachers[0].info])


def test_party_side_student_learns_the_feature_maps_of_each_round(models, tmp_path):
    policy = Policy(
        predict=PredictPolicy(output="logits"),
        synthesize=SynthesizePolicy(),
        activations=LayersPolicy(layers=["*"]),
        sample_budget=None,
    )
    teachers = [
        LocalTeacher(local_party(f"s{i}", m, DIGITS, (1, 8, 8), policy, tmp_path))
        for i, m in enumerate(models)
    ]
    config = DataFreeConfig(variant="dfmf", beta=1.0, **TINY)
    fusion = PartySideFusion(teachers, config, rounds=3, context=RunContext(progress=False))
    history = fusion.run().history
    steps = TINY["iterations"] * TINY["student_steps"]
    assert len(history["student/vid"]) == steps
    assert "assistant0/kl" in history and "assistant0/vid" not in history  # logits alone
    for teacher in teachers:
        calls = [
            r for r in read_records(teacher.handler.audit.path) if r["method"] == "Activations"
        ]
        # one Activations call per round on the round's pool of both parties' images
        pool = TINY["student_steps"] * (TINY["batch_size"] // 2)
        assert [r["samples"] for r in calls] == [2 * pool] * 3
