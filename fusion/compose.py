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
from tqdm.auto import tqdm

from amalgam.fusion.composition import RULES, aggregate, collect_union_probs, union_classes
from amalgam.fusion.data import Dataset, fit_to_shape
from amalgam.fusion.models import Classifier, create_model
from amalgam.fusion.teacher import Teacher
from amalgam.fusion.train import Checkpoint, accuracy, fit, predict_logits

# ``map_teachers(fn, teachers)``: ``[fn(t) for t in teachers]``, where the coordinator may
# answer ``None`` for a teacher that dropped out of the job (its party became unreachable).
TeacherMap = Callable[[Callable[[Teacher], object], Sequence[Teacher]], list]


def sequential_map(fn: Callable[[Teacher], object], teachers: Sequence[Teacher]) -> list:
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


@dataclass(frozen=True)
class Predictions:
    """Every answering teacher's union-space predictions on the unlabeled and the test
    images."""

    union: list[str]
    known: Tensor  # (T, U) bool
    names: list[str]  # names of the teachers that answered, in the order of the T axis
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


def relabel(data: Dataset, union: Sequence[str]) -> tuple[Tensor, Tensor]:
    """The samples whose class is in ``union``, labelled by union index: (N', C, H, W), (N',)."""
    if data.y is None:
        raise ValueError("the data set has no labels")
    mapping = torch.tensor([union.index(n) if n in union else -1 for n in data.class_names])
    y = mapping[data.y]
    keep = y >= 0
    return data.x[keep], y[keep]


PREDICT_CHUNK = 2048  # images per progress step when collecting predictions


def predict_all(teacher: Teacher, x: Tensor, position: int, progress: bool) -> Tensor:
    """``teacher.predict`` on all of ``x`` (fitted to its input shape), with a progress bar."""
    x = fit_to_shape(x, teacher.info.input_shape)
    outputs = []
    with tqdm(
        total=len(x),
        desc=f"predict {teacher.info.name}",
        unit="img",
        position=position,
        leave=False,
        disable=None if progress else True,
    ) as bar:
        for start in range(0, len(x), PREDICT_CHUNK):
            outputs.append(teacher.predict(x[start : start + PREDICT_CHUNK]))
            bar.update(len(outputs[-1]))
    return torch.cat(outputs)


def gather(
    teachers: Sequence[Teacher],
    unlabeled: Dataset,
    test: Dataset,
    map_teachers: TeacherMap = sequential_map,
    progress: bool = True,
) -> Predictions:
    """Ask every teacher for its predictions on the unlabeled and the test images.

    Each teacher answers both in one mapped call, so that one that drops out (``None`` from
    ``map_teachers``) leaves no half-collected state: the union is that of the teachers that
    answered. Test samples of classes that none of them knows are left out. Each teacher
    receives the images fitted to its own input shape; the student takes the first one's.
    """
    started = time.perf_counter()

    def both(teacher: Teacher) -> tuple[Tensor, Tensor]:
        position = list(teachers).index(teacher)
        return (
            predict_all(teacher, unlabeled.x, position, progress),
            predict_all(teacher, test.x, position, progress),
        )

    outputs = map_teachers(both, teachers)
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
        unlabeled=probs,
        test=test_probs,
        x_unlabeled=fit_to_shape(unlabeled.x, in_shape),
        y_unlabeled=y_unlabeled,
        x_test=fit_to_shape(x_test, in_shape),
        y_test=y_test,
        seconds=time.perf_counter() - started,
    )


def teacher_rows(p: Predictions) -> dict[str, float]:
    """Accuracy of each teacher (argmax over its own classes) and of each ensemble rule."""
    rows = {
        f"teacher:{name}": accuracy(probs.argmax(dim=1), p.y_test)
        for name, probs in zip(p.names, p.test)
    }
    rows["best_teacher"] = max(rows.values())
    for rule in RULES:
        rows[f"ensemble:{rule}"] = accuracy(aggregate(p.test, p.known, rule).labels, p.y_test)
    rows["ensemble"] = max(v for k, v in rows.items() if k.startswith("ensemble:"))
    return rows


def pseudo_label_stats(p: Predictions, tau: float) -> dict[str, dict[str, float]]:
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
    config: CompositionConfig,
    p: Predictions,
    x: Tensor,
    targets: Tensor,
    desc: str,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
) -> tuple[Classifier, list[float]]:
    """A fresh ``config.arch`` over the union classes, trained on ``targets``."""
    torch.manual_seed(config.seed)
    model = create_model(config.arch, in_shape=tuple(p.x_test.shape[1:]), num_classes=len(p.union))
    curve = fit(
        model,
        x,
        targets,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        desc=desc,
        progress=progress,
        checkpoint=checkpoint,
    )
    return model, curve


