"""Algorithm 1 of paper 004: for every layer, amalgamate the teachers' features and learn the
student's layer from the previous amalgamated features (layer-wise parameter learning); then
learn the head from the concatenated score vectors, and every layer jointly."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from amalgam.fusion.amalgamation.autoencoder import (
    AutoencoderConfig,
    amalgamate_features,
    half_squared_error,
    mean_energy,
)
from amalgam.fusion.amalgamation.features import FeatureCache
from amalgam.fusion.amalgamation.scores import (
    TARGETS,
    ScoreTarget,
    entries,
    score_loss,
    score_targets,
)
from amalgam.fusion.amalgamation.student import (
    LayerStep,
    Layout,
    build_student,
    fold_adaptation,
    layer_steps,
    student_width,
)
from amalgam.fusion.amalgamation.traced import learn_point_wise, plan_points, point_widths
from amalgam.fusion.config import Config
from amalgam.fusion.data import fit_to_shape
from amalgam.fusion.labels import as_logits
from amalgam.fusion.models import VGG
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import Teacher, TeacherInfo, predict_all
from amalgam.fusion.train import StudentConfig, fit
from amalgam.fusion.train import build_student as build_library_student

# the distillation baselines (paper 004, Table 1 "Baseline"): the student's architecture from
# scratch on the score vectors alone, with the paper's two targets and with the routed one
BASELINES = {"kd_concat_softmax": "concat", "kd_per_teacher": "per_teacher",
             "kd_routed": "routed"}  # fmt: skip
VGG_STUDENT = "vgg_cnn"  # the paper's student: the teachers' family, widths of its own


class AmalgamationConfig(Config):
    """Knowledge amalgamation (paper 004, Algorithm 1): the teachers' features amalgamated
    layer by layer into the student, then joint learning on their score vectors with the
    student's schedule (:class:`amalgam.fusion.train.StudentConfig`)."""

    scheme: Literal["dfa", "ifa"] = "dfa"  # all teachers' features at once, or two at a time
    # routed: each teacher's softmax weighted by how likely the image is of its part;
    # per_teacher: the same divided by N; concat: one softmax over the concatenated logits;
    # logits: the squared error of Eq. 5 on the logits (scores.TARGETS)
    score_target: ScoreTarget = "routed"
    temperature: float = Field(2.0, gt=0)  # T of the softmax targets
    # of the routed target's part weights (scores.part_weights); 0: equal weights
    routing_sharpness: float = Field(1.0, ge=0)
    # a vgg_cnn student's width: scale * sqrt(sum of C_i^2)
    width_scale: float = Field(0.9, gt=0)
    feature_samples: int = Field(2000, ge=2)  # images of the unlabeled set whose features move
    autoencoder_epochs: int = Field(5, ge=0)  # after the PCA start (the optimum of a linear AE)
    layer_epochs: int = Field(20, ge=1)  # of each layer-wise step


@dataclass
class AmalgamationResult:
    """``layerwise``: the student after the layer-wise stage only; ``joint``: after joint
    learning; ``baselines``: :data:`BASELINES` students; a ``vgg_cnn`` student with its
    adaptation modules folded in (:func:`student.fold_adaptation`). Every student outputs
    ``entries`` (the class of each column, teacher after teacher). ``widths``: per student
    layer amalgamated, the teachers' widths and the student's; ``layers``: per student layer,
    each party's layer amalgamated into it; ``losses``: per layer, the auto-encoders' and the
    step's final loss relative to the energy of their targets, and each run's epoch losses."""

    layerwise: nn.Module
    joint: nn.Module
    baselines: dict[str, nn.Module]
    entries: list[str]
    widths: dict[str, dict[str, int]]
    layers: dict[str, dict[str, str]] = field(default_factory=dict)
    losses: dict[str, object] = field(default_factory=dict)


def common_layout(infos: Sequence[TeacherInfo]) -> Layout:
    """The ``vgg_cnn`` depth every party releases; a party that differs is named."""
    layouts = []
    for info in infos:
        if "activations" not in info.capabilities:
            raise ValueError(f"party {info.name}: Activations is not granted by its policy")
        try:
            layouts.append(Layout.from_layer_names(info.layers))
        except ValueError as error:
            raise ValueError(f"party {info.name}: {error}") from None
    for info, layout in zip(infos, layouts, strict=True):
        if layout != layouts[0]:
            raise ValueError(
                f"party {info.name}: conv layers per stage {layout.stages} and {layout.fc} fc "
                f"layers, but {infos[0].name} has {layouts[0].stages} and {layouts[0].fc}; "
                "amalgamation needs teachers of one depth"
            )
    return layouts[0]


