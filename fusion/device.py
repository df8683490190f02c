"""Where a run computes and in which precision it trains.

A job's (and a party's) ``device`` is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``;
``auto`` takes the accelerator when one is present. ``precision`` is ``fp32``, or ``bf16`` /
``fp16`` autocast for training loops (``fp16`` with a gradient scaler on CUDA). Data sets
stay on the host; what a loop trains on is copied to the device once (from pinned memory,
without blocking), and answers come back to the host.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

import torch
from pydantic import AfterValidator
from torch import Tensor, nn

Precision = Literal["fp32", "bf16", "fp16"]
HALF_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
M = TypeVar("M", bound=nn.Module)


def _device_name(name: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise ValueError(f"{name!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return name


DeviceName = Annotated[str, AfterValidator(_device_name)]  # what a configuration may say


def resolve_device(name: str) -> torch.device:
    """The device ``name`` stands for; one that this machine does not have raises
    ``ValueError`` saying so (``auto``: CUDA, else MPS, else the CPU)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name} is not present: this machine has no CUDA device")
        if (device.index or 0) >= count:
            raise ValueError(f"{name} is not present: this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} is not present: this machine has no MPS device")
    return device


def to_model(model: nn.Module, x: Tensor) -> Tensor:
    """Inputs ``x`` on the device and in the floating type of ``model``'s parameters."""
    parameter = next(model.parameters(), None)
    return x if parameter is None else x.to(device=parameter.device, dtype=parameter.dtype)


def to_host(x: Tensor) -> Tensor:
    """What leaves the device for a party or a file: float32 on the host, detached."""
    return x.detach().float().cpu()


@dataclass(frozen=True)
class Hardware:
    """Attributes
    ----------
    device : where models and the batches they train on live.
    precision : ``fp32``, or the half type that training loops autocast to.
    """

    device: torch.device = torch.device("cpu")
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("precision: fp16 autocast needs a GPU; use bf16 on the CPU")

    def place(self, model: M) -> M:
        """``model`` on the device."""
        return model.to(self.device)

    def put(self, tensor: Tensor) -> Tensor:
        """``tensor`` on the device: through pinned memory and without blocking from the
        host to a CUDA device."""
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for a forward pass and its loss (nothing at ``fp32``)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=HALF_TYPES[self.precision])

    def scaler(self) -> torch.amp.GradScaler:
        """The gradient scaler that ``fp16`` needs (a pass-through otherwise)."""
        enabled = self.precision == "fp16"
        return torch.amp.GradScaler(self.device.type, enabled=enabled)
