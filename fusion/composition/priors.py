"""Class-prior alignment of each teacher's predictions on the unlabeled set.

A teacher trained briefly, or on a skewed shard, over-predicts some of its classes, and it
files the images of classes it does not know under one or two of its own. Its argmax then
carries a class prior that no entropy filter undoes: on the composition benchmark's weak
MNIST teachers the ``mean`` rule labels 47 % of the unlabeled images "1" (true share 11 %).

Alignment rescales each teacher's probabilities per class, ``p'(c | x) ∝ v_c p(c | x)``, with
the one ``v`` under which its rescaled predictions average to the uniform distribution over
its own classes on the unlabeled set: the distribution alignment of ReMixMatch (Berthelot et
al., ICLR 2020), solved exactly. The rescaled predictions are an entropic optimal-transport
plan between the samples (mass ``1/N`` each) and the classes (``1/K`` each) with cost
``-log p`` and regularisation 1, whose plan is ``diag(u) p diag(v)`` (Cuturi, NeurIPS 2013;
the balanced pseudo-labels of Asano et al., ICLR 2020), which POT's Sinkhorn finds.

It assumes that the unlabeled set holds each class in about equal shares; a set that does not
should turn it off (``CompositionConfig.align_priors``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FULL_DISTRIBUTIONS = ("probs", "logits")  # output forms that carry a class prior to rescale
_TINY = 1e-30  # floor under probabilities before their logarithm


def prior_log_scales(probs: Tensor, known: Tensor, forms: Sequence[str]) -> Tensor:
    """Per teacher, ``log v`` that aligns its predictions on ``probs`` to a uniform prior.

    Parameters
    ----------
    probs : (T, N, U) union-space probabilities on the unlabeled set.
    known : (T, U) bool.
    forms : each teacher's output form; a teacher that releases only labels or its top k has
        no class prior to rescale and keeps ``log v = 0``.

    Returns
    -------
    (T, U) float64, zero outside each teacher's classes, mean zero over them.
    """
    import ot  # POT, a coordinator dependency

    log_scales = torch.zeros(known.shape, dtype=torch.float64)
    for t, form in enumerate(forms):
        if form not in FULL_DISTRIBUTIONS:
            continue
        mine = probs[t][:, known[t]].double().clamp_min(_TINY)  # (N, K)
        samples = torch.full((mine.shape[0],), 1.0 / mine.shape[0], dtype=torch.float64)
        classes = torch.full((mine.shape[1],), 1.0 / mine.shape[1], dtype=torch.float64)
        # float64 and the floor keep the kernel p in [1e-30, 1]: no overflow in its scalings
        _, log = ot.sinkhorn(samples, classes, -mine.log(), 1.0, numItermax=2000, log=True,
                             warn=False)  # fmt: skip
        log_v = log["v"].log()  # (K,)
        log_scales[t, known[t]] = log_v - log_v.mean()
    return log_scales


def rescale(probs: Tensor, known: Tensor, log_scales: Tensor) -> Tensor:
    """(T, B, U) probabilities ``∝ v_c p(c | x)`` over each teacher's classes, zero elsewhere.

    Parameters
    ----------
    probs : (T, B, U) union-space probabilities.
    known : (T, U) bool.
    log_scales : (T, U) from :func:`prior_log_scales`.
    """
    rescaled = torch.empty_like(probs)
    for t, mine in enumerate(known):  # one teacher at a time: a thousand fit in memory
        logits = probs[t].double().clamp_min(_TINY).log() + log_scales[t]  # (B, U)
        rescaled[t] = torch.softmax(logits.masked_fill(~mine, float("-inf")), dim=1)
    return rescaled


def predicted_shares(probs: Tensor, known: Tensor) -> Tensor:
    """(T, U): the share of the samples each teacher predicts as each class (its argmax over
    its own classes), zero outside them."""
    shares = torch.zeros(known.shape, dtype=torch.float64)
    for t, mine in enumerate(known):
        labels = probs[t].masked_fill(~mine, -1.0).argmax(dim=1)  # (B,)
        shares[t] = torch.bincount(labels, minlength=len(mine)).double() / len(labels)
    return shares
