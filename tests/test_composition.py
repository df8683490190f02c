"""fusion/labels.py and fusion/composition/rules.py: union label space, entropy filtering and
the aggregation rules of paper 000 (Model composition with pseudo-labels), checked on hand-made
tables."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from amalgam.fusion.composition.rules import (
    RULES,
    VOTE_RULES,
    Confidence,
    Rule,
    aggregate,
    entropy_filter,
    normalized_entropy,
    restricted_fit,
)
from amalgam.fusion.labels import (
    collect_union_probs,
    known_mask,
    to_probs,
    to_union,
    union_classes,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# --- union label space ----------------------------------------------------------------------


def test_union_classes_keeps_first_appearance_order():
    assert union_classes([["b", "a"], ["c", "a"], ["d", "b"]]) == ["b", "a", "c", "d"]
    assert union_classes([["x"]]) == ["x"]
    assert union_classes([]) == []


def test_known_mask():
    mask = known_mask([["a", "b"], ["b", "c"]], ["a", "b", "c"])
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, False], [False, True, True]]


def test_to_union_places_columns_by_name():
    probs = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
    out = to_union(probs, ["c", "a"], ["a", "b", "c", "d"])
    assert out.shape == (2, 4)
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.0, 0.7, 0.0], [0.9, 0.0, 0.1, 0.0]]))
    assert out.dtype == probs.dtype


def test_to_union_with_an_unknown_class_raises():
    with pytest.raises(ValueError):
        to_union(torch.ones(1, 1), ["zebra"], ["a", "b"])


# --- released outputs -> probabilities ------------------------------------------------------


def test_to_probs_label_is_one_hot():
    out = to_probs(torch.tensor([2, 0, 1]), "label", 4)
    assert out.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    assert out.dtype == torch.float32


def test_to_probs_topk_is_renormalized():
    topk = torch.tensor([[0.6, 0.0, 0.2, 0.0], [0.0, 0.5, 0.0, 0.0]])
    out = to_probs(topk, "topk", 4)
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.0, 0.25, 0.0], [0.0, 1.0, 0.0, 0.0]]))


def test_to_probs_logits_is_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    out = to_probs(logits, "logits", 3)
    torch.testing.assert_close(out, F.softmax(logits, dim=1))
    torch.testing.assert_close(out[1], torch.full((3,), 1 / 3))


def test_to_probs_probs_pass_through_and_rounded_probs_are_renormalized():
    probs = torch.tensor([[0.2, 0.8]])
    torch.testing.assert_close(to_probs(probs, "probs", 2), probs)
    rounded = torch.tensor([[0.33, 0.33, 0.33]])  # released with round_decimals=2
    torch.testing.assert_close(to_probs(rounded, "probs", 3), torch.full((1, 3), 1 / 3))


def test_to_probs_unknown_form_raises():
    with pytest.raises(ValueError, match="unknown output form 'scores'"):
        to_probs(torch.zeros(1, 2), "scores", 2)


def test_collect_union_probs_mixes_forms():
    probs, known = collect_union_probs(
        [torch.tensor([1]), torch.tensor([[0.0, 0.0]])],
        ["label", "logits"],
        [["a", "b"], ["c", "b"]],
        ["a", "b", "c"],
    )
    assert probs.shape == (2, 1, 3)
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(probs[1, 0], torch.tensor([0.0, 0.5, 0.5]))
    assert known.tolist() == [[True, True, False], [False, True, True]]


# --- entropy --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5, 10, 100])
def test_normalized_entropy_bounds(k):
    one_hot = F.one_hot(torch.arange(k) % k, k).float()  # (k, k)
    torch.testing.assert_close(normalized_entropy(one_hot), torch.zeros(k))
    uniform = torch.full((3, k), 1.0 / k)
    torch.testing.assert_close(normalized_entropy(uniform), torch.ones(3))
    # anything else lies strictly between
    mixed = torch.softmax(torch.randn(8, k, generator=torch.Generator().manual_seed(k)), dim=1)
    h = normalized_entropy(mixed)
    assert ((h > 0) & (h < 1)).all()


def test_normalized_entropy_uses_the_given_class_count():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(normalized_entropy(probs), torch.tensor([0.5]))  # log 2 / log 4
    torch.testing.assert_close(normalized_entropy(probs, 2), torch.tensor([1.0]))


def test_normalized_entropy_keeps_dtype():
    assert normalized_entropy(torch.full((2, 3), 1 / 3, dtype=torch.float64)).dtype == torch.float64


def test_entropy_filter_normalizes_by_each_teachers_own_classes():
    known = torch.tensor([[True, True, False], [True, True, True]])
    # both teachers say (0.5, 0.5, 0): maximal doubt for a 2-class teacher, log2/log3 for 3 classes
    half = torch.tensor([0.5, 0.5, 0.0])
    sure = torch.tensor([0.98, 0.02, 0.0])
    probs = torch.stack([torch.stack([half, sure]), torch.stack([half, sure])])  # (T=2, B=2, U=3)
    confident = entropy_filter(probs, known, tau=0.7)
    assert confident.shape == (2, 2)
    assert confident.tolist() == [[False, True], [True, True]]  # log2/log3 = 0.63 <= 0.7
    assert entropy_filter(probs, known, tau=0.6).tolist() == [[False, True], [False, True]]


def test_a_keep_fraction_is_a_floor_under_the_threshold_per_teacher_and_predicted_class():
    known = torch.tensor([[True, True]])
    # one teacher, eight samples: four predicted 0 (sure to unsure), four predicted 1 (all
    # less sure than any of the first four)
    first = torch.tensor([0.99, 0.95, 0.9, 0.8])
    second = torch.tensor([0.75, 0.7, 0.65, 0.6])
    probs = torch.cat([torch.stack([first, 1 - first], 1), torch.stack([1 - second, second], 1)])
    probs = probs.unsqueeze(0)  # (T=1, B=8, U=2)
    fixed = entropy_filter(probs, known, Confidence(threshold=0.75))  # H(0.8) = 0.72
    assert fixed.tolist() == [[True, True, True, True, False, False, False, False]]
    # the threshold keeps all of class 0; the floor adds class 1's two most confident
    floor = entropy_filter(probs, known, Confidence(threshold=0.75, keep_fraction=0.5))
    assert floor.tolist() == [[True, True, True, True, True, True, False, False]]
    half = entropy_filter(probs, known, Confidence(threshold=0.0, keep_fraction=0.5))
    assert half.tolist() == [[True, True, False, False, True, True, False, False]]
    everything = entropy_filter(probs, known, Confidence(threshold=0.1, keep_fraction=1.0))
    assert everything.all()


# --- the paper's votes (Algorithm 2) --------------------------------------------------------
#
# union (a, b, c); T0 knows {a, b}, T1 knows {b, c}, T2 knows {a, b, c}.
# N (teachers that know a class): a -> 2, b -> 3, c -> 2.
# Each cell is the class a teacher votes for confidently, or None when it abstains (uniform).

UNION = ["a", "b", "c"]
SETS = [["a", "b"], ["b", "c"], ["a", "b", "c"]]
VOTES = [
    # T0    T1    T2          K per voted class          unanimous  consensus  affirmative
    ("b", "b", "b"),  # 0: b 3/3                        b          b          b
    ("a", "c", "a"),  # 1: a 2/2, c 1/2                 a          a          a
    ("a", "c", "c"),  # 2: a 1/2, c 2/2                 c          c          c
    ("b", "b", "a"),  # 3: b 2/3, a 1/2                 -          b          b
    (None, None, "b"),  # 4: b 1/3                      -          -          b
    (None, None, None),  # 5: nobody is confident       -          -          -
    ("a", None, None),  # 6: a 1/2 (exactly N/2)        -          a          a
    (None, "c", "c"),  # 7: c 2/2                       c          c          c
]
EXPECTED = {
    "unanimous": ["b", "a", "c", None, None, None, None, "c"],
    "consensus": ["b", "a", "c", "b", None, None, "a", "c"],
    "affirmative": ["b", "a", "c", "b", "b", None, "a", "c"],
}
TAU = 0.5


def _teacher_row(classes: list[str], vote: str | None) -> list[float]:
    """Union-space probabilities: confident on ``vote`` (normalized entropy < 0.4), else uniform."""
    row = [0.0] * len(UNION)
    for name in classes:
        if vote is None:
            row[UNION.index(name)] = 1.0 / len(classes)
        else:
            row[UNION.index(name)] = 0.9 if name == vote else 0.1 / (len(classes) - 1)
    return row


def _vote_table(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor(
        [[_teacher_row(classes, votes[t]) for votes in VOTES] for t, classes in enumerate(SETS)],
        dtype=dtype,
    )  # (T=3, B=8, U=3)
    return probs, known_mask(SETS, UNION)


def test_vote_table_confidence_is_as_designed():
    probs, known = _vote_table()
    confident = entropy_filter(probs, known, TAU)
    expected = [[vote is not None for vote in (row[t] for row in VOTES)] for t in range(3)]
    assert confident.tolist() == expected


@pytest.mark.parametrize("rule", VOTE_RULES)
def test_vote_rules_keep_and_label(rule):
    probs, known = _vote_table()
    result = aggregate(probs, known, rule, tau=TAU)
    expected = EXPECTED[rule]

    assert result.keep.dtype == torch.bool
    assert result.keep.tolist() == [label is not None for label in expected]
    kept_labels = [
        UNION[i] for i, k in zip(result.labels.tolist(), result.keep.tolist(), strict=True) if k
    ]
    assert kept_labels == [label for label in expected if label is not None]


@pytest.mark.parametrize("rule", VOTE_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vote_targets_are_one_hot(rule, dtype):
    probs, known = _vote_table(dtype)
    result = aggregate(probs, known, rule, tau=TAU)
    assert result.targets.shape == (8, 3)
    assert result.targets.dtype == dtype
    assert ((result.targets == 0) | (result.targets == 1)).all()
    assert (result.targets.sum(dim=1) == 1).all()
    assert torch.equal(result.targets.argmax(dim=1), result.labels)


def test_vote_rules_nest():
    # anything unanimous is a consensus, anything a consensus is affirmative
    probs, known = _vote_table()
    keep = {rule: aggregate(probs, known, rule, tau=TAU).keep for rule in VOTE_RULES}
    assert (keep["unanimous"] <= keep["consensus"]).all()
    assert (keep["consensus"] <= keep["affirmative"]).all()


def test_unknown_rule_lists_the_known_ones():
    probs, known = _vote_table()
    with pytest.raises(ValueError, match="unknown aggregation rule 'majority'") as info:
        aggregate(probs, known, "majority")
    for rule in RULES:
        assert rule in str(info.value)
    assert set(VOTE_RULES) | {"mean", "max-prob", "known-mean", "restricted-fit"} <= set(RULES)


# --- distribution rules ---------------------------------------------------------------------

# one sample; T0 {a, b}, T1 {b, c}, T2 {a, b, c}
DIST = torch.tensor([[[0.6, 0.4, 0.0]], [[0.0, 0.2, 0.8]], [[0.3, 0.3, 0.4]]])  # (3, 1, 3)
DIST_KNOWN = known_mask(SETS, UNION)


def test_mean_rule_is_the_normalized_average_of_union_probs():
    result = aggregate(DIST, DIST_KNOWN, "mean", tau=1.0)
    expected = DIST.mean(dim=0)  # (0.3, 0.3, 0.4)
    torch.testing.assert_close(result.targets, expected / expected.sum(dim=1, keepdim=True))
    torch.testing.assert_close(result.targets, torch.tensor([[0.3, 0.3, 0.4]]))


def test_known_mean_divides_by_the_teachers_that_know_each_class():
    result = aggregate(DIST, DIST_KNOWN, "known-mean", tau=1.0)
    # sums (0.9, 0.9, 1.2) over N = (2, 3, 2) -> (0.45, 0.30, 0.60), then normalized by 1.35
    expected = torch.tensor([[0.45, 0.30, 0.60]]) / 1.35
    torch.testing.assert_close(result.targets, expected)
    assert result.labels.tolist() == [2]


def test_max_prob_takes_the_highest_probability_per_class():
    result = aggregate(DIST, DIST_KNOWN, "max-prob", tau=1.0)
    torch.testing.assert_close(result.targets, torch.tensor([[0.6, 0.4, 0.8]]) / 1.8)


@pytest.mark.parametrize("rule", ["mean", "max-prob", "known-mean", "restricted-fit"])
def test_distribution_rules_filter_on_the_entropy_of_the_aggregate(rule):
    unsure = torch.tensor([[[0.5, 0.5, 0.0]], [[0.0, 0.5, 0.5]], [[1 / 3, 1 / 3, 1 / 3]]])
    probs = torch.cat([_agree(), unsure], dim=1)  # (3, 2, 3): sample 0 sure, sample 1 unsure
    result = aggregate(probs, DIST_KNOWN, rule, tau=0.5)
    h = normalized_entropy(result.targets)
    assert result.keep.tolist() == (h <= 0.5).tolist()
    assert result.keep.tolist() == [True, False]
    torch.testing.assert_close(result.targets.sum(dim=1), torch.ones(2))


def _agree() -> torch.Tensor:
    """(3, 1, 3): every teacher confidently says ``b``, the class all of them know."""
    return torch.tensor([[[0.02, 0.98, 0.0]], [[0.0, 0.98, 0.02]], [[0.01, 0.98, 0.01]]])


# --- restricted fit (Vongkulbhisal et al., CVPR 2019) ---------------------------------------


def _restrictions(q: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """(T, B, U): ``q`` restricted to each teacher's classes and renormalized."""
    mask = known.unsqueeze(1).to(q.dtype)  # (T, 1, U)
    restricted = q.unsqueeze(0) * mask
    return restricted / restricted.sum(dim=2, keepdim=True)


