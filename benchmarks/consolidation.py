"""Representation-consolidation benchmark (paper 001's protocol at CPU scale).

No downstream class is ever seen in training. The generalist (a BatchNorm CNN) learns a broad
mixture: CIFAR-10 classes 0-4 in grayscale at 28x28 and the Fashion-MNIST t-split (classes
0-4). Variant ``n1``: one task-specific teacher, fine-tuned from the generalist on the MNIST
t-split (digits 0-4). Variant ``n5``: five teachers of a smaller width, trained from scratch,
each on a different pair of t-split digits ({0,1}, {1,2}, ..., {4,0}: with five t-split
classes, single-class teachers would have nothing to distil). Proxy data: the mixture's
training images without labels (no digits). Representations: ``generalist``, ``teacher`` (n5:
the best of the five on each task), ``kd`` (lambda_0 = 0: traditional multi-teacher
distillation), ``consolidated`` (lambda_0 = 1, lambda_i = 1/N, T = 2, BatchNorm statistics
frozen, backbone lr 1e-3 and heads 1e-2 as in the paper's Appendix A) and
``consolidated_exp4`` (lambda_0 = 1/2, lambda_i = 3/(2N): the paper's Exp. 4). Downstream
tasks, 5-shot linear probe (logistic regression, cross-validated L2) on frozen penultimate
features averaged over 20 draws, scored on the task's whole test set: related ``mnist_d``
(digits 5-9), ``usps`` (5-9), ``kannada`` (all ten Kannada digits); unrelated ``cifar_d``
(CIFAR-10 5-9, grayscale), ``fashion_d`` (Fashion-MNIST 5-9), ``notmnist`` (letters A-J).
Rows ``<representation>:<task>``, plus ``<network>:upstream_t`` (the teachers' task through
the student's heads; n5: mean over the five) and ``<network>:upstream_g`` (the mixture
through head 0).

    python -m benchmarks.consolidation [--variant n1] [--epochs 2] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from amalgam.fusion.consolidation.student import MultiHeadStudent
from amalgam.fusion.consolidation.trainer import ConsolidationConfig, consolidate, multitask_oracle
from amalgam.fusion.data import DIGIT_NAMES, Dataset, fit_to_shape, load_source
from amalgam.fusion.models import Classifier, create_model
from amalgam.fusion.train import accuracy, fit, predict_logits
from amalgam.fusion.transfer import extract_features, transfer_score
from benchmarks.harness import Benchmark, Results, record

SEED = 0
VARIANTS = ["n1", "n5"]
SHAPE = (1, 28, 28)
T_SPLIT, D_SPLIT = DIGIT_NAMES[:5], DIGIT_NAMES[5:]
PAIRS = [[T_SPLIT[k], T_SPLIT[(k + 1) % 5]] for k in range(5)]  # n5: one pair per teacher
TASKS = {  # name: (source set, classes or None for all, related to the teachers' task)
    "mnist_d": ("mnist", D_SPLIT, True),
    "usps": ("usps", D_SPLIT, True),
    "kannada": ("kannada", None, True),
    "cifar_d": ("cifar10", "last5", False),
    "fashion_d": ("fashion_mnist", "last5", False),
    "notmnist": ("notmnist", None, False),
}
STUDENTS = {  # row: (lambda_0, lambda_i as a multiple of 1/N)
    "kd": (0.0, 1.0),
    "consolidated": (1.0, 1.0),
    "consolidated_exp4": (0.5, 1.5),
    "mtl_oracle": (1.0, 1.0),  # labelled mixture + the teachers' labelled data, no proxy
}


@dataclasses.dataclass
class Teacher:
    classes: list[str]  # the t-split digits it knows
    model: Classifier
    data: Dataset  # its private training data: only the multi-task oracle sees it


def _gray(data: Dataset, classes: list[str]) -> Dataset:
    data = data.restrict(classes)
    return dataclasses.replace(data, x=fit_to_shape(data.x, SHAPE))


def _concat(parts: list[Dataset]) -> Dataset:
    offsets = np.cumsum([0] + [len(p.class_names) for p in parts[:-1]])
    return Dataset(
        torch.cat([p.x for p in parts]),
        torch.cat([p.y + int(o) for p, o in zip(parts, offsets, strict=True)]),
        [name for p in parts for name in p.class_names],
    )


def mixture(part: str) -> Dataset:
    """The generalist's task: CIFAR-10 classes 0-4 (grayscale, 28x28) + Fashion-MNIST 0-4."""
    cifar, fashion = load_source(f"cifar10:{part}"), load_source(f"fashion_mnist:{part}")
    return _concat([_gray(cifar, cifar.class_names[:5]), _gray(fashion, fashion.class_names[:5])])


