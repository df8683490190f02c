"""What a party releases of its model's outputs: the policy's output form and rounding for a
classifier, the score threshold and the detection cap for a detector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from amalgam.protocol.schemas import PredictPolicy


def release(logits: Tensor, rule: PredictPolicy) -> Tensor:
    """Apply the policy's output form to (B, K) logits.

    logits -> ``z / T``; probs -> ``softmax(z / T)``; topk -> probs with zeros outside the
    ``top_k`` largest; label -> (B,) int64 argmax. Then optional rounding.
    """
    if rule.output == "label":
        return logits.argmax(dim=1)
    scaled = logits / rule.temperature
    if rule.output == "logits":
        out = scaled
    else:
        out = F.softmax(scaled, dim=1)
        if rule.output == "topk":
            k = min(rule.top_k, out.shape[1])
            top = out.topk(k, dim=1)
            out = torch.zeros_like(out).scatter_(1, top.indices, top.values)
    if rule.round_decimals is not None:
        out = torch.round(out, decimals=rule.round_decimals)
    return out.float()


def release_detections(
    found: list[dict[str, Tensor]], rule: PredictPolicy, label_offset: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Apply the policy to a detector's per-image outputs (torchvision's ``boxes``,
    ``scores``, ``labels``): no box below ``score_threshold``, the ``max_detections`` most
    confident per image, optional rounding of boxes and scores. Returns the batch as rows:
    (M, 4) boxes, (M,) scores, (M,) labels (category indices), (B,) counts per image."""
    boxes, scores, labels, counts = [], [], [], []
    for image in found:
        confident = torch.nonzero(image["scores"] >= rule.score_threshold).flatten()
        order = confident[image["scores"][confident].argsort(descending=True)]
        order = order[: rule.max_detections]
        boxes.append(image["boxes"][order].float())
        scores.append(image["scores"][order].float())
        labels.append(image["labels"][order].long() - label_offset)
        counts.append(len(order))
    rows = [torch.cat(boxes).reshape(-1, 4), torch.cat(scores), torch.cat(labels)]
    if rule.round_decimals is not None:
        rows[0] = torch.round(rows[0], decimals=rule.round_decimals)
        rows[1] = torch.round(rows[1], decimals=rule.round_decimals)
    return rows[0], rows[1], rows[2], torch.tensor(counts, dtype=torch.long)
