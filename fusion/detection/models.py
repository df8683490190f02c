"""Detectors small enough to train on a CPU: torchvision's Faster R-CNN, FCOS and RetinaNet
heads on a small BatchNorm CNN backbone, built without pretrained weights (none can be
downloaded here, and a digit canvas has nothing in common with ImageNet).

Inputs are (1, S, S) canvases in [0, 1]; the internal transform keeps their size (no resize to
800 pixels) and normalises with mean 0.5, std 0.5.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

DETECTORS = ("frcnn", "fcos", "retinanet")


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallBackbone(nn.Module):
    """Feature maps at strides 8 and 16 (``"0"``, ``"1"``), ``out_channels`` each."""

    def __init__(self, width: int = 32, levels: int = 2) -> None:
        super().__init__()
        self.out_channels = width
        self.levels = levels
        self.stem = nn.Sequential(
            _block(1, width // 2, 2), _block(width // 2, width, 2), _block(width, width, 2),
            _block(width, width, 1),
        )  # fmt: skip
        self.down = nn.Sequential(_block(width, width, 2), _block(width, width, 1))

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        s8 = self.stem(x)  # (B, W, S/8, S/8)
        features = OrderedDict([("0", s8)])
        if self.levels > 1:
            features["1"] = self.down(s8)  # (B, W, S/16, S/16)
        return features


def create_detector(
    arch: str, num_classes: int, size: int = 64, width: int = 32, score_thresh: float = 0.05
) -> nn.Module:
    """A detector for ``num_classes`` categories on ``size`` x ``size`` canvases.

    ``arch``: ``frcnn`` (two-stage, anchors on stride 8), ``fcos`` (anchor-free, strides 8 and
    16) or ``retinanet`` (one-stage, anchors on strides 8 and 16). ``model.arch`` records the
    arguments, as the classifiers of :mod:`amalgam.fusion.models` do.
    """
    common = dict(min_size=size, max_size=size, image_mean=[0.5], image_std=[0.5])
    if arch == "frcnn":
        backbone = SmallBackbone(width, levels=1)
        anchors = AnchorGenerator(sizes=((12, 20, 32),), aspect_ratios=((1.0, 1.5, 2.0),))
        model = FasterRCNN(
            backbone,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(width * 7 * 7, 128),
            box_predictor=FastRCNNPredictor(128, num_classes + 1),  # + background
            rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
            rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=50,
            rpn_batch_size_per_image=64, box_batch_size_per_image=64,
            box_detections_per_img=20, box_score_thresh=score_thresh,
            **common,
        )  # fmt: skip
    elif arch in ("fcos", "retinanet"):
        backbone = SmallBackbone(width, levels=2)
        heads = dict(score_thresh=score_thresh, detections_per_img=20, **common)
        if arch == "fcos":
            if width % 32:
                raise ValueError(f"width: {width}; fcos needs a multiple of 32 (its GroupNorm)")
            anchors = AnchorGenerator(sizes=((16,), (32,)), aspect_ratios=((1.0,), (1.0,)))
            model = FCOS(backbone, num_classes, anchor_generator=anchors, **heads)
            # torchvision's FCOS regresses ReLU(conv) with a zero bias: trained from scratch,
            # the distances can all go negative early and the ReLU never lets them back
            # (every box shrinks to a point). A bias of one anchor size starts them alive.
            nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)
        else:
            anchors = AnchorGenerator(
                sizes=((12, 20), (28, 40)), aspect_ratios=((1.0, 1.5, 2.0),) * 2
            )
            model = RetinaNet(backbone, num_classes, anchor_generator=anchors, **heads)
    else:
        raise ValueError(f"arch: {arch!r} is not one of {', '.join(DETECTORS)}")
    model.task = "detection"  # what a party agent advertises for it
    model.label_offset = 1 if arch == "frcnn" else 0  # Faster R-CNN's class 0 is background
    model.arch = {"name": arch, "kwargs": {"num_classes": num_classes, "size": size,
                                           "width": width}}  # fmt: skip
    return model