def task_data(name: str, part: str) -> Dataset:
    source, classes, _ = TASKS[name]
    data = load_source(f"{source}:{part}")
    if classes == "last5":
        classes = data.class_names[5:]
    return _gray(data, classes or data.class_names)


def _subsample(data: Dataset, size: int, seed: int = SEED) -> Dataset:
    if not size or len(data) <= size:
        return data
    return data.subset(np.sort(np.random.default_rng(seed).permutation(len(data))[:size]))


def train_generalist(train: Dataset, b: dict) -> Classifier:
    torch.manual_seed(SEED)
    model = create_model("small_cnn", in_shape=SHAPE, num_classes=10, width=b["width"])
    fit(model, train.x, train.y, epochs=b["generalist_epochs"], seed=SEED, desc="generalist")
    return model.eval()


def train_teachers(variant: str, generalist: Classifier, b: dict) -> list[Teacher]:
    """n1 fine-tunes the generalist on the t-split; n5 trains five narrower networks from
    scratch, one per pair of t-split digits."""
    mnist = load_source("mnist:train")
    teachers = []
    for k, classes in enumerate([T_SPLIT] if variant == "n1" else PAIRS):
        data = _subsample(mnist.restrict(classes), b["train"])
        if variant == "n1":
            teacher = create_model("small_cnn", in_shape=SHAPE, num_classes=5, width=b["width"])
            body = {k: v for k, v in generalist.state_dict().items() if not k.startswith("head")}
            teacher.load_state_dict(body, strict=False)
            lr = 1e-3
        else:
            torch.manual_seed(SEED + 1 + k)
            teacher = create_model(
                "small_cnn", in_shape=SHAPE, num_classes=2, width=b["width"] // 2
            )
            lr = 2e-3
        fit(teacher, data.x, data.y, epochs=b["teacher_epochs"], lr=lr, seed=SEED + k,
            desc=f"teacher {k}")  # fmt: skip
        teachers.append(Teacher(classes, teacher.eval(), data))
    return teachers


def proxy_images(mix_train: Dataset, b: dict) -> torch.Tensor:
    """The mixture's training images without labels, plus, with ``proxy_usps``, USPS digits
    0-4: a public digit set of the teachers' classes (no downstream class; the ``usps`` task
    uses USPS 5-9)."""
    if not b["proxy_usps"]:
        return mix_train.x
    usps = _subsample(_gray(load_source("usps:train"), T_SPLIT), b["train"])
    return torch.cat([mix_train.x, usps.x])


def train_students(generalist, teachers, mix_train: Dataset, b: dict) -> tuple[dict, dict, dict]:
    """Every row of ``b["students"]``, in the same code path (lambda_0 = 0 for ``kd``); the
    oracle learns from labels with the same optimiser and epochs."""
    proxy = proxy_images(mix_train, b)  # unlabeled: no label is ever read
    teacher_logits = [predict_logits(t.model, proxy) for t in teachers]
    students, losses, seconds = {}, {}, {}
    for row in b["students"]:
        lambda_0, share = STUDENTS[row]
        n = len(teachers)
        config = ConsolidationConfig(
            generalist_weight=lambda_0,
            teacher_weights=[share / n] * n,
            epochs=b["epochs"],
            backbone_lr=b["backbone_lr"],
        )
        tic = time.perf_counter()
        if row == "mtl_oracle":
            tasks = [(mix_train.x, mix_train.y), *((t.data.x, t.data.y) for t in teachers)]
            result = multitask_oracle(generalist, tasks, config, seed=SEED)
        else:
            result = consolidate(generalist, proxy, teacher_logits, config, seed=SEED)
        seconds[row] = round(time.perf_counter() - tic, 1)
        students[row], losses[row] = result.student, result.losses
    return students, losses, seconds


def _heads_accuracy(network: Callable, data: Dataset) -> float:
    with torch.no_grad():
        logits = torch.cat([network(x) for x in data.x.split(512)])
    return accuracy(logits.argmax(dim=1), data.y)


def upstream_rows(name: str, student: MultiHeadStudent, teachers, mix_test: Dataset) -> dict:
    mnist = load_source("mnist:test")
    student.eval()
    per_teacher = [
        _heads_accuracy(lambda x, k=k: student(x)[k], mnist.restrict(t.classes))
        for k, t in enumerate(teachers, start=1)
    ]
    return {
        f"{name}:upstream_t": float(np.mean(per_teacher)),
        f"{name}:upstream_g": _heads_accuracy(lambda x: student(x)[0], mix_test),
    }


