"""The aggregation rules of model composition (paper 000: Model composition, BMVC 2021).

Teachers may know different, overlapping class sets. Their predictions are mapped into the
union label space by class name (:mod:`amalgam.fusion.labels`), filtered by entropy (paper
Sec. 3.1) and aggregated (Sec. 3.2) by one of the named rules in :data:`RULES`:

* ``unanimous`` / ``consensus`` / ``affirmative`` -- the paper's votes. For a sample and a voted
  class ``c``: ``K`` teachers voted ``c``, ``N`` teachers know ``c``; unanimous keeps ``c`` when
  ``K == N``, consensus when ``K >= N / 2``, affirmative always (Algorithm 2). A teacher whose
  normalized entropy exceeds ``tau`` abstains.
* ``mean`` -- average of the union-space probabilities (zero for classes a teacher does not know);
  this is vanilla distillation's target.
* ``max-prob`` -- per class, the highest probability any teacher gives it.
* ``known-mean`` -- per class, the mean probability over only the teachers that know the class.
* ``restricted-fit`` -- one distribution ``q`` whose restriction to each teacher's class set
  matches that teacher's output, ``q = argmin sum_t KL(p_t || q|S_t)`` (Vongkulbhisal et al.,
  CVPR 2019, "Unifying heterogeneous classifiers").

The distribution rules filter on the normalized entropy of the aggregated ``q``. The filter
(:class:`Confidence`) is a fixed threshold with a floor: each predictor's most confident
fraction of every class it predicts passes even when the threshold would drop it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# every key of RULES, in its order
Rule = Literal[
    "unanimous", "consensus", "affirmative", "mean", "max-prob", "known-mean", "restricted-fit"
]
VOTE_RULES = ("unanimous", "consensus", "affirmative")


@dataclass(frozen=True)
class Aggregate:
    """Result of aggregation over ``B`` samples and ``U`` union classes.

    Attributes
    ----------
    targets : (B, U) distribution per sample (one-hot-like for the vote rules).
    keep : (B,) bool, samples whose pseudo-label passed filtering and voting.
    """

    targets: Tensor
    keep: Tensor

    @property
    def labels(self) -> Tensor:
        return self.targets.argmax(dim=1)


def normalized_entropy(probs: Tensor, num_classes: int | Tensor | None = None) -> Tensor:
    """``H(p) / log K`` in [0, 1] per row of (B, K) ``probs`` (paper Sec. 3.1, normalized so that
    one threshold serves teachers with different numbers of classes)."""
    k = probs.shape[1] if num_classes is None else num_classes
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    log_k = torch.log(torch.as_tensor(k, dtype=probs.dtype).clamp_min(2))
    return entropy / log_k


@dataclass(frozen=True)
class Confidence:
    """Which predictions are confident enough to count (paper Sec. 3.1).

    Attributes
    ----------
    threshold : normalized entropy tau in [0, 1]: at most this is confident; 1 keeps all.
    keep_fraction : a floor under the threshold. Per predictor (a teacher for the votes, the
        aggregate for the distribution rules) and per class it predicts, at least this
        fraction of those samples counts as confident, the ones with the lowest entropy,
        however few pass ``threshold``: for weak teachers the threshold follows each one's
        own entropy on the unlabeled set, and no predicted class is left without samples.
        ``None``: the threshold alone.
    """

    threshold: float = 1.0
    keep_fraction: float | None = None

    def __call__(self, entropy: Tensor, labels: Tensor) -> Tensor:
        """(B,) bool from (B,) normalized entropies and (B,) predicted classes."""
        confident = entropy <= self.threshold
        if self.keep_fraction is None:
            return confident
        for label in labels.unique():
            mine = labels == label
            cut = torch.quantile(entropy[mine].double(), self.keep_fraction)  # (,)
            confident[mine] |= entropy[mine].double() <= cut
        return confident


def _confidence(tau: float | Confidence) -> Confidence:
    return tau if isinstance(tau, Confidence) else Confidence(float(tau))


def entropy_filter(probs: Tensor, known: Tensor, tau: float | Confidence) -> Tensor:
    """(T, B) bool: teacher ``t`` is confident on sample ``b`` (normalized entropy <= tau,
    or within its most confident fraction for the class it predicts).

    Parameters
    ----------
    probs : (T, B, U) union-space probabilities.
    known : (T, U) bool.
    """
    confidence = _confidence(tau)
    counts = known.sum(dim=1)  # (T,)
    return torch.stack(
        [confidence(normalized_entropy(p[:, k], int(n)), p.argmax(dim=1))
         for p, k, n in zip(probs, known, counts)]
    )  # fmt: skip


RULES: dict[str, Callable[[Tensor, Tensor, Confidence], Aggregate]] = {}


def _rule(name: str):
    def register(fn):
        RULES[name] = fn
        return fn

    return register


def aggregate(probs: Tensor, known: Tensor, rule: Rule, tau: float | Confidence = 1.0) -> Aggregate:
    """Aggregate the teachers' union-space predictions with a named rule.

    Parameters
    ----------
    probs : (T, B, U) probabilities, zero outside each teacher's classes.
    known : (T, U) bool, teacher ``t`` knows class ``u``.
    rule : a key of :data:`RULES`.
    tau : normalized entropy threshold in (0, 1] (1 keeps everything), or a
        :class:`Confidence`.
    """
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
    return RULES[rule](probs, known, _confidence(tau))


def _votes(probs: Tensor, known: Tensor, tau: Confidence, rule: str) -> Aggregate:
    num_teachers, batch, num_classes = probs.shape
    confident = entropy_filter(probs, known, tau)  # (T, B)
    votes = F.one_hot(probs.argmax(dim=2), num_classes).float()  # (T, B, U)
    votes = votes * confident.unsqueeze(2)
    k = votes.sum(dim=0)  # (B, U) teachers that voted for each class
    n = known.sum(dim=0).float().expand(batch, -1)  # (B, U) teachers that know each class
    if rule == "unanimous":
        passes = k >= n
    elif rule == "consensus":
        passes = k >= n / 2
    else:
        passes = torch.ones_like(k, dtype=torch.bool)
    surviving = passes & (k > 0)
    keep = surviving.any(dim=1)
    # one label per sample: the surviving class with most votes, ties by the summed probability
    score = k + probs.sum(dim=0) / (num_teachers + 1)
    fallback = score.argmax(dim=1)  # plurality, used as the ensemble's answer when nothing survives
    label = torch.where(keep, score.masked_fill(~surviving, -1).argmax(dim=1), fallback)
    return Aggregate(F.one_hot(label, num_classes).to(probs.dtype), keep)


for _name in VOTE_RULES:
    RULES[_name] = lambda probs, known, tau, _r=_name: _votes(probs, known, tau, _r)


def _by_entropy(targets: Tensor, tau: Confidence) -> Aggregate:
    targets = targets / targets.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return Aggregate(targets, tau(normalized_entropy(targets), targets.argmax(dim=1)))


@_rule("mean")
def _mean(probs: Tensor, known: Tensor, tau: Confidence) -> Aggregate:
    return _by_entropy(probs.mean(dim=0), tau)


@_rule("max-prob")
def _max_prob(probs: Tensor, known: Tensor, tau: Confidence) -> Aggregate:
    return _by_entropy(probs.max(dim=0).values, tau)


@_rule("known-mean")
def _known_mean(probs: Tensor, known: Tensor, tau: Confidence) -> Aggregate:
    n = known.sum(dim=0).clamp_min(1).to(probs.dtype)  # (U,)
    return _by_entropy(probs.sum(dim=0) / n, tau)


def restricted_fit(probs: Tensor, known: Tensor, steps: int = 150, lr: float = 0.2) -> Tensor:
    """Fit ``q`` over the union so that ``q`` restricted and renormalized to each teacher's class
    set ``S_t`` matches that teacher's ``p_t``.

    Minimizes ``sum_t KL(p_t || q_{S_t} / sum(q_{S_t}))`` over the logits of ``q`` with Adam,
    starting from the known-class mean (Vongkulbhisal et al., CVPR 2019, Eq. for the KL form).
    Up to terms without ``q``, the loss is ``-sum_u P_u log q_u + sum_t s_t log(q . m_t)``, with
    ``P = sum_t p_t``, ``s_t = sum(p_t)`` and ``m_t`` the mask of ``S_t``: each step costs a
    (B, U) x (U, T) product, not (T, B, U) tensors, so a thousand teachers fit in memory.

    Parameters
    ----------
    probs : (T, B, U) union-space probabilities, zero outside ``S_t``.
    known : (T, U) bool.

    Returns
    -------
    Tensor
        (B, U) distributions, same dtype as ``probs``.
    """
    mask = known.double()  # (T, U)
    p = probs.detach().double()
    total = torch.einsum("tbu,tu->bu", p, mask)  # (B, U) P: summed over the teachers
    mass = torch.einsum("tbu,tu->bt", p, mask)  # (B, T) s: each teacher's own total
    del p
    init = _known_mean(probs, known, Confidence()).targets.double()
    logits = init.clamp_min(1e-6).log().requires_grad_(True)  # (B, U)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        log_q = F.log_softmax(logits, dim=1)  # (B, U)
        within = (log_q.exp() @ mask.T).clamp_min(1e-300)  # (B, T) q's mass on each S_t
        loss = -((total * log_q).sum() - (mass * within.log()).sum()) / len(logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return F.softmax(logits.detach(), dim=1).to(probs.dtype)


@_rule("restricted-fit")
def _restricted_fit(probs: Tensor, known: Tensor, tau: Confidence) -> Aggregate:
    return _by_entropy(restricted_fit(probs, known), tau)
