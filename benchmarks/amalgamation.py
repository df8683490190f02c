"""Knowledge-amalgamation benchmark (paper 004, Tables 1-3, at CPU scale).

Each variant splits a training set in two halves with a seeded permutation: the parties'
private half, of which party k holds the labelled images of its part of the classes, and the
coordinator's half, used without labels. Teachers: ``vgg_cnn`` networks of one width (three
stages of two conv layers, one hidden layer), each trained on its own part, served by real
party agents on loopback gRPC that release logits and every layer's features (in float16).
Variants: ``cifar10-2`` (classes 0-4 / 5-9), ``cifar10-4`` (0-2 / 3-4 / 5-7 / 8-9),
``fashion-2`` (Fashion-MNIST 0-4 / 5-9), each into the paper's student (a ``vgg_cnn`` of the
teachers' depth), and ``cifar10-2-resnet10t`` / ``fashion-2-resnet10t``: the same teachers
into timm's ``resnet10t``, learned at the feature points it shares with them (CIFAR-10: the
teachers' 16x16 and 8x8 stage outputs; Fashion-MNIST, which the student upsamples to 32x32:
their 28x28, 14x14 and 7x7 outputs pooled to its 16x16, 8x8 and 4x4). Rows:
``teacher:<party>`` on the test images of its part; ``ensemble`` (the highest score over the
concatenated logits) and ``ensemble_routed`` (over the teachers' softmaxes weighted by their
calibrated part weights) on the whole test set;
``layerwise`` (after layer-wise learning only), ``joint`` (layer-wise, then joint), the
distillation baselines ``kd_concat_softmax`` / ``kd_per_teacher`` / ``kd_routed`` (the
student's architecture from scratch on one softmax over the concatenated logits / on the
per-teacher softmaxes concatenated and divided by N / weighted by the part weights), each on
the whole task and on each part (``:part<k>``,
choosing among part k's classes), and ``supervised``: the same architecture and budget on as
many labelled private images. ``extra.params`` and ``extra.bytes_moved`` (payload bytes the
coordinator received; ``extra.wire`` the gRPC messages both ways).

    python -m benchmarks.amalgamation [--variant cifar10-2] [--unlabeled 25000] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from amalgam.fusion.amalgamation import AmalgamationConfig, FeatureCache, amalgamate
from amalgam.fusion.amalgamation.evaluate import (
    amalgamation_rows,
    parameter_count,
    parameter_counts,
)
from amalgam.fusion.amalgamation.student import Layout, build_student
from amalgam.fusion.amalgamation.trainer import VGG_STUDENT
from amalgam.fusion.data import Dataset, load_source
from amalgam.fusion.labels import relabel
from amalgam.fusion.models import create_model
from amalgam.fusion.run import RunContext
from amalgam.fusion.train import StudentConfig, fit
from amalgam.protocol.schemas import LayersPolicy, Policy, PredictPolicy
from amalgam.server.fanout import fan_out
from amalgam.server.remote import RemoteTeacher
from amalgam.server.simulation.parties import local_party, serving
from benchmarks.harness import Benchmark, Results, record

SEED = 0
HALVES = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
VARIANTS = {  # name: (data set, the classes of each party by index, the student)
    "cifar10-2": ("cifar10", HALVES, VGG_STUDENT),
    "cifar10-4": ("cifar10", [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]], VGG_STUDENT),
    "fashion-2": ("fashion_mnist", HALVES, VGG_STUDENT),
    "cifar10-2-resnet10t": ("cifar10", HALVES, "timm:resnet10t"),
    "fashion-2-resnet10t": ("fashion_mnist", HALVES, "timm:resnet10t"),
}
TEACHER = dict(stages=((16, 16), (32, 32), (64, 64)), fc=(128,))


def budget(args: argparse.Namespace) -> dict:
    if args.quick:
        return dict(teacher_epochs=1, unlabeled=600, features=200, layer_epochs=2, epochs=1,
                    private=2000, test=500)  # fmt: skip
    return dict(teacher_epochs=10, unlabeled=args.unlabeled, features=2000, layer_epochs=20,
                epochs=10, private=None, test=None)  # fmt: skip


def halves(data: Dataset, seed: int = SEED) -> tuple[Dataset, Dataset]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[: len(data) // 2]), data.subset(order[len(data) // 2 :])


def _first(data: Dataset, size: int | None) -> Dataset:
    return data if size is None else data.subset(torch.arange(min(size, len(data))))


def train_teachers(private: Dataset, parts: list[list[str]], b: dict) -> list[torch.nn.Module]:
    models = []
    for k, classes in enumerate(parts):
        own = private.restrict(classes)
        torch.manual_seed(SEED + k)
        model = create_model("vgg_cnn", in_shape=tuple(own.x.shape[1:]),
                             num_classes=len(classes), **TEACHER)  # fmt: skip
        fit(model, own.x, own.y, epochs=b["teacher_epochs"], seed=SEED + k,
            desc=f"teacher {k + 1} ({len(own)} images)")  # fmt: skip
        models.append(model.eval())
    return models


def serve(models, parts, shape, folder: Path, stack: ExitStack) -> list[RemoteTeacher]:
    """One party agent per teacher on loopback port 0 (stopped with ``stack``); clients ask
    for float16 features."""
    policy = Policy(
        predict=PredictPolicy(output="logits"),
        activations=LayersPolicy(layers=["*"]),
        sample_budget=None,
    )
    teachers = []
    for k, (model, classes) in enumerate(zip(models, parts, strict=True), start=1):
        handler = local_party(f"party{k}", model, classes, shape, policy, folder)
        address = stack.enter_context(serving(handler))
        teachers.append(RemoteTeacher(f"party{k}", address, half={"activations"},
                                      deadline_s=300.0))  # fmt: skip
    return teachers


def supervised(
    private: Dataset, classes: list[str], entries: list[str], result, arch: str, b: dict
):
    """The student's architecture on as many labelled private images as the unlabeled ones
    (the ceiling); its outputs are the entries, trained on the first entry of each class."""
    data = _first(private, b["unlabeled"])
    x, y = relabel(data, classes)
    column = torch.tensor([entries.index(name) for name in classes])
    if arch == VGG_STUDENT:
        model = build_student(Layout(tuple(len(s) for s in result.joint.stages),
                                     len(result.joint.fc_widths)),
                              [w["student"] for w in result.widths.values()],
                              tuple(x.shape[1:]), len(entries))  # fmt: skip
    else:
        torch.manual_seed(SEED)
        model = create_model(arch, in_shape=tuple(x.shape[1:]), num_classes=len(entries))
    fit(model, x, column[y], epochs=b["epochs"], seed=SEED, desc="supervised")
    return model.eval()


def run_variant(name: str, args: argparse.Namespace, results: Results) -> None:
    b = budget(args)
    started = time.perf_counter()
    source, part_index, arch = VARIANTS[name]
    train, test = load_source(f"{source}:train"), load_source(f"{source}:test")
    test = _first(test.subset(torch.randperm(len(test), generator=torch.Generator()
                                             .manual_seed(SEED))), b["test"])  # fmt: skip
    private, coordinator = halves(train)
    private = _first(private, b["private"])
    parts = [[train.class_names[i] for i in idx] for idx in part_index]
    shape = tuple(train.x.shape[1:])
    models = train_teachers(private, parts, b)
    unlabeled = _first(coordinator, b["unlabeled"]).x  # labels never used
    config = AmalgamationConfig(feature_samples=b["features"], layer_epochs=b["layer_epochs"])
    training = StudentConfig(arch=arch, epochs=b["epochs"])
    with tempfile.TemporaryDirectory(prefix="amalgamation-") as tmp, ExitStack() as stack:
        teachers = serve(models, parts, shape, Path(tmp), stack)
        cache = FeatureCache(Path(tmp) / "cache", wire_bytes=2)
        context = RunContext(seed=SEED, map_teachers=fan_out, log=print)
        result = amalgamate(teachers, unlabeled, config, training, cache, context)
        classes = [c for part in parts for c in part]
        ceiling = supervised(private, classes, result.entries, result, arch, b)
        students = {"layerwise": result.layerwise, "joint": result.joint,
                    **result.baselines, "supervised": ceiling}  # fmt: skip
        rows = amalgamation_rows(teachers, students, result.entries, test, context,
                                 config.routing_sharpness)  # fmt: skip
        infos = [t.info for t in teachers]
        wire = {t.info.name: {"sent": t.stats.bytes_sent, "received": t.stats.bytes_received}
                for t in teachers}  # fmt: skip
    params = parameter_counts(infos, result.widths, result.joint, arch)
    exact = {f"teacher:party{k}": parameter_count(m) for k, m in enumerate(models, start=1)}
    assert all(params.get(key, n) == n for key, n in exact.items()), (params, exact)
    params = {**exact, "teachers": sum(exact.values()), **params}
    scores = sum(len(unlabeled) * len(p) * 2 for p in parts)  # float16 logits on the wire
    moved = sum(cache.bytes_moved.values())
    results.write(
        record(
            "amalgamation",
            name,
            data=f"{source} train: private half (labelled per part) {len(private)}, coordinator "
            f"half {len(unlabeled)} unlabeled (features of {b['features']}); test "
            f"{len(test)}, shared/data",
            seed=SEED,
            budget=f"student {arch}; teachers {b['teacher_epochs']} epochs; layer-wise "
            f"{b['layer_epochs']} epochs per layer; joint, baselines, supervised "
            f"{b['epochs']} epochs; joint target {config.score_target}",
            results=rows,
            started=started,
            extra={
                "params": params,
                "bytes_moved": {"features": moved, "scores": scores, "total": moved + scores},
                "wire": wire,
                "widths": result.widths,
                "layers": result.layers,
                "parts": {f"part{k}": p for k, p in enumerate(parts, start=1)},
                "losses": {k: v for k, v in result.losses.items() if not isinstance(v, list)},
            },
        )
    )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unlabeled", type=int, default=10_000,
        help="images of the coordinator's half the student learns from, without their labels "
        "(the whole half: 25000 on CIFAR-10, 30000 on Fashion-MNIST); also the size of the "
        "supervised ceiling's labelled set",
    )  # fmt: skip


BENCHMARK = Benchmark("amalgamation", __doc__, list(VARIANTS), run_variant, options=options)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
