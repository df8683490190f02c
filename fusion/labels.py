"""Label spaces: teachers may know different, overlapping class sets, and release their
predictions in different forms. Everything that maps between a teacher's classes and the
union of all of them, or between released forms, lives here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from amalgam.fusion.data import Dataset


def union_classes(class_sets: Sequence[Sequence[str]]) -> list[str]:
    """The union of the teachers' class names, in order of first appearance."""
    seen: dict[str, None] = {}
    for classes in class_sets:
        for name in classes:
            seen.setdefault(name, None)
    return list(seen)


def known_mask(class_sets: Sequence[Sequence[str]], union: Sequence[str]) -> Tensor:
    """(T, U) bool: which teacher knows which union class."""
    return torch.tensor(
        [[name in set(classes) for name in union] for classes in class_sets], dtype=torch.bool
    )


def to_probs(outputs: Tensor, form: str, num_classes: int) -> Tensor:
    """Turn released predictions into (B, K) probabilities.

    ``logits`` -> softmax; ``probs`` as they are; ``topk`` (zeros outside the top k) renormalized;
    ``label`` (B,) -> one-hot.
    """
    if form == "logits":
        return F.softmax(outputs.float(), dim=1)
    if form in ("probs", "topk"):
        probs = outputs.float().clamp_min(0)
        return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
    if form == "label":
        return F.one_hot(outputs.long(), num_classes).float()
    raise ValueError(f"unknown output form {form!r}; expected one of logits, probs, topk, label")


def as_logits(outputs: Tensor, form: str, num_classes: int) -> Tensor:
    """Released predictions as (B, K) logits: logits as they are, probabilities (``probs``,
    ``topk``, one-hot ``label``) as log-probabilities, which have the same softmax at any
    temperature for logits and sharpen or soften the released distribution alike otherwise."""
    if form == "logits":
        return outputs.float()
    return to_probs(outputs, form, num_classes).clamp_min(1e-12).log()


def to_union(probs: Tensor, classes: Sequence[str], union: Sequence[str]) -> Tensor:
    """Scatter (B, K) probabilities over a teacher's classes into (B, U) union columns."""
    index = torch.tensor([list(union).index(name) for name in classes])
    out = probs.new_zeros(probs.shape[0], len(union))
    out[:, index] = probs
    return out


def collect_union_probs(
    outputs: Sequence[Tensor],
    forms: Sequence[str],
    class_sets: Sequence[Sequence[str]],
    union: Sequence[str],
) -> tuple[Tensor, Tensor]:
    """Stack every teacher's released outputs as (T, B, U) union-space probabilities.

    Returns
    -------
    probs : (T, B, U)
    known : (T, U) bool
    """
    probs = torch.stack(
        [
            to_union(to_probs(out, form, len(classes)), classes, union)
            for out, form, classes in zip(outputs, forms, class_sets)
        ]
    )
    return probs, known_mask(class_sets, union)


def relabel(data: Dataset, union: Sequence[str]) -> tuple[Tensor, Tensor]:
    """The samples whose class is in ``union``, labelled by union index: (N', C, H, W), (N',)."""
    if data.y is None:
        raise ValueError("the data set has no labels")
    mapping = torch.tensor([union.index(n) if n in union else -1 for n in data.class_names])
    y = mapping[data.y]
    keep = y >= 0
    return data.x[keep], y[keep]
