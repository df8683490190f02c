"""Model composition for object detection (paper 000, Scenarios 1 and 4) at CPU scale, on
canvases of real digits (:mod:`amalgam.fusion.detection.canvas`, 64 x 64, 1-5 digits each).

Scenario 1 (variants ``same-dist``, ``other-dist``): three detector parties with overlapping
skills, like Table 2's transportation / sports / home: ``low`` knows 0-4, ``mid`` 0, 1, 4, 5,
6, ``high`` 0, 1, 6-9 (0 and 1 in all three, 4 and 6 in two, the rest in one). Each is a
Faster R-CNN trained on 2,000 canvases of its own 12,000 MNIST training digits, annotated
with its categories only. Each party answers through its agent's policy (``PartyHandler``:
boxes with confidence >= 0.05, at most 20 per image). The student is an FCOS (a different
architecture) trained on 2,000 unlabeled canvases: of MNIST digits 36,000-47,999
(``same-dist``) or of USPS training digits (``other-dist``, the paper's unlabeled OID).
Test: 500 canvases of the first 5,000 MNIST test digits, all ten categories.

Scenario 4 (``ten-parties``): ten parties on disjoint 3,600-digit shards (600 canvases each),
each knowing a seeded random 3-6 of the categories (redrawn until all ten are covered).

Rows (mAP@[.5:.95], COCO, pycocotools): ``supervised`` (the student trained on the same
unlabeled canvases with all their true labels: the upper bound), ``student_0pct`` (composed,
consensus vote + Soft-NMS + one category per object, no labels), ``no_filtering`` (no
confidence filter before the vote), ``no_category_check`` (overlapping boxes of different
categories both kept), ``no_aggregation`` (every confident detection of every party is a
training box: no vote, no Soft-NMS, no category check), ``teacher:<party>`` (each party
on the categories it knows) and, for ``same-dist``, ``student_ft_<p>pct`` (the composed
student fine-tuned, 300 steps, on the
labels of the first p% of the unlabeled canvases together with the pseudo-labels of the rest,
the default ``finetune_mix``, the labelled canvases repeated to a quarter of the set, the
default ``finetune_label_share``, and the student kept halfway between its weights before and
after, the default ``finetune_interpolation``), ``student_ft_no_interpolation_<p>pct`` (the
weights after), ``student_ft_labels_only_<p>pct`` (the same steps on the labelled canvases
alone, kept halfway) against ``supervised_<p>pct`` (the student architecture trained on
those labelled canvases alone, as many steps as the student).
``extra``: mAP@.5 of every row, the student's AP per category, the pseudo-labels' own mAP on
the test canvases, and how many boxes each stage and rule kept.

    python -m benchmarks.detection [--variant same-dist] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from amalgam.fusion.data import Dataset, load_source
from amalgam.fusion.detection.aggregate import AggregationConfig, aggregate
from amalgam.fusion.detection.canvas import DetectionSet, make_canvases
from amalgam.fusion.detection.coco import evaluate_map
from amalgam.fusion.detection.compose import (
    DetectionCompositionConfig,
    compose_detection,
    detection_map,
    finetune,
    finetune_set,
    gather_detections,
)
from amalgam.fusion.detection.figures import pseudo_label_grid
from amalgam.fusion.detection.models import create_detector
from amalgam.fusion.detection.train import fit_detector
from amalgam.party.local import LocalTeacher
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.simulation.parties import local_party
from benchmarks.harness import Benchmark, Results, record

VARIANTS = ["same-dist", "other-dist", "ten-parties"]
SEED = 0
SIZE = 64
SKILLS = {
    "low": ["0", "1", "2", "3", "4"],
    "mid": ["0", "1", "4", "5", "6"],
    "high": ["0", "1", "6", "7", "8", "9"],
}
FULL = dict(party_canvases=2000, party_epochs=10, unlabeled=2000, test=500, student_epochs=12,
            ten_canvases=600, ten_epochs=30, finetune_steps=300)  # fmt: skip
QUICK = dict(party_canvases=200, party_epochs=2, unlabeled=200, test=100, student_epochs=2,
             ten_canvases=60, ten_epochs=2, finetune_steps=20)  # fmt: skip
LABEL_FRACTIONS = (1, 5, 10)
UPPER_BOUND: dict[str, dict] = {}
BATCH = 16


def _glyphs(source: str, start: int, stop: int) -> Dataset:
    data = load_source(source)
    return data.subset(np.arange(start, min(stop, len(data))))


def _party(name: str, classes: list[str], canvases: DetectionSet, epochs: int, seed: int,
           folder: Path) -> LocalTeacher:  # fmt: skip
    """A detector party: Faster R-CNN trained on ``canvases`` annotated with ``classes``,
    answering through its agent's policy."""
    torch.manual_seed(seed)
    model = create_detector("frcnn", len(classes), size=SIZE)
    fit_detector(model, canvases.restrict(classes), epochs=epochs, batch_size=BATCH, seed=seed,
                 desc=f"party {name}")  # fmt: skip
    policy = Policy(predict=PredictPolicy(score_threshold=0.05, max_detections=20),
                    max_batch=256)  # fmt: skip
    handler = local_party(name, model, classes, (1, SIZE, SIZE), policy, folder)
    return LocalTeacher(handler, caller="coordinator")


