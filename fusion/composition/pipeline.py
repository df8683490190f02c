"""The composition pipeline (paper 000, Algorithm 1): predictions on unlabeled data ->
each teacher's class prior aligned (an addition: ``priors``) -> entropy filter and
aggregation -> student trained on the kept pseudo-labels -> optional fine-tuning on a few
labels, evaluated against each teacher, each ensemble rule, vanilla distillation and a
supervised bound."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from amalgam.fusion.composition.priors import predicted_shares, prior_log_scales, rescale
from amalgam.fusion.composition.rules import RULES, Aggregate, Confidence, Rule, aggregate
from amalgam.fusion.config import Config
from amalgam.fusion.data import Dataset, fit_to_shape
from amalgam.fusion.labels import collect_union_probs, relabel, union_classes
from amalgam.fusion.models import Classifier
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import Teacher, predict_all
from amalgam.fusion.train import StudentConfig, accuracy, build_student, fit, predict_logits


class CompositionConfig(Config):
    """Model composition by pseudo-labels (paper 000, Algorithm 1)."""

    rule: Rule = "restricted-fit"  # aggregation rule, see amalgam.fusion.composition.RULES
    entropy_threshold: float = Field(0.5, ge=0, le=1)  # normalized entropy tau, paper 3.1
    # a floor under the threshold: per teacher (votes) or aggregate (the other rules) and per
    # class it predicts, at least this fraction of the samples is kept, the most confident;
    # None: the threshold alone
    keep_fraction: float | None = Field(0.3, gt=0, le=1)
    # rescale each teacher's probabilities per class so that, on the unlabeled set, they
    # average to a uniform prior over its classes (amalgam.fusion.composition.priors);
    # false for an unlabeled set whose classes are far from equal shares
    align_priors: bool = True
    targets: Literal["hard", "soft"] = "soft"  # train on labels or on the aggregated distribution
    finetune_fraction: float = Field(0.0, ge=0, lt=1)  # labelled fraction for fine-tuning
    finetune_epochs: int = Field(5, ge=1)


@dataclass(frozen=True)
class Predictions:
    """Every answering teacher's union-space predictions on the unlabeled and the test
    images."""

    union: list[str]
    known: Tensor  # (T, U) bool
    names: list[str]  # names of the teachers that answered, in the order of the T axis
    forms: list[str]  # their output forms (probs, logits, topk, label), same order
    unlabeled: Tensor  # (T, N, U) probabilities
    test: Tensor  # (T, M, U) probabilities
    x_unlabeled: Tensor  # (N, C, H, W), fitted to the student's input shape
    y_unlabeled: Tensor | None  # (N,) union labels, when the unlabeled set has labels
    x_test: Tensor  # (M, C, H, W)
    y_test: Tensor  # (M,) union labels
    seconds: float


@dataclass
class CompositionResult:
    student: Classifier
    class_names: list[str]
    results: dict[str, float]  # row -> test accuracy on the union classes
    extra: dict = field(default_factory=dict)  # retention, pseudo-label accuracy, curves, times


def gather(
    teachers: Sequence[Teacher],
    unlabeled: Dataset,
    test: Dataset,
    context: RunContext = RunContext(),
) -> Predictions:
    """Ask every teacher for its predictions on the unlabeled and the test images.

    Each teacher answers both in one mapped call, so that one that drops out (``None`` from
    ``context.map_teachers``) leaves no half-collected state: the union is that of the teachers that
    answered. Test samples of classes that none of them knows are left out. Each teacher
    receives the images fitted to its own input shape; the student takes the first one's.
    """
    started = time.perf_counter()

    def both(teacher: Teacher) -> tuple[Tensor, Tensor]:
        position = list(teachers).index(teacher)
        return (
            predict_all(teacher, unlabeled.x, position, context.progress),
            predict_all(teacher, test.x, position, context.progress),
        )

    outputs = context.map_teachers(both, teachers)
    answered = [(t, o) for t, o in zip(teachers, outputs) if o is not None]
    if not answered:
        raise ValueError("no teacher answered")
    alive = [t for t, _ in answered]
    union = union_classes([t.info.class_names for t in alive])
    in_shape = tuple(alive[0].info.input_shape)
    in_union = torch.tensor([name in union for name in test.class_names])[test.y]
    x_test, y_test = relabel(test, union)

    def union_probs(index: int, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return collect_union_probs(
            [o[index] if keep is None else o[index][keep] for _, o in answered],
            [t.info.output_form for t in alive],
            [t.info.class_names for t in alive],
            union,
        )

    probs, known = union_probs(0)
    test_probs, _ = union_probs(1, in_union)
    y_unlabeled = None
    if unlabeled.y is not None and all(n in union for n in unlabeled.class_names):
        y_unlabeled = relabel(unlabeled, union)[1]
    return Predictions(
        union=union,
        known=known,
        names=[t.info.name for t in alive],
        forms=[t.info.output_form for t in alive],
        unlabeled=probs,
        test=test_probs,
        x_unlabeled=fit_to_shape(unlabeled.x, in_shape),
        y_unlabeled=y_unlabeled,
        x_test=fit_to_shape(x_test, in_shape),
        y_test=y_test,
        seconds=time.perf_counter() - started,
    )


def teacher_rows(p: Predictions, aligned: Predictions | None = None) -> dict[str, float]:
    """Accuracy of each teacher (argmax over its own classes), of each ensemble rule, of each
    rule over the ``aligned`` teachers when given (``ensemble:<rule>:aligned``), and the best
    of those ensembles (``ensemble``)."""
    rows = {
        f"teacher:{name}": accuracy(probs.argmax(dim=1), p.y_test)
        for name, probs in zip(p.names, p.test)
    }
    rows["best_teacher"] = max(rows.values())
    rows |= ensemble_rows(p)
    if aligned is not None:
        rows |= ensemble_rows(aligned, ":aligned")
    rows["ensemble"] = max(v for k, v in rows.items() if k.startswith("ensemble:"))
    return rows


def ensemble_rows(p: Predictions, suffix: str = "") -> dict[str, float]:
    """``ensemble:<rule><suffix>``: each rule's accuracy over the teachers' test predictions."""
    return {
        f"ensemble:{rule}{suffix}": accuracy(aggregate(p.test, p.known, rule).labels, p.y_test)
        for rule in RULES
    }


def align_priors(p: Predictions) -> Predictions:
    """``p`` with each teacher's unlabeled and test probabilities rescaled by the factors that
    align its predictions on the unlabeled set to a uniform class prior
    (:mod:`amalgam.fusion.composition.priors`)."""
    log_scales = prior_log_scales(p.unlabeled, p.known, p.forms)  # (T, U)
    return dataclasses.replace(
        p,
        unlabeled=rescale(p.unlabeled, p.known, log_scales),
        test=rescale(p.test, p.known, log_scales),
    )


def largest_class_shares(before: Predictions, after: Predictions) -> dict[str, list[float]]:
    """Per teacher, the share of unlabeled images its most predicted class takes before and
    after alignment."""
    return {
        name: [float(b.max()), float(a.max())]
        for name, b, a in zip(
            before.names,
            predicted_shares(before.unlabeled, before.known),
            predicted_shares(after.unlabeled, after.known),
        )
    }


def described_alignment(shares: dict[str, list[float]]) -> str:
    """The log's and the report's line on the alignment, from :func:`largest_class_shares`."""
    return (
        "class priors aligned on the unlabeled set; each teacher's most predicted class took "
        + ", ".join(f"{name} {b:.0%} -> {a:.0%}" for name, (b, a) in shares.items())
        + " of the images"
    )


def pseudo_label_stats(p: Predictions, tau: float | Confidence) -> dict[str, dict[str, float]]:
    """Retention and (when labels exist) correctness of every rule's pseudo-labels."""
    stats = {}
    for rule in RULES:
        pseudo = aggregate(p.unlabeled, p.known, rule, tau)
        entry = {"retention": float(pseudo.keep.float().mean())}
        if p.y_unlabeled is not None and pseudo.keep.any():
            entry["accuracy"] = accuracy(pseudo.labels[pseudo.keep], p.y_unlabeled[pseudo.keep])
        stats[rule] = entry
    return stats


