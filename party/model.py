"""Load the owner's private model: TorchScript, or a registered architecture plus a state dict."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from amalgam.fusion.detection.models import DETECTORS, create_detector
from amalgam.fusion.models import create_model
from amalgam.party.config import ModelSource


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or from ``torch.save`` (loaded with weights_only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(source: ModelSource) -> nn.Module:
    """The model in eval mode with gradients off."""
    if source.torchscript is not None:
        model = torch.jit.load(source.torchscript, map_location="cpu")
    else:
        build = create_detector if source.arch in DETECTORS else create_model
        model = build(source.arch, **source.kwargs)
        model.load_state_dict(load_state_dict(source.weights))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
