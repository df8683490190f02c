"""The composition pipeline with in-process teachers on the embedded digits."""

from __future__ import annotations

import pytest
import torch

from amalgam.fusion.composition import (
    RULES,
    CompositionConfig,
    align_priors,
    compose,
    compose_predictions,
    gather,
    pseudo_label_stats,
)
from amalgam.fusion.composition.rules import Confidence, aggregate
from amalgam.fusion.data import load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import TeacherInfo
from amalgam.fusion.train import StudentConfig, fit


class ModelTeacher:
    """A Teacher over a plain model, releasing probabilities."""

    def __init__(self, name, model, classes):
        self.model = model
        self.info = TeacherInfo(name, tuple(classes), (1, 8, 8), "probs")

    def predict(self, x):
        with torch.no_grad():
            return self.model(x).softmax(dim=1)


@pytest.fixture(scope="module")
def teachers():
    made = []
    for i, classes in enumerate(["012345", "456789"]):  # overlapping on 4 and 5
        data = load_source(f"digits:private-{i}").restrict(list(classes))
        torch.manual_seed(i)
        model = create_model("small_cnn", in_shape=(1, 8, 8), num_classes=6, width=8)
        fit(model, data.x, data.y, epochs=30, batch_size=32, progress=False)
        made.append(ModelTeacher(f"t{i}", model, classes))
    return made


@pytest.fixture(scope="module")
def data():
    return load_source("digits:public"), load_source("digits:test")


STUDENT = StudentConfig(arch="small_cnn", epochs=10, batch_size=32)


def test_rows_cover_teachers_every_rule_and_baselines(teachers, data):
    said = []
    result = compose(teachers, *data, CompositionConfig(), STUDENT, RunContext(log=said.append))
    rows = result.results
    expected = {
        "teacher:t0",
        "teacher:t1",
        "best_teacher",
        "ensemble",
        "student",
        "vanilla_kd",
        "supervised",
    } | {f"ensemble:{rule}{aligned}" for rule in RULES for aligned in ("", ":aligned")}
    assert set(rows) == expected
    assert rows["ensemble"] == max(v for k, v in rows.items() if k.startswith("ensemble:"))
    shares = result.extra["largest_class_share"]  # the most predicted class, before and after
    assert set(shares) == {"t0", "t1"} and all(1 / 6 <= s <= 1 for v in shares.values() for s in v)
    assert any(line.startswith("class priors aligned on the unlabeled set;") for line in said)
    assert all(0 <= v <= 1 for v in rows.values())
    assert rows["best_teacher"] < 0.65  # each teacher knows six of the ten classes
    assert rows["student"] > rows["best_teacher"] + 0.2
    assert 0 < result.extra["retention"] <= 1
    assert result.class_names == list("0123456789")


def test_without_alignment_the_student_learns_the_teachers_answers_as_they_are(teachers, data):
    predictions = gather(teachers, *data)
    config = CompositionConfig(align_priors=False)
    result = compose_predictions(predictions, config, STUDENT, RunContext(baselines=False))
    assert not any(k.endswith(":aligned") for k in result.results)
    assert result.results["ensemble"] == max(
        v for k, v in result.results.items() if k.startswith("ensemble:")
    )
    assert "largest_class_share" not in result.extra
    raw = aggregate(predictions.unlabeled, predictions.known, config.rule, Confidence(0.5, 0.3))
    assert result.extra["retention"] == float(raw.keep.float().mean())
    aligned = align_priors(predictions)
    assert aligned.unlabeled.shape == predictions.unlabeled.shape
    assert not torch.equal(aligned.unlabeled, predictions.unlabeled)
    assert torch.equal(aligned.x_unlabeled, predictions.x_unlabeled)


def test_finetuning_uses_the_asked_fraction_of_labels(teachers, data):
    config = CompositionConfig(finetune_fraction=0.1)
    result = compose(teachers, *data, config, STUDENT, RunContext(baselines=False))
    assert result.extra["finetune_samples"] == round(0.1 * len(data[0]))
    assert "vanilla_kd" not in result.results


def test_when_nothing_passes_the_filter_the_student_learns_from_every_image(teachers, data):
    predictions = gather(teachers, *data)
    said = []
    config = CompositionConfig(rule="unanimous", entropy_threshold=1e-9, keep_fraction=None)
    context = RunContext(baselines=False, log=said.append)
    result = compose_predictions(predictions, config, STUDENT, context)
    assert result.extra["filter_fallback"] == "nothing passed entropy threshold 1e-09; kept all"
    assert result.extra["retention"] == 1.0 and result.extra["classes_without_pseudo_labels"] == []
    assert any(line.startswith("no pseudo-label passed rule 'unanimous'") for line in said)
    assert result.results["student"] > result.results["best_teacher"]  # a real student


def test_a_class_left_without_pseudo_labels_is_named_and_the_keep_fraction_floor_keeps_every_class(
    teachers, data
):
    predictions = gather(teachers, *data)
    said = []
    context = RunContext(baselines=False, log=said.append)
    strict = CompositionConfig(
        rule="consensus", entropy_threshold=0.005, keep_fraction=None, targets="hard"
    )
    result = compose_predictions(predictions, strict, STUDENT, context)
    missing = result.extra["classes_without_pseudo_labels"]
    aligned = align_priors(predictions)  # what the job's rule reads
    kept = aggregate(aligned.unlabeled, aligned.known, "consensus", 0.005)
    labels = {predictions.union[c] for c in kept.labels[kept.keep].tolist()}
    assert missing and set(missing) == set(predictions.union) - labels
    assert any(line.startswith(f"no kept pseudo-label of class {missing[0]}") for line in said)
    floor = CompositionConfig(rule="consensus", entropy_threshold=0.005, targets="hard")
    result = compose_predictions(predictions, floor, STUDENT, RunContext(baselines=False))
    assert floor.keep_fraction == 0.3  # the default floor
    assert result.extra["classes_without_pseudo_labels"] == []
    retention = result.extra["retention"]
    assert 0.2 < retention < 0.6  # 30 % per teacher and class, then the vote
    # the student makes the updates of STUDENT.epochs over every unlabeled image
    assert result.extra["student_epochs"] == round(STUDENT.epochs / retention) > STUDENT.epochs


def test_pseudo_label_stats_per_rule(teachers, data):
    stats = pseudo_label_stats(gather(teachers, *data), tau=1.0)
    assert set(stats) == set(RULES)
    assert stats["affirmative"]["retention"] == 1.0  # tau 1 and every sample gets a vote
    assert stats["restricted-fit"]["accuracy"] > stats["mean"]["accuracy"] - 0.05


def test_unknown_rule_and_targets_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"rule\n.*'restricted-fit'"):
        CompositionConfig(rule="vote")
    with pytest.raises(ValueError, match=r"targets\n.*'hard' or 'soft'"):
        CompositionConfig(targets="fuzzy")
