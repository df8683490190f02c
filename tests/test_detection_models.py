"""The detectors of fusion.detection.models train from scratch without collapsing, and
fine-tuning keeps the interpolation between the weights before and after."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amalgam.fusion.data import load_source
from amalgam.fusion.detection.canvas import make_canvases
from amalgam.fusion.detection.compose import DetectionCompositionConfig, finetune
from amalgam.fusion.detection.models import create_detector
from amalgam.fusion.detection.train import detect, fit_detector


def _canvases(count: int, seed: int):
    digits = load_source("digits:train")  # the embedded 8x8 digits
    return make_canvases(digits.subset(np.arange(300)), count, size=64, seed=seed)


def test_fcos_regresses_boxes_of_positive_size_from_the_start_and_after_training():
    torch.manual_seed(0)
    model = create_detector("fcos", 10, size=64)
    canvases = _canvases(160, seed=3)
    features = list(model.backbone(canvases.images[:4] * 2 - 1).values())
    distances = model.head(features)["bbox_regression"]  # (B, locations, 4)
    assert bool((distances > 0).all())
    fit_detector(model, canvases, epochs=4, batch_size=16, seed=0, progress=False)
    found = detect(model, canvases.images[:20])
    boxes = torch.cat([d.boxes for d in found])
    assert boxes.shape[0] > 0
    sides = boxes[:, 2:] - boxes[:, :2]  # (M, 2) widths and heights in pixels
    assert float(sides.min()) > 1.0


def test_finetuning_keeps_the_interpolation_between_the_weights_before_and_after():
    canvases = _canvases(16, seed=4)
    torch.manual_seed(0)
    model = create_detector("frcnn", 10, size=64, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = {}
    for weight in (1.0, 0.25):
        model.load_state_dict(before)
        config = DetectionCompositionConfig(finetune_interpolation=weight, batch_size=8)
        torch.manual_seed(1)  # the same proposal sampling in both runs
        finetune(model, canvases, config, epochs=1, progress=False)
        after[weight] = {k: v.clone() for k, v in model.state_dict().items()}
    moved = 0
    for name, start in before.items():
        full, kept = after[1.0][name], after[0.25][name]
        if start.is_floating_point():  # a quarter of the way from before to after
            torch.testing.assert_close(kept, start + 0.25 * (full - start))
            moved += int(not torch.equal(full, start))
        else:  # integer buffers (step counts) as fine-tuning left them
            assert torch.equal(kept, full)
    assert moved > 0  # fine-tuning changed the weights


@pytest.mark.parametrize("weight", [0.0, 1.5])
def test_an_interpolation_outside_zero_to_one_is_refused(weight):
    with pytest.raises(ValueError, match=rf"finetune_interpolation: {weight} is outside \(0, 1\]"):
        DetectionCompositionConfig(finetune_interpolation=weight)
