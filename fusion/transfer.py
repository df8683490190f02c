"""Transfer evaluation of a representation (paper 001, section 3): a linear classifier on frozen
features of a downstream task, trained on k images per class (few-shot, averaged over random
draws) or on the whole training set, and scored on the whole test set."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from amalgam.fusion.data import Dataset
from amalgam.fusion.device import to_model
from amalgam.fusion.models import Classifier

C_GRID = np.logspace(-3, 2, 6)  # inverse L2 strengths tried by cross-validation


@torch.no_grad()
def extract_features(model: Classifier, x: Tensor, batch_size: int = 512) -> np.ndarray:
    """(N, D) penultimate features phi(x) of ``model`` in eval mode on (N, C, H, W) images."""
    model.eval()
    parts = [
        model.forward_features(to_model(model, x[i : i + batch_size]))
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(parts).float().cpu().numpy()


def few_shot_indices(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``shots`` random samples of every class in ``labels`` (all of a class that
    has fewer), sorted."""
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features, its L2
    strength chosen by stratified ``folds``-fold cross-validation on the training features
    (fewer folds when a class has fewer samples; a fixed C = 1 below two per class)."""
    _, counts = np.unique(train_labels, return_counts=True)
    folds = min(folds, int(counts.min()))
    if folds >= 2:
        split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        classifier = LogisticRegressionCV(
            Cs=C_GRID,
            cv=split,
            max_iter=2000,
            l1_ratios=(0.0,),  # L2 only
            scoring="accuracy",
            use_legacy_attributes=False,
        )
    else:
        classifier = LogisticRegression(C=1.0, max_iter=2000)
    probe = make_pipeline(StandardScaler(), classifier)
    probe.fit(train_features, train_labels)
    return float((probe.predict(test_features) == test_labels).mean())


def few_shot_draws(labels: np.ndarray, shots: int, draws: int, seed: int) -> list[np.ndarray]:
    """``draws`` seeded :func:`few_shot_indices` sets: the same seed gives every
    representation the same training sets."""
    rng = np.random.default_rng(seed)
    return [few_shot_indices(labels, shots, rng) for _ in range(draws)]


@dataclass(frozen=True)
class ProbeScore:
    mean: float
    std: float  # across draws; 0 for a single fit
    draws: int


def few_shot_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    draws: Sequence[np.ndarray],
    seed: int = 0,
) -> ProbeScore:
    """Mean and spread of :func:`linear_probe` over the training sets ``draws`` (index arrays
    into ``train_features``), each scored on every test sample."""
    scores = [
        linear_probe(
            train_features[index], train_labels[index], test_features, test_labels, seed=seed + k
        )
        for k, index in enumerate(draws)
    ]
    return ProbeScore(float(np.mean(scores)), float(np.std(scores)), len(scores))


Represent = Callable[[Tensor], np.ndarray]  # (N, C, H, W) images in [0, 1] -> (N, D) features


@dataclass(frozen=True)
class TransferScore:
    few_shot: ProbeScore
    full: float | None = None  # linear probe on every training image, where asked for


def transfer_score(
    represent: Represent,
    train: Dataset,
    test: Dataset,
    shots: int = 5,
    draws: int = 20,
    seed: int = 0,
    full: bool = False,
) -> TransferScore:
    """Few-shot (and optionally full-data) linear-probe accuracy of a representation on a
    downstream task. Only the images some draw uses are represented, unless ``full``: a
    party that computes its own features is asked for no more than that."""
    labels = train.y.numpy()
    sets = few_shot_draws(labels, shots, draws, seed)
    needed = np.arange(len(train)) if full else np.unique(np.concatenate(sets))
    features = represent(train.x[torch.from_numpy(needed)])  # (len(needed), D)
    test_features = represent(test.x)
    test_labels = test.y.numpy()
    local = [np.searchsorted(needed, index) for index in sets]
    few_shot = few_shot_probe(
        features, labels[needed], test_features, test_labels, local, seed=seed
    )
    if not full:
        return TransferScore(few_shot)
    return TransferScore(few_shot, linear_probe(features, labels, test_features, test_labels))
