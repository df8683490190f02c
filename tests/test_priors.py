"""fusion/composition/priors.py: each teacher's predictions aligned to a uniform class prior on
the unlabeled set, checked on synthetic teachers whose prior is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amalgam.fusion.composition.priors import predicted_shares, prior_log_scales, rescale
from amalgam.fusion.labels import known_mask

pytestmark = pytest.mark.usefixtures("torch_single_thread")

UNION = list("abcde")
CLASS_SETS = [list("abc"), list("cde")]
KNOWN = known_mask(CLASS_SETS, UNION)  # (2, 5)


def biased_teachers(n: int, bias: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, n, 5) union-space probabilities of two teachers that see the true class of a
    sample they know with a clear margin, and (n,) true classes in equal shares; each adds
    ``bias`` to the logit of its first class (an over-predicted class)."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(UNION)
    probs = torch.zeros(2, n, len(UNION))
    for t, known in enumerate(KNOWN):
        logits = 2.0 * torch.randn(n, len(UNION), generator=generator)  # (n, 5)
        logits += 3.0 * F.one_hot(y, len(UNION))
        logits[:, known.nonzero()[0, 0]] += bias
        probs[t] = logits.masked_fill(~known, float("-inf")).softmax(dim=1)
    return probs, y


def test_aligned_predictions_average_to_a_uniform_prior_over_each_teachers_classes():
    probs, _ = biased_teachers(600, bias=2.0)
    log_scales = prior_log_scales(probs, KNOWN, ["probs", "logits"])
    assert log_scales.shape == (2, 5) and log_scales[~KNOWN].abs().max() == 0
    aligned = rescale(probs, KNOWN, log_scales)  # (2, 600, 5)
    means = aligned.double().mean(dim=1)  # (2, 5)
    assert torch.allclose(means[KNOWN], torch.full((6,), 1 / 3, dtype=torch.float64), atol=1e-5)
    assert means[~KNOWN].abs().max() == 0
    assert torch.allclose(aligned.sum(dim=2), torch.ones(2, 600), atol=1e-6)
    # the over-predicted class gets the smallest factor; factors have mean zero in log
    for t, known in enumerate(KNOWN):
        mine = log_scales[t, known]
        assert mine.argmin() == 0 and abs(float(mine.mean())) < 1e-9


def test_alignment_undoes_a_class_prior_shift_and_applies_unchanged_to_other_samples():
    """A bias on one logit is a class-prior shift: aligned, the biased teachers answer as the
    unbiased ones aligned do, on the unlabeled samples and on others."""
    fair, y = biased_teachers(1000, bias=0.0, seed=0)
    biased, _ = biased_teachers(1000, bias=2.5, seed=0)
    fair_scales = prior_log_scales(fair, KNOWN, ["probs", "probs"])
    biased_scales = prior_log_scales(biased, KNOWN, ["probs", "probs"])
    shift = torch.tensor([-2.5, 0.0, 0.0], dtype=torch.float64) + 2.5 / 3  # centered in log
    for t, known in enumerate(KNOWN):
        assert torch.allclose(biased_scales[t, known] - fair_scales[t, known], shift, atol=1e-4)
    fair_test, y_test = biased_teachers(1000, bias=0.0, seed=1)
    biased_test, _ = biased_teachers(1000, bias=2.5, seed=1)
    for before, after, labels in (
        (biased, rescale(biased, KNOWN, biased_scales), y),
        (biased_test, rescale(biased_test, KNOWN, biased_scales), y_test),
    ):
        reference = fair if labels is y else fair_test
        assert torch.allclose(after, rescale(reference, KNOWN, fair_scales), atol=1e-4)
        for t, known in enumerate(KNOWN):
            mine = known[labels]  # samples of classes teacher t knows
            right_before = (before[t, mine].argmax(dim=1) == labels[mine]).float().mean()
            right_after = (after[t, mine].argmax(dim=1) == labels[mine]).float().mean()
            assert right_after > right_before + 0.05
        # before: the biased class takes most of a teacher's answers; after, about its share
        assert predicted_shares(before, KNOWN).max() > 0.6
        assert predicted_shares(after, KNOWN)[KNOWN].max() < 0.45


def test_a_teacher_already_at_a_uniform_prior_is_left_as_it_is():
    probs, _ = biased_teachers(500, bias=2.0)
    once = rescale(probs, KNOWN, prior_log_scales(probs, KNOWN, ["probs", "probs"]))
    again = prior_log_scales(once, KNOWN, ["probs", "probs"])
    assert again.abs().max() < 1e-4
    assert torch.allclose(rescale(once, KNOWN, again), once, atol=1e-5)


def test_teachers_that_release_labels_or_their_top_k_keep_their_answers():
    probs, _ = biased_teachers(300, bias=2.0)
    labels = F.one_hot(probs[0].argmax(dim=1), len(UNION)).float()  # (300, 5)
    top2 = probs[1] * (probs[1] >= probs[1].topk(2, dim=1).values[:, 1:]).float()
    top2 = top2 / top2.sum(dim=1, keepdim=True)
    released = torch.stack([labels, top2])
    log_scales = prior_log_scales(released, KNOWN, ["label", "topk"])
    assert log_scales.abs().max() == 0
    assert torch.allclose(rescale(released, KNOWN, log_scales), released, atol=1e-6)