def run_variant(variant: str, args: argparse.Namespace, results: Results) -> None:
    b, tag = budget(args), args.tag
    started = time.perf_counter()
    mix_train, mix_test = (_subsample(mixture(p), b["train"]) for p in ("train", "test"))
    generalist = train_generalist(mix_train, b)
    teachers = train_teachers(variant, generalist, b)
    students, losses, seconds = train_students(generalist, teachers, mix_train, b)

    rows: dict[str, float] = {}
    for row, student in students.items():
        rows |= upstream_rows(row, student, teachers, mix_test)
    rows["teacher:upstream_t"] = float(
        np.mean([_heads_accuracy(t.model, load_source("mnist:test").restrict(t.classes))
                 for t in teachers])
    )  # fmt: skip
    rows["generalist:upstream_g"] = _heads_accuracy(generalist, mix_test)
    networks = {"generalist": generalist} | {f"teacher{k}": t.model for k, t in enumerate(teachers)}
    networks |= {row: s.model for row, s in students.items()}
    per_teacher: dict[str, dict[str, float]] = {}
    spread: dict[str, float] = {}
    for task in TASKS:
        train = _subsample(task_data(task, "train"), b["probe_pool"])
        test = _subsample(task_data(task, "test"), b["test"])
        for name, model in networks.items():
            score = transfer_score(
                lambda x, m=model: extract_features(m, x),
                train,
                test,
                shots=5,
                draws=b["draws"],
                seed=SEED,
            )
            if name.startswith("teacher"):
                per_teacher.setdefault(task, {})[name] = score.few_shot.mean
            else:
                rows[f"{name}:{task}"] = score.few_shot.mean
                spread[f"{name}:{task}"] = score.few_shot.std
        rows[f"teacher:{task}"] = max(per_teacher[task].values())  # n5: the best teacher
        print(
            f"{variant} {task}: "
            + ", ".join(f"{k.split(':')[0]} {100 * v:.1f}" for k, v in rows.items()
                        if k.endswith(f":{task}")),
            flush=True,
        )  # fmt: skip
    results.write(
        record(
            "consolidation",
            f"{variant}-{tag}" if tag else variant,
            data=f"generalist: mixture (CIFAR-10 0-4 grayscale + Fashion-MNIST 0-4) train "
            f"{len(mix_train)} / test {len(mix_test)}; teachers: MNIST 0-4; proxy: the "
            "mixture's training images" + (" + USPS 0-4" if b["proxy_usps"] else "")
            + ", unlabeled; downstream: " + ", ".join(TASKS) + "; shared/data",
            seed=SEED,
            budget=f"generalist small_cnn width {b['width']} {b['generalist_epochs']} epochs; "
            f"teachers {b['teacher_epochs']} epochs; consolidation {b['epochs']} epochs on the "
            f"proxy, backbone lr {b['backbone_lr']:g}; 5-shot probe, {b['draws']} draws",
            results=rows,
            started=started,
            extra={
                "related": [t for t, (_, _, related) in TASKS.items() if related],
                "std_over_draws": spread,
                "teachers_per_task": per_teacher,
                "teacher_classes": [t.classes for t in teachers],
                "losses": losses,
                "consolidation_seconds": seconds,
            },
        )
    )  # fmt: skip


def budget(args: argparse.Namespace) -> dict:
    b = {
        "generalist_epochs": args.generalist_epochs,
        "teacher_epochs": args.teacher_epochs,
        "epochs": args.epochs,
        "width": args.width,
        "backbone_lr": args.backbone_lr,
        "draws": args.draws,
        "students": args.student or list(STUDENTS),
        "proxy_usps": args.proxy_usps,
        "train": 0,
        "probe_pool": 0,
        "test": 0,
    }
    if args.quick:
        b |= {"generalist_epochs": 1, "teacher_epochs": 1, "epochs": 1, "draws": 2}
        b |= {"train": 2000, "probe_pool": 500, "test": 500}
    return b


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generalist-epochs", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="consolidation epochs")
    parser.add_argument("--backbone-lr", type=float, default=1e-3, help="SGD rate of phi_s")
    parser.add_argument("--width", type=int, default=32, help="generalist channels (32/64)")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument(
        "--student", choices=list(STUDENTS), action="append", help="rows to train (default all)"
    )
    parser.add_argument(
        "--proxy-usps", action="store_true", help="add USPS digits 0-4, unlabeled, to the proxy"
    )
    parser.add_argument("--tag", help="a run with another budget: results as <variant>-<tag>")


BENCHMARK = Benchmark("consolidation", __doc__, VARIANTS, run_variant, options=options)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
