"""Linear centered kernel alignment (Kornblith et al. 2019), the layer similarity of paper 002.

A party can release the centered Gram matrix of a layer instead of its activations: linear
CKA needs nothing else, and :func:`cka_from_grams` gives the same number as :func:`linear_cka`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from amalgam.fusion.activations import as_matrix


def cka_from_grams(gram_x: Tensor, gram_y: Tensor) -> Tensor:
    """Linear CKA from two centered (t, t) Gram matrices: ``<K, L>_F / (||K||_F ||L||_F)``.

    Equal to paper 002's Eq. 2, ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on centered X, Y,
    because ``<X X^T, Y Y^T>_F = ||Y^T X||_F^2``. Returns a 0-d tensor in [0, 1]; 0 when
    either representation is constant.
    """
    if gram_x.shape != gram_y.shape or gram_x.ndim != 2 or gram_x.shape[0] != gram_x.shape[1]:
        raise ValueError(
            f"Gram matrices must be (t, t) of one t, got {tuple(gram_x.shape)} "
            f"and {tuple(gram_y.shape)}"
        )
    k, m = gram_x.double(), gram_y.double()
    norms = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(m)
    if norms == 0:
        return torch.zeros((), dtype=gram_x.dtype, device=gram_x.device)
    return ((k * m).sum() / norms).to(gram_x.dtype)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA (paper 002, Eq. 2) between (t, ...) and (t, ...) activations of t samples."""
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same samples: {len(x)} vs {len(y)} rows")
    a, b = as_matrix(x), as_matrix(y)
    a = a - a.mean(dim=0, keepdim=True)  # (t, p_A)
    b = b - b.mean(dim=0, keepdim=True)  # (t, p_B)
    cross = torch.linalg.matrix_norm(b.T @ a) ** 2
    norms = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    if norms == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return (cross / norms).to(x.dtype)


def cka_cost(grams_deep: list[Tensor], grams_shallow: list[Tensor]) -> Tensor:
    """Cost matrix ``C[j, i] = 1 - CKA(layer j of the deeper net, layer i of the shallower)``
    (paper 002, Eq. 3), shape (m, n), from centered Gram matrices."""
    cost = torch.empty(len(grams_deep), len(grams_shallow), dtype=torch.float64)
    for j, gram_a in enumerate(grams_deep):
        for i, gram_b in enumerate(grams_shallow):
            cost[j, i] = 1.0 - cka_from_grams(gram_a, gram_b).double()
    return cost
