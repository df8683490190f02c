"""Weight fusion of the parties' networks (paper 002): export each party's weights, compare
their neurons on probe images (the parties compute Gram matrices or activations at home where
their policy grants it), fuse by OT -- after cross-layer alignment and balancing for networks
of different depths (CLAFusion) --, re-estimate BatchNorm statistics, optionally fine-tune, and
evaluate the fused network against each party's network and their ensemble."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from amalgam.fusion.data import Dataset, fit_to_shape
from amalgam.fusion.evaluate import per_class_accuracy
from amalgam.fusion.labels import relabel
from amalgam.fusion.models import Classifier, create_model
from amalgam.fusion.ot.config import AlignmentConfig, OTFusionConfig
from amalgam.fusion.ot.fuse import (
    FusionResult,
    clafusion,
    cross_layer_spec,
    ot_fuse,
    recompute_batchnorm,
    vanilla_average,
)
from amalgam.fusion.ot.probe import Probe
from amalgam.fusion.ot.repair import repair
from amalgam.fusion.ot.spec import UnsupportedNetwork, fusion_spec
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import Normaliser, Teacher, TeacherInfo
from amalgam.fusion.train import StudentConfig, accuracy, fit, predict_logits

BATCHNORM_IMAGES = 10_000  # unlabeled images for re-estimating BatchNorm statistics


class WeightFusionParams(AlignmentConfig):
    """Weight fusion of parties: ``ot`` fuses equally deep networks layer by layer,
    ``clafusion`` first aligns and balances networks of different depths."""

    # the party whose network the others align to; None: the first party (ot), the
    # shallowest network (clafusion)
    base: str | None = None
    probe_size: int = Field(200, ge=2)  # unlabeled images for CKA / activations
    recompute_batchnorm: bool = True  # BN statistics re-estimated on the unlabeled images
    # REPAIR: each fused channel rescaled to the inputs' interpolated statistics on the probe
    # images (after BatchNorm re-estimation, which it supersedes where BatchNorm follows)
    repair: bool = False
    finetune_epochs: int = Field(0, ge=0)  # on labelled images, with the student's optimiser


class Incompatible(ValueError):
    """Parties whose networks cannot be fused by weights."""


def check_compatible(infos: Sequence[TeacherInfo]) -> None:
    """Same classes in the same order, same input shape and normalisation, or a one-line
    error naming the first party that differs."""
    first = infos[0]
    for k, info in enumerate(infos[1:], start=1):
        for name in ("class_names", "input_shape", "mean", "std"):
            if getattr(info, name) != getattr(first, name):
                raise Incompatible(
                    f"parties.{k} ({info.name}): {name} {list(getattr(info, name))} differs "
                    f"from {first.name}'s {list(getattr(first, name))}; weight fusion needs "
                    "identical outputs and inputs"
                )


@dataclass
class WeightFusion:
    """What fusing the parties produced.

    Attributes
    ----------
    fusion : the fused network and what the fusion found (alignments, CKA, transport costs).
    names : the parties, in the order of the fusion's model indices.
    class_names : the classes every network predicts.
    networks : every network evaluated by name: ``teacher:<party>``, ``vanilla_avg`` (equal
        shapes), ``fused_one_shot`` and ``finetuned:<party>`` (with fine-tuning), ``student``.
    rows : accuracy of every network, ``ensemble`` and ``best_teacher`` on the test images.
    per_class : accuracy within each class, per network (None for an absent class).
    supplied : what each party computed at home on the probe images.
    test_images : how many test images were scored.
    repaired : the layers whose channel statistics REPAIR set (with ``repair``).
    """

    fusion: FusionResult
    names: list[str]
    class_names: list[str]
    networks: dict[str, Classifier]
    rows: dict[str, float]
    per_class: dict[str, list[float | None]]
    supplied: list[str]
    test_images: int
    repaired: list[str] = field(default_factory=list)


def _supply_party_answers(
    probe: Probe,
    raw: Tensor,
    teachers: Sequence[Teacher],
    models: list,
    cross_layer: bool,
    config: WeightFusionParams,
) -> list[str]:
    """Let parties that grant Gram (CKA) or Activations (activation-based OT) compute them
    at home; returns which party supplied what."""
    supplied = []
    for teacher, model in zip(teachers, models, strict=True):
        structure = fusion_spec(model)
        info = teacher.info
        if cross_layer and "gram" in info.capabilities:
            units = [u.output for s in structure.sections for u in s.units]
            if set(units) <= set(info.layers):
                probe.supply(model, "grams", teacher.gram(raw, units))
                supplied.append(f"{info.name}: Gram of {len(units)} layers")
        if config.ground_metric == "activation" and "activations" in info.capabilities:
            layers = [layer for g in structure.groups for layer in g.probes]
            if set(layers) <= set(info.layers):
                probe.supply(model, "outputs", teacher.activations(raw, layers))
                supplied.append(f"{info.name}: activations of {len(layers)} layers")
    return supplied


def _probe(
    unlabeled: Dataset | None,
    normalise: Normaliser,
    teachers: Sequence[Teacher],
    models: list,
    cross_layer: bool,
    config: WeightFusionParams,
    seed: int,
) -> tuple[Probe | None, list[str]]:
    """``probe_size`` images of ``unlabeled`` (seeded), with what the parties computed on
    them; no probe without unlabeled data."""
    if unlabeled is None:
        return None, []
    order = np.random.default_rng(seed).permutation(len(unlabeled))
    chosen = torch.from_numpy(order[: config.probe_size])
    raw = fit_to_shape(unlabeled.x[chosen], normalise.shape)  # the parties normalise themselves
    probe = Probe(normalise(raw))
    return probe, _supply_party_answers(probe, raw, teachers, models, cross_layer, config)


def _rows(models: dict[str, Classifier], x: Tensor, y: Tensor, classes: int):
    """Accuracy and per-class accuracy of each network, plus their mean-probability ensemble
    over the parties' networks (rows ``teacher:*``)."""
    logits = {name: predict_logits(m, x) for name, m in models.items()}
    predictions = {name: z.argmax(dim=1) for name, z in logits.items()}
    parties = [z for name, z in logits.items() if name.startswith("teacher:")]
    predictions["ensemble"] = torch.stack([F.softmax(z, 1) for z in parties]).mean(0).argmax(1)
    rows = {name: accuracy(p, y) for name, p in predictions.items()}
    rows["best_teacher"] = max(v for k, v in rows.items() if k.startswith("teacher:"))
    per_class = {
        name: [None if math.isnan(v) else v for v in per_class_accuracy(p, y, classes)]
        for name, p in predictions.items()
    }
    return rows, per_class


