"""The ``consolidate`` job method (paper 001): export the generalist's network, ask the
task-specific teachers for predictions on the coordinator's proxy images, train the
consolidated student (and plain multi-teacher distillation as the baseline), then judge every
representation by few-shot linear probes on the job's downstream tasks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from amalgam.fusion.activations import PENULTIMATE
from amalgam.fusion.compose import predict_all, relabel
from amalgam.fusion.composition import to_probs
from amalgam.fusion.consolidation.loss import as_logits
from amalgam.fusion.consolidation.student import MultiHeadStudent
from amalgam.fusion.consolidation.trainer import ConsolidationConfig, consolidate
from amalgam.fusion.data import Dataset, fit_to_shape, load_source
from amalgam.fusion.models import Classifier
from amalgam.fusion.teacher import Teacher
from amalgam.fusion.train import accuracy
from amalgam.fusion.transfer import Represent, extract_features, transfer_score
from amalgam.protocol.schemas import JobSpec
from amalgam.server.fanout import fan_out
from amalgam.server.outcome import Outcome
from amalgam.server.report import markdown_table
from amalgam.server.weightfusion import Normaliser


def _config(spec: JobSpec) -> ConsolidationConfig:
    fields = {f.name for f in dataclasses.fields(ConsolidationConfig)}
    params = spec.method.params.model_dump(include=fields)
    return ConsolidationConfig(**params, seed=spec.seed)


def _local(model: Classifier, normalise: Normaliser) -> Represent:
    return lambda x: extract_features(model, normalise(x))


def _remote(teacher: Teacher) -> Represent:
    """The party computes its own features (Activations of its penultimate layer)."""
    shape = tuple(teacher.info.input_shape)
    return lambda x: teacher.activations(fit_to_shape(x, shape), [PENULTIMATE])[PENULTIMATE]


def _releases_features(teacher: Teacher) -> bool:
    info = teacher.info
    return "activations" in info.capabilities and PENULTIMATE in info.layers


def _task_data(task) -> tuple[Dataset, Dataset]:
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


def _upstream(spec, experts, students, normalise, progress) -> dict[str, float]:
    """Each teacher's own task, on the test images of its classes: the teacher itself and the
    students' head for it (rows ``<network>:upstream-<party>``)."""
    test, rows = load_source(spec.data.test), {}
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
                logits = torch.cat([student(normalise(part))[k] for part in x.split(512)])
            rows[f"{name}:{task}"] = accuracy(logits.argmax(dim=1), y)
    return rows


def _table(spec: JobSpec, scores: dict[str, dict[str, tuple[float, float]]]) -> str:
    tasks = spec.method.params.tasks
    related = {True: " (related)", False: " (unrelated)", None: ""}
    header = ["representation"] + [f"{t.name}{related[t.related]}" for t in tasks]
    rows = [
        [name] + [f"{100 * per[t.name][0]:.1f} ± {100 * per[t.name][1]:.1f}" for t in tasks]
        for name, per in scores.items()
    ]
    return markdown_table(header, rows)


def _heads_writer(student: MultiHeadStudent, experts: Sequence[Teacher]):
    def write(path):
        tensors = {
            f"{teacher.info.name}.{key}": value.contiguous()
            for teacher, head in zip(experts, student.teacher_heads, strict=True)
            for key, value in head.state_dict().items()
        }
        save_file(tensors, str(path))

    return write


def run_consolidation(spec: JobSpec, teachers, progress, log, checkpoints=None) -> Outcome:
    params = spec.method.params
    generalist_party = next(t for t in teachers if t.info.name == params.generalist)
    experts = [t for t in teachers if t.info.name != params.generalist]
    normalise = Normaliser(generalist_party.info)
    tasks = {task.name: _task_data(task) for task in params.tasks}  # bad input fails first
    log(f"consolidate: exporting the generalist's network ({params.generalist})")
    generalist = generalist_party.weights().build()
    proxy = load_source(spec.data.unlabeled)
    log(f"consolidate: {len(experts)} teachers predict on {len(proxy)} proxy images")
    released = fan_out(lambda t: predict_all(t, proxy.x, experts.index(t), progress), experts)
    logits = [
        as_logits(out, t.info.output_form, len(t.info.class_names))
        for out, t in zip(released, experts, strict=True)
    ]
    config, x_proxy = _config(spec), normalise(proxy.x)
    runs = {"consolidated": config}
    if spec.baselines and config.generalist_weight > 0:
        runs["kd"] = dataclasses.replace(config, generalist_weight=0.0)
    students, losses = {}, {}
    for name, run_config in runs.items():
        log(f"consolidate: training {name} (lambda_0 = {run_config.generalist_weight})")
        result = consolidate(generalist, x_proxy, logits, run_config, progress)
        students[name], losses[name] = result.student, result.losses

    represent = {"generalist": _local(generalist, normalise)}
    represent |= {f"teacher:{t.info.name}": _remote(t) for t in experts if _releases_features(t)}
    represent |= {name: _local(s.model, normalise) for name, s in students.items()}
    withheld = [t.info.name for t in experts if not _releases_features(t)]
    results, scores = {}, {name: {} for name in represent}
    for task in params.tasks:
        train, test = tasks[task.name]
        log(f"consolidate: {params.shots}-shot linear probes on {task.name}")
        for name, fn in represent.items():
            score = transfer_score(
                lambda x, fn=fn: np.asarray(fn(x), dtype=np.float32).reshape(len(x), -1),
                train,
                test,
                params.shots,
                params.draws,
                spec.seed,
                params.full_probe,
            )
            results[f"{name}:{task.name}"] = score.few_shot.mean
            scores[name][task.name] = (score.few_shot.mean, score.few_shot.std)
            if score.full is not None:
                results[f"{name}:{task.name}:full"] = score.full
    results |= _upstream(spec, experts, students, normalise, progress)
    summary = [
        f"Proxy: {spec.data.unlabeled} ({len(proxy)} images, unlabeled); generalist "
        f"{params.generalist}; teachers {', '.join(t.info.name for t in experts)}.",
        "",
        f"{params.shots}-shot linear probe on frozen features, mean ± std over "
        f"{params.draws} draws, accuracy %:",
        "",
        _table(spec, scores),
    ]
    if withheld:
        summary += ["", f"No feature rows for {', '.join(withheld)}: penultimate not released."]
    extra = {
        "few_shot": {n: {t: list(v) for t, v in per.items()} for n, per in scores.items()},
        "losses": losses,
        "normalization": {
            "mean": list(generalist_party.info.mean),
            "std": list(generalist_party.info.std),
        },
        "teacher_heads": {t.info.name: list(t.info.class_names) for t in experts},
    }
    consolidated = students["consolidated"]
    return Outcome(
        consolidated.model,
        list(generalist_party.info.class_names),
        results,
        extra,
        summary,
        files={"heads.safetensors": _heads_writer(consolidated, experts)},
    )
