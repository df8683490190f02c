"""Parties on this machine: a party agent's handler over an in-memory model, and serving it on
loopback. The market, the benchmarks and the tests build every local party here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from torch import nn

from amalgam.party.audit import AuditLog
from amalgam.party.handler import PartyHandler
from amalgam.party.service import create_server
from amalgam.party.slicing import SLICE_BYTES
from amalgam.protocol.schemas import Normalization, Policy


def local_party(
    name: str,
    model: nn.Module,
    classes: Sequence[str],
    input_shape: tuple[int, ...],
    policy: Policy,
    folder: str | Path,
    normalization: Normalization | None = None,
    slice_bytes: int = SLICE_BYTES,
) -> PartyHandler:
    """The agent of party ``name``: ``model`` (predicting ``classes`` from ``input_shape``
    images) behind ``policy``, its audit log ``<folder>/<name>-audit.jsonl``; forward passes
    in slices of ``slice_bytes`` (:mod:`amalgam.party.slicing`)."""
    audit = AuditLog(Path(folder) / f"{name}-audit.jsonl")
    return PartyHandler(name, model, list(classes), tuple(input_shape), policy, audit,
                        normalization, slice_bytes=slice_bytes)  # fmt: skip


@contextlib.contextmanager
def serving(
    handler: PartyHandler,
    credentials: grpc.ServerCredentials | None = None,
    max_workers: int = 4,
) -> Iterator[str]:
    """Serve ``handler`` over gRPC on 127.0.0.1, port 0 (mutual TLS with ``credentials``);
    yields ``host:port`` and stops the server on exit."""
    server = create_server(handler, "127.0.0.1:0", max_workers=max_workers, credentials=credentials)
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(None)
