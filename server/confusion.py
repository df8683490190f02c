"""The delivered student on the job's test set, class by class: its confusion matrix and
accuracy per class, for every method whose student classifies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import confusion_matrix

from amalgam.fusion.data import fit_to_shape, load_source
from amalgam.fusion.detection import DETECTORS
from amalgam.fusion.train import predict_logits
from amalgam.server.student import load_student


@dataclass(frozen=True)
class Confusion:
    """``matrix[i][j]``: test images of class ``class_names[i]`` the student called
    ``class_names[j]``; only classes the student knows."""

    class_names: list[str]
    matrix: list[list[int]]

    @property
    def per_class(self) -> list[float | None]:
        """Accuracy of each class (the diagonal over its row; None for a class without test
        images)."""
        counts = np.asarray(self.matrix)
        totals = counts.sum(axis=1)
        return [None if t == 0 else float(counts[i, i] / t) for i, t in enumerate(totals)]


def student_confusion(run_dir: Path, test_source: str) -> Confusion | None:
    """The confusion of the student delivered in ``run_dir`` on ``test_source``, over the
    student's classes (test images of other classes are left out); None for a detector or
    a test set that shares no class with the student."""
    student, card = load_student(run_dir)
    if card["arch"] in DETECTORS:
        return None
    test = load_source(test_source)
    names = list(card["class_names"])
    own = [names.index(n) if n in names else -1 for n in test.class_names]
    truth = torch.tensor(own)[test.y]  # (N,) student class index, -1 where unknown to it
    keep = truth >= 0
    if not keep.any():
        return None
    x = fit_to_shape(test.x[keep], tuple(card["input_shape"]))  # (M, C, H, W) in [0, 1]
    predicted = predict_logits(student, x).argmax(dim=1)  # (M,)
    matrix = confusion_matrix(truth[keep].numpy(), predicted.numpy(), labels=range(len(names)))
    return Confusion(names, matrix.tolist())
