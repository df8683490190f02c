"""Cross-layer alignment (paper 002, section 3.1, Definition 1 and Algorithm 1).

Given the cost ``C[j, i]`` between hidden layer j of the deeper network A (m layers) and
hidden layer i of the shallower network B (n <= m layers), find the strictly increasing map
``a`` from B's layers to A's that minimises ``sum_i C[a(i), i]``, with the first and the last
hidden layers matched to each other. Indices are 0-based here (the paper counts from 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _increasing_assignment(cost: Tensor) -> list[int]:
    """Optimal strictly increasing map for a (m, n) cost, n <= m, no pinned layers.

    ``S[i, j]``: optimal cost of mapping B's first i layers into A's first j layers;
    ``S[i, j] = min(S[i, j-1], S[i-1, j-1] + C[j-1, i-1])`` (Algorithm 1), O(mn).
    """
    m, n = cost.shape
    if n == 0:
        return []
    best = [[math.inf] * (m + 1) for _ in range(n + 1)]
    best[0] = [0.0] * (m + 1)
    for i in range(1, n + 1):
        for j in range(i, m + 1):
            best[i][j] = min(best[i][j - 1], best[i - 1][j - 1] + float(cost[j - 1, i - 1]))
    mapping = [0] * n
    j = m
    for i in range(n, 0, -1):  # backtrack: skip A's layer j while it is not used
        while j > i and best[i][j] == best[i][j - 1]:
            j -= 1
        mapping[i - 1] = j - 1
        j -= 1
    return mapping


def cross_layer_alignment(
    cost: Tensor, *, pin_first: bool = True, pin_last: bool = True
) -> list[int]:
    """The optimal cross-layer alignment of paper 002 (Definition 1, Algorithm 1).

    Parameters
    ----------
    cost : (m, n) tensor, ``cost[j, i]`` = dissimilarity of A's hidden layer j and B's
        hidden layer i (e.g. ``1 - linear CKA``, Eq. 3), with m >= n.
    pin_first, pin_last : match the first (last) hidden layers of the two networks; with
        n = 1 the first layer wins.

    Returns
    -------
    list of n indices ``a`` into A's layers, strictly increasing.
    """
    if cost.ndim != 2:
        raise ValueError(f"cost must be a (m, n) matrix, got shape {tuple(cost.shape)}")
    m, n = cost.shape
    if n == 0 or n > m:
        raise ValueError(f"cost: need 1 <= n <= m (the deeper network first), got m={m}, n={n}")
    if not torch.isfinite(cost).all():
        raise ValueError("cost contains NaN or infinite entries")
    head = [0] if pin_first else []
    tail = [m - 1] if pin_last and n - len(head) > 0 else []
    inner_rows = range(len(head), m - len(tail))
    inner_cols = range(len(head), n - len(tail))
    inner = cost[inner_rows.start : inner_rows.stop, inner_cols.start : inner_cols.stop]
    return head + [inner_rows.start + j for j in _increasing_assignment(inner)] + tail
