"""Builders shared by the contract, integration and CLI tests: tiny teachers behind real
handlers, and real gRPC party servers on loopback port 0."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from amalgam.fusion.models import create_model
from amalgam.party.audit import AuditLog
from amalgam.party.handler import PartyHandler
from amalgam.party.service import create_server
from amalgam.protocol.schemas import Policy, PredictPolicy

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
    return PartyHandler(
        name, model, classes, INPUT_SHAPE, policy, AuditLog(folder / f"{name}-audit.jsonl")
    )


@contextlib.contextmanager
def serving(handler: PartyHandler) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1 port 0; yields ``host:port``."""
    server = create_server(handler, "127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(None)
