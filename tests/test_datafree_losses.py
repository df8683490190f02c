"""The loss terms of data-free fusion (paper 003): signs, zeros and extremes."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.fusion.datafree.losses import (
    GeneratorObjective,
    batch_entropy,
    confidence_weights,
    instance_entropy,
    kd_kl,
    teacher_side_loss,
)


def test_adversarial_term_is_zero_when_the_assistant_matches_the_teacher():
    logits = torch.randn(8, 5)
    objective = GeneratorObjective(bn=0.0, adversarial=1.0, temperature=3.0)
    total, parts = teacher_side_loss(logits, torch.tensor(0.0), objective, logits.clone())
    assert parts["adversarial"] == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(0.0, abs=1e-6)


def test_adversarial_term_rewards_disagreement():
    """Eq. 5: the generator minimizes -KL(T || A), so more disagreement lowers its loss."""
    teacher = torch.tensor([[4.0, 0.0, 0.0]])
    close, far = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]])
    objective = GeneratorObjective(bn=0.0, adversarial=1.0)
    loss_close, _ = teacher_side_loss(teacher, torch.tensor(0.0), objective, close)
    loss_far, _ = teacher_side_loss(teacher, torch.tensor(0.0), objective, far)
    assert loss_far < loss_close < 0


def test_entropies_at_their_extremes():
    confident = torch.tensor([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0], [0.0, 0.0, 50.0]])
    uniform = torch.zeros(3, 3)
    assert instance_entropy(confident).item() == pytest.approx(0.0, abs=1e-6)
    assert instance_entropy(uniform).item() == pytest.approx(math.log(3))
    assert batch_entropy(confident).item() == pytest.approx(math.log(3), abs=1e-6)
    assert batch_entropy(confident[:1].expand(3, -1)).item() == pytest.approx(0.0, abs=1e-6)


def test_fidelity_weights_and_signs():
    logits = torch.randn(6, 4)
    bn = torch.tensor(2.5)
    objective = GeneratorObjective(bn=0.5, instance_entropy=2.0, batch_entropy=3.0)
    total, parts = teacher_side_loss(logits, bn, objective)
    expected = 0.5 * 2.5 + 2.0 * instance_entropy(logits) - 3.0 * batch_entropy(logits)
    assert total.item() == pytest.approx(expected.item())
    assert parts["total"] == pytest.approx(expected.item())
    assert "adversarial" not in parts


def test_kd_kl_scales_with_the_temperature_squared_and_is_zero_on_equal_logits():
    t, s = torch.randn(4, 6), torch.randn(4, 6)
    assert kd_kl(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    manual = torch.nn.functional.kl_div(
        torch.log_softmax(s / 2, 1),
        torch.log_softmax(t / 2, 1),
        reduction="batchmean",
        log_target=True,
    )
    assert kd_kl(t, s, 2.0).item() == pytest.approx(4 * manual.item(), rel=1e-5)


def test_an_adversarial_objective_needs_adversary_logits_and_a_positive_temperature():
    with pytest.raises(ValueError, match="adversary"):
        teacher_side_loss(torch.randn(2, 3), torch.tensor(0.0), GeneratorObjective(adversarial=1.0))
    with pytest.raises(ValueError, match="temperature"):
        GeneratorObjective(temperature=0)


def test_confidence_weights_favour_the_confident_teacher_and_sum_to_one_per_sample():
    sure, unsure = torch.tensor([[9.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.8, 0.9]])
    weights = confidence_weights(
        torch.stack([torch.cat([sure, unsure]), torch.cat([unsure, sure])])
    )
    assert weights.shape == (2, 2)  # (teachers, samples)
    assert torch.allclose(weights.sum(dim=0), torch.ones(2))
    assert weights[0, 0] > 0.5 > weights[0, 1] and weights[1, 1] > 0.5 > weights[1, 0]
    three = confidence_weights(torch.randn(1, 4, 5).expand(3, -1, -1))  # equally sure teachers
    assert torch.allclose(three, torch.full((3, 4), 1 / 3))
    assert torch.equal(confidence_weights(torch.randn(1, 4, 5)), torch.ones(1, 4))
