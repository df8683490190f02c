"""Builders shared by the contract, integration and CLI tests: tiny teachers behind real
handlers (served on loopback port 0 with :func:`amalgam.server.simulation.parties.serving`)."""

from __future__ import annotations

from pathlib import Path

import torch

from amalgam.fusion.models import create_model
from amalgam.party.handler import PartyHandler
from amalgam.protocol.schemas import Policy, PredictPolicy
from amalgam.server.simulation.parties import local_party

CLASSES = ["cat", "dog", "eel"]
INPUT_SHAPE = (1, 8, 8)


def tiny_handler(
    folder: Path,
    policy: Policy | None = None,
    name: str = "acme",
    classes: list[str] | None = None,
    model: torch.nn.Module | None = None,
) -> PartyHandler:
    """A handler over a seeded MLP; the policy grants probs by default."""
    classes = classes or CLASSES
    if model is None:
        torch.manual_seed(0)
        model = create_model("mlp", in_shape=INPUT_SHAPE, num_classes=len(classes), hidden=16)
    policy = policy or Policy(predict=PredictPolicy(output="probs"), max_batch=16)
    return local_party(name, model, classes, INPUT_SHAPE, policy, folder)
