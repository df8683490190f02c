"""A small registry of classifiers with a uniform interface.

Every model exposes ``forward_features(x) -> (B, F)``, ``forward_head(f) -> (B, K)`` and
``num_features``; distillation, amalgamation and consolidation heads all build on that.
Entry points take ``in_shape=(C, H, W)`` and ``num_classes`` plus their own keywords.

A model that weight fusion or amalgamation can work on declares its layers once, as timm
models declare ``feature_info``: :meth:`Classifier.sections` names every layer (its module,
the output that represents it, its width) section by section, and :meth:`Classifier.arch_with`
says how to build the same family with other sections. Nothing else spells out layer names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from amalgam.fusion.config import first_line

_REGISTRY: dict[str, Callable[..., Classifier]] = {}


def register_model(fn: Callable[..., Classifier]) -> Callable[..., Classifier]:
    """Register a model entry point under its function name; a duplicate name raises."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def is_architecture(name: str) -> bool:
    """Whether :func:`create_model` can build ``name``: a registered model, or a torchvision or
    timm classifier (:mod:`amalgam.fusion.zoo`)."""
    from amalgam.fusion.zoo import resolve

    return name in _REGISTRY or resolve(name) is not None


def create_model(name: str, **kwargs: Any) -> Classifier:
    """Build a registered model, or a torchvision or timm classifier by name
    (:class:`amalgam.fusion.zoo.LibraryClassifier`, keywords ``in_shape``, ``num_classes``
    and the library's own); an unknown name raises ``ValueError``."""
    if name in _REGISTRY:
        model = _REGISTRY[name](**kwargs)
    elif is_architecture(name):
        from amalgam.fusion.zoo import LibraryClassifier

        model = LibraryClassifier(name, **kwargs)
    else:
        raise ValueError(
            f"unknown architecture {name!r}: neither the registry ({', '.join(list_models())}), "
            "torchvision nor timm has it"
        )
    model.arch = {"name": name, "kwargs": dict(kwargs)}
    return model


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or from ``torch.save`` (loaded with weights_only);
    a file that is neither raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's reader raises whatever a file of other bytes trips
        raise ValueError(f"{path}: not a readable state dict ({first_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def fit_problem(model: nn.Module, state: Mapping[str, Tensor]) -> str | None:
    """Why ``state`` does not load into ``model`` exactly, in one line, or None."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} of another shape (e.g. {k}: {list(state[k].shape)} for "
            f"{list(expected[k].shape)})"
        )
    return "; ".join(problems) or None


@dataclass(frozen=True)
class Unit:
    """One layer as alignment and amalgamation see it.

    Attributes
    ----------
    module : the layer's module, the prefix of its parameters (e.g. ``stages.0.1``).
    output : the module whose output is the layer's feature map before its non-linearity:
        what CKA, activation-based OT and amalgamation read (e.g. ``stages.0.1.bn``).
    width : its output channels or features.
    """

    module: str
    output: str
    width: int


@dataclass(frozen=True)
class Section:
    """Consecutive layers of one kind at one resolution (an MLP's hidden layers, a VGG stage
    or its fully connected layers, a ResNet stage): cross-layer alignment maps layers within a
    section, and balancing adds or removes layers in one."""

    name: str
    units: tuple[Unit, ...]


class Classifier(nn.Module):
    """Base class: ``forward(x) = forward_head(forward_features(x))``."""

    num_features: int
    arch: dict[str, Any]

    def sections(self) -> list[Section]:
        """The model's layers, section by section, input to output (the head excluded)."""
        raise NotImplementedError(f"{type(self).__name__} declares no sections")

    def arch_with(self, widths: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        """The architecture (``{"name", "kwargs"}`` for :func:`create_model`) of this model's
        family with the layer widths ``widths[section]`` instead, one per layer: a section
        may gain or lose layers."""
        raise NotImplementedError(f"{type(self).__name__} cannot change its sections")

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

    def sections(self) -> list[Section]:
        units = _linear_units("body", self.body)
        return [Section("hidden", units)]

    def arch_with(self, widths: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        kwargs = {**self.arch["kwargs"], "hidden": tuple(widths["hidden"])}
        return {"name": self.arch["name"], "kwargs": kwargs}


def _linear_units(prefix: str, layers: nn.Sequential) -> tuple[Unit, ...]:
    """Every linear layer of ``layers`` as a unit represented by its own output."""
    return tuple(
        Unit(f"{prefix}.{i}", f"{prefix}.{i}", m.out_features)
        for i, m in enumerate(layers)
        if isinstance(m, nn.Linear)
    )


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

    def sections(self) -> list[Section]:
        """``stage<s>``: the conv layers of stage s, each represented by its BatchNorm's
        output; ``fc``: the hidden fully connected layers, by their own output."""
        sections = [
            Section(
                f"stage{s}",
                tuple(
                    Unit(f"stages.{s}.{j}", f"stages.{s}.{j}.bn", layer.conv.out_channels)
                    for j, layer in enumerate(stage)
                ),
            )
            for s, stage in enumerate(self.stages)
        ]
        return sections + [Section("fc", _linear_units("fc", self.fc))]

    def arch_with(self, widths: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        stages = tuple(tuple(widths[f"stage{s}"]) for s in range(len(self.stage_widths)))
        kwargs = {**self.arch["kwargs"], "stages": stages, "fc": tuple(widths["fc"])}
        return {"name": self.arch["name"], "kwargs": kwargs}

    def hidden_fc(self) -> list[list[nn.Module]]:
        """Per hidden fully connected layer: its linear map, its adaptation module (with
        ``adapt``) and its ReLU."""
        layers, current = [], []
        for module in list(self.fc)[1:]:  # after the Flatten
            current.append(module)
            if isinstance(module, nn.ReLU):
                layers.append(current)
                current = []
        return layers

    # the outputs that represent a plain vgg_cnn's layers, as :meth:`sections` names them
    _CONV_OUTPUT = re.compile(r"^stages\.(\d+)\.(\d+)\.bn$")
    _FC_OUTPUT = re.compile(r"^fc\.(\d+)$")

    @classmethod
    def feature_layers(cls, stages: Sequence[int], fc: int) -> list[str]:
        """The outputs that represent the layers of a plain ``vgg_cnn`` with ``stages[s]``
        conv layers in stage s and ``fc`` hidden fully connected layers, input to output."""
        convs = [f"stages.{s}.{j}.bn" for s, count in enumerate(stages) for j in range(count)]
        return convs + [f"fc.{1 + 2 * k}" for k in range(fc)]  # fc: Flatten, (Linear, ReLU)*

    @classmethod
    def depth_of(cls, layers: Sequence[str]) -> tuple[tuple[int, ...], int]:
        """``(stages, fc)`` of the plain ``vgg_cnn`` whose layers ``layers`` name (among
        other module names); ``ValueError`` naming the first layer missing from them."""
        convs = {(int(m[1]), int(m[2])) for n in layers if (m := cls._CONV_OUTPUT.match(n))}
        if not convs:
            raise ValueError("no vgg_cnn conv layer (stages.<s>.<j>.bn)")
        stages = tuple(
            1 + max((j for s, j in convs if s == stage), default=0)  # a stage has a layer
            for stage in range(1 + max(s for s, _ in convs))
        )
        expected = {(s, j) for s, count in enumerate(stages) for j in range(count)}
        if convs != expected:
            missing = sorted(expected - convs)[0]
            raise ValueError(f"layer stages.{missing[0]}.{missing[1]}.bn")
        linear = {n for n in layers if cls._FC_OUTPUT.match(n)}
        fc = 0
        while cls.feature_layers(stages, fc + 1)[-1] in linear:
            fc += 1
        return stages, fc


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

    def sections(self) -> list[Section]:
        """``stage<s>``: the blocks of stage s, each represented by its second BatchNorm's
        output (before the residual addition)."""
        return [
            Section(
                f"stage{s}",
                tuple(
                    Unit(f"stages.{s}.{b}", f"stages.{s}.{b}.bn2", self.widths[s])
                    for b in range(count)
                ),
            )
            for s, count in enumerate(self.blocks)
        ]

    def arch_with(self, widths: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        for s, width in enumerate(self.widths):
            if set(widths[f"stage{s}"]) != {width}:
                raise ValueError(f"stage{s}: every block is {width} wide in this family")
        blocks = tuple(len(widths[f"stage{s}"]) for s in range(len(self.widths)))
        # the named depths (resnet8_cifar, ...) are resnet_cifar with their own blocks
        return {"name": "resnet_cifar", "kwargs": {**self.arch["kwargs"], "blocks": blocks}}


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
