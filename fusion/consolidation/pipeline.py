"""Representation consolidation of parties (paper 001): export the generalist's network, ask
the task-specific teachers for predictions on the coordinator's proxy images, train the
consolidated student (and plain multi-teacher distillation as the baseline), then judge every
representation by few-shot linear probes on downstream tasks the coordinator owns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from amalgam.fusion.activations import PENULTIMATE
from amalgam.fusion.config import Config
from amalgam.fusion.consolidation.student import MultiHeadStudent
from amalgam.fusion.consolidation.trainer import ConsolidationConfig, consolidate
from amalgam.fusion.data import Dataset, fit_to_shape, load_source
from amalgam.fusion.device import to_model
from amalgam.fusion.labels import as_logits, relabel, to_probs
from amalgam.fusion.models import Classifier
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import Normaliser, Teacher, predict_all
from amalgam.fusion.train import accuracy
from amalgam.fusion.transfer import Represent, extract_features, transfer_score


class TransferTask(Config):
    """A downstream task for judging a representation: labelled sources the coordinator owns."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    train: str  # the linear probe's training images (k per class are drawn)
    test: str  # every image is scored
    classes: list[str] | None = None  # only these classes of both sources; None: all
    related: bool | None = None  # to a teacher's task (shown in the report); None: unknown


class ConsolidationParams(ConsolidationConfig):
    """Representation consolidation of parties: the generalist and the task-specific teachers
    distilled into one multi-head student on the proxy images, judged on ``tasks``."""

    generalist: str  # the party whose network is the generalist: it must grant weights
    shots: int = Field(5, ge=1)  # few-shot linear probe: images per class
    draws: int = Field(20, ge=1)  # random few-shot training sets, averaged
    full_probe: bool = False  # also a linear probe on every training image of each task
    tasks: list[TransferTask] = Field(min_length=1)


@dataclass
class Consolidation:
    """What consolidating the parties produced.

    Attributes
    ----------
    students : ``consolidated`` and, with the baselines, ``kd`` (the same training without
        the generalist's term).
    losses : the mean loss of each epoch, per student.
    scores : per representation, per task: the few-shot probe's mean and std over draws.
    rows : few-shot accuracies ``<representation>:<task>`` (``:full`` with full probes) and
        each teacher's own task ``<network>:upstream-<party>``.
    withheld : teachers whose penultimate features their policy does not release.
    experts : the task-specific teachers, in the order of the students' heads 1..N.
    """

    students: dict[str, MultiHeadStudent]
    losses: dict[str, list[float]]
    scores: dict[str, dict[str, tuple[float, float]]]
    rows: dict[str, float]
    withheld: list[str]
    experts: list[Teacher]


def _local(model: Classifier, normalise: Normaliser) -> Represent:
    return lambda x: extract_features(model, normalise(x))


def _remote(teacher: Teacher) -> Represent:
    """The party computes its own features (Activations of its penultimate layer)."""
    shape = tuple(teacher.info.input_shape)
    return lambda x: teacher.activations(fit_to_shape(x, shape), [PENULTIMATE])[PENULTIMATE]


def releases_features(teacher: Teacher) -> bool:
    info = teacher.info
    return "activations" in info.capabilities and PENULTIMATE in info.layers


def task_data(task: TransferTask) -> tuple[Dataset, Dataset]:
    """A task's training and test images, restricted to its classes; a class a source lacks
    is named."""
    train, test = load_source(task.train), load_source(task.test)
    if task.classes is None:
        return train, test
    for source, data in ((task.train, train), (task.test, test)):
        unknown = [c for c in task.classes if c not in data.class_names]
        if unknown:
            raise ValueError(
                f"method.params.tasks ({task.name}): {source} has no class {unknown[0]!r}"
            )
    return train.restrict(task.classes), test.restrict(task.classes)


def _upstream(test: Dataset, experts, students, normalise, progress) -> dict[str, float]:
    """Each teacher's own task, on the test images of its classes: the teacher itself and the
    students' head for it (rows ``<network>:upstream-<party>``)."""
    rows = {}
    for k, teacher in enumerate(experts, start=1):
        classes = list(teacher.info.class_names)
        x, y = relabel(test, classes)
        if not len(y):
            continue
        released = predict_all(teacher, x, 0, progress)
        probs = to_probs(released, teacher.info.output_form, len(classes))
        task = f"upstream-{teacher.info.name}"
        rows[f"teacher:{teacher.info.name}:{task}"] = accuracy(probs.argmax(dim=1), y)
        for name, student in students.items():
            with torch.no_grad():
                logits = torch.cat(
                    [student(to_model(student, normalise(part)))[k].cpu() for part in x.split(512)]
                )
            rows[f"{name}:{task}"] = accuracy(logits.argmax(dim=1), y)
    return rows


def consolidate_parties(
    teachers: Sequence[Teacher],
    params: ConsolidationParams,
    proxy: Dataset,
    test: Dataset,
    context: RunContext = RunContext(),
) -> Consolidation:
    """Consolidate the generalist party's exported network and the other parties' predictions
    on the unlabeled ``proxy`` images; judge every representation on ``params.tasks`` and each
    teacher's own task on ``test``."""
    generalist_party = next(t for t in teachers if t.info.name == params.generalist)
    experts = [t for t in teachers if t.info.name != params.generalist]
    normalise = Normaliser(generalist_party.info)
    tasks = {task.name: task_data(task) for task in params.tasks}  # bad input fails first
    seed, progress, log = context.seed, context.progress, context.log
    log(f"consolidate: exporting the generalist's network ({params.generalist})")
    generalist = generalist_party.weights().build()
    log(f"consolidate: {len(experts)} teachers predict on {len(proxy)} proxy images")
    released = context.map_teachers(
        lambda t: predict_all(t, proxy.x, experts.index(t), progress), experts
    )
    logits = [
        as_logits(out, t.info.output_form, len(t.info.class_names))
        for out, t in zip(released, experts, strict=True)
    ]
    x_proxy = normalise(proxy.x)
    runs = {"consolidated": params}
    if context.baselines and params.generalist_weight > 0:
        runs["kd"] = params.model_copy(update={"generalist_weight": 0.0})
    students, losses = {}, {}
    for name, run_config in runs.items():
        log(f"consolidate: training {name} (lambda_0 = {run_config.generalist_weight})")
        result = consolidate(generalist, x_proxy, logits, run_config, seed=seed, progress=progress,
                             hardware=context.hardware)  # fmt: skip
        students[name], losses[name] = result.student, result.losses

    represent = {"generalist": _local(generalist, normalise)}
    represent |= {f"teacher:{t.info.name}": _remote(t) for t in experts if releases_features(t)}
    represent |= {name: _local(s.model, normalise) for name, s in students.items()}
    rows, scores = {}, {name: {} for name in represent}
    for task in params.tasks:
        train, task_test = tasks[task.name]
        log(f"consolidate: {params.shots}-shot linear probes on {task.name}")
        for name, fn in represent.items():
            score = transfer_score(
                lambda x, fn=fn: np.asarray(fn(x), dtype=np.float32).reshape(len(x), -1),
                train,
                task_test,
                params.shots,
                params.draws,
                seed,
                params.full_probe,
            )
            rows[f"{name}:{task.name}"] = score.few_shot.mean
            scores[name][task.name] = (score.few_shot.mean, score.few_shot.std)
            if score.full is not None:
                rows[f"{name}:{task.name}:full"] = score.full
    rows |= _upstream(test, experts, students, normalise, progress)
    withheld = [t.info.name for t in experts if not releases_features(t)]
    return Consolidation(students, losses, scores, rows, withheld, experts)
