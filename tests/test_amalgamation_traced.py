"""Amalgamation with teachers and students of any traced architecture: feature points at the
ends of units, matched resolution by resolution, a student cut into steps at them, what the
parties advertise, and a timm student learned from two digit teachers."""

from __future__ import annotations

import pytest
import torch

from amalgam.fusion.activations import layer_outputs
from amalgam.fusion.amalgamation import AmalgamationConfig, FeatureCache, amalgamate
from amalgam.fusion.amalgamation.evaluate import amalgamation_rows
from amalgam.fusion.amalgamation.points import (
    FeaturePoint,
    feature_points,
    match_points,
    pooled,
    split_at,
)
from amalgam.fusion.data import load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.run import RunContext
from amalgam.fusion.train import StudentConfig, fit
from amalgam.party.local import LocalTeacher
from amalgam.protocol.schemas import LayersPolicy, Policy, PredictPolicy
from amalgam.server.simulation.parties import local_party

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PARTS = {"low": ["0", "1", "2", "3", "4"], "high": ["5", "6", "7", "8", "9"]}
SHARING = Policy(
    predict=PredictPolicy(output="logits"),
    activations=LayersPolicy(layers=["*"]),
    sample_budget=None,
)
STUDENT = "timm:test_resnet"


def test_feature_points_are_the_outputs_of_units_read_from_the_modules_that_return_them():
    model = create_model("torchvision:resnet18", in_shape=(3, 32, 32), num_classes=10).eval()
    points = feature_points(model, (3, 32, 32))
    assert (
        [p.name for p in points]
        == [
            "body.relu",  # the stem: conv, BatchNorm, activation
            *[f"body.layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)][:-1],  # residual blocks
            "body.avgpool",  # layer4.1 with the pooling that keeps its 1x1 shape
        ]
    )
    assert [p.shape for p in points[:4]] == [(64, 16, 16), (64, 8, 8), (64, 8, 8), (128, 4, 4)]
    x = torch.rand(3, 3, 32, 32)
    read = layer_outputs(model, x, [p.name for p in points])  # what a party's hooks release
    steps = split_at(model, points)
    features = x
    for step, point in zip(steps, points):
        features = step(features)
        assert torch.equal(features, read[point.name]), point.name
    assert torch.equal(steps[-1](features), model(x))


@pytest.mark.parametrize("arch", ["timm:test_efficientnet", "small_cnn", "vgg_cnn"])
def test_a_network_cut_at_its_points_computes_itself_and_shares_its_parameters(arch):
    model = create_model(arch, in_shape=(1, 8, 8), num_classes=4).eval()
    points = feature_points(model, (1, 8, 8))
    steps = split_at(model, points)
    assert len(steps) == len(points) + 1
    x = torch.rand(5, 1, 8, 8)
    features = x
    for step in steps:
        features = step(features)
    assert torch.equal(features, model(x))
    own = {id(p) for p in model.parameters()}
    shared = [id(p) for step in steps for p in step.parameters()]
    assert set(shared) == own and len(shared) == len(own)


def _points(*shapes: tuple[int, ...], prefix: str = "p") -> list[FeaturePoint]:
    return [FeaturePoint(f"{prefix}{k}", shape) for k, shape in enumerate(shapes)]


def test_points_match_every_layer_where_the_counts_agree_else_the_last_per_resolution():
    student = _points((8, 16, 16), (8, 16, 16), (16, 8, 8), (32,), prefix="s")
    same = _points((4, 16, 16), (6, 16, 16), (12, 8, 8), (20,), prefix="a")
    deeper = _points((8, 32, 32), (4, 16, 16), (4, 16, 16), (4, 16, 16), (9, 8, 8), prefix="b")
    matched = match_points({"a": same}, student)
    assert [(row["a"].name, row["student"].name) for row in matched] == [
        ("a0", "s0"), ("a1", "s1"), ("a2", "s2"), ("a3", "s3")
    ]  # fmt: skip
    matched = match_points({"a": same, "b": deeper}, student)  # b: 3 at 16x16, no vector
    assert [(row["a"].name, row["b"].name, row["student"].name) for row in matched] == [
        ("a1", "b3", "s1"), ("a2", "b4", "s2")
    ]  # fmt: skip


def test_a_student_that_upsamples_takes_the_next_larger_features_pooled_to_its_size():
    teacher = _points((8, 28, 28), (16, 14, 14), (32, 7, 7), (64,), prefix="t")  # 28x28 inputs
    student = _points((8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2), (64, 1, 1), prefix="s")
    matched = match_points({"t": teacher}, student)
    assert [(row["t"].name, row["student"].name) for row in matched] == [
        ("t0", "s0"), ("t1", "s1"), ("t2", "s2")
    ]  # fmt: skip
    features = torch.arange(2 * 3 * 28 * 28, dtype=torch.float16).view(2, 3, 28, 28)
    assert pooled(features, (16, 16)).shape == (2, 3, 16, 16)
    assert torch.equal(pooled(features, (28, 28)), features)
    assert torch.allclose(pooled(features, (1, 1)).squeeze(), features.float().mean((2, 3)))


def test_a_party_without_a_resolution_for_the_student_is_named():
    student = _points((8, 16, 16), (16, 8, 8))
    with pytest.raises(ValueError, match=r"^party far: none of its feature maps is as large as "
                                         r"one of the student's \(16x16, 8x8\)$"):  # fmt: skip
        match_points({"near": _points((4, 8, 8)), "far": _points((4, 4, 4), (9,))}, student)


@pytest.fixture(scope="module")
def digit_teachers(tmp_path_factory):
    """Two small_cnn parties of disjoint digit sets, releasing logits and every layer."""
    folder = tmp_path_factory.mktemp("parties")
    teachers = []
    for shard, (name, classes) in enumerate(PARTS.items()):
        data = load_source(f"digits:private-{shard}").restrict(classes)
        torch.manual_seed(shard)
        model = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=len(classes))
        fit(model, data.x, data.y, epochs=10, batch_size=32, progress=False)
        handler = local_party(name, model.eval(), classes, (1, 8, 8), SHARING, folder)
        teachers.append(LocalTeacher(handler))
    return teachers


