"""Composition benchmark on real digits and clothes from ``../shared/data``.

Variants
--------
mnist
    Three teachers (small BN-CNN) trained on disjoint 10k shards of MNIST train, each restricted
    to an overlapping class subset {0-5}, {3-7}, {6-9, 0, 1}; unlabeled set: MNIST train images
    no teacher used (labels unused except for the supervised bound); test: MNIST test.
mnist-usps
    The same teachers; unlabeled set: USPS train (another distribution); test: MNIST test.
mnist-same-classes
    Three teachers that all know the ten classes, on disjoint 10k shards (the paper's
    classification set-up).
mnist-weak, fashion-weak
    Weak teachers: the overlapping class subsets (by class index for Fashion-MNIST), 2,400-image
    shards, two epochs each; 4,000 unlabeled images of the same training set. A student is
    trained for every rule, and for the default rule and the paper's vote also with the
    entropy threshold alone (no keep-fraction floor).

Every variant reports each teacher, each ensemble rule (on the teachers' answers, and with
their class priors aligned), vanilla distillation (on the teachers' answers, and aligned), the
student (with the label-space-aware rule, and with the paper's consensus vote, each also
without alignment) and a supervised bound of the student architecture on the true labels of
the same unlabeled images.

    python -m benchmarks.composition [--variant mnist] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amalgam.fusion.composition import (
    RULES,
    CompositionConfig,
    align_priors,
    compose_predictions,
    gather,
    pseudo_label_stats,
)
from amalgam.fusion.composition.rules import Confidence
from amalgam.fusion.data import Dataset, load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.run import RunContext
from amalgam.fusion.train import StudentConfig, fit
from amalgam.party.local import LocalTeacher
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.simulation.parties import local_party
from benchmarks.harness import Benchmark, Results, record

SEED = 0
OVERLAPPING = ((0, 1, 2, 3, 4, 5), (3, 4, 5, 6, 7), (6, 7, 8, 9, 0, 1))  # class indices
ALL_CLASSES = (tuple(range(10)),) * 3


@dataclass(frozen=True)
class Variant:
    data: str  # the named set the teachers, the test and (by default) the unlabeled set come from
    class_sets: tuple[tuple[int, ...], ...]
    unlabeled: str | None = None  # another source than the teachers' training set
    weak: bool = False  # small shards, two epochs, a student per rule


VARIANTS = {
    "mnist": Variant("mnist", OVERLAPPING),
    "mnist-usps": Variant("mnist", OVERLAPPING, unlabeled="usps:train"),
    "mnist-same-classes": Variant("mnist", ALL_CLASSES),
    "mnist-weak": Variant("mnist", OVERLAPPING, weak=True),
    "fashion-weak": Variant("fashion_mnist", OVERLAPPING, weak=True),
}
PAPER_RULE = "consensus"


def budget(quick: bool, weak: bool) -> dict:
    if quick:
        return dict(shard=2000, unlabeled=2000, test=1000, teacher_epochs=3, student_epochs=3)
    if weak:
        return dict(shard=2400, unlabeled=4000, test=10_000, teacher_epochs=2, student_epochs=5)
    return dict(shard=10_000, unlabeled=20_000, test=10_000, teacher_epochs=2, student_epochs=5)


def split_train(train: Dataset, b: dict) -> tuple[list[np.ndarray], np.ndarray]:
    """Three disjoint teacher shards and an unlabeled pool from the rest, seed ``SEED``."""
    order = np.random.default_rng(SEED).permutation(len(train))
    shards = [order[i * b["shard"] : (i + 1) * b["shard"]] for i in range(3)]
    rest = order[3 * b["shard"] :]
    return shards, rest[: b["unlabeled"]]


def train_teacher_models(train: Dataset, shards, class_sets, epochs: int) -> list:
    """One small BN-CNN per shard, on that shard's images of its class set (names)."""
    models = []
    for i, (shard, classes) in enumerate(zip(shards, class_sets)):
        data = train.subset(shard).restrict(list(classes))
        torch.manual_seed(SEED + i)
        model = create_model("small_cnn", in_shape=(1, 28, 28), num_classes=len(classes))
        fit(model, data.x, data.y, epochs=epochs, batch_size=64, seed=SEED + i, desc=f"teacher-{i}")
        models.append(model.eval())
    return models


def local_teachers(models, class_sets, rule: PredictPolicy, folder: Path) -> list[LocalTeacher]:
    """The models behind party handlers that release predictions as ``rule`` says."""
    policy = Policy(predict=rule, sample_budget=None)
    return [
        LocalTeacher(local_party(f"party-{i}", model, classes, (1, 28, 28), policy, folder))
        for i, (model, classes) in enumerate(zip(models, class_sets))
    ]


