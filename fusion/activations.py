"""Outputs of named layers on given inputs: what the ``Activations`` and ``Gram`` capabilities
release, and what CKA, activation-based OT and layer merging read."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fusion.ot.cka import centered_gram


def layer_names(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs can be asked for (every named submodule)."""
    return [name for name, _ in model.named_modules() if name]


@torch.no_grad()
def layer_outputs(
    model: nn.Module, x: Tensor, layers: Sequence[str], *, batch_size: int = 256
) -> dict[str, Tensor]:
    """Outputs of the modules ``layers`` of ``model`` (eval mode) on (t, C, H, W) inputs.

    Returns ``{name: (t, ...)}``; an unknown name raises ``KeyError`` naming it. In-place
    activations that follow a layer do not alter what is recorded (outputs are cloned).
    """
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules or not name]
    if missing:
        raise KeyError(f"no layer named {missing[0]!r}")
    chunks: dict[str, list[Tensor]] = {name: [] for name in layers}
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: chunks[name].append(out.detach().clone())
        )
        for name in dict.fromkeys(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
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
