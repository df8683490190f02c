"""Representation consolidation (paper 001): the loss of Eq. 1, the multi-head student, frozen
BatchNorm statistics, and the few-shot transfer probe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amalgam.fusion.consolidation.loss import consolidation_loss, kd_loss
from amalgam.fusion.consolidation.student import MultiHeadStudent
from amalgam.fusion.consolidation.trainer import ConsolidationConfig, consolidate, multitask_oracle
from amalgam.fusion.data import Dataset
from amalgam.fusion.labels import as_logits
from amalgam.fusion.models import create_model
from amalgam.fusion.transfer import (
    few_shot_draws,
    few_shot_indices,
    few_shot_probe,
    linear_probe,
    transfer_score,
)


def _generalist(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("small_cnn", in_shape=(1, 8, 8), num_classes=4, width=4).eval()


def _proxy(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_loss_is_equation_1_on_a_hand_computed_case():
    # head 0: teacher [2 ln 3, 0] / T=2 -> p_t = (3/4, 1/4); student uniform -> CE = ln 2
    # head 1: teacher uniform over 3; student [2 ln 2, 0, 0] / 2 -> p_s = (1/2, 1/4, 1/4)
    #         -> CE = -(1/3)(ln 1/2 + 2 ln 1/4) = (5/3) ln 2
    student = [torch.tensor([[0.0, 0.0]]), torch.tensor([[2 * math.log(2), 0.0, 0.0]])]
    teacher = [torch.tensor([[2 * math.log(3), 0.0]]), torch.zeros(1, 3)]
    loss = consolidation_loss(student, teacher, [1.0, 0.5], temperature=2.0)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * 5 / 3 * math.log(2), rel=1e-6)


def test_kd_loss_is_kl_plus_teacher_entropy():
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    p_t = F.softmax(t / 2, dim=1)
    kl = F.kl_div(F.log_softmax(s / 2, dim=1), p_t, reduction="batchmean")
    entropy = -(p_t * p_t.log()).sum(dim=1).mean()
    assert kd_loss(s, t, 2.0).item() == pytest.approx((kl + entropy).item(), rel=1e-5)


def test_released_probabilities_become_logits_with_the_same_softmax():
    logits = torch.randn(6, 4)
    probs = F.softmax(logits, dim=1)
    for temperature in (1.0, 2.0):
        torch.testing.assert_close(
            F.softmax(as_logits(probs, "probs", 4) / temperature, dim=1),
            F.softmax(logits / temperature, dim=1),
        )
    labels = as_logits(torch.tensor([2, 0]), "label", 4)
    assert F.softmax(labels / 2.0, dim=1).argmax(dim=1).tolist() == [2, 0]


def test_student_starts_as_the_generalist_with_fresh_teacher_heads():
    generalist, x = _generalist(), _proxy(8)
    student = MultiHeadStudent(generalist, [3, 2], seed=0).eval()
    outputs = student(x)
    assert [o.shape for o in outputs] == [(8, 4), (8, 3), (8, 2)]
    torch.testing.assert_close(outputs[0], generalist(x))
    again = MultiHeadStudent(generalist, [3, 2], seed=0)
    torch.testing.assert_close(again.teacher_heads[0].weight, student.teacher_heads[0].weight)
    assert student.model is not generalist


def _batchnorm_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}


def test_consolidation_keeps_batchnorm_statistics_and_trains_the_rest():
    generalist, proxy = _generalist(), _proxy()
    teachers = [torch.randn(len(proxy), 3), torch.randn(len(proxy), 2)]
    config = ConsolidationConfig(epochs=2, batch_size=16, backbone_lr=0.05, head_lr=0.1)
    result = consolidate(generalist, proxy, teachers, config, progress=False)
    student = result.student.model
    before, after = _batchnorm_state(generalist), _batchnorm_state(student)
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    moved = [
        name
        for name, p in student.named_parameters()
        if not torch.equal(p, dict(generalist.named_parameters())[name])
    ]
    assert "body.0.0.weight" in moved and "head.weight" in moved
    assert len(result.losses) == 2 and result.losses[1] < result.losses[0]


def test_unfrozen_batchnorm_statistics_move():
    generalist, proxy = _generalist(), _proxy()
    config = ConsolidationConfig(epochs=1, batch_size=16, freeze_batchnorm=False)
    result = consolidate(generalist, proxy, [torch.randn(len(proxy), 3)], config, progress=False)
    before, after = _batchnorm_state(generalist), _batchnorm_state(result.student.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_zero_generalist_weight_is_plain_multi_teacher_distillation():
    generalist, proxy = _generalist(), _proxy()
    teachers = [torch.randn(len(proxy), 3), torch.randn(len(proxy), 2)]
    config = ConsolidationConfig(generalist_weight=0.0, epochs=1, batch_size=16)
    student = consolidate(generalist, proxy, teachers, config, progress=False).student
    # head 0 (the generalist's task) is untouched; the backbone learned from the teachers
    torch.testing.assert_close(student.model.head.weight, generalist.head.weight, rtol=0, atol=0)
    assert not torch.equal(student.model.body[0][0].weight, generalist.body[0][0].weight)
    # and the objective is the mean of the teachers' KD losses, the generalist absent
    outputs = student(proxy)
    targets = [generalist(proxy).detach(), *teachers]
    loss = consolidation_loss(outputs, targets, config.loss_weights(2), 2.0)
    plain = (kd_loss(outputs[1], teachers[0], 2.0) + kd_loss(outputs[2], teachers[1], 2.0)) / 2
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ConsolidationConfig(teacher_weights=[1.0]), "teacher_weights: 1 given for 2 teachers"),
        (ConsolidationConfig(teacher_weights=[-1.0, 1.0]), "non-negative"),
        (ConsolidationConfig(generalist_weight=0.0, teacher_weights=[0.0, 0.0]), "positive sum"),
    ],
)
def test_bad_loss_weights_name_the_problem(config, message):
    with pytest.raises(ValueError, match=message):
        config.loss_weights(2)


def test_a_negative_generalist_weight_is_refused_by_the_config():
    with pytest.raises(ValueError, match=r"generalist_weight\n.*greater than or equal to 0"):
        ConsolidationConfig(generalist_weight=-1.0)


def test_teacher_predictions_must_cover_the_proxy():
    generalist, proxy = _generalist(), _proxy(10)
    with pytest.raises(ValueError, match="teacher 2: 9 predictions for 10 proxy images"):
        consolidate(generalist, proxy, [torch.randn(10, 3), torch.randn(9, 3)], progress=False)


def test_multitask_oracle_learns_every_head_from_its_own_labels():
    generalist = _generalist()
    # task 1: dark (0) or bright (1) images; task 0 gets zero weight and stays untouched
    y1 = torch.arange(64) % 2
    x1 = 0.5 * _proxy(64, seed=3) + 0.5 * y1.view(-1, 1, 1, 1)
    x0, y0 = _proxy(64, seed=4), torch.randint(0, 4, (64,))
    config = ConsolidationConfig(
        generalist_weight=0.0, epochs=30, batch_size=16, backbone_lr=0.05, head_lr=0.2
    )
    before = MultiHeadStudent(generalist, [2], 0).eval()
    result = multitask_oracle(generalist, [(x0, y0), (x1, y1)], config, progress=False)
    student = result.student
    torch.testing.assert_close(student.model.head.weight, generalist.head.weight, rtol=0, atol=0)
    accuracy = lambda model: (model(x1)[1].argmax(dim=1) == y1).float().mean().item()  # noqa: E731
    assert accuracy(student) >= 0.9 > accuracy(before)
    assert result.losses[-1] < result.losses[0]
    before_bn, after_bn = _batchnorm_state(generalist), _batchnorm_state(student.model)
    assert all(torch.equal(before_bn[k], after_bn[k]) for k in before_bn)


def test_few_shot_sampler_draws_k_per_class_and_all_of_small_classes():
    labels = np.array([0] * 10 + [1] * 3 + [7] * 8)
    index = few_shot_indices(labels, 5, np.random.default_rng(0))
    assert np.bincount(labels[index]).tolist() == [5, 3, 0, 0, 0, 0, 0, 5]
    assert len(set(index.tolist())) == len(index)
    same = few_shot_indices(labels, 5, np.random.default_rng(0))
    other = few_shot_indices(labels, 5, np.random.default_rng(1))
    assert np.array_equal(index, same) and not np.array_equal(index, other)


def _blobs(n: int, separation: float, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    centres = rng.normal(size=(4, 16)) * separation
    return centres[labels] + rng.normal(size=(n, 16)), labels


def test_linear_probe_separates_separable_features_and_not_noise():
    train, train_y = _blobs(400, 3.0, seed=0)
    test, test_y = _blobs(400, 3.0, seed=0)
    assert linear_probe(train[:200], train_y[:200], test[200:], test_y[200:]) > 0.95
    noise = np.random.default_rng(2).normal(size=train.shape)
    assert linear_probe(noise[:200], train_y[:200], noise[200:], test_y[200:]) < 0.45


def test_few_shot_probe_is_seeded_and_improves_with_shots():
    x, y = _blobs(1000, 0.6, seed=3)

    def probe(shots: int):
        draws = few_shot_draws(y[:500], shots, draws=10, seed=0)
        return few_shot_probe(x[:500], y[:500], x[500:], y[500:], draws)

    one, again, twenty = probe(1), probe(1), probe(20)
    assert one == again and one.draws == 10 and one.std > 0
    assert twenty.mean > one.mean


def test_transfer_score_represents_only_the_drawn_images():
    x, y = _blobs(600, 2.0, seed=4)
    images = torch.from_numpy(x).float().view(600, 1, 4, 4)
    train = Dataset(images[:400], torch.from_numpy(y[:400]), list("abcd"))
    test = Dataset(images[400:], torch.from_numpy(y[400:]), list("abcd"))
    seen = []

    def represent(batch: torch.Tensor) -> np.ndarray:
        seen.append(len(batch))
        return batch.flatten(1).numpy()

    score = transfer_score(represent, train, test, shots=2, draws=3, seed=0)
    assert seen[0] <= 4 * 2 * 3 and seen[1] == 200  # drawn training images, every test image
    assert score.full is None and score.few_shot.draws == 3 and score.few_shot.mean > 0.6
    full = transfer_score(represent, train, test, shots=2, draws=3, seed=0, full=True)
    assert seen[2] == 400 and full.few_shot == score.few_shot and full.full > 0.9


def test_a_diverging_consolidation_stops_with_the_reason():
    generalist, proxy = _generalist(), _proxy()
    config = ConsolidationConfig(epochs=3, batch_size=16, backbone_lr=1e6, head_lr=1e6)
    with pytest.raises(FloatingPointError, match="consolidate: the loss became .* lower the"):
        consolidate(generalist, proxy, [torch.randn(len(proxy), 3) * 50], config, progress=False)