@pytest.mark.parametrize(
    "sets",
    [
        [["a", "b"], ["b", "c"], ["a", "b", "c"]],
        [["a", "b"], ["b", "c"]],  # no teacher knows everything
        [["a", "b"], ["b", "c"], ["c", "d"]],  # a chain of overlaps
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_restricted_fit_recovers_the_true_distribution(sets, dtype):
    union = union_classes(sets)
    known = known_mask(sets, union)
    generator = torch.Generator().manual_seed(len(union))
    q_star = torch.softmax(1.5 * torch.randn(16, len(union), generator=generator), dim=1)
    probs = _restrictions(q_star, known).to(dtype)

    q = restricted_fit(probs, known)
    assert q.dtype == dtype
    assert q.shape == (16, len(union))
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16, dtype=dtype))
    torch.testing.assert_close(q, q_star.to(dtype), atol=1e-3, rtol=0)

    result = aggregate(probs, known, "restricted-fit", tau=1.0)
    assert result.targets.dtype == dtype
    torch.testing.assert_close(result.targets, q_star.to(dtype), atol=1e-3, rtol=0)


def test_restricted_fit_with_one_teacher_returns_its_output():
    probs = torch.tensor([[[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]]])
    known = torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(restricted_fit(probs, known), probs[0], atol=1e-4, rtol=0)


