"""``composition`` (paper 000): pseudo-labels from every party's predictions train one student
over the union of their classes; detection parties are composed box by box (section 3.2)."""

from __future__ import annotations

import dataclasses

import torch
from pydantic import Field

from amalgam.fusion.composition import CompositionConfig, compose, described_alignment
from amalgam.fusion.data import load_source
from amalgam.fusion.detection import (
    DETECTORS,
    AggregationConfig,
    DetectionCompositionConfig,
    compose_detection,
    load_canvases,
    pseudo_label_grid,
    score_composition,
)
from amalgam.fusion.run import RunContext
from amalgam.server.methods.base import Grants, Method, Need, Outcome
from amalgam.server.report import markdown_table
from amalgam.server.roster import Roster


class CompositionParams(AggregationConfig, CompositionConfig):
    """The composition of classifiers; with detection parties, the vote per object and
    Soft-NMS of Algorithm 2 (``detection_rule``, ``iou_threshold``, ``score_threshold``,
    ``soft_nms_sigma``, ...) and the fine-tuning on the true boxes of ``finetune_fraction``
    of the unlabeled canvases (``finetune_mix``, ``finetune_label_share``,
    ``finetune_interpolation``)."""

    # detection parties: fine-tune on the labelled canvases together with the pseudo-labelled
    # rest (else on the labelled ones alone), the labelled ones repeated to at least
    # finetune_label_share of the fine-tuning set (None: each once)
    finetune_mix: bool = True
    finetune_label_share: float | None = Field(0.25, ge=0, lt=1)
    # ... and keep (1 - a) x the weights before + a x those after, a = finetune_interpolation
    finetune_interpolation: float = Field(0.5, gt=0, le=1)


DETECTION_ONLY = ("finetune_mix", "finetune_label_share", "finetune_interpolation")


class Composition(Method):
    name = "composition"
    summary = "pseudo-labels from every party's predictions train one student (paper 000)"
    params = CompositionParams
    grants = (Grants((Need("predict", ("probs", "logits", "topk", "label")),)),)

    def check(self, spec) -> str | None:
        if spec.data.unlabeled is None:
            return "data.unlabeled: composition needs unlabeled data"
        return None

    def run(self, spec, teachers, context: RunContext) -> Outcome:
        tasks = {t.info.task for t in teachers}
        if len(tasks) > 1:
            detectors = [t.info.name for t in teachers if t.info.task == "detection"]
            raise ValueError(f"parties: {', '.join(detectors)} detect and the others classify; "
                             "a composition job takes one kind")  # fmt: skip
        if tasks == {"detection"}:
            return _compose_detectors(spec, teachers, context)
        return _compose_classifiers(spec, teachers, context)


def _compose_classifiers(spec, teachers, context: RunContext) -> Outcome:
    params = spec.method.params
    for name in DETECTION_ONLY:  # by value: a resumed job's stored spec sets every parameter
        if getattr(params, name) != CompositionParams.model_fields[name].default:
            raise ValueError(f"method.params.{name}: applies to detection parties only")
    unlabeled, test = load_source(spec.data.unlabeled), load_source(spec.data.test)
    roster = Roster(spec.min_parties or len(spec.parties), context.log)
    context = dataclasses.replace(context, map_teachers=roster.map)  # lost parties are dropped
    result = compose(teachers, unlabeled, test, spec.method.params, spec.student, context)
    extra = result.extra
    extra["dropped_parties"] = {name: d.reason for name, d in roster.dropped.items()}
    kept = f"Pseudo-labels kept: {100 * extra['retention']:.1f}%"
    if "pseudo_label_accuracy" in extra:
        kept += f", of which correct: {100 * extra['pseudo_label_accuracy']:.1f}%"
    summary = [
        f"Data: unlabeled {spec.data.unlabeled} ({extra['unlabeled']} images), test "
        f"{spec.data.test} ({extra['test']} images of the union classes).",
        kept + ".",
        *_alignment_summary(extra),
        *roster.summary(),
    ]
    return Outcome(result.student, result.class_names, result.results, extra, summary)


def _alignment_summary(extra: dict) -> list[str]:
    """One line on the class-prior alignment, when it ran."""
    if "largest_class_share" not in extra:
        return []
    line = described_alignment(extra["largest_class_share"])
    return [line[0].upper() + line[1:] + "."]


def _detection_config(spec, log) -> DetectionCompositionConfig:
    """The student detector: ``student.arch`` must name one; left unset, the default
    detector."""
    student, arch = spec.student, spec.student.arch
    if arch not in DETECTORS:
        if "arch" in student.model_fields_set:
            raise ValueError(
                f"student.arch: {arch} is a classifier; detection parties need one of "
                f"{', '.join(DETECTORS)}"
            )
        arch = DetectionCompositionConfig().student_arch
        log(f"detection parties: the student is {arch} (student.arch not set)")
    params = spec.method.params
    aggregation = AggregationConfig(
        **params.model_dump(include=set(AggregationConfig.model_fields))
    )
    return DetectionCompositionConfig(aggregation, student_arch=arch, epochs=student.epochs,
                                      batch_size=student.batch_size, lr=student.lr,
                                      finetune_epochs=params.finetune_epochs,
                                      finetune_mix=params.finetune_mix,
                                      finetune_label_share=params.finetune_label_share,
                                      finetune_interpolation=params.finetune_interpolation,
                                      seed=spec.seed)  # fmt: skip