def test_accuracy(model: Classifier, p: Predictions) -> float:
    return accuracy(predict_logits(model, p.x_test).argmax(dim=1), p.y_test)


def compose_predictions(
    p: Predictions,
    config: CompositionConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    checkpoints: Callable[[str], Checkpoint] | None = None,
) -> CompositionResult:
    """Aggregate pseudo-labels with ``config.rule``, train the student, and evaluate it with
    the teachers, the ensembles and (``config.baselines``) vanilla KD and the supervised bound.
    ``checkpoints(name)``, where given, keeps each training run's progress (see
    :func:`amalgam.fusion.train.fit`)."""

    def checkpoint(name: str) -> Checkpoint | None:
        return checkpoints(name) if checkpoints is not None else None

    results = teacher_rows(p)
    pseudo = aggregate(p.unlabeled, p.known, config.rule, config.entropy_threshold)
    keep = pseudo.keep
    if not keep.any():
        raise ValueError(
            f"no pseudo-label passed rule {config.rule!r} at entropy threshold "
            f"{config.entropy_threshold}; raise the threshold or choose another rule"
        )
    extra: dict = {
        "union_classes": p.union,
        "unlabeled": len(p.x_unlabeled),
        "test": len(p.x_test),
        "prediction_seconds": p.seconds,
        "retention": float(keep.float().mean()),
    }
    if p.y_unlabeled is not None:
        extra["pseudo_label_accuracy"] = accuracy(pseudo.labels[keep], p.y_unlabeled[keep])
    targets = pseudo.targets if config.targets == "soft" else pseudo.labels
    log(f"training the student on {int(keep.sum())} of {len(keep)} pseudo-labelled images")
    student, extra["student_loss"] = train_student(
        config, p, p.x_unlabeled[keep], targets[keep], "student", progress, checkpoint("student")
    )
    if config.finetune_fraction > 0:
        extra["finetune_samples"] = _finetune(student, p, config, progress, checkpoint("fine-tune"))
    results["student"] = test_accuracy(student, p)
    if config.baselines:
        log("training the baselines: vanilla distillation and the supervised bound")
        mean = aggregate(p.unlabeled, p.known, "mean").targets
        vanilla, _ = train_student(
            config, p, p.x_unlabeled, mean, "vanilla_kd", progress, checkpoint("vanilla_kd")
        )
        results["vanilla_kd"] = test_accuracy(vanilla, p)
        if p.y_unlabeled is not None:
            supervised, _ = train_student(
                config, p, p.x_unlabeled, p.y_unlabeled, "supervised", progress,
                checkpoint("supervised"),
            )  # fmt: skip
            results["supervised"] = test_accuracy(supervised, p)
    return CompositionResult(student, p.union, results, extra)


def compose(
    teachers: Sequence[Teacher],
    unlabeled: Dataset,
    test: Dataset,
    config: CompositionConfig,
    *,
    map_teachers: TeacherMap = sequential_map,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    checkpoints: Callable[[str], Checkpoint] | None = None,
) -> CompositionResult:
    """Compose ``teachers`` into one student over the union of their classes.

    Parameters
    ----------
    teachers : the parties' teachers; only ``predict`` is used.
    unlabeled : the coordinator's unlabeled images (labels, if present, serve only the
        supervised bound, the pseudo-label accuracy and ``finetune_fraction``).
    test : labelled images; samples of classes no teacher knows are left out.
    map_teachers : how to call every teacher (the coordinator passes a parallel fan-out).
    """
    log(
        f"collecting predictions of {len(teachers)} teachers on {len(unlabeled)} unlabeled "
        f"and {len(test)} test images"
    )
    predictions = gather(teachers, unlabeled, test, map_teachers, progress)
    return compose_predictions(
        predictions, config, progress=progress, log=log, checkpoints=checkpoints
    )


def _finetune(
    student: Classifier,
    p: Predictions,
    config: CompositionConfig,
    progress: bool,
    checkpoint: Checkpoint | None = None,
) -> int:
    """Fine-tune on a labelled fraction of the unlabeled set (paper Sec. 3, last step);
    returns the number of labelled samples used."""
    if p.y_unlabeled is None:
        raise ValueError("finetune_fraction needs labels on the unlabeled set")
    count = max(2, round(config.finetune_fraction * len(p.y_unlabeled)))
    generator = torch.Generator().manual_seed(config.seed)
    index = torch.randperm(len(p.y_unlabeled), generator=generator)[:count]
    fit(
        student,
        p.x_unlabeled[index],
        p.y_unlabeled[index],
        epochs=config.finetune_epochs,
        batch_size=config.batch_size,
        lr=config.lr / 10,
        weight_decay=config.weight_decay,
        seed=config.seed,
        desc="fine-tune",
        progress=progress,
        checkpoint=checkpoint,
    )
    return count
