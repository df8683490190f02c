"""Variational information distillation (VID, Ahn et al. 2019), the ``L^VID`` term of data-free
fusion's student and assistant losses (paper 003, Eq. 1-2).

The student's last convolutional feature map predicts the teacher's as a Gaussian with a
learned mean (a stack of 1x1 convolutions) and a learned per-channel variance; the loss is the
negative log-likelihood of the teacher's map under it::

    L^VID = mean_{c,h,w} [ log sigma_c + (t_{c,h,w} - mu_{c,h,w}(s))^2 / (2 sigma_c^2) ]

Only the last convolutional layer is matched (paper 003, Sec. 4): the teacher's is the last
spatial feature layer it advertises (``TeacherInfo.feature_layers``), released through the
``Activations`` capability; the student's is its own last spatial unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amalgam.fusion.amalgamation.points import feature_points
from amalgam.fusion.teacher import Teacher, TeacherInfo


def last_feature_map(info: TeacherInfo) -> tuple[str, tuple[int, ...]] | None:
    """The name and (C, H, W) shape of the last spatial layer a party advertises; None when
    it advertises none (its policy releases no feature maps, or its model cannot be traced)."""
    spatial = [(name, shape) for name, shape in info.feature_layers if len(shape) == 3]
    return spatial[-1] if spatial else None


class VIDRegressor(nn.Module):
    """The variational distribution ``q(t | s)`` of one (student, teacher) pair.

    Parameters
    ----------
    student_channels, teacher_channels : channel counts of the two feature maps.
    init_variance : the variance every channel starts from (Ahn et al. use 5).
    """

    def __init__(
        self, student_channels: int, teacher_channels: int, init_variance: float = 5.0
    ) -> None:
        super().__init__()
        hidden = max(student_channels, teacher_channels)
        self.mean = nn.Sequential(
            nn.Conv2d(student_channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, teacher_channels, 1),
        )
        self.eps = 1e-6
        raw = math.log(math.expm1(init_variance - self.eps))  # softplus(raw) + eps = init
        self.raw_variance = nn.Parameter(torch.full((teacher_channels,), raw))

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``L^VID`` of (B, C_s, H_s, W_s) student and (B, C_t, H_t, W_t) teacher maps; the
        larger grid is average-pooled to the smaller one."""
        size = min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1])
        student = F.adaptive_avg_pool2d(student, size)
        teacher = F.adaptive_avg_pool2d(teacher.to(student), size)
        mean = self.mean(student)  # (B, C_t, h, w)
        variance = (F.softplus(self.raw_variance) + self.eps).view(1, -1, 1, 1)  # (1, C_t, 1, 1)
        nll = 0.5 * ((teacher - mean) ** 2 / variance + variance.log())
        return nll.mean()


class FeatureTap:
    """The output of a model's last spatial unit, recorded on every forward pass."""

    def __init__(self, model: nn.Module, in_shape: tuple[int, ...]) -> None:
        spatial = [p for p in feature_points(model, in_shape) if len(p.shape) == 3]
        if not spatial:
            raise ValueError("VID needs a student with a convolutional feature map")
        self.name, self.shape = spatial[-1].name, spatial[-1].shape
        self.module = dict(model.named_modules())[self.name]
        self.output: Tensor | None = None

    @contextmanager
    def recording(self) -> Iterator[FeatureTap]:
        """Record ``self.output`` (B, C, H, W) for forwards inside the ``with`` block."""

        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.output = output

        handle = self.module.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()


class VIDTerm(nn.Module):
    """``sum_k w_k L^VID(model, T_k)`` with ``w_k = 1 / K`` (Eq. 1; Eq. 2 with one teacher),
    over the teachers that release a feature map; the others add nothing.

    Raises ``ValueError`` when no teacher releases one.
    """

    def __init__(
        self,
        model: nn.Module,
        in_shape: tuple[int, ...],
        teachers: Sequence[TeacherInfo],
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        super().__init__()
        self.tap = FeatureTap(model, in_shape)
        self.layers = [last_feature_map(info) for info in teachers]
        if not any(self.layers):
            raise ValueError(
                "beta > 0: VID needs a party that releases a feature map through "
                "Activations; none does"
            )
        for info, layer in zip(teachers, self.layers):
            if layer is None:
                log(f"party {info.name} releases no feature map: VID leaves it out")
        self.weight = 1 / len(teachers)
        self.regressors = nn.ModuleDict(
            {
                str(k): VIDRegressor(self.tap.shape[0], layer[1][0])
                for k, layer in enumerate(self.layers)
                if layer is not None
            }
        )

    def teacher_maps(self, teachers: Sequence[Teacher], x: Tensor) -> list[Tensor | None]:
        """Each teacher's feature map on (B, C, H, W) ``x``, None where it releases none."""
        return [
            None if layer is None else teacher.activations(x, [layer[0]])[layer[0]]
            for teacher, layer in zip(teachers, self.layers)
        ]

    def forward(self, maps: Sequence[Tensor | None]) -> Tensor:
        """The term for the model's last forward inside :meth:`FeatureTap.recording`."""
        student = self.tap.output
        return sum(
            self.weight * self.regressors[str(k)](student, teacher_map)
            for k, teacher_map in enumerate(maps)
            if teacher_map is not None
        )
