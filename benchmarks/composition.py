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
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from amalgam.fusion.compose import (
    CompositionConfig,
    compose_predictions,
    gather,
    pseudo_label_stats,
)
from amalgam.fusion.data import Dataset, SourceUnavailable, load_source, shared_data_dir
from amalgam.fusion.models import create_model
from amalgam.fusion.train import fit
from amalgam.party.audit import AuditLog
from amalgam.party.handler import PartyHandler
from amalgam.party.local import LocalTeacher
from amalgam.protocol.schemas import Policy, PredictPolicy
from benchmarks.results_io import write_results

SEED = 0
RESULTS = Path(__file__).resolve().parent / "results"
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
    return [
        LocalTeacher(
            PartyHandler(
                f"party-{i}",
                model,
                list(classes),
                (1, 28, 28),
                Policy(predict=rule, sample_budget=None),
                AuditLog(folder / f"party-{i}.jsonl"),
            )
        )
        for i, (model, classes) in enumerate(zip(models, class_sets))
    ]


def run_variant(name: str, quick: bool, cache: dict) -> dict:
    class_sets, unlabeled_source, unlabeled_desc = VARIANTS[name]
    b = budget(quick)
    started = time.perf_counter()
    train, test = load_source("mnist:train"), load_source("mnist:test")
    shards, unlabeled_index = split_mnist(train, b)
    if class_sets not in cache:
        models = train_teacher_models(train, shards, class_sets, b["teacher_epochs"])
        cache[class_sets] = local_teachers(
            models, class_sets, PredictPolicy(output="probs"), Path(tempfile.mkdtemp())
        )
    teachers = cache[class_sets]
    if unlabeled_source == "mnist:train":
        unlabeled = train.subset(unlabeled_index)
    else:
        unlabeled = load_source(unlabeled_source)
        if quick:
            unlabeled = unlabeled.subset(np.arange(b["unlabeled"]))
    test = test.subset(np.arange(min(b["test"], len(test))))
    predictions = gather(teachers, unlabeled, test)
    config = CompositionConfig(
        rule="restricted-fit", epochs=b["student_epochs"], batch_size=128, seed=SEED
    )
    result = compose_predictions(predictions, config)
    paper = compose_predictions(
        predictions, replace(config, rule=PAPER_RULE, targets="hard", baselines=False)
    )
    results = dict(result.results)
    results[f"student:{PAPER_RULE}"] = paper.results["student"]
    return {
        "benchmark": "composition",
        "variant": name,
        "data": f"teachers: disjoint {b['shard']}-image shards of MNIST train (classes "
        f"{' / '.join(''.join(c) for c in class_sets)}); unlabeled: {len(unlabeled)} "
        f"images of {unlabeled_desc}; test: {len(test)} MNIST test images; shared/data",
        "seed": SEED,
        "budget": f"teachers: {b['teacher_epochs']} epochs each; each student: "
        f"{b['student_epochs']} epochs, batch 128",
        "metric": "accuracy",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": results,
        "extra": {
            "config": asdict(config),
            "student_rule": config.rule,
            "paper_student": f"{PAPER_RULE} votes, hard labels, tau {config.entropy_threshold}",
            "pseudo_labels": pseudo_label_stats(predictions, config.entropy_threshold),
            "retention": result.extra["retention"],
            "pseudo_label_accuracy": result.extra.get("pseudo_label_accuracy"),
            "quick": quick,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=list(VARIANTS), action="append")
    parser.add_argument("--quick", action="store_true", help="tiny budget, results to a temp dir")
    args = parser.parse_args(argv)
    try:
        load_source("mnist:test")
    except SourceUnavailable as error:
        print(f"skipped: {error}")
        return 0
    torch.manual_seed(SEED)
    folder = Path(tempfile.mkdtemp(prefix="composition-quick-")) if args.quick else RESULTS
    cache: dict = {}
    text = ""
    for name in args.variant or list(VARIANTS):
        print(f"variant {name} ...", flush=True)
        try:
            record = run_variant(name, args.quick, cache)
        except SourceUnavailable as error:
            print(f"{name} skipped: {error}", file=sys.stderr)
            continue
        text = write_results(
            record, folder, list(VARIANTS)
        )  # after every variant, so a long run keeps its results
    if not text:
        print(f"skipped: no variant's data under {shared_data_dir()}")
        return 0
    print(text)
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