def test_restricted_fit_does_not_change_its_input():
    probs, known = _restrictions(torch.tensor([[0.2, 0.3, 0.5]]), DIST_KNOWN), DIST_KNOWN
    before = probs.clone()
    restricted_fit(probs, known)
    assert torch.equal(probs, before)
    assert not probs.requires_grad


def test_restricted_fit_differs_from_the_mean_when_class_sets_differ():
    # the mean is pulled toward classes that many teachers know; the fit is not
    q_star = torch.tensor([[0.1, 0.1, 0.8]])
    probs = _restrictions(q_star, DIST_KNOWN)
    mean = aggregate(probs, DIST_KNOWN, "mean").targets
    fit = aggregate(probs, DIST_KNOWN, "restricted-fit").targets
    assert (mean - q_star).abs().max() > 0.1
    assert (fit - q_star).abs().max() < 1e-3
    assert math.isclose(float(fit.sum()), 1.0, abs_tol=1e-5)


def test_every_rule_a_job_may_name_is_registered_once_in_order():
    assert tuple(RULES) == get_args(Rule)


def _restricted_fit_by_definition(probs, known, steps=150, lr=0.2):
    """The KL objective written out over (T, B, U) tensors, as the paper states it."""
    p = probs.double()
    mask = known.unsqueeze(1).double()  # (T, 1, U)
    counts = known.sum(dim=0).clamp_min(1).double()
    init = probs.double().sum(dim=0) / counts  # the known-class mean
    init = init / init.sum(dim=1, keepdim=True)
    logits = init.clamp_min(1e-6).log().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        log_q = F.log_softmax(logits, dim=1).unsqueeze(0)  # (1, B, U)
        masked = log_q.masked_fill(mask == 0, -math.inf)
        log_restricted = log_q - torch.logsumexp(masked, dim=2, keepdim=True)  # (T, B, U)
        loss = -(p * log_restricted * mask).sum() / p.shape[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return F.softmax(logits.detach(), dim=1).float()


def test_restricted_fit_equals_the_objective_written_out_over_every_teacher():
    generator = torch.Generator().manual_seed(3)
    teachers, batch, classes = 9, 40, 10
    known = torch.rand(teachers, classes, generator=generator) < 0.5
    known[:, :2] = True  # every teacher knows at least two classes
    logits = 3 * torch.randn(teachers, batch, classes, generator=generator)
    probs = torch.softmax(logits.masked_fill(~known.unsqueeze(1), -1e9), dim=2)
    probs = probs * known.unsqueeze(1)
    expected = _restricted_fit_by_definition(probs, known)
    torch.testing.assert_close(restricted_fit(probs, known), expected, atol=1e-6, rtol=0)
