"""Weight-fusion benchmark: OT fusion and CLAFusion (paper 002's appendix set-up on MNIST,
and CNN cases on CIFAR-10).

Variants (paper 002, Appendix B-D): ``mlp-same`` — two MLPs 784-400-200-100-10 from different
seeds: each model, the prediction ensemble, vanilla weight averaging and one-shot OT fusion;
``mlp-hetero`` — MLPs with hidden layers 400-200-100-50-25 and 400-200-100 (Table 10): the
cross-layer map, CLAFusion with add / merge (sign of sum) / merge (average of sign) before
fine-tuning, and after a short fine-tune (``--ft-epochs``) next to each input fine-tuned for
the same budget, with the test accuracy after every epoch of a longer one (``--ft-curve-epochs``,
rows ``*_ft_<n>ep``; SGD's constant rate makes epoch k of it a k-epoch fine-tune);
``skill-transfer`` (Appendix D.1) — model A sees all of digit 4 and 10% of the rest, model B
the rest (A: hidden 400-200-100, B: 400-200-100-50, as in the paper); CLAFusion for
w_A = 0, 0.1, ..., 1. Training: SGD lr 0.01, momentum 0.5, batch 64, inputs normalised with
MNIST's mean and standard deviation. Neurons are aligned on their pre-activations over the
probe (paper 002's choice; rows ``*_weight_metric`` align on weights instead). The probe for
CKA, alignment and merging: 200 training images (the paper's 200 samples). ``cifar-vgg``
(VGG-style with BatchNorm and biases, 2 vs 1 conv layers per stage) and ``cifar-resnet``
(ResNet-14 vs ResNet-8): a few epochs each, CLAFusion, then a short fine-tune next to each
input fine-tuned for the same budget (rows as ``mlp-hetero``; merging does not apply to
convolutions).

    python -m benchmarks.otfusion [--variant mlp-same] [--epochs 10] [--ft-epochs 2]
        [--ft-curve-epochs 10] [--cnn-ft-epochs 2] [--seeds 0 1 2] [--tag ft5] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from amalgam.fusion.data import Dataset, load_source
from amalgam.fusion.models import Classifier, create_model
from amalgam.fusion.ot.config import OTFusionConfig
from amalgam.fusion.ot.fuse import (
    FusionResult,
    clafusion,
    ot_fuse,
    recompute_batchnorm,
    vanilla_average,
)
from amalgam.fusion.train import accuracy, fit, predict_logits
from amalgam.server.figures import plot_heatmap
from benchmarks.harness import Benchmark, Results, record

SEED = 0  # the first seed; --seeds runs more
SGD = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.5, "weight_decay": 0.0, "batch_size": 64}
DEEP, SHALLOW, SAME = (400, 200, 100, 50, 25), (400, 200, 100), (400, 200, 100)
SKILL_A, SKILL_B = (400, 200, 100), (400, 200, 100, 50)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
ADAM = {"optimizer": "adam", "lr": 2e-3, "batch_size": 64}
ADAM_FT = {"optimizer": "adam", "lr": 1e-3, "batch_size": 64}
BATCHNORM_IMAGES = 10_000
PROBE_SIZE = 200
SKILL_DIGIT, SKILL_SHARE = 4, 0.1
FINE_TUNED = "cla_merge_sum"  # the fused network cla_ft fine-tunes (the paper's best, Table 10)


def train_mlp(data: Dataset, hidden: tuple[int, ...], epochs: int, seed: int, desc: str):
    torch.manual_seed(seed)
    model = create_model("mlp", in_shape=tuple(data.x.shape[1:]), num_classes=10, hidden=hidden)
    fit(model, data.x, data.y, epochs=epochs, seed=seed, desc=desc, **SGD)
    return model.eval()


def _copy(model: Classifier) -> Classifier:
    clone = create_model(model.arch["name"], **model.arch["kwargs"])
    clone.load_state_dict(model.state_dict())
    return clone


def fine_tuned(
    model: Classifier, data: Dataset, epochs: int, seed: int, desc: str, optimiser: dict = SGD
) -> Classifier:
    clone = _copy(model)
    fit(clone, data.x, data.y, epochs=epochs, seed=seed + 7, desc=desc, **optimiser)
    return clone.eval()


def fine_tuning_curve(
    model: Classifier, train: Dataset, test: Dataset, epochs: int, seed: int, desc: str
) -> list[float]:
    """Test accuracy after each epoch of one ``epochs``-epoch fine-tune with the MLPs' SGD:
    at its constant rate the value after epoch k is that of :func:`fine_tuned` for k epochs."""
    clone, curve = _copy(model), []
    fit(
        clone, train.x, train.y, epochs=epochs, seed=seed + 7, desc=desc,
        on_epoch=lambda _: curve.append(test_accuracy(clone, test)), **SGD,
    )  # fmt: skip
    return curve


def test_accuracy(model: Classifier, test: Dataset) -> float:
    return accuracy(predict_logits(model, test.x).argmax(dim=1), test.y)


def ensemble_accuracy(models: list[Classifier], test: Dataset) -> float:
    probs = torch.stack([F.softmax(predict_logits(m, test.x), dim=1) for m in models])
    return accuracy(probs.mean(dim=0).argmax(dim=1), test.y)


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, round(time.perf_counter() - started, 2)


def probe_inputs(train: Dataset, seed: int) -> torch.Tensor:
    index = np.random.default_rng(seed).permutation(len(train))[:PROBE_SIZE]
    return train.x[torch.from_numpy(index)]


def mlp_same(train: Dataset, test: Dataset, b: dict, out: Path) -> tuple[dict, dict]:
    a = train_mlp(train, SAME, b["epochs"], b["seed"], "model_a")
    m_b = train_mlp(train, SAME, b["epochs"], b["seed"] + 1, "model_b")
    vanilla, t_vanilla = timed(vanilla_average, [a, m_b])
    fused, t_ot = timed(ot_fuse, [a, m_b], OTFusionConfig(ground_metric="weight"))
    fused_act, t_act = timed(
        ot_fuse,
        [a, m_b],
        OTFusionConfig(ground_metric="activation"),
        probe_inputs(train, b["seed"]),
    )
    results = {
        "model_a": test_accuracy(a, test),
        "model_b": test_accuracy(m_b, test),
        "ensemble": ensemble_accuracy([a, m_b], test),
        "vanilla_avg": test_accuracy(vanilla, test),
        "ot_fused": test_accuracy(fused.model, test),
        "ot_fused_activation": test_accuracy(fused_act.model, test),
    }
    extra = {
        "fusion_seconds": {
            "vanilla_avg": t_vanilla,
            "ot_fused": t_ot,
            "ot_fused_activation": t_act,
        },
        "transport_cost": fused.transport_costs[1],
    }
    return results, extra


def _cla_extra(result: FusionResult, out: Path, name: str, seed: int) -> dict:
    other = 1 - result.base
    cka, mapping = result.cka["hidden"][other], result.alignments["hidden"][other]
    plot_heatmap(
        cka.numpy(),
        out / f"otfusion-{name}-cka-seed{seed}.png",
        title="linear CKA: rows deeper model's hidden layers, columns shallower's; red: CLA map",
        marks=[(j, i) for i, j in enumerate(mapping)],
    )
    return {
        "cla_map": mapping,
        "cka": cka.tolist(),
        "transport_cost": result.transport_costs[other],
    }


def mlp_hetero(train: Dataset, test: Dataset, b: dict, out: Path) -> tuple[dict, dict]:
    a = train_mlp(train, DEEP, b["epochs"], b["seed"], "model_a")
    m_b = train_mlp(train, SHALLOW, b["epochs"], b["seed"] + 1, "model_b")
    probe = probe_inputs(train, b["seed"])
    fused, seconds = {}, {}
    for row, config in {
        "cla_add": OTFusionConfig(balance="add"),
        "cla_add_base_a": OTFusionConfig(balance="add", base=0),  # the deeper network as base
        "cla_merge_sum": OTFusionConfig(balance="merge", sign="sum"),
        "cla_merge_avg": OTFusionConfig(balance="merge", sign="average"),
        "cla_merge_sum_weight_metric": OTFusionConfig(
            balance="merge", sign="sum", ground_metric="weight"
        ),
    }.items():
        fused[row], seconds[row] = timed(clafusion, [a, m_b], probe, config)
    results = {
        "model_a": test_accuracy(a, test),
        "model_b": test_accuracy(m_b, test),
        "ensemble": ensemble_accuracy([a, m_b], test),
    }
    results |= {row: test_accuracy(r.model, test) for row, r in fused.items()}
    depth_aligned = {row: [test_accuracy(m, test) for m in r.balanced] for row, r in fused.items()}
    best = FINE_TUNED  # fixed in advance: choosing by test accuracy would leak the test set
    short, long = b["ft_epochs"], max(b["ft_epochs"], b["ft_curve_epochs"])
    curves = {
        row: fine_tuning_curve(model, train, test, long, b["seed"], row)
        for row, model in {"cla_ft": fused[best].model, "model_a_ft": a, "model_b_ft": m_b}.items()
    }
    for row, curve in curves.items():
        results[row] = curve[short - 1]
        if long > short:
            results[f"{row}_{long}ep"] = curve[-1]
    extra = _cla_extra(fused["cla_add"], out, "mlp-hetero", b["seed"]) | {
        "fusion_seconds": seconds,
        "fine_tuned_from": best,
        "fine_tuning_curve": curves,
        "depth_aligned_accuracy": depth_aligned,
        "fused_architecture": {row: list(r.model.hidden) for row, r in fused.items()},
    }
    return results, extra


def skill_split(train: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """A: every image of digit 4 and 10% of the others; B: the remaining 90% of the others."""
    rng = np.random.default_rng(seed)
    labels = train.y.numpy()
    others = np.flatnonzero(labels != SKILL_DIGIT)
    shared = rng.random(len(others)) < SKILL_SHARE
    a = np.concatenate([np.flatnonzero(labels == SKILL_DIGIT), others[shared]])
    return train.subset(np.sort(a)), train.subset(others[~shared])


def skill_transfer(train: Dataset, test: Dataset, b: dict, out: Path) -> tuple[dict, dict]:
    part_a, part_b = skill_split(train, b["seed"])
    a = train_mlp(part_a, SKILL_A, b["epochs"], b["seed"], "model_a")
    m_b = train_mlp(part_b, SKILL_B, b["epochs"], b["seed"] + 1, "model_b")
    probe = probe_inputs(train, b["seed"])
    fours = test.subset(np.flatnonzero(test.y.numpy() == SKILL_DIGIT))
    results = {
        "model_a": test_accuracy(a, test),
        "model_b": test_accuracy(m_b, test),
        "ensemble": ensemble_accuracy([a, m_b], test),
    }
    digit, merge = {"model_a": test_accuracy(a, fours), "model_b": test_accuracy(m_b, fours)}, {}
    seconds = {}
    for w_a in np.round(np.linspace(0, 1, 11), 1):
        add, seconds[f"fused_wA_{w_a:.1f}"] = timed(
            clafusion, [a, m_b], probe, OTFusionConfig(weights=[w_a, 1 - w_a])
        )
        merged = clafusion([a, m_b], probe, OTFusionConfig(balance="merge", weights=[w_a, 1 - w_a]))
        results[f"fused_wA_{w_a:.1f}"] = test_accuracy(add.model, test)
        digit[f"fused_wA_{w_a:.1f}"] = test_accuracy(add.model, fours)
        merge[f"fused_wA_{w_a:.1f}"] = test_accuracy(merged.model, test)
    extra = {
        "split": f"A: all {SKILL_DIGIT}s + {SKILL_SHARE:.0%} of the rest ({len(part_a)} images); "
        f"B: the rest ({len(part_b)})",
        "balance": "add (rows); merge (sign of sum) in merge_accuracy",
        f"accuracy_on_digit_{SKILL_DIGIT}": digit,
        "merge_accuracy": merge,
        "fusion_seconds": seconds,
    }
    return results, extra


def train_cnn(data: Dataset, arch: dict, epochs: int, seed: int, desc: str) -> Classifier:
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in arch.items() if k != "name"}
    model = create_model(arch["name"], in_shape=tuple(data.x.shape[1:]), num_classes=10, **kwargs)
    fit(model, data.x, data.y, epochs=epochs, seed=seed, desc=desc, **ADAM)
    return model.eval()


def cnn_pair(arch_a: dict, arch_b: dict):
    """A CNN case: two networks of one family and different depths, CLAFusion with identity
    layers / zero-residual blocks, BatchNorm statistics averaged or re-estimated, then a short
    fine-tune next to each input fine-tuned for the same budget."""

    def run(train: Dataset, test: Dataset, b: dict, out: Path) -> tuple[dict, dict]:
        a = train_cnn(train, arch_a, b["cnn_epochs"], b["seed"], "model_a")
        m_b = train_cnn(train, arch_b, b["cnn_epochs"], b["seed"] + 1, "model_b")
        probe = probe_inputs(train, b["seed"])
        fused, seconds = timed(clafusion, [a, m_b], probe, OTFusionConfig())
        by_weights = clafusion([a, m_b], probe, OTFusionConfig(ground_metric="weight"))
        results = {
            "model_a": test_accuracy(a, test),
            "model_b": test_accuracy(m_b, test),
            "ensemble": ensemble_accuracy([a, m_b], test),
            "cla_add": test_accuracy(fused.model, test),
        }
        for row, result in {"cla_add_bn": fused, "cla_add_bn_weight_metric": by_weights}.items():
            recompute_batchnorm(result.model, train.x[:BATCHNORM_IMAGES])
            results[row] = test_accuracy(result.model, test)
        ft = b["cnn_ft_epochs"]
        results["cla_ft"] = test_accuracy(
            fine_tuned(fused.model, train, ft, b["seed"], "cla_ft", ADAM_FT), test
        )
        results["model_a_ft"] = test_accuracy(
            fine_tuned(a, train, ft, b["seed"], "model_a_ft", ADAM_FT), test
        )
        results["model_b_ft"] = test_accuracy(
            fine_tuned(m_b, train, ft, b["seed"], "model_b_ft", ADAM_FT), test
        )
        extra = {
            "architectures": {"model_a": a.arch, "model_b": m_b.arch, "fused": fused.model.arch},
            "cla_map": fused.alignments,
            "cka": {s: {k: c.tolist() for k, c in m.items()} for s, m in fused.cka.items()},
            "transport_cost": fused.transport_costs,
            "fusion_seconds": seconds,
            "depth_aligned_accuracy": [test_accuracy(m, test) for m in fused.balanced],
            "rows": "cla_add: activation-based alignment, BatchNorm statistics averaged with "
            f"the weights; cla_add_bn: re-estimated on {BATCHNORM_IMAGES} training images "
            "(_weight_metric: weight-based alignment); cla_ft fine-tunes cla_add_bn",
        }
        return results, extra

    return run


RUNNERS = {
    "mlp-same": mlp_same,
    "mlp-hetero": mlp_hetero,
    "skill-transfer": skill_transfer,
    "cifar-vgg": cnn_pair(
        {"name": "vgg_cnn", "stages": ((16, 16), (32, 32), (64, 64)), "fc": (128,)},
        {"name": "vgg_cnn", "stages": ((16,), (32,), (64,)), "fc": (128,)},
    ),
    "cifar-resnet": cnn_pair({"name": "resnet14_cifar"}, {"name": "resnet8_cifar"}),
}
VARIANTS = list(RUNNERS)


def normalised(source: str, mean: tuple[float, ...], std: tuple[float, ...]) -> Dataset:
    data = load_source(source)
    shape = (1, -1, 1, 1)
    x = (data.x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
    return dataclasses.replace(data, x=x)


def run_variant(name: str, args: argparse.Namespace, results: Results) -> None:
    """Run one variant once per seed; its rows are the means over seeds, each seed's rows
    are kept in ``extra.per_seed`` and the first seed's figures in ``extra``."""
    b, seeds, tag, out = budget(args), args.seeds, args.tag, results.folder
    started = time.perf_counter()
    cifar = name.startswith("cifar")
    stats = (CIFAR_MEAN, CIFAR_STD) if cifar else ((MNIST_MEAN,), (MNIST_STD,))
    source = "cifar10" if cifar else "mnist"
    train, test = (normalised(f"{source}:{part}", *stats) for part in ("train", "test"))
    if b["train"]:
        train = train.subset(np.random.default_rng(SEED).permutation(len(train))[: b["train"]])
    per_seed, extra = {}, {}
    for seed in seeds:
        rows, seed_extra = RUNNERS[name](train, test, b | {"seed": seed}, out)
        per_seed[seed] = rows
        extra = extra or seed_extra
    rows = {row: float(np.mean([r[row] for r in per_seed.values()])) for row in rows}
    if len(seeds) > 1:
        extra["per_seed"] = per_seed
    if cifar:
        spent = (
            f"CNNs: {b['cnn_epochs']} epochs Adam lr 2e-3 cosine batch 64; fine-tuning: "
            f"{b['cnn_ft_epochs']} epoch(s) Adam lr 1e-3; probe: {PROBE_SIZE} training images"
        )
    else:
        spent = (
            f"MLPs: {b['epochs']} epochs SGD lr 0.01 momentum 0.5 batch 64; fine-tuning: "
            f"{b['ft_epochs']} epoch(s), same optimiser (mlp-hetero: also "
            f"{max(b['ft_epochs'], b['ft_curve_epochs'])}, rows *_ft_<n>ep); probe: "
            f"{PROBE_SIZE} training images"
        )
    results.write(
        record(
            "otfusion",
            f"{name}-{tag}" if tag else name,
            data=f"{source} train ({len(train)} images) / test {len(test)}, normalised, "
            "shared/data",
            seed=seeds[0] if len(seeds) == 1 else seeds,
            budget=spent + ("" if len(seeds) == 1 else f"; mean over {len(seeds)} seeds"),
            results=rows,
            started=started,
            extra=extra,
        )
    )


def budget(args: argparse.Namespace) -> dict:
    if args.quick:
        return {"epochs": 1, "ft_epochs": 1, "ft_curve_epochs": 2, "cnn_epochs": 1,
                "cnn_ft_epochs": 1, "train": 1000}  # fmt: skip
    return {
        "epochs": args.epochs,
        "ft_epochs": args.ft_epochs,
        "ft_curve_epochs": args.ft_curve_epochs,
        "cnn_epochs": args.cnn_epochs,
        "cnn_ft_epochs": args.cnn_ft_epochs,
        "train": 0,
    }


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument(
        "--ft-curve-epochs", type=int, default=10, help="mlp-hetero: longest fine-tune recorded"
    )
    parser.add_argument("--cnn-epochs", type=int, default=3)
    parser.add_argument("--cnn-ft-epochs", type=int, default=2)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[SEED], help="one run per seed; rows are means"
    )
    parser.add_argument("--tag", help="a run with another budget: results as <variant>-<tag>")


BENCHMARK = Benchmark(
    "otfusion", __doc__, VARIANTS, run_variant, options=options, results={"decimals": 2}
)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
