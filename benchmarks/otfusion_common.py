"""What the weight-fusion benchmark's cases share: their optimisers, probe, and the
accuracy, ensemble, fine-tuning and timing of a network."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from amalgam.fusion.data import Dataset
from amalgam.fusion.models import Classifier
from amalgam.fusion.train import accuracy, fit, predict_logits

SEED = 0  # the first seed; --seeds runs more
SGD = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.5, "weight_decay": 0.0, "batch_size": 64}
ADAM = {"optimizer": "adam", "lr": 2e-3, "batch_size": 64}
ADAM_FT = {"optimizer": "adam", "lr": 1e-3, "batch_size": 64}
BATCHNORM_IMAGES = 10_000
PROBE_SIZE = 200


def one_hot(data: Dataset) -> torch.Tensor:
    """(N, 10) targets of ``data``'s labels, for networks without the registry's ``head``."""
    return F.one_hot(data.y.long(), 10).float()


def fine_tuned(
    model: nn.Module, data: Dataset, epochs: int, seed: int, desc: str, optimiser: dict = SGD
) -> Classifier:
    clone = copy.deepcopy(model)
    fit(clone, data.x, one_hot(data), epochs=epochs, seed=seed + 7, desc=desc, **optimiser)
    return clone.eval()


def test_accuracy(model: Classifier, test: Dataset) -> float:
    return accuracy(predict_logits(model, test.x).argmax(dim=1), test.y)


def ensemble_accuracy(models: list[Classifier], test: Dataset) -> float:
    probs = torch.stack([F.softmax(predict_logits(m, test.x), dim=1) for m in models])
    return accuracy(probs.mean(dim=0).argmax(dim=1), test.y)


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, round(time.perf_counter() - started, 4)


def probe_inputs(train: Dataset, seed: int) -> torch.Tensor:
    index = np.random.default_rng(seed).permutation(len(train))[:PROBE_SIZE]
    return train.x[torch.from_numpy(index)]
