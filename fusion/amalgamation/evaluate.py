"""How an amalgamated student is judged (paper 004, Tables 1-3): on the whole task against
the ensemble of the teachers (the highest score over their concatenated vectors), and on each
teacher's part against that teacher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from amalgam.fusion.amalgamation.scores import merge_entries, score_targets
from amalgam.fusion.amalgamation.student import build_student
from amalgam.fusion.amalgamation.trainer import VGG_STUDENT, common_layout
from amalgam.fusion.data import Dataset, fit_to_shape
from amalgam.fusion.labels import as_logits, relabel, union_classes
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import Teacher, TeacherInfo, predict_all
from amalgam.fusion.train import accuracy, predict_logits


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_counts(
    infos: Sequence[TeacherInfo],
    widths: Mapping[str, Mapping[str, int]],
    student: nn.Module,
    arch: str = VGG_STUDENT,
) -> dict[str, int]:
    """``student``; for a ``vgg_cnn`` student (``arch``) also ``teacher:<party>`` (its
    ``vgg_cnn`` from the widths of its released layers) and ``teachers`` (their sum)."""
    if arch != VGG_STUDENT:
        return {"student": parameter_count(student)}
    layout = common_layout(infos)
    counts = {
        f"teacher:{info.name}": parameter_count(
            build_student(
                layout,
                [widths[layer][info.name] for layer in layout.layers],
                info.input_shape,
                len(info.class_names),
                adapt=False,
            )
        )
        for info in infos
    }
    counts["teachers"] = sum(counts.values())
    counts["student"] = parameter_count(student)
    return counts


def amalgamation_rows(
    teachers: Sequence[Teacher],
    students: Mapping[str, nn.Module],
    entry_classes: Sequence[str],
    test: Dataset,
    context: RunContext = RunContext(),
    routing_sharpness: float = 1.0,
) -> dict[str, float]:
    """Rows ``teacher:<party>`` (on the test images of its classes), ``ensemble`` (the
    highest score over the concatenated logits, the paper's), ``ensemble_routed`` (the
    highest of the teachers' softmaxes weighted by their part weights at
    ``routing_sharpness``, calibrated on the test images: :func:`scores.part_weights`) and
    every student on the whole task (test images of the union of classes), and
    ``<student>:part<k>``: the student on teacher k's images, choosing among teacher k's
    entries as the teacher does (k from 1, in the order of ``teachers``)."""
    infos = [t.info for t in teachers]
    classes = union_classes([info.class_names for info in infos])
    x, y = relabel(test, classes)
    x = fit_to_shape(x, tuple(infos[0].input_shape))
    released = context.map_teachers(
        lambda t: predict_all(t, x, infos.index(t.info), context.progress), teachers
    )
    logits = [
        as_logits(out, info.output_form, len(info.class_names))
        for out, info in zip(released, infos, strict=True)
    ]  # each (N, K_i)
    routed = score_targets(logits, "routed", 1.0, routing_sharpness)  # (N, E)
    rows = {
        "ensemble": _whole(torch.cat(logits, dim=1), entry_classes, classes, y),
        "ensemble_routed": _whole(routed, entry_classes, classes, y),
    }
    columns, start = [], 0
    for info in infos:
        columns.append(slice(start, start + len(info.class_names)))
        start += len(info.class_names)
    for info, scores, part in zip(infos, logits, columns, strict=True):
        rows[f"teacher:{info.name}"] = _part(scores, entry_classes[part], classes, y)
    for name, student in students.items():
        scores = predict_logits(student, x)  # (N, E)
        rows[name] = _whole(scores, entry_classes, classes, y)
        for k, part in enumerate(columns, start=1):
            rows[f"{name}:part{k}"] = _part(scores[:, part], entry_classes[part], classes, y)
    return rows


def _whole(scores: Tensor, entry_classes, classes, y: Tensor) -> float:
    return accuracy(merge_entries(scores, entry_classes, classes).argmax(dim=1), y)


def _part(scores: Tensor, part_classes, classes, y: Tensor) -> float:
    """Accuracy on the images whose class is among ``part_classes``, choosing among them."""
    index = torch.tensor([classes.index(name) for name in part_classes])
    mine = torch.isin(y, index)
    chosen = index[scores[mine].argmax(dim=1)]
    return accuracy(chosen, y[mine])
