"""A detection data set built from real digits: square canvases holding 1-5 digits at random
positions and scales, with exact boxes.

No detection data set is available offline; canvases of MNIST (or USPS, Kannada-MNIST, or the
embedded scikit-learn digits) give real object appearance, several objects per image,
overlaps and scale variation, and a second digit distribution for the "different unlabeled
data" case of the composition paper (000, Scenario 1 with unlabeled OID). Deterministic given
the seed; generated in memory in about a second per thousand canvases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from amalgam.fusion.data import Dataset, load_source
from amalgam.fusion.teacher import Detections

INK = 0.25  # a pixel belongs to the digit above this fraction of its maximum


@dataclass
class DetectionSet:
    """Canvases with their boxes.

    Attributes
    ----------
    images : (N, 1, S, S) float32 in [0, 1].
    targets : one :class:`Detections` per canvas, or ``None`` when unlabeled.
    class_names : category names, indexed by the labels.
    """

    images: Tensor
    targets: list[Detections] | None
    class_names: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index) -> DetectionSet:
        index = [int(i) for i in index]
        targets = None if self.targets is None else [self.targets[i] for i in index]
        return DetectionSet(self.images[index], targets, self.class_names)

    def restrict(self, class_names: list[str]) -> DetectionSet:
        """The same canvases annotated with the boxes of ``class_names`` only, relabelled to
        indices into it (what a party that knows only those categories was trained on)."""
        mapping = torch.full((len(self.class_names),), -1, dtype=torch.long)
        for i, name in enumerate(class_names):
            mapping[self.class_names.index(name)] = i
        targets = []
        for target in self.targets or []:
            new = mapping[target.labels]
            kept = target.select(new >= 0)
            targets.append(Detections(kept.boxes, new[new >= 0], kept.scores))
        return DetectionSet(self.images, targets, list(class_names))

    def unlabeled(self) -> DetectionSet:
        return DetectionSet(self.images, None, self.class_names)


def _ink_box(digit: Tensor) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)`` of the pixels above INK of a (h, w) glyph, x2/y2 exclusive."""
    ys, xs = torch.nonzero(digit > INK * digit.max(), as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _overlap(box: tuple, placed: list[tuple]) -> float:
    """The largest fraction of ``box`` covered by a placed box."""
    x1, y1, x2, y2 = box
    area = (x2 - x1) * (y2 - y1)
    worst = 0.0
    for a1, b1, a2, b2 in placed:
        w, h = min(x2, a2) - max(x1, a1), min(y2, b2) - max(y1, b1)
        if w > 0 and h > 0:
            worst = max(worst, w * h / area)
    return worst


def make_canvases(
    glyphs: Dataset,
    count: int,
    size: int = 64,
    digits: tuple[int, int] = (1, 5),
    scale: tuple[float, float] = (0.3, 0.55),
    max_overlap: float = 0.3,
    seed: int = 0,
) -> DetectionSet:
    """``count`` canvases of ``size`` x ``size`` pixels.

    Parameters
    ----------
    glyphs : (N, 1, h, w) labelled images of single digits; their classes are the categories.
    digits : fewest and most digits per canvas (uniform).
    scale : a digit's side as a fraction of the canvas side (uniform).
    max_overlap : a digit is re-placed (up to 20 tries, then dropped) when more than this
        fraction of its box is covered by a digit already there.
    seed : the same seed gives the same canvases.
    """
    if glyphs.y is None:
        raise ValueError("canvases need labelled glyphs")
    rng = np.random.default_rng(seed)
    images = torch.zeros(count, 1, size, size)
    targets = []
    for i in range(count):
        boxes, labels = [], []
        for _ in range(int(rng.integers(digits[0], digits[1] + 1))):
            k = int(rng.integers(len(glyphs)))
            side = max(6, round(size * rng.uniform(*scale)))
            glyph = F.interpolate(glyphs.x[k : k + 1], size=(side, side), mode="bilinear",
                                  align_corners=False)[0, 0].clamp(0, 1)  # fmt: skip
            if glyph.max() <= 0:
                continue
            gx1, gy1, gx2, gy2 = _ink_box(glyph)
            for _ in range(20):
                x, y = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
                box = (x + gx1, y + gy1, x + gx2, y + gy2)
                if _overlap(box, boxes) <= max_overlap:
                    region = images[i, 0, y : y + side, x : x + side]
                    torch.maximum(region, glyph, out=region)
                    boxes.append(box)
                    labels.append(int(glyphs.y[k]))
                    break
        targets.append(
            Detections(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.long),
                torch.ones(len(labels)),
            )
        )
    return DetectionSet(images, targets, list(glyphs.class_names))


CANVAS_PREFIX = "canvases:"


def load_canvases(source: str, size: int = 64, seed: int = 0) -> DetectionSet:
    """``canvases:<glyph source>``: canvases of the digits of a classification source
    (``canvases:mnist:train``, ``canvases:digits:public`` ...; see
    :func:`amalgam.fusion.data.load_source`), one canvas per three digits of the source."""
    if not source.startswith(CANVAS_PREFIX):
        raise ValueError(f"{source!r} is not a canvas source ({CANVAS_PREFIX}<source>)")
    glyphs = load_source(source[len(CANVAS_PREFIX) :])
    return make_canvases(glyphs, max(1, len(glyphs) // 3), size=size, seed=seed)
