"""The detectors of fusion.detection.models train from scratch without collapsing."""

from __future__ import annotations

import numpy as np
import torch

from amalgam.fusion.data import load_source
from amalgam.fusion.detection.canvas import make_canvases
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
