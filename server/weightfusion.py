"""The ``ot`` and ``clafusion`` job methods: fuse the parties' exported weights into one
network (paper 002), evaluate it against each party's network and their ensemble, and
optionally fine-tune it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from amalgam.fusion.compose import relabel
from amalgam.fusion.data import Dataset, fit_to_shape, load_source
from amalgam.fusion.evaluate import per_class_accuracy
from amalgam.fusion.models import Classifier, create_model
from amalgam.fusion.ot.fuse import (
    FusionResult,
    OTFusionConfig,
    clafusion,
    ot_fuse,
    recompute_batchnorm,
    vanilla_average,
)
from amalgam.fusion.ot.probe import Probe
from amalgam.fusion.ot.spec import UnsupportedNetwork, fusion_spec
from amalgam.fusion.teacher import Teacher, TeacherInfo
from amalgam.fusion.train import accuracy, fit, predict_logits
from amalgam.protocol.schemas import JobSpec
from amalgam.server.fanout import fan_out
from amalgam.server.outcome import Outcome
from amalgam.server.report import plot_heatmap, plot_transport_costs

BATCHNORM_IMAGES = 10_000  # unlabeled images for re-estimating BatchNorm statistics


class Incompatible(ValueError):
    """Parties whose networks cannot be fused by weights."""


def check_compatible(infos: Sequence[TeacherInfo]) -> None:
    """Same classes in the same order, same input shape and normalisation, or a one-line
    error naming the first party that differs."""
    first = infos[0]
    for k, info in enumerate(infos[1:], start=1):
        for field in ("class_names", "input_shape", "mean", "std"):
            if getattr(info, field) != getattr(first, field):
                raise Incompatible(
                    f"parties.{k} ({info.name}): {field} {list(getattr(info, field))} differs "
                    f"from {first.name}'s {list(getattr(first, field))}; weight fusion needs "
                    "identical outputs and inputs"
                )


class Normaliser:
    """Inputs in [0, 1] -> what the exported networks expect (the parties' normalisation)."""

    def __init__(self, info: TeacherInfo) -> None:
        self.shape = tuple(info.input_shape)
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (fit_to_shape(x, self.shape) - self.mean) / self.std


def _supply_party_answers(
    probe: Probe, raw: Tensor, teachers: Sequence[Teacher], models: list, spec: JobSpec
) -> list[str]:
    """Let parties that grant Gram (CKA) or Activations (activation-based OT) compute them
    at home; returns which party supplied what."""
    supplied = []
    for teacher, model in zip(teachers, models, strict=True):
        structure = fusion_spec(model)
        info = teacher.info
        if spec.method.name == "clafusion" and "gram" in info.capabilities:
            units = [u for s in structure.sections for u in s.units]
            if set(units) <= set(info.layers):
                probe.supply(model, "grams", teacher.gram(raw, units))
                supplied.append(f"{info.name}: Gram of {len(units)} layers")
        if spec.method.params.ground_metric == "activation" and "activations" in info.capabilities:
            layers = [g.probe for g in structure.groups]
            if set(layers) <= set(info.layers):
                probe.supply(model, "outputs", teacher.activations(raw, layers))
                supplied.append(f"{info.name}: activations of {len(layers)} layers")
    return supplied


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


def _fine_tuned(model: Classifier, x: Tensor, y: Tensor, spec: JobSpec, progress: bool):
    clone = create_model(model.arch["name"], **model.arch["kwargs"])
    clone.load_state_dict(model.state_dict())
    fit(
        clone,
        x,
        y,
        epochs=spec.method.params.finetune_epochs,
        batch_size=spec.student.batch_size,
        lr=spec.student.lr,
        weight_decay=spec.student.weight_decay,
        seed=spec.seed,
        desc="fine-tune",
        progress=progress,
    )
    return clone.eval()


def _summary(result: FusionResult, names: list[str], supplied: list[str]) -> list[str]:
    lines = [f"Base network: {names[result.base]}'s; fused architecture {result.model.arch}."]
    for section, maps in result.alignments.items():
        for k, mapping in maps.items():
            lines.append(
                f"Cross-layer map, {section}, {names[k]} and the base (the shallower "
                f"network's layers -> the deeper's): {mapping}."
            )
    if supplied:
        lines.append("Computed at the parties: " + "; ".join(supplied) + ".")
    return lines


def _probe(
    spec: JobSpec, unlabeled: Dataset | None, normalise: Normaliser, teachers, models
) -> tuple[Probe | None, list]:
    """``probe_size`` images of ``data.unlabeled`` (seeded), with what the parties computed
    on them; no probe without unlabeled data."""
    if unlabeled is None:
        return None, []
    order = np.random.default_rng(spec.seed).permutation(len(unlabeled))
    chosen = torch.from_numpy(order[: spec.method.params.probe_size])
    raw = fit_to_shape(unlabeled.x[chosen], normalise.shape)  # the parties normalise themselves
    probe = Probe(normalise(raw))
    return probe, _supply_party_answers(probe, raw, teachers, models, spec)


def _config(spec: JobSpec, names: list[str]) -> OTFusionConfig:
    params = spec.method.params
    return OTFusionConfig(
        ground_metric=params.ground_metric,
        plan=params.plan,
        reg=params.reg,
        weights=params.weights,
        base=names.index(params.base) if params.base else None,
        mode=params.mode,
        balance=params.balance,
        sign=params.sign,
    )


def _networks(spec: JobSpec, names, models, fused, classes, normalise, progress) -> dict:
    """Every network to evaluate: the parties', vanilla averaging (equal shapes), the fused
    one, and with fine-tuning the fine-tuned fused one (``student``) and inputs alike."""
    params = spec.method.params
    networks = {f"teacher:{name}": m for name, m in zip(names, models, strict=True)}
    shapes = {tuple((n, p.shape) for n, p in m.state_dict().items()) for m in models}
    if spec.baselines and len(shapes) == 1:
        networks["vanilla_avg"] = vanilla_average(models, params.weights)
    if not params.finetune_epochs:
        return networks | {"student": fused}
    x, y = relabel(load_source(spec.data.finetune), classes)
    x = normalise(x)
    networks["fused_one_shot"] = fused
    if spec.baselines:
        for name, model in zip(names, models, strict=True):
            networks[f"finetuned:{name}"] = _fine_tuned(model, x, y, spec, progress)
    return networks | {"student": _fine_tuned(fused, x, y, spec, progress)}


def _figures(result: FusionResult, names: list[str]) -> dict:
    def transport(path):
        plot_transport_costs(result.transport_costs, names, path)

    def heatmap(section: str, k: int):
        mapping = result.alignments[section][k]
        return lambda path: plot_heatmap(
            result.cka[section][k].numpy(),
            path,
            title=f"linear CKA, {names[k]} and the base (rows: the deeper); red: cross-layer map",
            marks=[(j, i) for i, j in enumerate(mapping)],
        )

    figures = {"transport-cost.png": transport}
    for section, matrices in result.cka.items():
        for k in matrices:
            figures[f"cka-{section}-{names[k]}.png"] = heatmap(section, k)
    return figures


def run_weight_fusion(spec: JobSpec, teachers, progress, log, checkpoints=None) -> Outcome:
    params = spec.method.params
    infos = [t.info for t in teachers]
    check_compatible(infos)
    names = [info.name for info in infos]
    normalise = Normaliser(infos[0])
    log(f"{spec.method.name}: exporting the weights of {len(teachers)} parties")
    models = [w.build() for w in fan_out(lambda t: t.weights(), teachers)]
    for k, (name, model) in enumerate(zip(names, models, strict=True)):
        try:
            fusion_spec(model)
        except UnsupportedNetwork as error:
            raise UnsupportedNetwork(f"parties.{k} ({name}): {error}") from None
    unlabeled = load_source(spec.data.unlabeled) if spec.data.unlabeled else None
    probe, supplied = _probe(spec, unlabeled, normalise, teachers, models)
    log(f"{spec.method.name}: fusing {', '.join(names)}")
    if spec.method.name == "clafusion":
        result = clafusion(models, probe, _config(spec, names))
    else:
        result = ot_fuse(models, _config(spec, names), probe)
    if params.recompute_batchnorm:
        recompute_batchnorm(result.model, normalise(unlabeled.x[:BATCHNORM_IMAGES]))
    classes = list(infos[0].class_names)
    networks = _networks(spec, names, models, result.model, classes, normalise, progress)
    x, y = relabel(load_source(spec.data.test), classes)
    rows, per_class = _rows(networks, normalise(x), y, len(classes))
    extra = {
        "per_class": per_class,
        "class_names": classes,
        "base": names[result.base],
        "alignments": {
            s: {names[k]: m for k, m in maps.items()} for s, maps in result.alignments.items()
        },
        "transport_costs": {names[k]: c for k, c in enumerate(result.transport_costs)},
        "fused_architecture": result.model.arch,
        "normalization": {"mean": list(infos[0].mean), "std": list(infos[0].std)},
    }
    summary = [f"Test: {spec.data.test} ({len(y)} images).", *_summary(result, names, supplied)]
    return Outcome(networks["student"], classes, rows, extra, summary, _figures(result, names))
