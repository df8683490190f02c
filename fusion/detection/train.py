"""Training and inference loops for the detectors of :mod:`amalgam.fusion.detection.models`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from amalgam.fusion.detection.canvas import DetectionSet
from amalgam.fusion.device import Hardware, to_host, to_model
from amalgam.fusion.progress import progress_bar
from amalgam.fusion.teacher import Detections


def _targets(batch: list[Detections], offset: int, hardware: Hardware) -> list[dict[str, Tensor]]:
    """torchvision's targets of a batch, on ``hardware``."""
    return [
        {"boxes": hardware.put(d.boxes), "labels": hardware.put(d.labels + offset)} for d in batch
    ]


def fit_detector(
    model: nn.Module,
    data: DetectionSet,
    *,
    epochs: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    desc: str = "train detector",
    progress: bool = True,
    hardware: Hardware = Hardware(),
) -> list[float]:
    """Train on ``data`` (labelled canvases) with Adam, a 5% linear warm-up and a cosine
    decay, on ``hardware`` (the model stays there); gradients are clipped at norm 10
    (from-scratch detectors spike early). Returns
    each epoch's mean of the summed detection losses; a non-finite loss stops the run with
    ``FloatingPointError`` naming the step and the loss terms."""
    if data.targets is None:
        raise ValueError("fit_detector needs labelled canvases")
    hardware.place(model)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * max(1, -(-len(data) // batch_size))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def rate(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    offset = getattr(model, "label_offset", 0)
    history = []
    bar = progress_bar(steps, desc, unit="step", show=progress)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(data), batch_size):
            index = order[start : start + batch_size].tolist()
            images = list(hardware.put(data.images[index]))  # B x (1, S, S)
            losses = model(images, _targets([data.targets[i] for i in index], offset, hardware))
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                parts = ", ".join(f"{k} {float(v):.3g}" for k, v in losses.items())
                raise FloatingPointError(f"{desc}: non-finite loss at step {bar.n} ({parts})")
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            total, count = total + loss.item(), count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.3f}")
        history.append(total / count)
    bar.close()
    model.eval()
    return history


@torch.no_grad()
def detect(model: nn.Module, images: Tensor, batch_size: int = 64) -> list[Detections]:
    """The detections of ``model`` on (N, 1, S, S) images, labels as category indices, on the
    host (the images go to the model's device)."""
    model.eval()
    offset = getattr(model, "label_offset", 0)
    found = []
    for start in range(0, images.shape[0], batch_size):
        for out in model(list(to_model(model, images[start : start + batch_size]))):
            boxes, scores = to_host(out["boxes"]), to_host(out["scores"])
            found.append(Detections(boxes, out["labels"].cpu() - offset, scores))
    return found
