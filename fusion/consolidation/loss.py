"""The consolidation objective, Eq. 1 of paper 001, with the KD distillation loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``-sum_c p_t^(c) log p_s^(c)`` with ``p = softmax(z / T)``, averaged over the batch
    (paper 001, section 2, after Hinton et al.); (B, K) logits each."""
    targets = F.softmax(teacher_logits / temperature, dim=1)
    return -(targets * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean()


def consolidation_loss(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    weights: Sequence[float],
    temperature: float,
) -> Tensor:
    """Eq. 1 of paper 001 on a batch: ``sum_i lambda_i L_distill(h_t^i(phi_t^i(x)),
    h_s^i(phi_s(x)))``, i = 0 the generalist. A zero weight skips its term entirely, so that
    ``lambda_0 = 0`` is plain multi-teacher distillation and head 0 gets no gradient."""
    if not len(student_logits) == len(teacher_logits) == len(weights):
        raise ValueError(
            f"{len(student_logits)} student heads, {len(teacher_logits)} teachers and "
            f"{len(weights)} weights: one of each per teacher"
        )
    terms = [
        w * kd_loss(s, t, temperature)
        for s, t, w in zip(student_logits, teacher_logits, weights, strict=True)
        if w
    ]
    if not terms:
        raise ValueError("every loss weight is zero")
    return torch.stack(terms).sum()
