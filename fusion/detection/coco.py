"""COCO format for pseudo-labels and ground truth, and mAP with pycocotools.

Boxes are ``x1, y1, x2, y2`` in pixels inside Amalgam and ``[x, y, width, height]`` in COCO;
category ids are the category index + 1 (COCO reserves 0).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np

from amalgam.fusion.teacher import Detections


def to_coco(
    labels: Sequence[Detections], class_names: Sequence[str], size: int, scores: bool = False
) -> dict:
    """A COCO data set dict (``images``, ``annotations``, ``categories``) of ``labels[i]``
    on image i (``size`` x ``size`` pixels); ``scores`` adds each box's score."""
    images = [{"id": i + 1, "width": size, "height": size} for i in range(len(labels))]
    annotations = []
    for i, detections in enumerate(labels):
        for box, label, score in zip(
            detections.boxes.tolist(), detections.labels.tolist(), detections.scores.tolist()
        ):
            x1, y1, x2, y2 = box
            entry = {
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": int(label) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
            }
            if scores:
                entry["score"] = float(score)
            annotations.append(entry)
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _coco(data: dict):
    from pycocotools.coco import COCO  # the detection extra: amalgam[detection]

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate_map(
    truth: Sequence[Detections],
    predictions: Sequence[Detections],
    class_names: Sequence[str],
    size: int,
) -> dict:
    """COCO mAP of ``predictions`` against ``truth`` (one entry per image).

    Returns ``map`` (mAP@[.5:.95]), ``map50`` (mAP@.5) and ``per_category`` (AP@[.5:.95] of
    each category that has ground truth), all in [0, 1].
    """
    gt = _coco(to_coco(truth, class_names, size))
    detections = to_coco(predictions, class_names, size, scores=True)["annotations"]
    if not detections:
        return {"map": 0.0, "map50": 0.0, "per_category": {n: 0.0 for n in class_names}}
    with contextlib.redirect_stdout(io.StringIO()):
        found = gt.loadRes(detections)
        from pycocotools.cocoeval import COCOeval

        evaluation = COCOeval(gt, found, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    precision = evaluation.eval["precision"]  # (T iou, R recall, K cat, A area, M maxdets)
    per_category = {}
    for k, name in enumerate(class_names):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        if values.size:
            per_category[name] = float(np.mean(values))
    return {
        "map": float(evaluation.stats[0]),
        "map50": float(evaluation.stats[1]),
        "per_category": per_category,
    }
