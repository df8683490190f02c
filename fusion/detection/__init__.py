"""Model composition for object detection (paper 000, section 3.2): detector parties answer
with boxes on unlabeled canvases, the coordinator votes per object across distinct models,
thins each object's candidates with Soft-NMS and trains one detector for the union of the
categories.

The coordinator imports only what is listed here.
"""

from amalgam.fusion.detection.aggregate import AggregationConfig
from amalgam.fusion.detection.canvas import CANVAS_PREFIX, load_canvases
from amalgam.fusion.detection.compose import (
    DetectionCompositionConfig,
    compose_detection,
    score_composition,
)
from amalgam.fusion.detection.figures import pseudo_label_grid
from amalgam.fusion.detection.models import DETECTORS, create_detector

__all__ = [
    "CANVAS_PREFIX",
    "DETECTORS",
    "AggregationConfig",
    "DetectionCompositionConfig",
    "compose_detection",
    "create_detector",
    "load_canvases",
    "pseudo_label_grid",
    "score_composition",
]
