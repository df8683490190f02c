"""Pseudo-label aggregation for detection (paper 000, section 3.2, Algorithm 2, Remark 1).

Per image, the detections of all models are grouped into objects: two detections of the same
category whose boxes overlap by more than ``iou_threshold`` belong to the same object (the
groups are the connected components of that relation). For object j of image i,
K_ij = the number of distinct models in its group and N_ij = the number of models whose
category set contains its category. A group is kept when

- ``unanimous``: K_ij = N_ij,
- ``consensus``: K_ij >= N_ij / 2,
- ``affirmative``: always,

and Soft-NMS (Bodla et al. 2017, Gaussian) then thins the candidates inside each kept group.
A category only one model knows has K_ij = N_ij = 1 and is kept by every rule (Remark 1):
that model's confident detections are the only evidence there is. Votes count distinct
models, not boxes, so one model that fires twice on an object is still one vote.

Last, an addition to Algorithm 2: one category per object. A kept box that overlaps a
higher-scoring kept box of another category by more than ``category_iou`` goes. Detectors
suppress duplicates per category, so one model may box a digit as both a 7 and a 9, and two
models may name it differently (one of them as a category it was never taught the digit for);
the vote, per category, keeps both where few models know the category, and as training targets
the two boxes contradict each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from pydantic import Field
from torch import Tensor
from torchvision.ops import box_iou

from amalgam.fusion.config import Config
from amalgam.fusion.teacher import Detections

DetectionRule = Literal["unanimous", "consensus", "affirmative"]
RULES: tuple[str, ...] = get_args(DetectionRule)


class AggregationConfig(Config):
    """Algorithm 2's settings; a composition job over detection parties sets the first four
    in its ``method.params``."""

    detection_rule: DetectionRule = "consensus"  # unanimous (K = N) | consensus | affirmative
    iou_threshold: float = Field(0.5, gt=0, lt=1)  # same category and IoU above: one object
    # confidence filter applied to every model's detections first (FilterPseudoLabels of
    # Algorithm 1); 0 keeps everything
    score_threshold: float = Field(0.5, ge=0, le=1)
    soft_nms_sigma: float = Field(0.5, gt=0)  # Soft-NMS: a score decays by exp(-IoU^2 / sigma)
    # detections Soft-NMS decayed below this are dropped: at the confidence filter's 0.5, a
    # duplicate (at IoU 0.7 its score decays to 0.38 of itself) no longer passes as an object
    final_score: float = Field(0.5, ge=0, le=1)
    soft_nms: bool = True  # False: every detection of a kept group stays
    # one category per object: boxes of another category overlapping a higher-scoring kept
    # box by more than this IoU are dropped; None: objects of different categories may overlap
    category_iou: float | None = Field(0.5, gt=0, lt=1)


@dataclass
class AggregationStats:
    """How many boxes each stage kept, over all images."""

    detections: int = 0  # what the models returned
    confident: int = 0  # after the confidence filter
    objects: int = 0  # groups formed
    kept_objects: int = 0  # groups the rule kept
    boxes: int = 0  # pseudo-label boxes after Soft-NMS and one category per object
    conflicts: int = 0  # boxes dropped for a higher-scoring box of another category
    # the groups each rule would keep
    per_rule: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULES, 0))

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def soft_nms(boxes: Tensor, scores: Tensor, sigma: float = 0.5, final_score: float = 0.5):
    """Gaussian Soft-NMS: repeatedly take the highest-scoring box M and decay every other
    score by ``exp(-IoU(M, b)^2 / sigma)``; boxes that fall below ``final_score`` go.

    Parameters
    ----------
    boxes : (M, 4) ``x1, y1, x2, y2``.
    scores : (M,).

    Returns
    -------
    keep : (K,) indices into ``boxes`` in the order they were selected.
    decayed : (K,) their scores after decay.
    """
    scores = scores.clone().float()
    remaining = torch.arange(boxes.shape[0])
    keep, decayed = [], []
    while remaining.numel():
        top = int(torch.argmax(scores[remaining]))
        best = remaining[top]
        if scores[best] < final_score:
            break
        keep.append(int(best))
        decayed.append(float(scores[best]))
        remaining = torch.cat([remaining[:top], remaining[top + 1 :]])
        if remaining.numel():
            iou = box_iou(boxes[best : best + 1], boxes[remaining])[0]  # (R,)
            scores[remaining] *= torch.exp(-(iou**2) / sigma)
    return torch.tensor(keep, dtype=torch.long), torch.tensor(decayed)


def group_objects(boxes: Tensor, labels: Tensor, iou_threshold: float) -> list[Tensor]:
    """Indices of the detections of each object: connected components of "same category and
    IoU > ``iou_threshold``" (boxes (M, 4), labels (M,))."""
    if boxes.shape[0] == 0:
        return []
    linked = (box_iou(boxes, boxes) > iou_threshold) & (labels[:, None] == labels[None, :])
    parent = list(range(boxes.shape[0]))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.nonzero(torch.triu(linked, diagonal=1)).tolist():
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(boxes.shape[0]):
        groups.setdefault(root(i), []).append(i)
    return [torch.tensor(members) for members in groups.values()]