def _labelled_canvases(spec, unlabeled, log) -> tuple[list[int] | None, str | None]:
    """The positions of the canvases whose true boxes fine-tune the student (a seeded
    ``finetune_fraction`` of the unlabeled ones), and a line saying how; None when off."""
    params = spec.method.params
    if params.finetune_fraction == 0:
        return None, None
    count = max(1, round(params.finetune_fraction * len(unlabeled)))
    order = torch.randperm(len(unlabeled), generator=torch.Generator().manual_seed(spec.seed))
    how = (
        f"together with the pseudo-labels of the other {len(unlabeled) - count} (labelled "
        f"share at least {params.finetune_label_share or 0:.0%})"
        if params.finetune_mix
        else "alone"
    )
    line = (f"Fine-tuning: the true boxes of {count} of the {len(unlabeled)} unlabeled "
            f"canvases, {how}, {params.finetune_epochs} epochs; the student kept is "
            f"{params.finetune_interpolation:g} of the way from its weights before to "
            "those after.")  # fmt: skip
    log(line)
    return order[:count].tolist(), line


def _compose_detectors(spec, teachers, context: RunContext) -> Outcome:
    """Composition of detection parties; ``data.unlabeled`` and ``data.test`` are canvas
    sources (``canvases:<glyph source>``)."""
    size = teachers[0].info.input_shape[-1]
    unlabeled = load_canvases(spec.data.unlabeled, size=size, seed=spec.seed)
    test = load_canvases(spec.data.test, size=size, seed=spec.seed + 1)
    config = _detection_config(spec, context.log)
    roster = Roster(spec.min_parties or len(spec.parties), context.log)
    context.log(f"collecting detections of {len(teachers)} parties on {len(unlabeled)} canvases")
    labelled_index, finetune_line = _labelled_canvases(spec, unlabeled, context.log)
    labelled = None if labelled_index is None else unlabeled.subset(labelled_index)
    composed = compose_detection(teachers, unlabeled.images, config, labelled=labelled,
                                 map_teachers=roster.map, progress=context.progress,
                                 hardware=context.hardware,
                                 labelled_index=labelled_index)  # fmt: skip
    alive = [t for t in teachers if t.info.name not in roster.dropped]
    scores = score_composition(alive, composed.student, test, config.aggregation)
    student, pseudo = scores.student, scores.pseudo_labels
    stats = composed.stats.as_dict()
    extra = {
        "metric": "mAP@[.5:.95]",
        "student_map50": student["map50"],
        "student_per_category": student["per_category"],
        "pseudo_labels_on_test": pseudo,
        "aggregation": stats,
        "dropped_parties": {name: d.reason for name, d in roster.dropped.items()},
    }
    if labelled_index is not None:
        extra["finetune_samples"] = len(labelled_index)
    kept, aggregation = stats["per_rule"], config.aggregation
    summary = [
        f"Data: unlabeled {spec.data.unlabeled} ({len(unlabeled)} canvases), test "
        f"{spec.data.test} ({len(test)} canvases); detection parties, rows are COCO "
        f"mAP@[.5:.95] (student mAP@.5: {100 * student['map50']:.1f}).",
        f"Pseudo-labels: {stats['detections']} detections, {stats['confident']} above the "
        f"confidence {aggregation.score_threshold}, {stats['objects']} objects; kept by "
        f"unanimous {kept['unanimous']}, consensus {kept['consensus']}, affirmative "
        f"{kept['affirmative']} ({aggregation.detection_rule} used); {stats['boxes']} boxes "
        f"after Soft-NMS and one category per object ({stats['conflicts']} dropped for a "
        f"higher-scoring box of another category). The same aggregation on the test canvases "
        f"scores {100 * pseudo['map']:.1f} mAP.",
        *([finetune_line] if finetune_line else []),
        "",
        "AP per category, %:",
        "",
        markdown_table(
            list(student["per_category"]),
            [[f"{100 * v:.1f}" for v in student["per_category"].values()]],
        ),  # fmt: skip
        *roster.summary(),
    ]
    figures = {
        "pseudo-labels.png": lambda path: pseudo_label_grid(
            unlabeled.images,
            composed.raw,
            composed.pseudo_labels,
            composed.union,
            path,
            [t.info.name for t in alive],
        )  # fmt: skip
    }
    return Outcome(
        composed.student, composed.union, scores.rows, extra, summary, figures, metric="mAP"
    )


METHOD = Composition()
