"""Data-free fusion benchmark (paper 003's protocol scaled to a CPU).

Two parties, each with a small BatchNorm CNN teacher trained on its share of the training set
(on CIFAR-10: a CIFAR ResNet-8, and the student too, paper 003's ResNet set-up at CPU scale):
``bl`` splits the images evenly; ``ibl3`` gives party k 75% of the images of its half of the
classes and 25% of the rest (r = 3). The student never sees an image: it learns from generated
samples through the parties' Predict and BatchNormFeedback. Rows: each teacher,
best teacher, ensemble (mean probabilities), gold (trained on all the data), and the student of
every method with the same budget of generator and student steps, and ``kd_real``: the same
student budget spent on the real training images (unlabeled), the ceiling that generated
samples approach. Each method takes about 10-13 minutes on 2 cores at the default budget
(CIFAR-10: 19-25); the teachers and gold model take 12-15 minutes more.

    python -m benchmarks.datafree [--variant mnist-ibl3] [--method dfmf] [--seeds 0 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from amalgam.fusion.data import Dataset, load_source
from amalgam.fusion.datafree import (
    VARIANTS,
    DataFreeConfig,
    DataFreeFusion,
    DataFreeResult,
    PartySideFusion,
)
from amalgam.fusion.evaluate import evaluate
from amalgam.fusion.labels import relabel
from amalgam.fusion.run import RunContext
from amalgam.fusion.train import StudentConfig, build_student, fit
from amalgam.party.local import LocalTeacher
from amalgam.protocol.schemas import (
    BnFeedbackPolicy,
    LayersPolicy,
    Policy,
    PredictPolicy,
    SynthesizePolicy,
)
from amalgam.server.figures import plot_curves
from amalgam.server.simulation.parties import local_party
from benchmarks.datafree_public import PUBLIC_METHODS, load_public_code, run_public_dfq
from benchmarks.harness import Benchmark, Results

SEED = 0
# DFMF with generators at the parties, DFMF with sample-wise teacher weights (w_k by each
# teacher's confidence), and a ceiling: the same student budget spent on the real training
# images (unlabeled) instead of generated ones
METHODS = [*VARIANTS, "dfmf_party_side", "dfmf_confidence", "kd_real"]
PARTY_SIDE_ROUNDS = 20


@dataclass(frozen=True)
class Split:
    """A benchmark variant: the data set, its imbalance ratio r (1 = balanced), the parties'
    teacher (also the gold model) and its training epochs, and the student's network."""

    source: str
    ratio: int
    teacher: StudentConfig = StudentConfig(kwargs={"width": 16})  # small_cnn
    epochs: int = 1
    student: StudentConfig = StudentConfig()  # small_cnn, width 32

    def teacher_name(self) -> str:
        """``small_cnn width 16``: the architecture and its keywords, for the budget line."""
        return " ".join([self.teacher.arch, *(f"{k} {v}" for k, v in self.teacher.kwargs.items())])


RESNET8 = StudentConfig(arch="resnet8_cifar")
SPLITS = {
    "mnist-bl": Split("mnist", 1),
    "mnist-ibl3": Split("mnist", 3),
    "fashion-bl": Split("fashion_mnist", 1),
    "fashion-ibl3": Split("fashion_mnist", 3),
    # paper 003's CIFAR-10 set-up (ResNet teachers and student) at CPU scale
    "cifar10-ibl3": Split("cifar10", 3, teacher=RESNET8, epochs=5, student=RESNET8),
}


def budget(args: argparse.Namespace, split: Split) -> dict:
    """The steps of a run; ``student``: the student's network."""
    if args.quick:
        return dict(
            teacher_epochs=3,
            train=4000,
            warmup=5,
            iterations=10,
            student_steps=2,
            test=1000,
            student=split.student,
        )
    return dict(
        teacher_epochs=split.epochs,
        train=None,
        warmup=args.warmup,
        iterations=args.iterations,
        student_steps=args.student_steps,
        test=None,
        student=split.student,
    )


def party_indices(train: Dataset, ratio: int, parties: int = 2) -> list[np.ndarray]:
    """Indices per party: even split (ratio 1), or party k takes ratio/(ratio+1) of the images
    of its 1/parties of the classes and an even share of the rest (paper Sec. 4, IBL)."""
    rng = np.random.default_rng(SEED)
    labels = train.y.numpy()
    shares: list[list[int]] = [[] for _ in range(parties)]
    classes = np.arange(len(train.class_names))
    frequent = np.array_split(classes, parties)
    for c in classes:
        index = rng.permutation(np.flatnonzero(labels == c))
        owner = next(k for k, f in enumerate(frequent) if c in f)
        fraction = ratio / (ratio + parties - 1)
        cut = int(round(fraction * len(index))) if ratio > 1 else len(index) // parties
        if ratio == 1:
            for k, part in enumerate(np.array_split(index, parties)):
                shares[k].extend(part)
            continue
        shares[owner].extend(index[:cut])
        others = [k for k in range(parties) if k != owner]
        for k, part in zip(others, np.array_split(index[cut:], len(others))):
            shares[k].extend(part)
    return [np.sort(np.array(s)) for s in shares]