TEACHERS: dict = {}  # (data, class sets, budget) -> their parties, trained once for every variant


def students(predictions, student: StudentConfig, weak: bool) -> dict[str, float]:
    """The paper's vote student; the default rule and the vote without class-prior alignment;
    vanilla KD on the aligned teachers (the mean of every image); and for weak teachers one
    student per rule and the threshold alone for the default rule and the vote."""
    default = CompositionConfig()
    runs = {
        f"student:{PAPER_RULE}": CompositionConfig(rule=PAPER_RULE, targets="hard"),
        f"student:{default.rule}:unaligned": CompositionConfig(align_priors=False),
        f"student:{PAPER_RULE}:unaligned": CompositionConfig(
            rule=PAPER_RULE, targets="hard", align_priors=False
        ),
        "vanilla_kd:aligned": CompositionConfig(
            rule="mean", entropy_threshold=1.0, keep_fraction=None
        ),
    }
    if weak:
        runs |= {f"student:{rule}": CompositionConfig(rule=rule) for rule in RULES
                 if rule != default.rule and rule != PAPER_RULE}  # fmt: skip
        for rule, targets in ((default.rule, "soft"), (PAPER_RULE, "hard")):
            alone = CompositionConfig(rule=rule, targets=targets, keep_fraction=None)
            runs[f"student:{rule}:threshold-alone"] = alone
    return {
        row: compose_predictions(
            predictions, config, student, RunContext(seed=SEED, baselines=False)
        ).results["student"]
        for row, config in runs.items()
    }


def run_variant(name: str, args: argparse.Namespace, results: Results) -> None:
    variant = VARIANTS[name]
    b = budget(args.quick, variant.weak)
    started = time.perf_counter()
    torch.manual_seed(SEED)
    train, test = load_source(f"{variant.data}:train"), load_source(f"{variant.data}:test")
    class_sets = tuple(tuple(train.class_names[c] for c in s) for s in variant.class_sets)
    shards, unlabeled_index = split_train(train, b)
    key = (variant.data, class_sets, b["shard"], b["teacher_epochs"])
    if key not in TEACHERS:
        models = train_teacher_models(train, shards, class_sets, b["teacher_epochs"])
        TEACHERS[key] = local_teachers(
            models, class_sets, PredictPolicy(output="probs"), Path(tempfile.mkdtemp())
        )
    if variant.unlabeled is None:
        unlabeled = train.subset(unlabeled_index)
        unlabeled_desc = f"{variant.data} train images no teacher saw"
    else:
        unlabeled = load_source(variant.unlabeled)
        unlabeled_desc = f"{variant.unlabeled}, 16x16 placed as 20x20 in 28x28"
        if args.quick:
            unlabeled = unlabeled.subset(np.arange(b["unlabeled"]))
    test = test.subset(np.arange(min(b["test"], len(test))))
    predictions = gather(TEACHERS[key], unlabeled, test)
    config = CompositionConfig()
    student = StudentConfig(epochs=b["student_epochs"], batch_size=128)
    result = compose_predictions(predictions, config, student, RunContext(seed=SEED))
    rows = dict(result.results) | students(predictions, student, variant.weak)
    confidence = Confidence(config.entropy_threshold, config.keep_fraction)
    aligned = align_priors(predictions)
    results.write(
        record(
            "composition",
            name,
            data=f"teachers: disjoint {b['shard']}-image shards of {variant.data} train "
            f"(class indices {' / '.join(''.join(map(str, c)) for c in variant.class_sets)}); "
            f"unlabeled: {len(unlabeled)} images of {unlabeled_desc}; test: {len(test)} "
            f"{variant.data} test images; shared/data",
            seed=SEED,
            budget=f"teachers: {b['teacher_epochs']} epochs each; each student: "
            f"{b['student_epochs']} epochs, batch 128",
            results=rows,
            started=started,
            extra={
                "config": {
                    **config.model_dump(),
                    **student.model_dump(),
                    "seed": SEED,
                    "baselines": True,
                },  # fmt: skip
                "student_rule": config.rule,
                "paper_student": f"{PAPER_RULE} votes, hard labels, tau "
                f"{config.entropy_threshold}, keep fraction {config.keep_fraction}",
                "pseudo_labels": pseudo_label_stats(aligned, confidence),
                "largest_class_share": result.extra["largest_class_share"],
                "retention": result.extra["retention"],
                "pseudo_label_accuracy": result.extra.get("pseudo_label_accuracy"),
                "quick": args.quick,
            },
        )
    )


BENCHMARK = Benchmark("composition", __doc__, list(VARIANTS), run_variant)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
