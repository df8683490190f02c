"""REPAIR (Jordan et al. 2022, "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", section 4): give each channel of a fused network the statistics of the inputs'.

Averaging aligned neurons that are not perfectly correlated shrinks their variance, and the
shrinkage compounds layer after layer ("variance collapse"): a one-shot fused CNN's deep
channels carry a fraction of the inputs' signal. REPAIR measures, on probe images, the mean
and standard deviation of every channel of every aligned input network, and rescales the
fused network's channel so that its statistics are their interpolation (the paper's eq. 4:
``mu = sum_k w_k mu_k``, ``sigma = sum_k w_k sigma_k``). The affine correction is folded into
the layer that writes the channel:

- channels that a BatchNorm carries are corrected at its output (its weight and bias);
- other hidden channels (not the classes) at the output of the convolution or linear layer
  that writes them.

Layers are corrected in forward order within one pass, so each one's statistics are measured
after the layers before it were repaired. Only the probe images are needed, not the data set
that BatchNorm re-estimation reads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from amalgam.fusion.ot.spec import FusionSpec, fusion_spec

EPS = 1e-6
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def repair_points(model: nn.Module, spec: FusionSpec) -> list[str]:
    """The modules whose outputs REPAIR corrects, in the model's order: every affine
    BatchNorm on hidden channels, and every convolution and linear layer whose hidden
    channels no BatchNorm carries."""

    def group(name: str) -> str | None:
        axes = spec.axes.get(f"{name}.weight")
        return axes[0] if axes else None

    modules = list(model.named_modules())
    norms = {n for n, m in modules if isinstance(m, NORMS) and m.affine and group(n)}
    normalised = {group(n) for n in norms}
    return [
        n
        for n, m in modules
        if n in norms or (isinstance(m, PRODUCERS) and group(n) not in normalised | {None})
    ]


def channel_dim(module: nn.Module) -> int:
    """The axis of ``module``'s output that carries its channels: the last for a linear
    layer (which may read channels-last tensors), else 1."""
    return -1 if isinstance(module, nn.Linear) else 1


def channel_rows(y: Tensor, dim: int) -> Tensor:
    """``y`` with its channels on ``dim`` as (N*..., C) rows of channel values, in float64."""
    return y.movedim(dim, -1).reshape(-1, y.shape[dim]).double()


def channel_statistics(y: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of ``y`` (its channels on ``dim``), each (C,)
    in float64."""
    rows = channel_rows(y, dim)  # (N*..., C)
    return rows.mean(dim=0), rows.std(dim=0, unbiased=False)


def _forward_with_hooks(model: nn.Module, x: Tensor, hooks: dict[str, Callable]) -> None:
    """One forward pass of ``model`` (eval mode) on ``x`` with ``hooks[name]`` as the forward
    hook of module ``name``; the hooks are removed afterwards."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]
    try:
        model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def statistics_at(
    model: nn.Module, x: Tensor, points: list[str]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Channel statistics at each of ``points`` on inputs ``x`` (t, C, H, W); a module called
    more than once is left out (its channels have no single set of statistics)."""
    found: dict[str, list[tuple[Tensor, Tensor]]] = {p: [] for p in points}

    def recorder(name: str):
        def hook(module, _inputs, output):
            found[name].append(channel_statistics(output, channel_dim(module)))

        return hook

    _forward_with_hooks(model, x, {p: recorder(p) for p in points})
    return {p: calls[0] for p, calls in found.items() if len(calls) == 1}


def _fold(module: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """Make ``module`` output ``scale * y + shift`` per channel where it output ``y``: its
    weight's rows are scaled and the shift joins its bias (a module without a bias keeps
    only the scale)."""
    weight = module.weight
    view = (-1,) + (1,) * (weight.dim() - 1)
    weight.mul_(scale.to(weight.dtype).view(view))
    if module.bias is not None:
        module.bias.mul_(scale.to(weight.dtype)).add_(shift.to(weight.dtype))


@torch.no_grad()
def repair(
    fused: nn.Module,
    aligned: list[nn.Module],
    x: Tensor,
    weights: list[float] | None = None,
) -> list[str]:
    """Rescale ``fused``'s channels (in place) to the interpolated statistics of the
    ``aligned`` input networks on probe inputs ``x`` (t, C, H, W).

    Parameters
    ----------
    fused : the fused network, in the neuron order of ``aligned``.
    aligned : the input networks after alignment (each of ``fused``'s architecture;
        :meth:`amalgam.fusion.ot.fuse.FusionResult.aligned_models`).
    weights : the fusion weights (normalised here); None: uniform.

    Returns
    -------
    The layers corrected (:func:`repair_points` called once per forward pass): each channel
    of their outputs now has, on ``x``, the mean ``sum_k w_k mu_k`` and standard deviation
    ``sum_k w_k sigma_k`` of the aligned networks' (eq. 4).
    """
    weights = weights if weights is not None else [1.0] * len(aligned)
    weights = [w / sum(weights) for w in weights]
    points = repair_points(fused, fusion_spec(fused, tuple(x.shape[1:])))
    measured = [statistics_at(model, x, points) for model in aligned]
    points = [p for p in points if all(p in m for m in measured)]
    targets = {
        p: tuple(sum(w * m[p][i] for w, m in zip(weights, measured, strict=True)) for i in (0, 1))
        for p in points
    }
    corrections: dict[str, tuple[Tensor, Tensor]] = {}

    def corrector(name: str):
        def hook(module, _inputs, output):
            dim = channel_dim(module)
            mean, std = channel_statistics(output, dim)
            target_mean, target_std = targets[name]
            # (C,); a channel constant on the probe keeps its scale and takes the mean
            scale = torch.where(std > EPS, target_std / std.clamp_min(EPS), 1.0)
            shift = target_mean - scale * mean  # (C,)
            corrections[name] = (scale, shift)
            view = [1] * output.dim()
            view[dim] = -1
            return output * scale.to(output.dtype).view(view) + shift.to(output.dtype).view(view)

        return hook

    _forward_with_hooks(fused, x, {p: corrector(p) for p in points})
    modules = dict(fused.named_modules())
    for name, (scale, shift) in corrections.items():
        _fold(modules[name], scale, shift)
    return list(corrections)
