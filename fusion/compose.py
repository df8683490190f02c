"""The composition pipeline (paper 000, Algorithm 1): predictions on unlabeled data ->
entropy filter and aggregation -> student trained on the kept pseudo-labels -> optional
fine-tuning on a few labels, evaluated against each teacher, each ensemble rule, vanilla
distillation and a supervised bound."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fusion.composition import RULES, aggregate, collect_union_probs, union_classes
from fusion.data import Dataset, fit_to_shape
from fusion.models import Classifier, create_model
from fusion.teacher import Teacher
from fusion.train import accuracy, fit, predict_logits

TeacherMap = Callable[[Callable[[Teacher], Tensor], Sequence[Teacher]], list[Tensor]]


def sequential_map(fn: Callable[[Teacher], Tensor], teachers: Sequence[Teacher]) -> list[Tensor]:
    return [fn(t) for t in teachers]


@dataclass(frozen=True)
class CompositionConfig:
    rule: str = "restricted-fit"  # a key of fusion.composition.RULES
    entropy_threshold: float = 0.5  # normalized entropy tau (paper Sec. 3.1)
    targets: str = "soft"  # "soft": the aggregated distribution; "hard": its argmax
    finetune_fraction: float = 0.0  # fraction of the unlabeled set whose labels may be used
    finetune_epochs: int = 5
    arch: str = "small_cnn"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    baselines: bool = True  # also train vanilla distillation and the supervised bound

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown aggregation rule {self.rule!r}; known: {', '.join(RULES)}")
        if self.targets not in ("soft", "hard"):
            raise ValueError(f"targets must be 'soft' or 'hard', got {self.targets!r}")


@dataclass
class CompositionResult:
    student: Classifier
    class_names: list[str]
    results: dict[str, float]  # row -> test accuracy on the union classes
    extra: dict = field(default_factory=dict)  # retention, pseudo-label accuracy, curves, times


def relabel(data: Dataset, union: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Keep the samples whose class is in ``union``; labels become union indices.

    Returns (x, y) with y of shape (N',).
    """
    if data.y is None:
        raise ValueError("the data set has no labels")
    mapping = torch.tensor([union.index(n) if n in union else -1 for n in data.class_names])
    y = mapping[data.y]
    keep = y >= 0
    return data.x[keep], y[keep]


def union_probs(
    teachers: Sequence[Teacher], x: Tensor, union: list[str], map_teachers: TeacherMap
) -> tuple[Tensor, Tensor]:
    """(T, N, U) union-space probabilities of every teacher on ``x``, and (T, U) known mask."""
    outputs = map_teachers(lambda t: t.predict(fit_to_shape(x, t.info.input_shape)), teachers)
    return collect_union_probs(
        outputs,
        [t.info.output_form for t in teachers],
        [t.info.class_names for t in teachers],
        union,
    )


def _train_student(
    config: CompositionConfig, in_shape: tuple[int, ...], num_classes: int, x: Tensor,
    targets: Tensor, desc: str, progress: bool,
) -> tuple[Classifier, list[float]]:
    torch.manual_seed(config.seed)
    model = create_model(config.arch, in_shape=in_shape, num_classes=num_classes)
    curve = fit(model, x, targets, epochs=config.epochs, batch_size=config.batch_size,
                lr=config.lr, weight_decay=config.weight_decay, seed=config.seed, desc=desc,
                progress=progress)
    return model, curve


