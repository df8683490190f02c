"""Small registry networks with non-trivial BatchNorm statistics, and probe inputs for
them: what the weight-fusion tests fuse."""

from __future__ import annotations

import torch
from torch import nn

from amalgam.fusion.models import create_model

NETWORKS = {
    "mlp": dict(name="mlp", in_shape=(1, 8, 8), hidden=(24, 16, 12)),
    "vgg": dict(name="vgg_cnn", in_shape=(3, 16, 16), stages=((6,), (8, 8)), fc=(12,)),
    "resnet": dict(name="resnet8_cifar", in_shape=(3, 16, 16)),
}


def trained_like(kind: str, seed: int = 0) -> nn.Module:
    """A network of ``kind`` whose BatchNorm statistics moved off their defaults, in eval
    mode."""
    torch.manual_seed(seed)
    kwargs = dict(NETWORKS[kind])
    model = create_model(kwargs.pop("name"), num_classes=5, **kwargs)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *kwargs["in_shape"]) * 2 + 0.5)
    return model.eval()


def probe_inputs(kind: str, count: int = 32, seed: int = 1) -> torch.Tensor:
    """(count, *in_shape) standard normal inputs for a network of ``kind``."""
    shape = NETWORKS[kind]["in_shape"]
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))
