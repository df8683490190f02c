"""Score vectors (paper 004, "Amalgamation of Score Vectors"): the teachers' logits side by
side, one entry per (teacher, class); entries of a class several teachers know are separate
in training and merged at test time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from amalgam.fusion.amalgamation.autoencoder import half_squared_error
from amalgam.fusion.train import soft_cross_entropy

ScoreTarget = Literal["routed", "per_teacher", "concat", "logits"]  # the keys of TARGETS
# what the student learns from the concatenated score vectors
TARGETS = {
    "routed": "each teacher's softmax weighted by how likely the image is of its part "
    "(part_weights): one distribution",
    "per_teacher": "each teacher's softmax, concatenated and divided by N: one distribution",
    "concat": "one softmax over the concatenated logits",
    "logits": "the concatenated logits themselves, by the squared error of Eq. 5",
}


def entries(class_names: Sequence[Sequence[str]]) -> list[str]:
    """The class of every column of the concatenated score vector, teacher after teacher."""
    return [name for names in class_names for name in names]


def merge_entries(scores: Tensor, entry_classes: Sequence[str], classes: Sequence[str]) -> Tensor:
    """(B, E) scores over entries -> (B, K) over ``classes``: the highest entry of each class
    (an argmax over entries then names the same class as an argmax over the result)."""
    merged = torch.full((len(scores), len(classes)), float("-inf"), dtype=scores.dtype)
    for column, name in enumerate(entry_classes):
        k = classes.index(name)
        merged[:, k] = torch.maximum(merged[:, k], scores[:, column])
    return merged


def part_weights(logits: Sequence[Tensor], sharpness: float) -> Tensor:
    """(B, N): for every image, how likely it is of each teacher's part, from the teachers'
    relative confidence.

    A teacher's largest logit is higher on images of its own classes than on others (the
    max-logit score of out-of-distribution detection; from a party that releases
    probabilities, whose logits here are log-probabilities, the maximum softmax probability).
    Teachers trained apart have logits of scales of their own, so each one's score is
    standardised over the B images before a softmax over the teachers at ``sharpness``
    (0: equal weights, as ``per_teacher``)."""
    score = torch.stack([z.float().max(dim=1).values for z in logits], dim=1)  # (B, N)
    standard = (score - score.mean(dim=0)) / score.std(dim=0, correction=0).clamp_min(1e-6)
    return torch.softmax(sharpness * standard, dim=1)


def score_targets(
    logits: Sequence[Tensor], form: str, temperature: float, sharpness: float = 1.0
) -> Tensor:
    """(B, E) targets from each teacher's (B, K_i) logits of B images, as :data:`TARGETS`
    describes; ``routed`` weighs the teachers with :func:`part_weights` at ``sharpness``,
    calibrated on these B images (pass all of them at once)."""
    if form == "routed":
        weights = part_weights(logits, sharpness)  # (B, N)
        return torch.cat(
            [w[:, None] * torch.softmax(z / temperature, dim=1) for w, z in zip(weights.T, logits)],
            dim=1,
        )
    if form == "per_teacher":
        return torch.cat([torch.softmax(z / temperature, dim=1) for z in logits], 1) / len(logits)
    if form == "concat":
        return torch.softmax(torch.cat(list(logits), dim=1) / temperature, dim=1)
    if form == "logits":
        return torch.cat(list(logits), dim=1)
    raise ValueError(f"score_target: unknown {form!r} (known: {', '.join(TARGETS)})")


def score_loss(form: str, temperature: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The student's loss against :func:`score_targets`: for distributions, the distillation
    loss ``T^2 * H(q, softmax(s / T))`` over one softmax of all entries; for logits, Eq. 5."""
    if form == "logits":
        return half_squared_error
    return lambda student, q: temperature**2 * soft_cross_entropy(student / temperature, q)