def one_category_per_object(found: Detections, iou_threshold: float) -> Detections:
    """Greedily, from the highest score down, drop every box that overlaps an already kept
    box of another category by more than ``iou_threshold``; same-category overlaps stay
    (Soft-NMS has dealt with them). Returns the kept detections, highest score first."""
    found = found.select(torch.argsort(found.scores, descending=True))
    clash = box_iou(found.boxes, found.boxes) > iou_threshold  # (M, M)
    clash &= found.labels[:, None] != found.labels[None, :]
    keep = torch.ones(len(found), dtype=torch.bool)
    for i in range(len(found)):
        if keep[i]:
            keep[i + 1 :] &= ~clash[i, i + 1 :]
    return found.select(keep)


def keeps(rule: str, k: int, n: int) -> bool:
    """Whether a group seen by ``k`` distinct models of the ``n`` that know its category
    survives ``rule`` (Algorithm 2)."""
    if rule == "unanimous":
        return k >= n
    if rule == "consensus":
        return k >= n / 2
    return True


def aggregate_image(
    per_model: Sequence[Detections],
    knows: Tensor,
    config: AggregationConfig,
    stats: AggregationStats | None = None,
) -> Detections:
    """The pseudo-labels of one image.

    Parameters
    ----------
    per_model : each model's detections, labels indexing the union of categories.
    knows : (models, categories) bool, which model has which category in its label set.
    """
    stats = stats if stats is not None else AggregationStats()
    parts = list(per_model)
    model_of = torch.cat([torch.full((len(d),), m) for m, d in enumerate(parts)])
    everything = Detections(
        torch.cat([d.boxes for d in parts]).reshape(-1, 4),
        torch.cat([d.labels for d in parts]),
        torch.cat([d.scores for d in parts]),
    )
    stats.detections += len(everything)
    confident = everything.scores >= config.score_threshold
    everything, model_of = everything.select(confident), model_of[confident]
    stats.confident += len(everything)
    kept = []
    for members in group_objects(everything.boxes, everything.labels, config.iou_threshold):
        stats.objects += 1
        k = len(set(model_of[members].tolist()))
        n = int(knows[:, everything.labels[members[0]]].sum())
        for rule in RULES:
            stats.per_rule[rule] += keeps(rule, k, n)
        if not keeps(config.detection_rule, k, n):
            continue
        stats.kept_objects += 1
        if config.soft_nms:
            chosen, scores = soft_nms(
                everything.boxes[members], everything.scores[members], config.soft_nms_sigma,
                config.final_score,
            )  # fmt: skip
            group = everything.select(members[chosen])
            kept.append(Detections(group.boxes, group.labels, scores))
        else:
            kept.append(everything.select(members))
    if not kept:
        return Detections.empty()
    result = Detections(
        torch.cat([d.boxes for d in kept]),
        torch.cat([d.labels for d in kept]),
        torch.cat([d.scores for d in kept]),
    )
    if config.category_iou is not None:
        before = len(result)
        result = one_category_per_object(result, config.category_iou)
        stats.conflicts += before - len(result)
    stats.boxes += len(result)
    return result


def aggregate(
    detections: Sequence[Sequence[Detections]],
    knows: Tensor,
    config: AggregationConfig,
) -> tuple[list[Detections], AggregationStats]:
    """Algorithm 2 over a data set: ``detections[m][i]`` is model m's detections on image i
    (labels in the union); returns the pseudo-labels of every image and the counts."""
    stats = AggregationStats()
    images = len(detections[0])
    labels = [
        aggregate_image([d[i] for d in detections], knows, config, stats) for i in range(images)
    ]
    return labels, stats
