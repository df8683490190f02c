"""Output minimisation as a measured trade-off: for each form in which a party may release its
predictions, what the coordinator's fused student reaches, and what an attacker reaches who
spends the same queries on cloning one party's teacher.

Variant ``mnist`` is the composition benchmark's protocol (three small BN-CNN teachers on
disjoint 10k shards of MNIST train with the overlapping class sets {0-5}, {3-7}, {6-9, 0, 1};
20,000 unlabeled MNIST train images no teacher saw; test: the 10k MNIST test images; seed 0).
For each form every party releases ``logits``, ``probs``, ``top1`` / ``top3`` (probabilities,
zero outside the top k), ``round2`` (probabilities to 2 decimals) or ``label``:

- ``student:<form>``: the composition student (restricted-fit, soft targets, 5 epochs) on the
  union of the ten classes;
- ``knockoff:<form>``: a copy of party-0's teacher (same architecture, from scratch, 5
  epochs) trained by an attacker on party-0's answers to the same 20,000 queries, scored on
  the test images of party-0's classes (``extra.teacher_on_its_classes`` is the teacher's own
  score there; ``extra.knockoff_agreement`` how often the copy names the teacher's class).

    python -m benchmarks.privacy [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from amalgam.fusion.composition import CompositionConfig, compose_predictions, gather
from amalgam.fusion.data import load_source
from amalgam.fusion.labels import relabel, to_probs
from amalgam.fusion.models import create_model
from amalgam.fusion.run import RunContext
from amalgam.fusion.train import StudentConfig, accuracy, fit, predict_logits
from amalgam.protocol.schemas import PredictPolicy
from benchmarks.composition import (
    OVERLAPPING,
    SEED,
    budget,
    local_teachers,
    split_mnist,
    train_teacher_models,
)
from benchmarks.harness import Benchmark, Results, record

FORMS = {
    "logits": PredictPolicy(output="logits"),
    "probs": PredictPolicy(output="probs"),
    "top1": PredictPolicy(output="topk", top_k=1),
    "top3": PredictPolicy(output="topk", top_k=3),
    "round2": PredictPolicy(output="probs", round_decimals=2),
    "label": PredictPolicy(output="label"),
}
VICTIM = 0  # the party whose teacher the attacker copies


def knockoff(teacher, unlabeled, test_x, test_y, epochs: int) -> tuple[float, float]:
    """Train a copy of ``teacher`` on its released answers for ``unlabeled``; returns its
    accuracy on (test_x, test_y) and its agreement with the teacher there."""
    classes = list(teacher.info.class_names)
    answers = to_probs(teacher.predict(unlabeled.x), teacher.info.output_form, len(classes))
    torch.manual_seed(SEED + 100)
    clone = create_model("small_cnn", in_shape=(1, 28, 28), num_classes=len(classes))
    fit(clone, unlabeled.x, answers, epochs=epochs, batch_size=128, seed=SEED, desc="knockoff")
    predicted = predict_logits(clone, test_x).argmax(dim=1)
    released = to_probs(teacher.predict(test_x), teacher.info.output_form, len(classes))
    return accuracy(predicted, test_y), accuracy(predicted, released.argmax(dim=1))


def run(variant: str, args: argparse.Namespace, results: Results) -> None:
    quick = args.quick
    b = budget(quick)
    started = time.perf_counter()
    train, test = load_source("mnist:train"), load_source("mnist:test")
    shards, unlabeled_index = split_mnist(train, b)
    unlabeled = train.subset(unlabeled_index)
    test = test.subset(np.arange(min(b["test"], len(test))))
    models = train_teacher_models(train, shards, OVERLAPPING, b["teacher_epochs"])
    victim_x, victim_y = relabel(test, list(OVERLAPPING[VICTIM]))
    teacher_score = accuracy(predict_logits(models[VICTIM], victim_x).argmax(dim=1), victim_y)
    student = StudentConfig(epochs=b["student_epochs"], batch_size=128)
    rows, agreement = {}, {}
    for form, rule in FORMS.items():
        print(f"form {form} ...", flush=True)
        teachers = local_teachers(models, OVERLAPPING, rule, Path(tempfile.mkdtemp()))
        predictions = gather(teachers, unlabeled, test)
        context = RunContext(seed=SEED, baselines=False)
        composed = compose_predictions(predictions, CompositionConfig(), student, context)
        rows[f"student:{form}"] = composed.results["student"]
        rows[f"knockoff:{form}"], agreement[form] = knockoff(
            teachers[VICTIM], unlabeled, victim_x, victim_y, b["student_epochs"]
        )
    results.write(
        record(
            "privacy",
            variant,
            data=f"teachers: disjoint {b['shard']}-image shards of MNIST train (classes "
            f"{' / '.join(''.join(c) for c in OVERLAPPING)}); queries: {len(unlabeled)} "
            f"unlabeled MNIST train images no teacher saw; test: {len(test)} MNIST test images; "
            "shared/data",
            seed=SEED,
            budget=f"teachers: {b['teacher_epochs']} epochs each; student and knockoff: "
            f"{b['student_epochs']} epochs, batch 128; the same {len(unlabeled)} queries per "
            "party",
            results=rows,
            started=started,
            extra={
                "forms": {form: rule.model_dump() for form, rule in FORMS.items()},
                "knockoff_of": f"party-{VICTIM}, classes {''.join(OVERLAPPING[VICTIM])}",
                "teacher_on_its_classes": teacher_score,
                "knockoff_agreement": agreement,
                "quick": quick,
            },
        )
    )


BENCHMARK = Benchmark("privacy", __doc__, ["mnist"], run)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