def train_model(data: Dataset, teacher: StudentConfig, epochs: int, seed: int, desc: str):
    torch.manual_seed(seed)
    model = build_student(
        teacher, tuple(data.x.shape[1:]), len(data.class_names), log=lambda message: None
    )
    fit(model, data.x, data.y, epochs=epochs, batch_size=64, seed=seed, desc=desc)
    return model


def teachers_for(train: Dataset, split: Split, b: dict, folder: Path):
    """The parties' teachers behind local handlers, and their models."""
    policy = Policy(
        predict=PredictPolicy(output="logits"),
        bn_feedback=BnFeedbackPolicy(),
        synthesize=SynthesizePolicy(max_steps=10_000, max_samples=100_000),
        activations=LayersPolicy(layers=["*"]),  # feature maps, for VID
        sample_budget=None,
    )
    teachers, models = [], []
    for k, index in enumerate(party_indices(train, split.ratio)):
        data = train.subset(index)
        model = train_model(data, split.teacher, b["teacher_epochs"], SEED + k, f"teacher-{k}")
        shape = tuple(train.x.shape[1:])
        handler = local_party(f"party-{k}", model, train.class_names, shape, policy, folder)
        teachers.append(LocalTeacher(handler))
        models.append(model)
    return teachers, models


def config_for(method: str, b: dict) -> DataFreeConfig:
    """The budget's config of ``method``: a variant, ``_party_side`` or ``_confidence`` after."""
    variant = method.removesuffix("_party_side").removesuffix("_confidence")
    return DataFreeConfig(
        variant=variant,
        teacher_weighting="confidence" if method.endswith("_confidence") else "uniform",
        warmup=b["warmup"],
        iterations=b["iterations"],
        student_steps=b["student_steps"],
    )


def run_method(
    method: str,
    teachers: list,
    models: list,
    train: Dataset,
    b: dict,
    seed: int,
    public_code: SimpleNamespace | None = None,
):
    """One student of ``method`` (a data-free variant, its party-side mode, ``kd_real``, or
    the public code's DFQ, ``public_code`` as :func:`load_public_code` returns it)."""
    if method in PUBLIC_METHODS:
        shape = tuple(train.x.shape[1:])
        student = run_public_dfq(public_code, models, shape, PUBLIC_METHODS[method], b, seed)
        return DataFreeResult(student=student, generators=[])
    fusion_args = dict(student=b["student"], context=RunContext(seed=seed))
    if method == "kd_real":
        return kd_on_real_images(teachers, train, config_for("dfq_no_adv", b), fusion_args)
    config = config_for(method, b)
    if method.endswith("_party_side"):
        return PartySideFusion(teachers, config, rounds=PARTY_SIDE_ROUNDS, **fusion_args).run()
    return DataFreeFusion(teachers, config, **fusion_args).run()


def kd_on_real_images(
    teachers: list, train: Dataset, config: DataFreeConfig, fusion_args: dict
) -> DataFreeResult:
    """The data-free student's optimiser, targets and number of steps, on batches of real
    training images: what the student would reach if the generators drew the real data.
    ``fusion_args``: the student and run context, as :class:`DataFreeFusion` takes them."""
    fusion = DataFreeFusion(teachers, config, own_generators=False, **fusion_args)
    rng = torch.Generator().manual_seed(fusion_args["context"].seed)
    for _ in range(config.iterations * config.student_steps):
        x = train.x[torch.randint(0, len(train.x), (config.batch_size,), generator=rng)]
        fusion.distil(x)
    return fusion.result([], [0] * len(teachers))