def _one_input_shape(infos: Sequence[TeacherInfo]) -> tuple[int, ...]:
    """The input shape every party takes; a party that differs is named."""
    for info in infos:
        if tuple(info.input_shape) != tuple(infos[0].input_shape):
            raise ValueError(
                f"party {info.name}: input shape {tuple(info.input_shape)}, but "
                f"{infos[0].name} takes {tuple(infos[0].input_shape)}"
            )
    return tuple(infos[0].input_shape)


@torch.no_grad()
def _start_at_target_scale(step: LayerStep, target: Tensor) -> None:
    """A step that ends in BatchNorm starts with its affine output at the target's
    per-channel mean and spread: the amalgamated features are not unit-variance (their
    first channels carry most of the energy), and Adam would take many steps to get there."""
    norm = step.layer[-1]
    if isinstance(norm, nn.BatchNorm2d):
        per_channel = target.float().transpose(0, 1).flatten(1)  # (C, t*H*W)
        norm.weight.copy_(per_channel.std(dim=1))
        norm.bias.copy_(per_channel.mean(dim=1))


def _widths(
    layout: Layout, infos: Sequence[TeacherInfo], features: Sequence[dict], scale: float
) -> dict[str, dict[str, int]]:
    """Per layer, each party's channels and the student's; spatial sizes must agree."""
    widths: dict[str, dict[str, int]] = {}
    for layer in layout.layers:
        first = features[0][layer].shape
        for info, held in zip(infos, features, strict=True):
            if held[layer].shape[2:] != first[2:]:
                raise ValueError(
                    f"party {info.name}: layer {layer} has shape {tuple(held[layer].shape[1:])}, "
                    f"but {infos[0].name}'s has {tuple(first[1:])}; amalgamation needs equal "
                    "spatial sizes"
                )
        widths[layer] = {info.name: int(f[layer].shape[1]) for info, f in zip(infos, features)}
        widths[layer]["student"] = student_width(list(widths[layer].values()), scale)
    return widths


def learn_layer_wise(
    student: VGG,
    x: Tensor,
    features: Sequence[dict[str, Tensor]],
    scores: Tensor,
    config: AmalgamationConfig,
    training: StudentConfig,
    context: RunContext = RunContext(),
) -> dict[str, object]:
    """Lines 1-7 of Algorithm 1, then the head: for every layer, amalgamate the teachers'
    features ``features[i][layer]`` on the (t, C, H, W) images ``x`` and train the student's
    step from the previous amalgamated features (the images for the first layer); the head
    learns the (t, E) targets ``scores`` from the last ones, with the batch size, learning rate
    and weight decay of ``training``. Returns each layer's losses."""
    seed, progress = context.seed, context.progress
    train = dict(batch_size=training.batch_size, lr=training.lr, seed=seed, progress=progress,
                 hardware=context.hardware)  # fmt: skip
    autoencoder = AutoencoderConfig(config.autoencoder_epochs, training.batch_size, 1e-3, seed)
    steps = layer_steps(student)
    losses: dict[str, object] = {}
    previous = x
    for step in steps[:-1]:
        layer = step.target
        amalgamated = amalgamate_features(
            [held[layer] for held in features],
            step.layer[0].out_channels
            if layer.startswith("stages")
            else step.layer[0].out_features,
            config.scheme,
            autoencoder,
            desc=f"auto-encoder {layer}",
            progress=progress,
            hardware=context.hardware,
        )
        _start_at_target_scale(step, amalgamated.features)
        history = fit(
            step,
            previous,
            amalgamated.features,
            epochs=config.layer_epochs,
            weight_decay=0.0,
            desc=f"layer {layer}",
            loss=half_squared_error,
            **train,
        )
        fit_error = history[-1] / max(mean_energy(amalgamated.features), 1e-12)
        losses[layer] = {"reconstruction": amalgamated.losses, "layer": fit_error}
        context.log(
            f"amalgamate: {layer}: reconstruction error "
            f"{', '.join(f'{v:.3f}' for v in amalgamated.losses)}, layer fit {fit_error:.3f} "
            "(relative to the features' energy)"
        )
        previous = amalgamated.features
    history = fit(
        steps[-1],
        previous,
        scores,
        epochs=config.layer_epochs,
        weight_decay=training.weight_decay,
        desc="layer scores",
        loss=score_loss(config.score_target, config.temperature),
        **train,
    )
    losses["scores"] = history[-1]
    return losses