def train_student(
    student: StudentConfig,
    p: Predictions,
    x: Tensor,
    targets: Tensor,
    name: str,
    context: RunContext,
) -> tuple[Classifier, list[float]]:
    """A fresh ``student.arch`` over the union classes, trained on ``targets`` (a training run
    called ``name``)."""
    torch.manual_seed(context.seed)
    model = build_student(student, tuple(p.x_test.shape[1:]), len(p.union), context.log)
    curve = fit(model, x, targets, **student.schedule(), seed=context.seed, desc=name,
                progress=context.progress, checkpoint=context.checkpoint(name),
                hardware=context.hardware)  # fmt: skip
    return model, curve


def _described(confidence: Confidence) -> str:
    described = f"entropy threshold {confidence.threshold}"
    if confidence.keep_fraction is None:
        return described
    return f"{described} with keep fraction {confidence.keep_fraction} per predictor and class"


def test_accuracy(model: Classifier, p: Predictions) -> float:
    return accuracy(predict_logits(model, p.x_test).argmax(dim=1), p.y_test)


def compose_predictions(
    p: Predictions,
    config: CompositionConfig,
    student: StudentConfig,
    context: RunContext = RunContext(),
) -> CompositionResult:
    """Align the teachers' class priors (``config.align_priors``), aggregate pseudo-labels with
    ``config.rule``, train a ``student``, and evaluate it with the teachers, the ensembles (as
    the teachers answer, and aligned: ``ensemble:<rule>:aligned``) and (``context.baselines``)
    vanilla KD on the teachers' answers and the supervised bound, each trained like the
    student. The student trains on the kept pseudo-labels for as many updates as
    ``student.epochs`` over every unlabeled image (its epochs scaled by one over the
    retention), the baselines' number of updates."""
    aligned = align_priors(p) if config.align_priors else None
    results = teacher_rows(p, aligned)
    extra: dict = {
        "union_classes": p.union,
        "unlabeled": len(p.x_unlabeled),
        "test": len(p.x_test),
        "prediction_seconds": p.seconds,
    }
    raw = p
    if aligned is not None:
        extra["largest_class_share"] = largest_class_shares(raw, aligned)
        context.log(described_alignment(extra["largest_class_share"]))
        p = aligned
    confidence = Confidence(config.entropy_threshold, config.keep_fraction)
    pseudo = aggregate(p.unlabeled, p.known, config.rule, confidence)
    if not pseudo.keep.any():
        context.log(
            f"no pseudo-label passed rule {config.rule!r} at {_described(confidence)}: the "
            "student learns the rule's aggregate of every unlabeled image instead"
        )
        everything = aggregate(p.unlabeled, p.known, config.rule, 1.0)
        pseudo = Aggregate(everything.targets, torch.ones_like(pseudo.keep))
        extra["filter_fallback"] = f"nothing passed {_described(confidence)}; kept all"
    keep = pseudo.keep
    extra["retention"] = float(keep.float().mean())
    kept_classes = set(pseudo.labels[keep].tolist())
    extra["classes_without_pseudo_labels"] = [
        name for c, name in enumerate(p.union) if c not in kept_classes
    ]
    if extra["classes_without_pseudo_labels"]:
        context.log(
            f"no kept pseudo-label of class {', '.join(extra['classes_without_pseudo_labels'])}"
            f" (rule {config.rule!r} at {_described(confidence)}): the student sees none"
        )
    if p.y_unlabeled is not None:
        extra["pseudo_label_accuracy"] = accuracy(pseudo.labels[keep], p.y_unlabeled[keep])
    targets = pseudo.targets if config.targets == "soft" else pseudo.labels
    kept = int(keep.sum())
    # as many updates as on every unlabeled image: a filter that keeps a third of them must not
    # cut the student's training to a third (weak teachers would leave it untrained)
    epochs = max(student.epochs, round(student.epochs * len(keep) / kept))
    extra["student_epochs"] = epochs
    context.log(
        f"training the student on {kept} of {len(keep)} pseudo-labelled images for {epochs} "
        f"epochs (the updates of {student.epochs} epochs over all of them)"
    )
    model, extra["student_loss"] = train_student(
        student.model_copy(update={"epochs": epochs}),
        p, p.x_unlabeled[keep], targets[keep], "student", context,
    )  # fmt: skip
    if config.finetune_fraction > 0:
        extra["finetune_samples"] = _finetune(model, p, config, student, context)
    results["student"] = test_accuracy(model, p)
    if context.baselines:
        context.log("training the baselines: vanilla distillation and the supervised bound")
        mean = aggregate(raw.unlabeled, raw.known, "mean").targets  # the teachers as they answer
        vanilla, _ = train_student(student, p, p.x_unlabeled, mean, "vanilla_kd", context)
        results["vanilla_kd"] = test_accuracy(vanilla, p)
        if p.y_unlabeled is not None:
            supervised, _ = train_student(
                student, p, p.x_unlabeled, p.y_unlabeled, "supervised", context
            )
            results["supervised"] = test_accuracy(supervised, p)
    return CompositionResult(model, p.union, results, extra)


