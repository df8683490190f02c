"""The amalgamated student: a ``vgg_cnn`` of the teachers' depth with its own widths and a
feature adaptation module before every ReLU, and its layers as the steps of layer-wise
parameter learning (paper 004, Eq. 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from amalgam.fusion.models import VGG, create_model


@dataclass(frozen=True)
class Layout:
    """The depth of a ``vgg_cnn``: conv layers per stage and hidden fully connected layers.

    ``layers`` names, in forward order, the outputs amalgamated and learned layer by layer
    (as the teachers' model registry names them): the BatchNorm output of every conv layer
    (before its ReLU) and every hidden fully connected layer (before its ReLU)."""

    stages: tuple[int, ...]
    fc: int

    @classmethod
    def from_layer_names(cls, names: Sequence[str]) -> Layout:
        """Parse the layers a ``vgg_cnn`` party releases (its policy may list more)."""
        try:
            stages, fc = VGG.depth_of(names)
        except ValueError as missing:
            raise ValueError(f"does not release {missing}") from None
        return cls(stages, fc)

    @property
    def layers(self) -> list[str]:
        return VGG.feature_layers(self.stages, self.fc)


def student_width(teacher_widths: Sequence[int], scale: float) -> int:
    """``scale * sqrt(sum C_i^2)`` rounded (to a multiple of 4 from 16 on: faster
    convolutions), kept between the widest teacher and the sum of all.

    Conv parameters grow with the square of the width, so ``scale < 1`` keeps the student
    smaller than the teachers together while it is wider than any one of them."""
    width = scale * math.sqrt(sum(c * c for c in teacher_widths))
    width = 4 * round(width / 4) if width >= 16 else round(width)
    return min(max(width, max(teacher_widths)), sum(teacher_widths))


def build_student(
    layout: Layout,
    widths: Sequence[int],
    in_shape: Sequence[int],
    entries: int,
    adapt: bool = True,
) -> VGG:
    """A ``vgg_cnn`` with ``widths`` one per name of ``layout.layers`` and ``entries``
    outputs, one per column of the concatenated score vector; ``adapt=False`` builds the
    plain network (a teacher of the family, for counting its parameters)."""
    convs = list(widths[: sum(layout.stages)])
    stages, start = [], 0
    for count in layout.stages:
        stages.append(convs[start : start + count])
        start += count
    return create_model(
        "vgg_cnn",
        in_shape=tuple(in_shape),
        num_classes=entries,
        stages=[list(s) for s in stages],
        fc=list(widths[sum(layout.stages) :]),
        **({"adapt": True} if adapt else {}),
    )


class LayerStep(nn.Module):
    """Eq. 3: ``F^_l = layer_l(pool(activation(FAM_{l-1}(F_{l-1}))))``; ``before`` holds the
    previous layer's adaptation module, ReLU and any pooling / flattening, ``layer`` this
    layer's parametric part (conv + BatchNorm, a linear map, or the head). Both are the
    student's own modules: training a step trains the student."""

    def __init__(self, target: str, before: Sequence[nn.Module], layer: Sequence[nn.Module]):
        super().__init__()
        self.target = target  # the teachers' layer it learns from; "scores" for the head
        self.before, self.layer = nn.Sequential(*before), nn.Sequential(*layer)

    @property
    def width(self) -> int:
        """Channels (or features) of this step's output."""
        return self.layer[0].weight.shape[0]

    def forward(self, previous: Tensor) -> Tensor:
        """(t, ...) features of the previous layer (float16 when stored) -> this layer's."""
        return self.layer(self.before(previous.to(self.layer[0].weight.dtype)))


def layer_steps(student: VGG) -> list[LayerStep]:
    """One step per amalgamated layer, then the head (target ``scores``); chaining every step
    from the image computes ``student.forward``."""
    layout = Layout(tuple(len(stage) for stage in student.stages), len(student.fc_widths))
    units: list[tuple[list[nn.Module], nn.Module, list[nn.Module]]] = []  # body, FAM, after
    for stage in student.stages:
        for j, block in enumerate(stage):
            after = [block.relu] + ([student.pool] if j == len(stage) - 1 else [])
            units.append(([block.conv, block.bn], block.adapt, after))
    units[-1][2].append(student.fc[0])  # flatten before the first linear layer (or the head)
    for linear, adapt, relu in student.hidden_fc():
        units.append(([linear], adapt, [relu]))
    steps, before = [], []
    for target, (body, adapt, after) in zip(layout.layers, units, strict=True):
        steps.append(LayerStep(target, before, body))
        before = [adapt, *after]
    steps.append(LayerStep("scores", before, [student.head]))
    return steps


@torch.no_grad()
def fold_adaptation(student: VGG) -> VGG:
    """The same function (in eval mode) as a plain ``vgg_cnn``: every adaptation module is
    linear and sits before a ReLU, so it folds into the layer before it, a conv layer through
    its BatchNorm's running statistics (that BatchNorm becomes the identity). The deployed
    student then has no more parameters than its widths call for."""
    plain = create_model(
        "vgg_cnn",
        in_shape=tuple(student.arch["kwargs"]["in_shape"]),
        num_classes=student.head.out_features,
        stages=[list(widths) for widths in student.stage_widths],
        fc=list(student.fc_widths),
    )
    for stage, plain_stage in zip(student.stages, plain.stages, strict=True):
        for block, target in zip(stage, plain_stage, strict=True):
            scale = block.bn.weight / torch.sqrt(block.bn.running_var + block.bn.eps)  # (C,)
            weight = block.conv.weight * scale.view(-1, 1, 1, 1)  # (C, C_in, 3, 3)
            bias = (block.conv.bias - block.bn.running_mean) * scale + block.bn.bias
            mix = block.adapt.weight[:, :, 0, 0]  # (C, C)
            target.conv.weight.copy_(torch.einsum("oc,cikl->oikl", mix, weight))
            target.conv.bias.copy_(mix @ bias + block.adapt.bias)
            target.bn.running_var.fill_(1.0 - target.bn.eps)  # BatchNorm: the identity
    for (linear, adapt, _), (target, _) in zip(student.hidden_fc(), plain.hidden_fc(), strict=True):
        target.weight.copy_(adapt.weight @ linear.weight)
        target.bias.copy_(adapt.weight @ linear.bias + adapt.bias)
    plain.head.load_state_dict(student.head.state_dict())
    return plain.eval()
