"""A network with the neurons of every alignment group in a random order: the same function
in other weights, which weight fusion must bring back."""

from __future__ import annotations

import copy

import torch
from torch import nn

from amalgam.fusion.ot.spec import FusionSpec
from amalgam.fusion.ot.transport import apply_transport


def permuted_copy(model: nn.Module, spec: FusionSpec, seed: int = 2) -> nn.Module:
    """``model`` (eval mode) with the neurons of every group of ``spec`` permuted."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for group, size in spec.group_sizes(model).items():
        permutation = torch.eye(size)[torch.randperm(size, generator=generator)]
        for name, axes in spec.axes.items():
            for axis, g in enumerate(axes):
                if g == group:
                    state[name] = apply_transport(state[name], axis, permutation)
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone.eval()