def amalgamate(
    teachers: Sequence[Teacher],
    x: Tensor,
    config: AmalgamationConfig,
    training: StudentConfig,
    cache: FeatureCache,
    context: RunContext = RunContext(),
) -> AmalgamationResult:
    """One student for the union of the teachers' classes from (N, C, H, W) unlabeled images
    in [0, 1] (paper 004, Algorithm 1); joint learning and (``context.baselines``) the baselines
    train on the schedule of ``training``. With ``training.arch`` ``vgg_cnn`` the student is
    a ``vgg_cnn`` of the teachers' depth with widths of its own and folded adaptation modules
    (the teachers must be ``vgg_cnn``s of one depth); with any other architecture it is that
    network, learned at the feature points it shares with the teachers
    (:mod:`amalgam.fusion.amalgamation.traced`)."""
    infos = [t.info for t in teachers]
    layout = common_layout(infos) if training.arch == VGG_STUDENT else None
    shape = _one_input_shape(infos)
    x = fit_to_shape(x, shape)
    position = {info.name: k for k, info in enumerate(infos)}
    log, progress, map_teachers = context.log, context.progress, context.map_teachers
    entry_classes = entries([info.class_names for info in infos])

    def library_student() -> nn.Module:
        torch.manual_seed(context.seed)
        return build_library_student(training, shape, len(entry_classes), log)

    if layout is None:
        student = library_student()
        points = plan_points(infos, student, training.arch)
        widths, matched = point_widths(points)
        layers = {name: [row[name].name for row in points] for name in position}
        log(f"amalgamate: feature points {matched}")
    else:
        layers = {name: layout.layers for name in position}
        matched = {layer: dict.fromkeys(position, layer) for layer in layout.layers}
    log(f"amalgamate: {len(teachers)} teachers predict on {len(x)} unlabeled images")
    released = map_teachers(lambda t: predict_all(t, x, position[t.info.name], progress), teachers)
    logits = [
        as_logits(out, info.output_form, len(info.class_names))
        for out, info in zip(released, infos, strict=True)
    ]  # each (N, K_i)
    generator = torch.Generator().manual_seed(context.seed)
    index = torch.randperm(len(x), generator=generator)[: config.feature_samples].sort().values
    x_features = x[index]  # (t, C, H, W)
    log(f"amalgamate: features of {len(layers[infos[0].name])} layers on {len(index)} images")
    features = map_teachers(
        lambda t: cache.fetch(t, x_features, layers[t.info.name], progress=progress,
                              position=position[t.info.name]),
        teachers,
    )  # fmt: skip  # per teacher {layer: (t, C_i, ...)} float16
    form, temperature = config.score_target, config.temperature

    def targets_of(target: str) -> Tensor:
        """(N, E) targets of every unlabeled image (the routed weights are calibrated on
        all of them)."""
        return score_targets(logits, target, temperature, config.routing_sharpness)

    scores = targets_of(form)[index]
    if layout is None:
        new_student, deploy = library_student, _as_is
        by_party = dict(zip(position, features, strict=True))
        losses = learn_point_wise(
            student, points, x_features, by_party, scores, config, training, context
        )
    else:
        widths = _widths(layout, infos, features, config.width_scale)

        def new_student() -> nn.Module:
            torch.manual_seed(context.seed)
            student_widths = [widths[layer]["student"] for layer in layout.layers]
            return build_student(layout, student_widths, shape, len(entry_classes))

        deploy = fold_adaptation
        student = new_student()
        losses = learn_layer_wise(student, x_features, features, scores, config, training, context)
    log(f"amalgamate: channels per layer {widths}")
    layerwise = copy.deepcopy(student).eval()

    def distil(model: nn.Module, target: str, name: str) -> list[float]:
        """Joint learning (lines 8-12) or a baseline: every layer on all unlabeled images."""
        log(f"amalgamate: {name} on {len(x)} images ({TARGETS[target]})")
        return fit(model, x, targets_of(target), **training.schedule(), seed=context.seed,
                   desc=name, progress=progress, loss=score_loss(target, temperature),
                   checkpoint=context.checkpoint(name), hardware=context.hardware)  # fmt: skip

    losses["joint"] = distil(student, form, "joint")
    trained = {}
    for name, target in BASELINES.items() if context.baselines else ():
        trained[name] = new_student()
        losses[name] = distil(trained[name], target, name)
    return AmalgamationResult(
        deploy(layerwise),
        deploy(student),
        {name: deploy(model) for name, model in trained.items()},
        entry_classes,
        widths,
        matched,
        losses,
    )


def _as_is(model: nn.Module) -> nn.Module:
    return model.eval()
