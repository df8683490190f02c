"""The BatchNorm-statistics loss of data-free fusion (paper 003, Eq. 3 first term and Eq. 4).

For every BatchNorm layer ``l`` of a teacher in eval mode, the per-channel mean and variance of
the layer's input over a batch are compared with the running statistics learned from the
teacher's training data, as a KL divergence between Gaussians::

    D_N((mu_hat, var_hat), (mu, var)) = ((mu_hat - mu)^2 + var_hat) / (2 var)
                                        - log(sigma_hat / sigma) - 1/2          (Eq. 4)

averaged over the channels of a layer and summed over layers. This runs where the teacher
lives: the running statistics never leave the party.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.export.unflatten import InterpreterModule
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers that track running statistics, in module order: BatchNorm
    modules, and in the unflattened module of a ``torch.export`` program the layers that were
    BatchNorm modules when it was exported (they keep ``running_mean`` and ``running_var``)."""
    return [m for m in model.modules() if _is_batchnorm(m)]


def _is_batchnorm(module: nn.Module) -> bool:
    if isinstance(module, _BatchNorm):
        return module.running_mean is not None
    exported = isinstance(module, InterpreterModule)
    return exported and {"running_mean", "running_var"} <= module._buffers.keys()


def gaussian_kl(mu_hat: Tensor, var_hat: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """Eq. 4 per channel: KL(N(mu_hat, var_hat) || N(mu, var)); all of shape (C,)."""
    return ((mu_hat - mu) ** 2 + var_hat) / (2 * var) - 0.5 * torch.log(var_hat / var) - 0.5


def _batch_moments(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) variance of (B, C, ...) features."""
    dims = [0] + list(range(2, features.ndim))  # every axis but the channels
    return features.mean(dim=dims), features.var(dim=dims, unbiased=False)


@contextmanager
def bn_statistics_loss(model: nn.Module, eps: float = 1e-5) -> Iterator[list[Tensor]]:
    """Collect the BN loss of every forward pass run inside the ``with`` block.

    Yields a list that receives one scalar per BatchNorm layer per forward of this thread;
    ``sum(...)`` of it is the first term of Eq. 3.

    Examples
    --------
    >>> with bn_statistics_loss(teacher) as losses:
    ...     logits = teacher(x)
    >>> loss = torch.stack(losses).sum()
    """
    losses: list[Tensor] = []
    owner = threading.get_ident()  # other threads may run the same model meanwhile

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if threading.get_ident() != owner:
            return
        mu_hat, var_hat = _batch_moments(inputs[0])
        kl = gaussian_kl(
            mu_hat,
            var_hat + eps,
            module.running_mean.to(mu_hat),
            module.running_var.to(mu_hat) + eps,
        )
        losses.append(kl.mean())

    handles = [layer.register_forward_hook(hook) for layer in batchnorm_layers(model)]
    try:
        yield losses
    finally:
        for handle in handles:
            handle.remove()
