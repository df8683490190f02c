"""Layer-wise parameter learning (paper 004, Algorithm 1, lines 1-7) for a student of any
traceable architecture -- torchvision's, timm's or the registry's -- from teachers of any
traceable architecture, at the feature points matched by
:func:`amalgam.fusion.amalgamation.points.match_points`.

Two things differ from the ``vgg_cnn`` student of :mod:`amalgam.fusion.amalgamation.student`:

- The student's widths are its architecture's: the teachers' features at a point are
  amalgamated to as many channels as the student has there.
- A library network's feature point is a unit's output (after its activation, after a
  residual addition), where the feature adaptation module of Eq. 3 cannot be folded into the
  layer before it. So step k of the student is trained on the student's own features at point
  k - 1 (the images for the first), and a 1x1 convolution (a linear map for vectors) carries
  its output to the amalgamated features (Eq. 5 through it); that adapter is used in training
  only, as the regressor of FitNets (Romero et al. 2015) is, and the student keeps its
  architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from amalgam.fusion.amalgamation.autoencoder import (
    AutoencoderConfig,
    amalgamate_features,
    half_squared_error,
    mean_energy,
)
from amalgam.fusion.amalgamation.points import (
    FeaturePoint,
    feature_points,
    match_points,
    pooled,
    split_at,
)
from amalgam.fusion.amalgamation.scores import score_loss
from amalgam.fusion.device import to_host, to_model
from amalgam.fusion.ot import UnsupportedNetwork
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import TeacherInfo
from amalgam.fusion.train import StudentConfig, fit

LSTSQ_ROWS = 65536  # feature vectors the adapter's least-squares start reads at most


def teacher_points(infos: Sequence[TeacherInfo]) -> dict[str, list[FeaturePoint]]:
    """Each party's released feature points (``PartyInfo.feature_layers``); a party without
    any is named."""
    points = {}
    for info in infos:
        if "activations" not in info.capabilities:
            raise ValueError(f"party {info.name}: Activations is not granted by its policy")
        if not info.feature_layers:
            raise ValueError(
                f"party {info.name}: releases no layer that ends a unit of its network (its "
                "policy's activations.layers lists none, or its model cannot be traced)"
            )
        points[info.name] = [
            FeaturePoint(name, tuple(shape)) for name, shape in info.feature_layers
        ]
    return points


def plan_points(
    infos: Sequence[TeacherInfo], student: nn.Module, arch: str
) -> list[dict[str, FeaturePoint]]:
    """The matched feature points of the parties and of ``student`` (architecture ``arch``),
    keyed by party name and ``"student"``."""
    shape = tuple(infos[0].input_shape)
    try:
        own = feature_points(student, shape)
    except UnsupportedNetwork as error:
        raise ValueError(f"student.arch: {arch}: {error}") from None
    return match_points(teacher_points(infos), own)


def learn_point_wise(
    student: nn.Module,
    points: Sequence[dict[str, FeaturePoint]],
    x: Tensor,
    features: dict[str, dict[str, Tensor]],
    scores: Tensor,
    config,
    training: StudentConfig,
    context: RunContext = RunContext(),
) -> dict[str, object]:
    """For every matched point, amalgamate the teachers' features ``features[party][layer]``
    on the (t, C, H, W) images ``x`` to the student's channels there, and train the student's
    step up to it (through a training-only adapter) from its own features at the point
    before; then the rest of the student on the (t, E) targets ``scores``. ``config`` is the
    :class:`amalgam.fusion.amalgamation.trainer.AmalgamationConfig`. Returns each point's
    losses."""
    seed, progress = context.seed, context.progress
    train = dict(batch_size=training.batch_size, lr=training.lr, seed=seed, progress=progress,
                 hardware=context.hardware)  # fmt: skip
    autoencoder = AutoencoderConfig(config.autoencoder_epochs, training.batch_size, 1e-3, seed)
    steps = split_at(student, [row["student"] for row in points])
    losses: dict[str, object] = {}
    previous = x
    for step, row in zip(steps, points):
        own = row["student"]
        teachers = {party: point for party, point in row.items() if party != "student"}
        amalgamated = amalgamate_features(
            [
                pooled(features[party][point.name], own.resolution)
                for party, point in teachers.items()
            ],
            own.shape[0],
            config.scheme,
            autoencoder,
            desc=f"auto-encoder {own.name}",
            progress=progress,
            hardware=context.hardware,
        )
        target = amalgamated.features.float()  # (t, C_s, ...)
        adapter = _adapter(own.shape)
        _start_adapter(adapter, _outputs(step, previous, batch_statistics=True), target)
        history = fit(
            nn.Sequential(step, adapter),
            previous,
            target,
            epochs=config.layer_epochs,
            weight_decay=0.0,
            desc=f"layer {own.name}",
            loss=half_squared_error,
            **train,
        )
        fit_error = history[-1] / max(mean_energy(target), 1e-12)
        losses[own.name] = {"reconstruction": amalgamated.losses, "layer": fit_error}
        context.log(
            f"amalgamate: {own.name} from "
            f"{', '.join(f'{party} {point.name}' for party, point in teachers.items())}: "
            f"reconstruction error {', '.join(f'{v:.3f}' for v in amalgamated.losses)}, "
            f"layer fit {fit_error:.3f} (relative to the features' energy)"
        )
        previous = _outputs(step, previous)
    history = fit(steps[-1], previous, scores, epochs=config.layer_epochs,
                  weight_decay=training.weight_decay, desc="layer scores",
                  loss=score_loss(config.score_target, config.temperature), **train)  # fmt: skip
    losses["scores"] = history[-1]
    return losses


def point_widths(
    points: Sequence[dict[str, FeaturePoint]],
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, str]]]:
    """Per student point, each party's channels and the student's; and the party layers
    matched to it."""
    widths = {
        row["student"].name: {p: point.shape[0] for p, point in row.items()} for row in points
    }
    layers = {
        row["student"].name: {p: point.name for p, point in row.items() if p != "student"}
        for row in points
    }
    return widths, layers


def _adapter(shape: tuple[int, ...]) -> nn.Module:
    channels = shape[0]
    return nn.Conv2d(channels, channels, 1) if len(shape) == 3 else nn.Linear(channels, channels)


@torch.no_grad()
def _outputs(
    step: nn.Module, x: Tensor, batch_size: int = 256, batch_statistics: bool = False
) -> Tensor:
    """The (t, ...) outputs of ``step`` on (t, ...) inputs, float32 on the host: in eval mode, or
    normalised by each batch's statistics as in training (``batch_statistics``)."""
    was_training = step.training
    step.train(batch_statistics)
    out = torch.cat([to_host(step(to_model(step, x[k : k + batch_size])))
                     for k in range(0, len(x), batch_size)])  # fmt: skip
    step.train(was_training)
    return out


@torch.no_grad()
def _start_adapter(adapter: nn.Module, outputs: Tensor, target: Tensor) -> None:
    """Start at the least-squares map from the step's first outputs to the target: the
    amalgamated features' scale and mean are then right from the first batch."""
    inputs = outputs.float().movedim(1, -1).reshape(-1, outputs.shape[1])  # (t*H*W, C)
    wanted = target.float().movedim(1, -1).reshape(-1, target.shape[1])  # (t*H*W, C_s)
    pick = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))[:LSTSQ_ROWS]
    design = torch.cat([inputs[pick], torch.ones(len(pick), 1)], dim=1).double()  # (n, C + 1)
    solution = torch.linalg.lstsq(design, wanted[pick].double()).solution  # (C + 1, C_s)
    adapter.weight.copy_(solution[:-1].T.reshape(adapter.weight.shape))
    adapter.bias.copy_(solution[-1])
