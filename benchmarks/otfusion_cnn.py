"""The weight-fusion benchmark's CNN cases on CIFAR-10: two networks of the registry
(CLAFusion of a VGG-style pair or a ResNet pair) or of torchvision (OT fusion of two seeds,
CLAFusion of two depths on the traced graph), each fused network one-shot, with BatchNorm
re-estimated, repaired, and fine-tuned next to its inputs (``python -m benchmarks.otfusion``
runs them)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from amalgam.fusion.activations import layer_outputs
from amalgam.fusion.data import Dataset
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
from amalgam.fusion.train import fit
from benchmarks.otfusion_common import (
    ADAM,
    ADAM_FT,
    BATCHNORM_IMAGES,
    PROBE_SIZE,
    SEED,
    ensemble_accuracy,
    fine_tuned,
    one_hot,
    probe_inputs,
    test_accuracy,
    timed,
)


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


CNN_RUNNERS = {
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
