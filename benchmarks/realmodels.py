"""Composition of networks organizations actually have, served as ``torch.export`` programs.

Variants
--------
cifar10
    Three teachers of different architectures -- torchvision ``resnet18``, torchvision
    ``mobilenet_v3_small`` and timm ``efficientnet_b0`` -- each trained here from scratch on a
    disjoint shard of CIFAR-10 train restricted to an overlapping class subset ({0-5}, {3-7},
    {6-9, 0, 1}), exported with ``torch.export`` (dynamic batch) and served by real
    ``amalgam party serve`` agents on loopback. The coordinator runs a composition job over
    gRPC into a student of yet another architecture (timm ``regnetx_002``), on CIFAR-10 train
    images no teacher saw, given as an ``.npz`` file; test: CIFAR-10 test images.

Rows: each teacher on the ten classes, the best teacher, the ensembles, vanilla distillation,
the student and the supervised bound (the student architecture on the true labels of the same
unlabeled images); ``job_seconds`` and ``job_images_per_s`` (unlabeled plus test images per
second of the whole job, from Describe to the report).

    python -m benchmarks.realmodels [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from amalgam.fusion.data import Dataset, load_source
from amalgam.fusion.models import create_model
from amalgam.fusion.train import fit
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.simulation.demo import PartyProcess
from benchmarks.harness import Benchmark, Results, record

SEED = 0
CLASS_SETS = ((0, 1, 2, 3, 4, 5), (3, 4, 5, 6, 7), (6, 7, 8, 9, 0, 1))
TEACHERS = ("resnet18", "mobilenet_v3_small", "timm:efficientnet_b0")
STUDENT = "timm:regnetx_002"
SHAPE = (3, 32, 32)


def budget(quick: bool) -> dict:
    if quick:
        return dict(shard=600, unlabeled=600, test=300, teacher_epochs=1, student_epochs=1,
                    entropy_threshold=1.0)  # fmt: skip
    # CIFAR-10 teachers trained for minutes are unsure: the default tau of 0.5 keeps few
    return dict(shard=8000, unlabeled=20_000, test=2000, teacher_epochs=10, student_epochs=10,
                entropy_threshold=0.8)  # fmt: skip


def train_teacher(arch: str, data: Dataset, epochs: int, seed: int, path: Path) -> None:
    """Train ``arch`` on ``data`` and save it as a ``torch.export`` program at ``path``."""
    torch.manual_seed(seed)
    model = create_model(arch, in_shape=SHAPE, num_classes=len(data.class_names))
    fit(model, data.x, data.y, epochs=epochs, batch_size=64, seed=seed, desc=arch)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (data.x[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def write_npz(data: Dataset, path: Path) -> None:
    """``data`` as the documented ``.npz``: uint8 images, labels, class names."""
    pixels = (data.x * 255).round().to(torch.uint8).numpy()
    np.savez(path, x=pixels, y=data.y.numpy(), class_names=np.array(data.class_names))


def party_config(folder: Path, k: int, names: list[str], classes: tuple[int, ...]) -> Path:
    path = folder / f"party-{k}.yaml"
    config = {
        "name": f"party-{k}",
        "address": "127.0.0.1:0",
        "model": {"program": f"teacher-{k}.pt2"},
        "class_names": [names[c] for c in classes],
        "input_shape": list(SHAPE),
        "policy": {"predict": {"output": "probs"}, "max_batch": 512, "sample_budget": None},
        "audit_log": f"party-{k}-audit.jsonl",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_variant(name: str, args: argparse.Namespace, results: Results) -> None:
    b = budget(args.quick)
    started = time.perf_counter()
    train, test = load_source("cifar10:train"), load_source("cifar10:test")
    order = np.random.default_rng(SEED).permutation(len(train))  # the file is sorted by class
    shards = [order[k * b["shard"] : (k + 1) * b["shard"]] for k in range(len(TEACHERS))]
    unlabeled = train.subset(order[len(TEACHERS) * b["shard"] :][: b["unlabeled"]])
    test = test.subset(np.random.default_rng(SEED).permutation(len(test))[: b["test"]])
    names = train.class_names
    with tempfile.TemporaryDirectory(prefix="amalgam-realmodels-") as tmp:
        folder = Path(tmp)
        teacher_started = time.perf_counter()
        for k, (arch, shard, classes) in enumerate(zip(TEACHERS, shards, CLASS_SETS)):
            own = train.subset(shard).restrict([names[c] for c in classes])
            train_teacher(arch, own, b["teacher_epochs"], SEED + k, folder / f"teacher-{k}.pt2")
        teacher_seconds = time.perf_counter() - teacher_started
        write_npz(unlabeled, folder / "unlabeled.npz")
        write_npz(test, folder / "test.npz")
        os.environ["OMP_NUM_THREADS"] = "1"  # three agents and the coordinator share 2 cores
        agents = [
            PartyProcess(party_config(folder, k, names, classes), insecure=True)
            for k, classes in enumerate(CLASS_SETS)
        ]
        del os.environ["OMP_NUM_THREADS"]
        try:
            job = {
                "name": "realmodels",
                "seed": SEED,
                "parties": [
                    {"name": f"party-{k}", "address": a.address} for k, a in enumerate(agents)
                ],  # fmt: skip
                "method": {
                    "name": "composition",
                    "params": {"entropy_threshold": b["entropy_threshold"]},
                },
                "student": {"arch": STUDENT, "epochs": b["student_epochs"], "batch_size": 128},
                "data": {
                    "unlabeled": str(folder / "unlabeled.npz"),
                    "test": str(folder / "test.npz"),
                },  # fmt: skip
                "output_dir": str(folder / "runs"),
                "deadline_s": 300,
            }
            (folder / "job.yaml").write_text(yaml.safe_dump(job))
            spec = load_job(folder / "job.yaml")
            job_started = time.perf_counter()
            run_dir = run_job(spec, connect(spec), progress=False)
            job_seconds = time.perf_counter() - job_started
        finally:
            for agent in agents:
                agent.stop()
        metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = dict(metrics["results"])
    rows["job_seconds"] = round(job_seconds, 1)
    rows["job_images_per_s"] = round((len(unlabeled) + len(test)) / job_seconds, 1)
    results.write(
        record(
            "realmodels",
            name,
            data=f"CIFAR-10 (shared/data): teachers on disjoint {b['shard']}-image shards of "
            "train restricted to classes {0-5} / {3-7} / {6-9,0,1}; unlabeled: "
            f"{len(unlabeled)} train images no teacher saw (.npz); test: {len(test)} test images",
            seed=SEED,
            budget=f"teachers: {b['teacher_epochs']} epochs, batch 64, no augmentation, "
            f"{teacher_seconds:.0f} s in all; student and baselines: {b['student_epochs']} "
            f"epochs, batch 128; entropy threshold {b['entropy_threshold']}",
            results=rows,
            started=started,
            extra={
                "teachers": dict(zip([f"party-{k}" for k in range(3)], TEACHERS)),
                "student": STUDENT,
                "served_as": "torch.export programs (.pt2) by amalgam party serve agents",
                "parties": metrics["parties"],
                "retention": metrics["extra"].get("retention"),
                "pseudo_label_accuracy": metrics["extra"].get("pseudo_label_accuracy"),
                "threads": torch.get_num_threads(),
                "quick": args.quick,
            },
        )
    )


BENCHMARK = Benchmark(
    "realmodels",
    __doc__,
    ["cifar10"],
    run_variant,
    results={"raw_rows": ("job_",)},
)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
