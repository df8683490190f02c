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
import torchvision
from torch import nn

from amalgam.fusion.activations import layer_outputs
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
from amalgam.fusion.ot.repair import channel_dim, channel_rows, repair, repair_points
from amalgam.fusion.ot.spec import fusion_spec
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
# the original OTFusion code's fusion of its two MNIST MLPs on this kind of machine (seconds)
ORIGINAL_SECONDS = {"weight": 0.72, "activation": 0.53}
FINE_TUNED = "cla_merge_sum"  # the fused network cla_ft fine-tunes (the paper's best, Table 10)


def train_mlp(data: Dataset, hidden: tuple[int, ...], epochs: int, seed: int, desc: str):
    torch.manual_seed(seed)
    model = create_model("mlp", in_shape=tuple(data.x.shape[1:]), num_classes=10, hidden=hidden)
    fit(model, data.x, data.y, epochs=epochs, seed=seed, desc=desc, **SGD)
    return model.eval()


def one_hot(data: Dataset) -> torch.Tensor:
    """(N, 10) targets of ``data``'s labels, for networks without the registry's ``head``."""
    return F.one_hot(data.y.long(), 10).float()


def fine_tuned(
    model: nn.Module, data: Dataset, epochs: int, seed: int, desc: str, optimiser: dict = SGD
) -> Classifier:
    clone = copy.deepcopy(model)
    fit(clone, data.x, one_hot(data), epochs=epochs, seed=seed + 7, desc=desc, **optimiser)
    return clone.eval()


def fine_tuning_curve(
    model: Classifier, train: Dataset, test: Dataset, epochs: int, seed: int, desc: str
) -> list[float]:
    """Test accuracy after each epoch of one ``epochs``-epoch fine-tune with the MLPs' SGD:
    at its constant rate the value after epoch k is that of :func:`fine_tuned` for k epochs."""
    clone, curve = copy.deepcopy(model), []
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
    return value, round(time.perf_counter() - started, 4)


def probe_inputs(train: Dataset, seed: int) -> torch.Tensor:
    index = np.random.default_rng(seed).permutation(len(train))[:PROBE_SIZE]
    return train.x[torch.from_numpy(index)]


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


def train_cnn(data: Dataset, arch: dict, epochs: int, seed: int, desc: str) -> Classifier:
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in arch.items() if k != "name"}
    model = create_model(arch["name"], in_shape=tuple(data.x.shape[1:]), num_classes=10, **kwargs)
    fit(model, data.x, data.y, epochs=epochs, seed=seed, desc=desc, **ADAM)
    return model.eval()


ONE_SHOT_ROWS = (
    "BatchNorm statistics averaged with the weights; _bn: re-estimated on "
    f"{BATCHNORM_IMAGES} training images; _repair: REPAIR on the {PROBE_SIZE} probe images "
    "alone (where every hidden channel passes a BatchNorm, it sets what re-estimation would)"
)


