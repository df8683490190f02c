"""Accuracy of teachers, their ensemble and students on a labelled set over the same classes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from amalgam.fusion.data import fit_to_shape
from amalgam.fusion.labels import to_probs
from amalgam.fusion.teacher import Teacher
from amalgam.fusion.train import accuracy, predict_logits


def per_class_accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    """Accuracy within each true class; NaN for a class absent from ``labels``."""
    return [
        accuracy(predictions[labels == c], labels[labels == c])
        if (labels == c).any()
        else float("nan")
        for c in range(num_classes)
    ]


def evaluate(
    teachers: Sequence[Teacher],
    students: Mapping[str, nn.Module],
    x: Tensor,
    y: Tensor,
    map_teachers: Callable = lambda fn, items: [fn(t) for t in items],
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Rows ``teacher:<name>``, ``best_teacher``, ``ensemble`` (mean probabilities) and one
    per student, with per-class accuracies. Teachers and students share one label set.

    Parameters
    ----------
    x : (N, C, H, W) images in [0, 1]; y : (N,) labels in the teachers' class order.
    """
    num_classes = len(teachers[0].info.class_names)
    probs = map_teachers(
        lambda t: to_probs(
            t.predict(fit_to_shape(x, t.info.input_shape)), t.info.output_form, num_classes
        ),
        teachers,
    )
    predictions = {f"teacher:{t.info.name}": p.argmax(dim=1) for t, p in zip(teachers, probs)}
    rows = {name: accuracy(pred, y) for name, pred in predictions.items()}
    rows["best_teacher"] = max(rows.values())
    predictions["ensemble"] = torch.stack(probs).mean(dim=0).argmax(dim=1)
    for name, student in students.items():
        predictions[name] = predict_logits(student, x).argmax(dim=1)
    rows.update({name: accuracy(predictions[name], y) for name in ["ensemble", *students]})
    per_class = {name: per_class_accuracy(p, y, num_classes) for name, p in predictions.items()}
    return rows, per_class