def test_a_party_advertises_the_released_layers_that_end_units(digit_teachers, tmp_path):
    info = digit_teachers[0].info
    assert [name for name, _ in info.feature_layers] == [
        "body.0.2", "body.1.2", "body.3.2", "body.4.2", "body.9"
    ]  # fmt: skip
    assert dict(info.feature_layers)["body.3.2"] == (64, 4, 4)
    some = Policy(predict=PredictPolicy(output="logits"),
                  activations=LayersPolicy(layers=["body.1.2", "body.3.1"]))  # fmt: skip
    handler = local_party("x", digit_teachers[0].handler.model, PARTS["low"], (1, 8, 8), some,
                          tmp_path)  # fmt: skip
    assert LocalTeacher(handler).info.feature_layers == (("body.1.2", (32, 8, 8)),)


def test_a_timm_student_amalgamates_two_teachers(digit_teachers, tmp_path):
    unlabeled, test = load_source("digits:train"), load_source("digits:test")
    config = AmalgamationConfig(feature_samples=300, layer_epochs=5, autoencoder_epochs=2)
    training = StudentConfig(arch=STUDENT, epochs=10, batch_size=32)
    lines = []
    context = RunContext(progress=False, baselines=False, log=lines.append)
    result = amalgamate(digit_teachers, unlabeled.x, config, training,
                        FeatureCache(tmp_path / "cache"), context)  # fmt: skip
    # the student keeps its architecture: timm's own layers, outputs the 10 entries
    fresh = create_model(STUDENT, in_shape=(1, 8, 8), num_classes=10)
    assert result.joint.state_dict().keys() == fresh.state_dict().keys()
    # test_resnet reaches 8x8 and 4x4 once each; small_cnn has two points at each: the last
    assert result.layers == {
        "body.layer1.0.act2": {"low": "body.1.2", "high": "body.1.2"},
        "body.layer2.0.act2": {"low": "body.4.2", "high": "body.4.2"},
    }
    assert result.widths["body.layer2.0.act2"] == {"low": 64, "high": 64, "student": 48}
    for layer in result.layers:  # each step fits its amalgamated features well
        assert result.losses[layer]["layer"] < 0.5, (layer, result.losses[layer])
    assert any("body.layer1.0.act2 from low body.1.2, high body.1.2" in line for line in lines)
    students = {"layerwise": result.layerwise, "joint": result.joint}
    rows = amalgamation_rows(digit_teachers, students, result.entries, test)
    assert rows["layerwise"] > 0.5  # chance: 0.1; from features alone, then the head
    assert rows["joint"] > 0.85 and rows["joint:part1"] > 0.9


def test_a_party_that_releases_no_unit_end_is_named(digit_teachers, tmp_path):
    hidden = Policy(predict=PredictPolicy(output="logits"),
                    activations=LayersPolicy(layers=["body.3.1"]), sample_budget=None)  # fmt: skip
    handler = local_party("high", digit_teachers[1].handler.model, PARTS["high"], (1, 8, 8),
                          hidden, tmp_path)  # fmt: skip
    teachers = [digit_teachers[0], LocalTeacher(handler)]
    with pytest.raises(ValueError, match="^party high: releases no layer that ends a unit"):
        amalgamate(teachers, torch.rand(20, 1, 8, 8), AmalgamationConfig(),
                   StudentConfig(arch=STUDENT), FeatureCache(tmp_path),
                   RunContext(progress=False))  # fmt: skip
