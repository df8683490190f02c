"""Weight-fusion benchmark: OT fusion and CLAFusion (paper 002's appendix set-up on MNIST,
and CNN cases on CIFAR-10).

Variants (paper 002, Appendix B-D): ``mlp-same`` — two MLPs 784-400-200-100-10 from different
seeds: each model, the prediction ensemble, vanilla weight averaging and one-shot OT fusion;
``otfusion-anchor`` -- the same on the original OTFusion code's MLP (784-400-200-100-10, no
biases), its two checkpoints given with ``--anchor`` or trained here by its recipe, with each
fusion's median seconds over 5 runs against that code's (0.72 s weights / 0.53 s activations);
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
convolutions). ``tv-resnet18`` and ``tv-vgg11bn`` (CIFAR-10): torchvision's networks (vgg11_bn
with a classifier for 32x32 inputs) from two seeds on ``--tv-images`` training images, OT
fusion on the traced graph, then the same fine-tune; ``tv-vgg11-13bn``: vgg11_bn and vgg13_bn
(two more conv layers), CLAFusion on the sections and units traced from their graphs;
``tv-vgg-half-double``: the same with other widths too, paper 002's VGG11-half and
VGG13-double configurations at a quarter of their widths. CNN
rows ``*_bn`` re-estimate BatchNorm on 10,000 training images, ``*_repair`` apply REPAIR on
the 200 probe images alone.

    python -m benchmarks.otfusion [--variant mlp-same] [--epochs 10] [--ft-epochs 2]
        [--ft-curve-epochs 10] [--cnn-ft-epochs 2] [--tv-images 20000] [--anchor A B]
        [--seeds 0 1 2] [--tag ft5] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from amalgam.fusion.data import Dataset, load_source
from amalgam.fusion.models import Classifier, create_model
from amalgam.fusion.ot.config import OTFusionConfig
from amalgam.fusion.ot.fuse import (
    FusionResult,
    clafusion,
    ot_fuse,
    vanilla_average,
)
from amalgam.fusion.ot.repair import repair
from amalgam.fusion.train import fit
from amalgam.server.figures import plot_heatmap
from benchmarks.harness import Benchmark, Results, record
from benchmarks.otfusion_cnn import CNN_RUNNERS
from benchmarks.otfusion_common import (
    PROBE_SIZE,
    SEED,
    SGD,
    ensemble_accuracy,
    one_hot,
    probe_inputs,
    test_accuracy,
    timed,
)

DEEP, SHALLOW, SAME = (400, 200, 100, 50, 25), (400, 200, 100), (400, 200, 100)
SKILL_A, SKILL_B = (400, 200, 100), (400, 200, 100, 50)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SKILL_DIGIT, SKILL_SHARE = 4, 0.1
# the original OTFusion code's fusion of its two MNIST MLPs on this kind of machine (seconds)
ORIGINAL_SECONDS = {"weight": 0.72, "activation": 0.53}
FINE_TUNED = "cla_merge_sum"  # the fused network cla_ft fine-tunes (the paper's best, Table 10)


def train_mlp(data: Dataset, hidden: tuple[int, ...], epochs: int, seed: int, desc: str):
    torch.manual_seed(seed)
    model = create_model("mlp", in_shape=tuple(data.x.shape[1:]), num_classes=10, hidden=hidden)
    fit(model, data.x, data.y, epochs=epochs, seed=seed, desc=desc, **SGD)
    return model.eval()


def fine_tuning_curve(
    model: Classifier, train: Dataset, test: Dataset, epochs: int, seed: int, desc: str
) -> list[float]:
    """Test accuracy after each epoch of one ``epochs``-epoch fine-tune with the MLPs' SGD:
    at its constant rate the value after epoch k is that of
    :func:`benchmarks.otfusion_common.fine_tuned` for k epochs."""
    clone, curve = copy.deepcopy(model), []
    fit(
        clone, train.x, train.y, epochs=epochs, seed=seed + 7, desc=desc,
        on_epoch=lambda _: curve.append(test_accuracy(clone, test)), **SGD,
    )  # fmt: skip
    return curve


def median_timed(fn, *args, repeats: int = 5):
    """``fn(*args)`` and the median of ``repeats`` runs' seconds."""
    runs = [timed(fn, *args) for _ in range(repeats)]
    return runs[0][0], float(np.median([seconds for _, seconds in runs]))