def run_variant(name: str, args: argparse.Namespace, results: Results) -> None:
    """Every asked method on split ``name``; the record is written after every method (a long
    run keeps its results) and adds to an earlier record of the same budget."""
    seeds, out = args.seeds, results.folder
    methods = args.method or [*METHODS, *(PUBLIC_METHODS if args.public_code else ())]
    if any(m in PUBLIC_METHODS for m in methods) and args.public_code is None:
        print(f"{name}: public_* methods skipped: no --public-code checkout given")
        methods = [m for m in methods if m not in PUBLIC_METHODS]
    public_code = None
    if any(m in PUBLIC_METHODS for m in methods):
        public_code = load_public_code(args.public_code)
    split = SPLITS[name]
    b = budget(args, split)
    source, ratio = split.source, split.ratio
    started = time.perf_counter()
    train, test = load_source(f"{source}:train"), load_source(f"{source}:test")
    if b["train"]:  # random subsets: CIFAR-10 is stored sorted by class
        train = train.subset(np.random.default_rng(SEED).permutation(len(train))[: b["train"]])
    if b["test"]:
        test = test.subset(np.random.default_rng(SEED).permutation(len(test))[: b["test"]])
    teachers, models = teachers_for(train, split, b, Path(tempfile.mkdtemp()))
    gold = train_model(train, split.teacher, b["teacher_epochs"], SEED, "gold")
    x, y = relabel(test, list(train.class_names))
    reference, per_class = evaluate(teachers, {"gold": gold}, x, y)
    split_name = "balanced" if ratio == 1 else f"IBL r={ratio}"
    generator = DataFreeConfig()  # the generator's size: the defaults
    student_line = "" if split.student == StudentConfig() else f", student {split.student.arch}"
    record = {
        "benchmark": "datafree",
        "variant": name,
        "data": f"{source} train split between 2 parties ({split_name}, {len(train)} images); "
        f"test: {len(test)} {source} test images; shared/data",
        "seed": SEED,
        "budget": f"teachers and gold: {b['teacher_epochs']} epoch(s) of {split.teacher_name()}"
        f"{student_line}; each method: {b['warmup']} warm-up + {b['iterations']} "
        f"iterations x {b['student_steps']} student steps, batch 128, generator latent "
        f"{generator.latent_dim}, width {generator.generator_width}",
        "metric": "accuracy",
        "wall_seconds": 0.0,
        "results": reference,
        "extra": {"per_class": per_class, "methods": {}},
    }
    previous = out / f"datafree-{name}.json"
    if previous.exists():  # add to an earlier run of the same budget instead of replacing it
        earlier = json.loads(previous.read_text())
        if earlier["budget"] == record["budget"] and earlier["data"] == record["data"]:
            earlier["results"].update(record["results"])
            earlier["extra"]["per_class"].update(record["extra"]["per_class"])
            record = earlier
    earlier_seconds = record["wall_seconds"]  # of the runs this one adds to
    for method in methods:
        earlier_runs = record["extra"]["methods"].get(method, {}).get("runs", [])
        runs = [r for r in earlier_runs if r["seed"] not in seeds]  # kept from an earlier run
        for seed in seeds:
            method_started = time.perf_counter()
            result = run_method(method, teachers, models, train, b, seed, public_code)
            rows, classes = evaluate(teachers, {method: result.student}, x, y)
            history = result.history
            runs.append(
                {
                    "seed": seed,
                    "accuracy": rows[method],
                    "per_class": classes[method],
                    "seconds": round(time.perf_counter() - method_started, 1),
                    "queries": result.queries,
                    "warnings": result.warnings,
                    "final_losses": {k: float(np.mean(v[-20:])) for k, v in history.items() if v},
                }
            )
            if history:
                plot_curves(history, out / f"datafree-{name}-{method}-seed{seed}-curves.png")
        accuracies = [r["accuracy"] for r in runs]
        spread = float(np.std(accuracies, ddof=1)) if len(runs) > 1 else None
        record["results"][method] = float(np.mean(accuracies))
        record["extra"]["per_class"][method] = np.mean(
            [r["per_class"] for r in runs], axis=0
        ).tolist()
        runs.sort(key=lambda r: r["seed"])
        record["extra"]["methods"][method] = {
            "seeds": [r["seed"] for r in runs],
            "accuracy_std": spread,
            "runs": runs,
        }
        record["wall_seconds"] = round(earlier_seconds + time.perf_counter() - started, 1)
        results.write(record)
        std = "" if spread is None else f" ± {100 * spread:.2f}"
        seeds_line = ", ".join(str(r["seed"]) for r in runs)
        print(
            f"{name} {method}: {100 * record['results'][method]:.2f}%{std} (seeds {seeds_line})",
            flush=True,
        )


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=[*METHODS, *PUBLIC_METHODS], action="append")
    parser.add_argument(
        "--public-code", type=Path,
        help="a checkout of github.com/zju-vipa/DataFree: adds rows public_dfq and "
        "public_dfq_no_adv (its DFQ loop on these teachers)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--student-steps", type=int, default=10)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[SEED], help="method seeds; rows are means"
    )


BENCHMARK = Benchmark(
    "datafree", __doc__, list(SPLITS), run_variant, options=options, results={"decimals": 2}
)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