def _fine_tuned(model: Classifier, x: Tensor, y: Tensor, epochs: int, student: StudentConfig,
                context: RunContext) -> Classifier:  # fmt: skip
    """A copy of ``model`` fine-tuned on ``x``, ``y`` (on the run's hardware)."""
    clone = create_model(model.arch["name"], **model.arch["kwargs"])
    clone.load_state_dict(model.state_dict())
    fit(clone, x, y, epochs=epochs, batch_size=student.batch_size, lr=student.lr,
        weight_decay=student.weight_decay, seed=context.seed, desc="fine-tune",
        progress=context.progress, hardware=context.hardware)  # fmt: skip
    return clone.eval()


def fuse_parties(
    teachers: Sequence[Teacher],
    config: WeightFusionParams,
    test: Dataset,
    *,
    cross_layer: bool = False,
    unlabeled: Dataset | None = None,
    finetune: Dataset | None = None,
    student: StudentConfig | None = None,
    context: RunContext = RunContext(),
) -> WeightFusion:
    """Fuse the networks the parties export into one (OT fusion, or CLAFusion with
    ``cross_layer``) and evaluate it on the labelled ``test`` images.

    Parameters
    ----------
    unlabeled : probe images (CKA, activations) and images for re-estimating BatchNorm.
    finetune : labelled images for ``config.finetune_epochs`` of fine-tuning with the
        ``student`` optimiser settings; the parties' networks are fine-tuned alike as
        baselines.
    context : with ``baselines``, vanilla averaging (equal shapes) and the fine-tuned inputs are
        evaluated too.
    """
    seed, log = context.seed, context.log
    if unlabeled is None and (config.recompute_batchnorm or config.repair):
        raise ValueError("unlabeled: recompute_batchnorm and repair need images (or set both "
                         "to false)")  # fmt: skip
    infos = [t.info for t in teachers]
    check_compatible(infos)
    names = [info.name for info in infos]
    normalise = Normaliser(infos[0])
    log(f"exporting the weights of {len(teachers)} parties")
    models = [w.build() for w in context.map_teachers(lambda t: t.weights(), teachers)]
    for k, (name, model) in enumerate(zip(names, models, strict=True)):
        try:
            cross_layer_spec(model) if cross_layer else fusion_spec(model)
        except UnsupportedNetwork as error:
            raise UnsupportedNetwork(f"parties.{k} ({name}): {error}") from None
    probe, supplied = _probe(unlabeled, normalise, teachers, models, cross_layer, config, seed)
    log(f"fusing {', '.join(names)}")
    alignment = OTFusionConfig(
        **config.model_dump(include=set(AlignmentConfig.model_fields)),
        base=names.index(config.base) if config.base else None,
    )
    if cross_layer:
        result = clafusion(models, probe, alignment)
    else:
        result = ot_fuse(models, alignment, probe)
    if config.recompute_batchnorm:
        recompute_batchnorm(result.model, normalise(unlabeled.x[:BATCHNORM_IMAGES]))
    repaired = []
    if config.repair:
        log(f"repairing the fused network's channel statistics on {len(probe.x)} probe images")
        repaired = repair(result.model, result.aligned_models(), probe.x, config.weights)
    classes = list(infos[0].class_names)
    networks = {f"teacher:{name}": m for name, m in zip(names, models, strict=True)}
    shapes = {tuple((n, p.shape) for n, p in m.state_dict().items()) for m in models}
    if context.baselines and len(shapes) == 1:
        networks["vanilla_avg"] = vanilla_average(models, config.weights)
    if config.finetune_epochs:
        x, y = relabel(finetune, classes)
        x = normalise(x)

        def tuned(model: Classifier) -> Classifier:
            return _fine_tuned(model, x, y, config.finetune_epochs, student or StudentConfig(),
                               context)  # fmt: skip

        networks["fused_one_shot"] = result.model
        if context.baselines:
            networks |= {f"finetuned:{n}": tuned(m) for n, m in zip(names, models, strict=True)}
        networks["student"] = tuned(result.model)
    else:
        networks["student"] = result.model
    x, y = relabel(test, classes)
    rows, per_class = _rows(networks, normalise(x), y, len(classes))
    return WeightFusion(
        result, names, classes, networks, rows, per_class, supplied, len(y), repaired
    )
