"""Composition benchmark on real digits from ``../shared/data``.

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

Every variant reports each teacher, each ensemble rule, vanilla distillation, the student
(with the label-space-aware rule, and with the paper's consensus vote) and a supervised bound
of the student architecture on the true labels of the same unlabeled images.

    python -m benchmarks.composition [--variant mnist] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from amalgam.fusion.composition import (
    CompositionConfig,
    compose_predictions,
    gather,
    pseudo_label_stats,
)
from amalgam.fusion.data import Dataset, load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.run import RunContext
from amalgam.fusion.train import StudentConfig, fit
from amalgam.party.local import LocalTeacher
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.simulation.parties import local_party
from benchmarks.harness import Benchmark, Results, record

SEED = 0
OVERLAPPING = (tuple("012345"), tuple("34567"), tuple("678901"))
ALL_CLASSES = (tuple("0123456789"),) * 3
VARIANTS = {
    # name: (teacher class sets, unlabeled source, description of the unlabeled data)
    "mnist": (OVERLAPPING, "mnist:train", "MNIST train images no teacher saw"),
    "mnist-usps": (OVERLAPPING, "usps:train", "USPS train, 16x16 placed as 20x20 in 28x28"),
    "mnist-same-classes": (ALL_CLASSES, "mnist:train", "MNIST train images no teacher saw"),
}
PAPER_RULE = "consensus"


def budget(quick: bool) -> dict:
    if quick:
        return dict(shard=2000, unlabeled=2000, test=1000, teacher_epochs=3, student_epochs=3)
    return dict(shard=10_000, unlabeled=20_000, test=10_000, teacher_epochs=2, student_epochs=5)


def split_mnist(train: Dataset, b: dict) -> tuple[list[np.ndarray], np.ndarray]:
    """Three disjoint teacher shards and an unlabeled pool from the rest, seed ``SEED``."""
    order = np.random.default_rng(SEED).permutation(len(train))
    shards = [order[i * b["shard"] : (i + 1) * b["shard"]] for i in range(3)]
    rest = order[3 * b["shard"] :]
    return shards, rest[: b["unlabeled"]]


def train_teacher_models(train: Dataset, shards, class_sets, epochs: int) -> list:
    """One small BN-CNN per shard, on that shard's images of its class set."""
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


TEACHERS: dict = {}  # class sets -> their parties, trained once for every variant


def run_variant(name: str, args: argparse.Namespace, results: Results) -> None:
    class_sets, unlabeled_source, unlabeled_desc = VARIANTS[name]
    b = budget(args.quick)
    started = time.perf_counter()
    torch.manual_seed(SEED)
    train, test = load_source("mnist:train"), load_source("mnist:test")
    shards, unlabeled_index = split_mnist(train, b)
    if class_sets not in TEACHERS:
        models = train_teacher_models(train, shards, class_sets, b["teacher_epochs"])
        TEACHERS[class_sets] = local_teachers(
            models, class_sets, PredictPolicy(output="probs"), Path(tempfile.mkdtemp())
        )
    teachers = TEACHERS[class_sets]
    if unlabeled_source == "mnist:train":
        unlabeled = train.subset(unlabeled_index)
    else:
        unlabeled = load_source(unlabeled_source)
        if args.quick:
            unlabeled = unlabeled.subset(np.arange(b["unlabeled"]))
    test = test.subset(np.arange(min(b["test"], len(test))))
    predictions = gather(teachers, unlabeled, test)
    config = CompositionConfig(rule="restricted-fit")
    student = StudentConfig(epochs=b["student_epochs"], batch_size=128)
    result = compose_predictions(predictions, config, student, RunContext(seed=SEED))
    paper_config = CompositionConfig(rule=PAPER_RULE, targets="hard")
    paper = compose_predictions(
        predictions, paper_config, student, RunContext(seed=SEED, baselines=False)
    )
    rows = dict(result.results)
    rows[f"student:{PAPER_RULE}"] = paper.results["student"]
    results.write(
        record(
            "composition",
            name,
            data=f"teachers: disjoint {b['shard']}-image shards of MNIST train (classes "
            f"{' / '.join(''.join(c) for c in class_sets)}); unlabeled: {len(unlabeled)} "
            f"images of {unlabeled_desc}; test: {len(test)} MNIST test images; shared/data",
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
                "paper_student": f"{PAPER_RULE} votes, hard labels, tau {config.entropy_threshold}",
                "pseudo_labels": pseudo_label_stats(predictions, config.entropy_threshold),
                "retention": result.extra["retention"],
                "pseudo_label_accuracy": result.extra.get("pseudo_label_accuracy"),
                "quick": args.quick,
            },
        )
    )


BENCHMARK = Benchmark("composition", __doc__, list(VARIANTS), run_variant)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