def same_depth_rows(a: nn.Module, m_b: nn.Module, probe: torch.Tensor, test: Dataset):
    """Rows of two equally deep networks: each, their ensemble, vanilla averaging, OT fusion
    on weights and on activations (then REPAIR on the probe: a layer without bias is only
    rescaled), with the median seconds of each fusion."""
    vanilla, t_vanilla = median_timed(vanilla_average, [a, m_b])
    by_weights, shape = OTFusionConfig(ground_metric="weight"), tuple(probe.shape[1:])
    fused, t_ot = median_timed(ot_fuse, [a, m_b], by_weights, None, shape)
    fused_act, t_act = median_timed(
        ot_fuse, [a, m_b], OTFusionConfig(ground_metric="activation"), probe
    )
    results = {
        "model_a": test_accuracy(a, test),
        "model_b": test_accuracy(m_b, test),
        "ensemble": ensemble_accuracy([a, m_b], test),
        "vanilla_avg": test_accuracy(vanilla, test),
        "ot_fused": test_accuracy(fused.model, test),
        "ot_fused_activation": test_accuracy(fused_act.model, test),
    }
    repaired = copy.deepcopy(fused_act.model)
    repair(repaired, fused_act.aligned_models(), probe)
    results["ot_fused_activation_repair"] = test_accuracy(repaired, test)
    extra = {
        "fusion_seconds": {
            "vanilla_avg": t_vanilla,
            "ot_fused": t_ot,
            "ot_fused_activation": t_act,
        },
        "transport_cost": fused.transport_costs[1],
    }
    return results, extra


def mlp_same(train: Dataset, test: Dataset, b: dict, out: Path) -> tuple[dict, dict]:
    a = train_mlp(train, SAME, b["epochs"], b["seed"], "model_a")
    m_b = train_mlp(train, SAME, b["epochs"], b["seed"] + 1, "model_b")
    return same_depth_rows(a, m_b, probe_inputs(train, b["seed"]), test)


class AnchorMLP(nn.Module):
    """The MNIST MLP of the original OTFusion code (``MlpNetBase``): 784-400-200-100-10
    without biases; the ``model_state_dict`` of its checkpoints loads into it. It returns
    logits where that code returns their log-softmax (the same predictions)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400, bias=False)
        self.fc2 = nn.Linear(400, 200, bias=False)
        self.fc3 = nn.Linear(200, 100, bias=False)
        self.fc4 = nn.Linear(100, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, 1, 28, 28) -> (B, 784)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc4(F.relu(self.fc3(x)))


def anchor_model(checkpoint: str | None, train: Dataset, b: dict, k: int) -> nn.Module:
    """Model ``k`` of the pair: loaded from ``checkpoint`` (the original code's file), else
    trained here as that code trains it (SGD lr 0.01, momentum 0.5, batch 64, no decay)."""
    model = AnchorMLP()
    if checkpoint:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(saved.get("model_state_dict", saved))
        return model.eval()
    torch.manual_seed(b["seed"] + k)
    fit(model, train.x, one_hot(train), epochs=b["epochs"], seed=b["seed"] + k, desc=f"model_{k}",
        **SGD)  # fmt: skip
    return model.eval()


def otfusion_anchor(train: Dataset, test: Dataset, b: dict, out: Path) -> tuple[dict, dict]:
    checkpoints = b["anchor"] or [None, None]
    a, m_b = (anchor_model(path, train, b, k) for k, path in enumerate(checkpoints))
    results, extra = same_depth_rows(a, m_b, probe_inputs(train, b["seed"]), test)
    extra["models"] = b["anchor"] or "trained here (the original code's recipe)"
    extra["original_code_seconds"] = ORIGINAL_SECONDS
    seconds = extra["fusion_seconds"]
    extra["seconds_over_original"] = {
        "ot_fused": round(seconds["ot_fused"] / ORIGINAL_SECONDS["weight"], 3),
        "ot_fused_activation": round(
            seconds["ot_fused_activation"] / ORIGINAL_SECONDS["activation"], 3
        ),
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


RUNNERS = {
    "mlp-same": mlp_same,
    "otfusion-anchor": otfusion_anchor,
    "mlp-hetero": mlp_hetero,
    "skill-transfer": skill_transfer,
    **CNN_RUNNERS,
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
    cifar = name.startswith(("cifar", "tv-"))
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
        images = f" on {b['tv_images']} images" if name.startswith("tv-") else ""
        spent = (
            f"CNNs: {b['cnn_epochs']} epochs{images} Adam lr 2e-3 cosine batch 64; fine-tuning: "
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
                "cnn_ft_epochs": 1, "train": 1000, "tv_images": 1000,
                "anchor": args.anchor}  # fmt: skip
    return {
        "epochs": args.epochs,
        "ft_epochs": args.ft_epochs,
        "ft_curve_epochs": args.ft_curve_epochs,
        "cnn_epochs": args.cnn_epochs,
        "cnn_ft_epochs": args.cnn_ft_epochs,
        "tv_images": args.tv_images,
        "anchor": args.anchor,
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
        "--anchor", nargs=2, metavar="CHECKPOINT",
        help="otfusion-anchor: the original OTFusion code's two MNIST MLP checkpoints",
    )  # fmt: skip
    parser.add_argument(
        "--tv-images", type=int, default=20_000, help="tv-*: training images (of 50,000)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[SEED], help="one run per seed; rows are means"
    )
    parser.add_argument("--tag", help="a run with another budget: results as <variant>-<tag>")


BENCHMARK = Benchmark(
    "otfusion", __doc__, VARIANTS, run_variant, options=options, results={"decimals": 2}
)

if __name__ == "__main__":
    raise SystemExit(BENCHMARK.main())