def compose(
    teachers: Sequence[Teacher],
    unlabeled: Dataset,
    test: Dataset,
    config: CompositionConfig,
    *,
    map_teachers: TeacherMap = sequential_map,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> CompositionResult:
    """Compose ``teachers`` into one student over the union of their classes.

    Parameters
    ----------
    teachers : the parties' teachers; only ``predict`` is used.
    unlabeled : the coordinator's unlabeled images (labels, if present, are used only for the
        supervised bound, the pseudo-label accuracy and ``finetune_fraction``).
    test : labelled images; samples of classes no teacher knows are left out.
    map_teachers : how to call every teacher (the coordinator passes a parallel fan-out).
    """
    union = union_classes([t.info.class_names for t in teachers])
    in_shape = tuple(teachers[0].info.input_shape)
    x_unl = fit_to_shape(unlabeled.x, in_shape)
    x_test, y_test = relabel(test, union)
    x_test = fit_to_shape(x_test, in_shape)
    extra: dict = {"union_classes": union, "unlabeled": len(x_unl), "test": len(x_test)}

    started = time.perf_counter()
    log(f"collecting predictions of {len(teachers)} teachers on {len(x_unl)} unlabeled images")
    probs, known = union_probs(teachers, unlabeled.x, union, map_teachers)  # (T, N, U)
    test_probs, _ = union_probs(teachers, test.x[_union_rows(test, union)], union, map_teachers)
    extra["prediction_seconds"] = time.perf_counter() - started

    results: dict[str, float] = {}
    for teacher, p in zip(teachers, test_probs):
        results[f"teacher:{teacher.info.name}"] = accuracy(p.argmax(dim=1), y_test)
    results["best_teacher"] = max(results.values())
    for rule in RULES:
        results[f"ensemble:{rule}"] = accuracy(aggregate(test_probs, known, rule).labels, y_test)
    results["ensemble"] = max(v for k, v in results.items() if k.startswith("ensemble:"))

    pseudo = aggregate(probs, known, config.rule, config.entropy_threshold)
    keep = pseudo.keep
    extra["retention"] = float(keep.float().mean())
    if unlabeled.y is not None:
        _, y_unl = relabel(unlabeled, union)
        if len(y_unl) == len(x_unl):
            extra["pseudo_label_accuracy"] = accuracy(pseudo.labels[keep], y_unl[keep])
    if not keep.any():
        raise ValueError(
            f"no pseudo-label passed rule {config.rule!r} at entropy threshold "
            f"{config.entropy_threshold}; raise the threshold or choose another rule"
        )
    targets = pseudo.targets if config.targets == "soft" else pseudo.labels
    log(f"training the student on {int(keep.sum())} of {len(x_unl)} pseudo-labelled images")
    student, curve = _train_student(config, in_shape, len(union), x_unl[keep], targets[keep],
                                    "student", progress)
    extra["student_loss"] = curve
    if config.finetune_fraction > 0:
        _finetune(student, unlabeled, union, in_shape, config, progress, extra)
    results["student"] = accuracy(predict_logits(student, x_test).argmax(dim=1), y_test)

    if config.baselines:
        mean = aggregate(probs, known, "mean").targets
        log("training the baselines: vanilla distillation and the supervised bound")
        vanilla, _ = _train_student(config, in_shape, len(union), x_unl, mean, "vanilla_kd",
                                    progress)
        results["vanilla_kd"] = accuracy(predict_logits(vanilla, x_test).argmax(dim=1), y_test)
        if unlabeled.y is not None:
            x_sup, y_sup = relabel(unlabeled, union)
            supervised, _ = _train_student(config, in_shape, len(union),
                                           fit_to_shape(x_sup, in_shape), y_sup, "supervised",
                                           progress)
            results["supervised"] = accuracy(predict_logits(supervised, x_test).argmax(dim=1),
                                             y_test)
    return CompositionResult(student, union, results, extra)


def _union_rows(data: Dataset, union: Sequence[str]) -> Tensor:
    """(N,) bool: the labelled samples whose class is in ``union``."""
    known = torch.tensor([name in union for name in data.class_names])
    return known[data.y]


def _finetune(student: Classifier, unlabeled: Dataset, union: list[str],
              in_shape: tuple[int, ...], config: CompositionConfig, progress: bool,
              extra: dict) -> None:
    """Fine-tune on a labelled fraction of the unlabeled set (paper Sec. 3, last step)."""
    if unlabeled.y is None:
        raise ValueError("finetune_fraction needs labels on the unlabeled set")
    x, y = relabel(unlabeled, union)
    count = max(2, int(round(config.finetune_fraction * len(x))))
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.seed))[:count]
    fit(student, fit_to_shape(x[index], in_shape), y[index], epochs=config.finetune_epochs,
        batch_size=config.batch_size, lr=config.lr / 10, weight_decay=config.weight_decay,
        seed=config.seed, desc="fine-tune", progress=progress)
    extra["finetune_samples"] = count