def compose(
    teachers: Sequence[Teacher],
    unlabeled: Dataset,
    test: Dataset,
    config: CompositionConfig,
    student: StudentConfig,
    context: RunContext = RunContext(),
) -> CompositionResult:
    """Compose ``teachers`` into one student over the union of their classes.

    Parameters
    ----------
    teachers : the parties' teachers; only ``predict`` is used.
    unlabeled : the coordinator's unlabeled images (labels, if present, serve only the
        supervised bound, the pseudo-label accuracy and ``finetune_fraction``).
    test : labelled images; samples of classes no teacher knows are left out.
    student : the student's architecture and schedule (the baselines train alike).
    """
    context.log(
        f"collecting predictions of {len(teachers)} teachers on {len(unlabeled)} unlabeled "
        f"and {len(test)} test images"
    )
    predictions = gather(teachers, unlabeled, test, context)
    return compose_predictions(predictions, config, student, context)


def _finetune(
    model: Classifier,
    p: Predictions,
    config: CompositionConfig,
    student: StudentConfig,
    context: RunContext,
) -> int:
    """Fine-tune on a labelled fraction of the unlabeled set (paper Sec. 3, last step), at a
    tenth of the student's learning rate; returns the number of labelled samples used."""
    if p.y_unlabeled is None:
        raise ValueError("finetune_fraction needs labels on the unlabeled set")
    count = max(2, round(config.finetune_fraction * len(p.y_unlabeled)))
    generator = torch.Generator().manual_seed(context.seed)
    index = torch.randperm(len(p.y_unlabeled), generator=generator)[:count]
    fit(
        model,
        p.x_unlabeled[index],
        p.y_unlabeled[index],
        epochs=config.finetune_epochs,
        batch_size=student.batch_size,
        lr=student.lr / 10,
        weight_decay=student.weight_decay,
        seed=context.seed,
        desc="fine-tune",
        progress=context.progress,
        checkpoint=context.checkpoint("fine-tune"),
        hardware=context.hardware,
    )
    return count
