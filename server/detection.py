"""The composition job for detection parties (paper 000, section 3.2): every party's boxes on
the unlabeled canvases, the vote per object and Soft-NMS, one student detector for the union
of the categories, scored by COCO mAP."""

from __future__ import annotations

import torch

from amalgam.fusion.detection.aggregate import AggregationConfig, aggregate
from amalgam.fusion.detection.canvas import load_canvases
from amalgam.fusion.detection.coco import evaluate_map
from amalgam.fusion.detection.compose import (
    DetectionCompositionConfig,
    compose_detection,
    detection_map,
    gather_detections,
)
from amalgam.fusion.detection.figures import pseudo_label_grid
from amalgam.fusion.detection.models import DETECTORS
from amalgam.protocol.schemas import JobSpec
from amalgam.server.outcome import Outcome
from amalgam.server.report import markdown_table
from amalgam.server.roster import Roster

DEFAULT_STUDENT = "fcos"


def detection_config(spec: JobSpec, log) -> DetectionCompositionConfig:
    params, student = spec.method.params, spec.student
    arch = student.arch
    if arch not in DETECTORS:
        if "arch" in student.model_fields_set:
            raise ValueError(
                f"student.arch: {arch} is a classifier; detection parties need one of "
                f"{', '.join(DETECTORS)}"
            )
        log(f"detection parties: the student is {DEFAULT_STUDENT} (student.arch not set)")
        arch = DEFAULT_STUDENT
    aggregation = AggregationConfig(
        rule=params.detection_rule,
        iou_threshold=params.iou_threshold,
        score_threshold=params.score_threshold,
        sigma=params.soft_nms_sigma,
    )
    return DetectionCompositionConfig(aggregation, student_arch=arch, epochs=student.epochs,
                                      batch_size=student.batch_size, lr=student.lr,
                                      seed=spec.seed)  # fmt: skip


def run_detection_composition(spec, teachers, progress, log, checkpoints=None) -> Outcome:
    """The composition runner when the parties detect; ``data.unlabeled`` and ``data.test``
    are canvas sources (``canvases:<glyph source>``)."""
    size = teachers[0].info.input_shape[-1]
    unlabeled = load_canvases(spec.data.unlabeled, size=size, seed=spec.seed)
    test = load_canvases(spec.data.test, size=size, seed=spec.seed + 1)
    config = detection_config(spec, log)
    roster = Roster(spec.min_parties or len(spec.parties), log)
    log(f"collecting detections of {len(teachers)} parties on {len(unlabeled)} canvases")
    composed = compose_detection(teachers, unlabeled.images, config, map_teachers=roster.map,
                                 progress=progress)  # fmt: skip
    alive = [t for t in teachers if t.info.name not in roster.dropped]
    raw_test, union, knows = gather_detections(alive, test.images)  # one call per party
    scored = test.restrict(union)
    results = {}
    for teacher, found in zip(alive, raw_test):  # each on the categories it knows
        known = torch.tensor([union.index(c) for c in teacher.info.class_names])
        truth = [d.select(torch.isin(d.labels, known)) for d in scored.targets]
        results[f"teacher:{teacher.info.name}"] = evaluate_map(truth, found, union, size)["map"]
    pseudo_test, _ = aggregate(raw_test, knows, config.aggregation)
    pseudo_metrics = evaluate_map(scored.targets, pseudo_test, union, size)
    student = detection_map(composed.student, scored)
    results["student"] = student["map"]
    stats = composed.stats.as_dict()
    extra = {
        "metric": "mAP@[.5:.95]",
        "student_map50": student["map50"],
        "student_per_category": student["per_category"],
        "pseudo_labels_on_test": pseudo_metrics,
        "aggregation": stats,
        "dropped_parties": {name: d.reason for name, d in roster.dropped.items()},
    }
    kept = stats["per_rule"]
    summary = [
        f"Data: unlabeled {spec.data.unlabeled} ({len(unlabeled)} canvases), test "
        f"{spec.data.test} ({len(test)} canvases); detection parties, rows are COCO "
        f"mAP@[.5:.95] (student mAP@.5: {100 * student['map50']:.1f}).",
        f"Pseudo-labels: {stats['detections']} detections, {stats['confident']} above the "
        f"confidence {config.aggregation.score_threshold}, {stats['objects']} objects; kept by "
        f"unanimous {kept['unanimous']}, consensus {kept['consensus']}, affirmative "
        f"{kept['affirmative']} ({config.aggregation.rule} used); {stats['boxes']} boxes after "
        f"Soft-NMS. The same aggregation on the test canvases scores "
        f"{100 * pseudo_metrics['map']:.1f} mAP.",
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
            unlabeled.images, composed.raw, composed.pseudo_labels, composed.union, path
        )
    }
    return Outcome(composed.student, composed.union, results, extra, summary, figures, metric="mAP")
