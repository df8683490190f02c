"""Outputs of named layers on given inputs: what the ``Activations`` and ``Gram`` capabilities
release, and what CKA, activation-based OT and layer merging read; the centered Gram matrix
that a party releases instead of activations (enough for linear CKA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def as_matrix(x: Tensor) -> Tensor:
    """(t, ...) activations -> (t, d) in float64."""
    return x.reshape(len(x), -1).double()  # (t, C, H, W) -> (t, C*H*W)


def centered_gram(x: Tensor) -> Tensor:
    """Centered linear Gram matrix ``H X X^T H`` of (t, ...) activations, shape (t, t).

    Centering the features (columns of X) and centering the Gram matrix are the same thing:
    ``(X H_p)(X H_p)^T = H_t X X^T H_t``.
    """
    features = as_matrix(x)
    features = features - features.mean(dim=0, keepdim=True)  # (t, d), columns centered
    return (features @ features.T).to(x.dtype)


PENULTIMATE = "penultimate"  # the input of the model's ``head``: its representation phi(x)


def layer_names(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs can be asked for (every named submodule), then
    :data:`PENULTIMATE` where the model has a ``head``."""
    names = [name for name, _ in model.named_modules() if name]
    if "head" in names and PENULTIMATE not in names:
        names.append(PENULTIMATE)
    return names


@torch.no_grad()
def layer_outputs(
    model: nn.Module, x: Tensor, layers: Sequence[str], *, batch_size: int = 256
) -> dict[str, Tensor]:
    """Outputs of the modules ``layers`` of ``model`` (eval mode) on (t, C, H, W) inputs.

    Returns ``{name: (t, ...)}``; an unknown name raises ``KeyError`` naming it. In-place
    activations that follow a layer do not alter what is recorded (outputs are cloned).
    :data:`PENULTIMATE` records the (t, D) input of the ``head``.
    """
    modules = dict(model.named_modules())
    known = set(layer_names(model))
    missing = [name for name in layers if name not in known]
    if missing:
        raise KeyError(f"no layer named {missing[0]!r}")
    chunks: dict[str, list[Tensor]] = {name: [] for name in layers}

    def record(name: str, value: Tensor) -> None:
        chunks[name].append(value.detach().clone())

    handles = [
        modules["head"].register_forward_pre_hook(lambda _m, args: record(PENULTIMATE, args[0]))
        if name == PENULTIMATE and name not in modules
        else modules[name].register_forward_hook(lambda _m, _i, out, n=name: record(n, out))
        for name in dict.fromkeys(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, max(len(x), 1), batch_size):  # an empty batch runs once
            model(x[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def layer_grams(
    model: nn.Module, x: Tensor, layers: Sequence[str], *, batch_size: int = 256
) -> dict[str, Tensor]:
    """Centered (t, t) Gram matrices of the outputs of ``layers`` on ``x``: enough for linear
    CKA while the activations themselves stay with the model's owner."""
    outputs = layer_outputs(model, x, layers, batch_size=batch_size)
    return {name: centered_gram(value) for name, value in outputs.items()}
