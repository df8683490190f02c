"""Losses of data-free fusion (paper 003, Eq. 1-6), as functions of logits.

The teacher-side part of a generator's loss -- BN statistics, instance entropy, batch entropy
and the adversarial divergence against the caller's adversary -- is evaluated where the
teacher lives (:func:`teacher_side_loss`); the coordinator sends only its own adversary's
logits and receives the input gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from amalgam.fusion.teacher import GeneratorObjective


def softened_kl(teacher_logits: Tensor, other_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(t / T) || softmax(s / T))`` averaged over the batch: the divergence D of
    Eq. 1, 2 and 5."""
    t = F.log_softmax(teacher_logits / temperature, dim=1)
    s = F.log_softmax(other_logits / temperature, dim=1)
    return (t.exp() * (t - s)).sum(dim=1).mean()


def kd_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """:func:`softened_kl` times ``T^2``, the usual distillation scaling that keeps gradient
    sizes independent of the temperature (student and assistant losses, Eq. 1-2)."""
    return softened_kl(teacher_logits, student_logits, temperature) * temperature**2


def prediction_entropy(logits: Tensor) -> Tensor:
    """``H(softmax(logits))`` over the last dimension, one value per prediction."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def instance_entropy(logits: Tensor) -> Tensor:
    """``E_x[H(softmax(T(x)))]``: low when each sample is confidently one class (Eq. 3)."""
    return prediction_entropy(logits).mean()


def batch_entropy(logits: Tensor) -> Tensor:
    """``H(E_x[softmax(T(x))])``: high when the batch covers the classes evenly (Eq. 3)."""
    mean = F.softmax(logits, dim=1).mean(dim=0)
    return -(mean * mean.clamp_min(1e-12).log()).sum()


def confidence_weights(logits: Tensor) -> Tensor:
    """Sample-wise teacher weights (K, B) from the teachers' logits (K, B, C): CA-MKD's
    ``w_k = (1 - softmax_k(L_k)) / (K - 1)`` (paper 003 Sec. 5 and its ref. [28]), with the
    entropy of each teacher's own prediction standing for its cross-entropy ``L_k`` to a label
    that data-free fusion does not have; the weights of one sample sum to 1, and a teacher
    close to one-hot on it weighs more."""
    teachers = logits.shape[0]
    if teachers == 1:
        return logits.new_ones(logits.shape[:2])
    entropy = prediction_entropy(logits)  # (K, B)
    return (1 - F.softmax(entropy, dim=0)) / (teachers - 1)


def teacher_side_loss(
    logits: Tensor,
    bn_loss: Tensor,
    objective: GeneratorObjective,
    adversary_logits: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The generator loss terms that need the teacher: Eq. 3 weighted, minus the adversarial
    term of Eq. 5 (``adversarial`` plays the role of ``1 / alpha`` in Eq. 6 up to scale).

    Returns
    -------
    total : scalar tensor, differentiable in ``logits`` and ``bn_loss``.
    parts : every term's value, and ``total``.
    """
    parts = {"bn": bn_loss}
    total = objective.bn * bn_loss
    if objective.instance_entropy:
        parts["instance_entropy"] = instance_entropy(logits)
        total = total + objective.instance_entropy * parts["instance_entropy"]
    if objective.batch_entropy:
        parts["batch_entropy"] = batch_entropy(logits)
        total = total - objective.batch_entropy * parts["batch_entropy"]
    if objective.adversarial:
        if adversary_logits is None:
            raise ValueError("an adversarial objective needs the adversary's logits")
        adversary = adversary_logits.to(logits)
        parts["adversarial"] = softened_kl(logits, adversary, objective.temperature)
        total = total - objective.adversarial * parts["adversarial"]
    parts["total"] = total
    return total, {name: float(value.detach()) for name, value in parts.items()}
