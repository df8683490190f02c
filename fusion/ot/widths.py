"""A traced network at other widths: a copy in which every neuron group has the size asked
for, each layer's tensors and size attributes changed to match (the tensors' values are to
be loaded). Cross-layer alignment balances a shallower network into a deeper one's
architecture this way when their widths differ (paper 002, e.g. a half-width VGG11 with a
double-width VGG13)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from amalgam.fusion.ot.spec import FusionSpec


def _depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _set_sizes(module: nn.Module, depthwise: bool) -> None:
    """The size attributes of ``module`` after its tensors were resized."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = weight.shape[0]
        module.in_channels = weight.shape[0] if depthwise else weight.shape[1]
        module.groups = weight.shape[0] if depthwise else module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = module.running_mean.shape[0] if weight is None else weight.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (weight.shape[0],)
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = weight.shape[0]


def resized(model: nn.Module, spec: FusionSpec, sizes: Mapping[str, int]) -> nn.Module:
    """A copy of ``model`` whose group ``g`` of ``spec`` has ``sizes[g]`` neurons (groups not
    named keep theirs); the tensors of resized layers are zero."""
    wider = copy.deepcopy(model)
    for prefix, module in wider.named_modules():
        depthwise, changed = _depthwise(module), False
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            axes = spec.axes.get(f"{prefix}.{name}" if prefix else name, ())
            shape = [sizes.get(g, n) if g is not None else n
                     for g, n in zip(axes, tensor.shape, strict=False)]  # fmt: skip
            shape += list(tensor.shape[len(shape) :])
            if shape == list(tensor.shape):
                continue
            zeros = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(zeros, requires_grad=tensor.requires_grad))
            else:
                setattr(module, name, zeros)  # a registered buffer stays one
            changed = True
        if changed:
            _set_sizes(module, depthwise)
    return wider