def scenario_one_parties(budget: dict, folder: Path) -> list[LocalTeacher]:
    parties = []
    for k, (name, classes) in enumerate(SKILLS.items()):
        glyphs = _glyphs("mnist:train", 12000 * k, 12000 * (k + 1))
        canvases = make_canvases(glyphs, budget["party_canvases"], size=SIZE, seed=100 + k)
        parties.append(_party(name, classes, canvases, budget["party_epochs"], k, folder))
    return parties


def ten_parties(budget: dict, folder: Path) -> list[LocalTeacher]:
    rng = np.random.default_rng(SEED)
    names = [str(d) for d in range(10)]
    while True:
        skills = [sorted(rng.choice(names, int(rng.integers(3, 7)), replace=False).tolist())
                  for _ in range(10)]  # fmt: skip
        if {c for s in skills for c in s} == set(names):
            break
    parties = []
    for k, classes in enumerate(skills):
        glyphs = _glyphs("mnist:train", 3600 * k, 3600 * (k + 1))
        canvases = make_canvases(glyphs, budget["ten_canvases"], size=SIZE, seed=200 + k)
        parties.append(_party(f"p{k}", classes, canvases, budget["ten_epochs"], k, folder))
    return parties


def _steps_as_epochs(steps: int, images: int) -> int:
    return max(1, math.ceil(steps * BATCH / images))


PARTIES: dict[str, list[LocalTeacher]] = {}  # per scenario, trained once for every variant


