"""The fused student as a run folder delivers it, and how to load it back.

A run folder holds the student three ways, each taking images in [0, 1] (the normalization it
expects is applied inside):

* ``student.safetensors`` with ``student.json``, its card: architecture, class names in output
  order, input shape and range, normalization, the job that made it and its metrics;
* ``student.pt2``, a ``torch.export`` program with a dynamic batch dimension, which runs with
  PyTorch alone (``torch.export.load(path).module()``);
* ``student.onnx`` on request (``amalgam fuse --export onnx``).

>>> import amalgam
>>> student, card = amalgam.load_student("runs/<job-id>")
>>> card["class_names"][student(images).argmax(dim=1)[0]]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from amalgam.fusion.config import first_line
from amalgam.fusion.detection import DETECTORS, create_detector
from amalgam.fusion.models import create_model

CARD = "student.json"
WEIGHTS = "student.safetensors"
PROGRAM = "student.pt2"
ONNX = "student.onnx"
EXPORTS = ("onnx",)  # what ``--export`` may add
MAX_BATCH = 4096  # the largest batch the exported program and ONNX model accept


class Student(nn.Module):
    """The student network behind the normalization it was trained with: (B, C, H, W) images
    in [0, 1] -> (B, K) logits."""

    def __init__(self, network: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))  # (1, C or 1, 1, 1)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.network((x - self.mean) / self.std)


def _network(card: dict) -> nn.Module:
    """A fresh network of the card's architecture."""
    build = create_detector if card["arch"] in DETECTORS else create_model
    return build(card["arch"], **card["kwargs"])


def write_student(
    run_dir: Path,
    network: nn.Module,
    card: dict,
    exports: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """Write ``network`` and its ``card`` into ``run_dir`` as the module docstring says;
    returns the card with ``files``: what was written. A classifier that ``torch.export``
    cannot trace is still delivered as safetensors; the log and the card say why not."""
    network = network.cpu().float().eval()  # delivered in float32 on the host
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(run_dir / WEIGHTS))
    files = {"weights": WEIGHTS}
    if card["arch"] not in DETECTORS:
        student = Student(network, **card["normalization"]).eval()
        example = torch.rand(2, *card["input_shape"])  # (2, C, H, W)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        try:
            program = torch.export.export(student, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(run_dir / PROGRAM))
            files["program"] = PROGRAM
            if "onnx" in exports:
                torch.onnx.export(student, (example,), str(run_dir / ONNX), dynamo=True,
                                  dynamic_shapes=({0: batch},), verbose=False)  # fmt: skip
                files["onnx"] = ONNX
        except Exception as error:  # tracing fails inside the network's own code
            files["not_exported"] = first_line(error)
            log(f"student: not exported as a program ({first_line(error)})")
    card = {**card, "files": files}
    (run_dir / CARD).write_text(json.dumps(card, indent=2))
    return card


def load_student(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """The student of a run folder, ready in eval mode, and its card.

    A classifier comes back as :class:`Student`: call it on (B, C, H, W) images in [0, 1]
    of the card's ``input_shape``; its (B, K) logits follow ``card["class_names"]``. A
    detector comes back as the network itself.

    Raises
    ------
    ValueError
        A folder without a student, or a card that does not describe its weights.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CARD).is_file() or not (run_dir / WEIGHTS).is_file():
        raise ValueError(f"{run_dir}: no student ({CARD} and {WEIGHTS}) in this folder")
    card = json.loads((run_dir / CARD).read_text())
    network = _network(card)
    try:
        network.load_state_dict(load_file(str(run_dir / WEIGHTS)))
    except RuntimeError as error:
        raise ValueError(f"{run_dir / WEIGHTS}: does not fit {card['arch']}: "
                         f"{first_line(error)}") from None  # fmt: skip
    if card["arch"] in DETECTORS:
        return network.eval(), card
    return Student(network, **card["normalization"]).eval(), card
