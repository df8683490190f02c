"""A small registry of classifiers with a uniform interface.

Every model exposes ``forward_features(x) -> (B, F)``, ``forward_head(f) -> (B, K)`` and
``num_features``; distillation, amalgamation and consolidation heads all build on that.
Entry points take ``in_shape=(C, H, W)`` and ``num_classes`` plus their own keywords.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

_REGISTRY: dict[str, Callable[..., Classifier]] = {}


def register_model(fn: Callable[..., Classifier]) -> Callable[..., Classifier]:
    """Register a model entry point under its function name; a duplicate name raises."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> Classifier:
    """Build a registered model; an unknown name raises ``ValueError`` listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    model = _REGISTRY[name](**kwargs)
    model.arch = {"name": name, "kwargs": dict(kwargs)}
    return model


class Classifier(nn.Module):
    """Base class: ``forward(x) = forward_head(forward_features(x))``."""

    num_features: int
    arch: dict[str, Any]

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class MLP(Classifier):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        in_features = 1
        for dim in in_shape:
            in_features *= dim
        self.body = nn.Sequential(
            nn.Flatten(),  # (B, C, H, W) -> (B, C*H*W)
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.num_features = hidden
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)
    )


class SmallCNN(Classifier):
    """Two conv-BN blocks with pooling, then a hidden layer; works from 8x8 to 32x32 inputs."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(in_shape[0], width),
            _conv_bn(width, width),
            nn.MaxPool2d(2),  # (B, w, H, W) -> (B, w, H/2, W/2)
            _conv_bn(width, 2 * width),
            _conv_bn(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(2),  # (B, 2w, h, w) -> (B, 2w, 2, 2)
            nn.Flatten(),  # -> (B, 8w)
            nn.Linear(8 * width, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(True),
        )
        self.num_features = 128
        self.head = nn.Linear(128, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(Classifier):
    """CIFAR-style ResNet (He et al. 2016): three stages of basic blocks, widths 16/32/64."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, blocks: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_shape[0], 16)]
        c_in = 16
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_BasicBlock(c_in, width, stride))
                c_in = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # (B, 64, h, w) -> (B, 64)
        self.body = nn.Sequential(*layers)
        self.num_features = 64
        self.head = nn.Linear(64, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)


@register_model
def mlp(in_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, hidden: int = 256) -> MLP:
    return MLP(tuple(in_shape), num_classes, hidden)


@register_model
def small_cnn(
    in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, width: int = 32
) -> SmallCNN:
    return SmallCNN(tuple(in_shape), num_classes, width)


@register_model
def resnet8_cifar(in_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(tuple(in_shape), num_classes, blocks=1)


@register_model
def resnet20_cifar(in_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(tuple(in_shape), num_classes, blocks=3)
