"""A small registry of classifiers with a uniform interface.

Every model exposes ``forward_features(x) -> (B, F)``, ``forward_head(f) -> (B, K)`` and
``num_features``; distillation, amalgamation and consolidation heads all build on that.
Entry points take ``in_shape=(C, H, W)`` and ``num_classes`` plus their own keywords.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    """Fully connected ReLU network with biases; ``hidden`` is one width per hidden layer
    (an int means two hidden layers of that width)."""

    def __init__(
        self, in_shape: tuple[int, ...], num_classes: int, hidden: int | Sequence[int] = 256
    ) -> None:
        super().__init__()
        widths = (hidden, hidden) if isinstance(hidden, int) else tuple(hidden)
        if not widths:
            raise ValueError("hidden: an MLP needs at least one hidden layer")
        layers: list[nn.Module] = [nn.Flatten()]  # (B, C, H, W) -> (B, C*H*W)
        previous = math.prod(in_shape)
        for width in widths:
            layers += [nn.Linear(previous, width), nn.ReLU(inplace=True)]
            previous = width
        self.body = nn.Sequential(*layers)
        self.hidden = widths
        self.num_features = previous
        self.head = nn.Linear(previous, num_classes)

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


def identity_adapter(width: int, spatial: bool) -> nn.Module:
    """A 1x1 convolution (``spatial``) or a linear map on ``width`` channels that starts as
    the identity: the feature adaptation module of knowledge amalgamation (paper 004, Eq. 3)."""
    adapter = nn.Conv2d(width, width, 1) if spatial else nn.Linear(width, width)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(width).view_as(adapter.weight))
        adapter.bias.zero_()
    return adapter


class ConvBNReLU(nn.Sequential):
    """``conv`` (3x3, bias) -> ``bn`` -> ``relu``: one VGG layer; with ``adapt``, a 1x1
    ``adapt`` convolution sits between ``bn`` and ``relu`` (paper 004, Eq. 3)."""

    def __init__(self, c_in: int, c_out: int, adapt: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        if adapt:
            self.adapt = identity_adapter(c_out, spatial=True)
        self.relu = nn.ReLU(inplace=True)


class VGG(Classifier):
    """VGG-style CNN (Simonyan & Zisserman 2015) with BatchNorm and biases.

    ``stages`` holds the conv widths of each stage; every stage ends in a 2x2 max-pool.
    ``fc`` holds the widths of the hidden fully connected layers before the head.
    ``adapt`` puts a feature adaptation module (paper 004, Eq. 3) before every ReLU: the
    architecture of an amalgamated student (:mod:`amalgam.fusion.amalgamation`).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        stages: Sequence[Sequence[int]] = ((32, 32), (64, 64), (128, 128)),
        fc: Sequence[int] = (256,),
        adapt: bool = False,
    ) -> None:
        super().__init__()
        self.adapt = adapt
        self.stage_widths = tuple(tuple(widths) for widths in stages)
        if not self.stage_widths or not all(self.stage_widths):
            raise ValueError("stages: every stage needs at least one conv layer")
        self.stages = nn.ModuleList()
        c_in, height, width = in_shape
        for widths in self.stage_widths:
            layers = []
            for c_out in widths:
                layers.append(ConvBNReLU(c_in, c_out, adapt))
                c_in = c_out
            self.stages.append(nn.Sequential(*layers))
            height, width = height // 2, width // 2  # (B, C, H, W) -> (B, C, H/2, W/2)
        if height < 1 or width < 1:
            raise ValueError(f"stages: {len(self.stage_widths)} poolings need a larger input")
        self.pool = nn.MaxPool2d(2)
        self.fc_widths = tuple(fc)
        head_in = c_in * height * width
        layers = [nn.Flatten()]  # (B, C, h, w) -> (B, C*h*w)
        for width_fc in self.fc_widths:
            layers.append(nn.Linear(head_in, width_fc))
            if adapt:
                layers.append(identity_adapter(width_fc, spatial=False))
            layers.append(nn.ReLU(inplace=True))
            head_in = width_fc
        self.fc = nn.Sequential(*layers)
        self.num_features = head_in
        self.head = nn.Linear(head_in, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = self.pool(stage(x))
        return self.fc(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut: identity, or 1x1 conv-BN when shape changes."""

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
    """CIFAR-style ResNet (He et al. 2016): a stem and three stages of basic blocks, widths
    16/32/64; ``blocks`` is the block count of every stage, or one count per stage."""

    widths = (16, 32, 64)

    def __init__(
        self, in_shape: tuple[int, ...], num_classes: int, blocks: int | Sequence[int] = 1
    ) -> None:
        super().__init__()
        counts = (blocks,) * 3 if isinstance(blocks, int) else tuple(blocks)
        if len(counts) != 3 or min(counts) < 1:
            raise ValueError(f"blocks: need three stages of at least one block, got {counts}")
        self.blocks = counts
        self.stem = _conv_bn(in_shape[0], self.widths[0])
        self.stages = nn.ModuleList()
        c_in = self.widths[0]
        for stage, (width, count) in enumerate(zip(self.widths, counts, strict=True)):
            layers = []
            for block in range(count):
                layers.append(BasicBlock(c_in, width, 2 if stage > 0 and block == 0 else 1))
                c_in = width
            self.stages.append(nn.Sequential(*layers))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 64, h, w) -> (B, 64)
        self.num_features = c_in
        self.head = nn.Linear(c_in, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.pool(x)


@register_model
def mlp(
    in_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, hidden: int | Sequence[int] = 256
) -> MLP:
    return MLP(tuple(in_shape), num_classes, hidden)


@register_model
def vgg_cnn(
    in_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    stages: Sequence[Sequence[int]] = ((32, 32), (64, 64), (128, 128)),
    fc: Sequence[int] = (256,),
    adapt: bool = False,
) -> VGG:
    return VGG(tuple(in_shape), num_classes, stages, fc, adapt)


@register_model
def small_cnn(
    in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, width: int = 32
) -> SmallCNN:
    return SmallCNN(tuple(in_shape), num_classes, width)


@register_model
def resnet8_cifar(in_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(tuple(in_shape), num_classes, blocks=1)


@register_model
def resnet14_cifar(in_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(tuple(in_shape), num_classes, blocks=2)


@register_model
def resnet_cifar(
    in_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, blocks: int | Sequence[int] = 1
) -> ResNetCifar:
    return ResNetCifar(tuple(in_shape), num_classes, blocks)


@register_model
def resnet20_cifar(in_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(tuple(in_shape), num_classes, blocks=3)