def run_variant(variant: str, args: argparse.Namespace, results: Results) -> None:
    """One variant; its parties (Scenario 1's three, or ten) are trained on first use."""
    budget = QUICK if args.quick else FULL
    torch.set_num_threads(2)  # both cores, whatever torch would pick
    started = time.perf_counter()
    scenario = "ten" if variant == "ten-parties" else "one"
    if scenario not in PARTIES:
        folder = Path(tempfile.mkdtemp(prefix="detection-audit-"))
        make = ten_parties if scenario == "ten" else scenario_one_parties
        PARTIES[scenario] = make(budget, folder)
    with_training = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    parties, out = PARTIES[scenario], results.folder
    same = make_canvases(_glyphs("mnist:train", 36000, 48000), budget["unlabeled"], size=SIZE,
                         seed=1)  # fmt: skip
    if variant == "other-dist":
        unlabeled = make_canvases(_glyphs("usps:train", 0, 10**6), len(same), size=SIZE, seed=1)
    else:
        unlabeled = same
    labelled_pool = same  # the same canvases with their true labels
    test = make_canvases(_glyphs("mnist:test", 0, 5000), budget["test"], size=SIZE, seed=2)
    names = test.class_names
    config = DetectionCompositionConfig(epochs=budget["student_epochs"], batch_size=BATCH,
                                        seed=SEED)  # fmt: skip
    rows, extra = {}, {"map50": {}, "aggregation": {}}

    def score(row: str, metrics: dict) -> None:
        rows[row] = metrics["map"]
        extra["map50"][row] = metrics["map50"]

    for party in parties:  # each on the categories it knows, in its own label order
        known = list(party.info.class_names)
        found = party.detect(test.images)
        score(f"teacher:{party.info.name}", evaluate_map(test.restrict(known).targets, found,
                                                          known, SIZE))  # fmt: skip
    raw_test, union, knows = gather_detections(parties, test.images)
    if set(union) != set(names):
        raise RuntimeError(f"the parties cover {union}, the test canvases {names}")
    student_test = test.restrict(union)  # labels in the students' (union) order
    pseudo_test, _ = aggregate(raw_test, knows, config.aggregation)
    extra["pseudo_labels_on_test"] = evaluate_map(student_test.targets, pseudo_test, union, SIZE)

    def supervised(labelled: DetectionSet, epochs: int, desc: str) -> dict:
        torch.manual_seed(SEED)
        model = create_detector(config.student_arch, len(names), size=SIZE)
        fit_detector(model, labelled, epochs=epochs, batch_size=BATCH, seed=SEED, desc=desc)
        return detection_map(model, test)

    if "supervised" not in UPPER_BOUND:  # the same canvases, labels and test in every variant
        UPPER_BOUND["supervised"] = supervised(labelled_pool, config.epochs, "supervised")
    score("supervised", UPPER_BOUND["supervised"])
    ablations = {
        "student_0pct": config.aggregation,
        "no_filtering": AggregationConfig(score_threshold=0.0),
        "no_category_check": AggregationConfig(category_iou=None),
        "no_aggregation": AggregationConfig(
            detection_rule="affirmative", soft_nms=False, category_iou=None
        ),
    }
    for row, aggregation in ablations.items():
        run_config = dataclasses.replace(config, aggregation=aggregation)
        composed = compose_detection(parties, unlabeled.images, run_config)
        metrics = detection_map(composed.student, student_test)
        score(row, metrics)
        extra["aggregation"][row] = composed.stats.as_dict()
        if row == "student_0pct":
            extra["student_per_category"] = metrics["per_category"]
            pseudo_label_grid(unlabeled.images, composed.raw, composed.pseudo_labels, union,
                              out / f"detection-{variant}-pseudo-labels.png",
                              [p.info.name for p in parties])  # fmt: skip
            label_free = composed  # fine-tuning starts from it and its pseudo-labels
            state = {k: v.clone() for k, v in composed.student.state_dict().items()}
    if variant == "same-dist":
        steps = budget["finetune_steps"]
        whole = dataclasses.replace(config, finetune_interpolation=1.0)  # the weights after
        student = label_free.student
        for pct in LABEL_FRACTIONS:
            labelled = labelled_pool.subset(range(max(1, len(labelled_pool) * pct // 100)))
            student_labelled = labelled.restrict(union)
            mixed = finetune_set(unlabeled.images, label_free.pseudo_labels, student_labelled,
                                 range(len(labelled)), config.finetune_label_share)  # fmt: skip
            for row, canvases, how in (("ft", mixed, config),
                                       ("ft_no_interpolation", mixed, whole),
                                       ("ft_labels_only", student_labelled, config)):  # fmt: skip
                student.load_state_dict(state)
                finetune(student, canvases, how, epochs=_steps_as_epochs(steps, len(canvases)),
                         desc=f"fine-tune {pct}% ({row})")  # fmt: skip
                score(f"student_{row}_{pct}pct", detection_map(student, student_test))
            same_steps = _steps_as_epochs(config.epochs * math.ceil(len(unlabeled) / BATCH),
                                          len(labelled))  # fmt: skip
            score(f"supervised_{pct}pct", supervised(labelled, same_steps, f"supervised {pct}%"))
    data = {
        "same-dist": "unlabeled: canvases of MNIST train digits 36,000-47,999",
        "other-dist": "unlabeled: canvases of USPS train digits",
        "ten-parties": "unlabeled: canvases of MNIST train digits 36,000-47,999",
    }[variant]
    extra["with_party_training_s"] = round(with_training + time.perf_counter() - started, 1)
    results.write(
        record(
            "detection",
            variant,
            data=f"{data}; test: {len(test)} canvases of MNIST test digits 0-4,999; "
            "64x64 canvases, 1-5 digits; shared/data",
            seed=SEED,
            budget=(
                f"parties Faster R-CNN {budget['party_epochs']} epochs on "
                f"{budget['party_canvases']} canvases"
                if variant != "ten-parties"
                else f"10 parties Faster R-CNN {budget['ten_epochs']} epochs on "
                f"{budget['ten_canvases']} canvases"
            )
            + f"; student FCOS {config.epochs} epochs on {len(unlabeled)} canvases, batch "
            f"{BATCH}; 2 cores",
            results=rows,
            started=started,
            extra=extra,
            metric="mAP@[.5:.95]",
        )
    )


BENCHMARK = Benchmark("detection", __doc__, VARIANTS, run_variant)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