def bn_estimated(model: nn.Module, train: Dataset) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics re-estimated on training images."""
    return recompute_batchnorm(copy.deepcopy(model), train.x[:BATCHNORM_IMAGES])


@torch.no_grad()
def matched_correlation(result: FusionResult, probe: torch.Tensor) -> dict[str, float]:
    """Per repair point, the mean correlation on the probe between each channel of the base
    and the channel aligned to it from the other network: averaging two channels of
    correlation r keeps sqrt((1 + r) / 2) of their standard deviation (REPAIR, section 3)."""
    aligned = result.aligned_models()
    base, other = aligned[result.base], aligned[1 - result.base]
    points = repair_points(result.model, fusion_spec(result.model, tuple(probe.shape[1:])))
    modules = dict(result.model.named_modules())
    ours, theirs = (layer_outputs(m, probe, points) for m in (base, other))
    found = {}
    for point in points:
        dim = channel_dim(modules[point])
        a, b = (channel_rows(z[point], dim) for z in (ours, theirs))  # (N, C) each
        a, b = a - a.mean(0), b - b.mean(0)
        r = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)  # (C,)
        found[point] = round(float(r.mean()), 3)
    return found


def one_shot_rows(
    row: str, result: FusionResult, train: Dataset, test: Dataset, probe: torch.Tensor
) -> tuple[dict[str, float], nn.Module, float]:
    """Test accuracy of the one-shot fused network (rows ``row``, ``row_bn``, ``row_repair``:
    :data:`ONE_SHOT_ROWS`), the repaired network and the seconds REPAIR took."""
    repaired = copy.deepcopy(result.model)
    _, seconds = timed(repair, repaired, result.aligned_models(), probe)
    rows = {
        row: test_accuracy(result.model, test),
        f"{row}_bn": test_accuracy(bn_estimated(result.model, train), test),
        f"{row}_repair": test_accuracy(repaired, test),
    }
    return rows, repaired, seconds


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
        }
        rows, _, repair_seconds = one_shot_rows("cla_add", fused, train, test, probe)
        results |= rows
        results["cla_add_bn_weight_metric"] = test_accuracy(
            bn_estimated(by_weights.model, train), test
        )
        ft = b["cnn_ft_epochs"]
        results["cla_ft"] = test_accuracy(
            fine_tuned(bn_estimated(fused.model, train), train, ft, b["seed"], "cla_ft", ADAM_FT),
            test,
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
            "repair_seconds": repair_seconds,
            "matched_correlation": matched_correlation(fused, probe),
            "depth_aligned_accuracy": [test_accuracy(m, test) for m in fused.balanced],
            "rows": f"cla_add: activation-based alignment, {ONE_SHOT_ROWS} "
            "(_weight_metric: weight-based alignment); cla_ft fine-tunes cla_add_bn",
        }
        return results, extra

    return run


def tv_vgg_bn(depth: int):
    """torchvision's ``vgg<depth>_bn`` with a classifier for 32x32 inputs: global average
    pooling and one hidden layer of 256 (its own 25088-4096-4096 classifier is 120M
    weights)."""

    def build(num_classes: int) -> nn.Module:
        model = torchvision.models.get_model(f"vgg{depth}_bn", num_classes=num_classes)
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(
            nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes)
        )
        return model

    return build


# paper 002's VGG11-half and VGG13-double (Table 3) at a quarter of their widths
VGG11_HALF = [16, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 128, "M"]
VGG13_DOUBLE = [16, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M", 256, 128, "M"]


def tv_vgg_layers(layers: list):
    """torchvision's VGG of the configuration ``layers`` (widths, "M" for max pooling) with
    BatchNorm, globally average-pooled into one linear classifier (as paper 002's VGGs)."""

    def build(num_classes: int) -> nn.Module:
        model = torchvision.models.vgg.VGG(
            torchvision.models.vgg.make_layers(layers, batch_norm=True), num_classes=num_classes
        )
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(layers[-2], num_classes)
        return model

    return build


def torchvision_pair(build_a, build_b=None):
    """A torchvision case: two networks from two seeds, trained on ``--tv-images`` training
    images -- of one architecture (``build_b`` unset), OT-fused (activation metric), or of
    two depths, fused by CLAFusion on the traced graph -- and repaired, then a short
    fine-tune of the fused network (``*_repair``) next to each input's."""
    row, ft_row = ("ot_fused", "ot_ft") if build_b is None else ("cla_add", "cla_ft")

    def run(train: Dataset, test: Dataset, b: dict, out: Path) -> tuple[dict, dict]:
        order = np.random.default_rng(SEED).permutation(len(train))[: b["tv_images"]]
        train = train.subset(order)
        models = []
        for k, (desc, build) in enumerate((("model_a", build_a), ("model_b", build_b or build_a))):
            torch.manual_seed(b["seed"] + k)
            model = build(num_classes=10)
            fit(model, train.x, one_hot(train), epochs=b["cnn_epochs"], seed=b["seed"] + k,
                desc=desc, **ADAM)  # fmt: skip
            models.append(model.eval())
        probe = probe_inputs(train, b["seed"])
        results = {
            "model_a": test_accuracy(models[0], test),
            "model_b": test_accuracy(models[1], test),
            "ensemble": ensemble_accuracy(models, test),
        }
        extra: dict = {"architectures": [type(m).__name__ for m in models]}
        if build_b is None:
            fused, seconds = timed(ot_fuse, models, OTFusionConfig(), probe)
            averaged = vanilla_average(models)
            results["vanilla_avg"] = test_accuracy(averaged, test)
            results["vanilla_avg_bn"] = test_accuracy(bn_estimated(averaged, train), test)
            extra["transport_cost"] = fused.transport_costs[1]
        else:
            fused, seconds = timed(clafusion, models, probe, OTFusionConfig())
            extra["cla_map"] = fused.alignments
            extra["depth_aligned_accuracy"] = [test_accuracy(m, test) for m in fused.balanced]
            on_b = clafusion(models, probe, OTFusionConfig(base=1))  # at model_b's widths
            results["cla_add_base_b_bn"] = test_accuracy(bn_estimated(on_b.model, train), test)
        rows, repaired, repair_seconds = one_shot_rows(row, fused, train, test, probe)
        results |= rows
        ft = b["cnn_ft_epochs"]
        for name, model in {
            ft_row: repaired,
            "model_a_ft": models[0],
            "model_b_ft": models[1],
        }.items():
            tuned = fine_tuned(model, train, ft, b["seed"], name, ADAM_FT)
            results[name] = test_accuracy(tuned, test)
        metric = (
            "CLAFusion (activation-based alignment)" if build_b else "activation-based alignment"
        )
        extra |= {
            "fusion_seconds": seconds,
            "repair_seconds": repair_seconds,
            "matched_correlation": matched_correlation(fused, probe),
            "rows": f"{row}: {metric}, {ONE_SHOT_ROWS}"
            + (
                "; cla_add_base_b_bn: aligned to model_b, at its widths"
                if build_b
                else "; vanilla_avg: weights averaged unaligned (_bn as above)"
            )
            + f"; {ft_row} fine-tunes {row}_repair",
        }
        return results, extra

    return run


RUNNERS = {
    "mlp-same": mlp_same,
    "otfusion-anchor": otfusion_anchor,
    "mlp-hetero": mlp_hetero,
    "skill-transfer": skill_transfer,
    "cifar-vgg": cnn_pair(
        {"name": "vgg_cnn", "stages": ((16, 16), (32, 32), (64, 64)), "fc": (128,)},
        {"name": "vgg_cnn", "stages": ((16,), (32,), (64,)), "fc": (128,)},
    ),
    "cifar-resnet": cnn_pair({"name": "resnet14_cifar"}, {"name": "resnet8_cifar"}),
    "tv-resnet18": torchvision_pair(torchvision.models.resnet18),
    "tv-vgg11bn": torchvision_pair(tv_vgg_bn(11)),
    "tv-vgg11-13bn": torchvision_pair(tv_vgg_bn(11), tv_vgg_bn(13)),
    "tv-vgg-half-double": torchvision_pair(tv_vgg_layers(VGG11_HALF), tv_vgg_layers(VGG13_DOUBLE)),
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
