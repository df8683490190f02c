"""A party's configuration file (``amalgam party serve --config party.yaml``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from amalgam.fusion.device import DeviceName
from amalgam.protocol.loading import load_yaml
from amalgam.protocol.schemas import Normalization, Policy, Strict, TlsFiles
from amalgam.protocol.tls import resolve_tls


class ModelSource(Strict):
    """One of: a ``torch.export`` program, a TorchScript file, or an architecture by name
    (the registry's, torchvision's or timm's) with a state dict (:mod:`amalgam.party.model`)."""

    program: str | None = None  # path to a torch.export.save file (.pt2)
    torchscript: str | None = None  # path to a torch.jit.save file
    arch: str | None = None  # registry, torchvision (torchvision:<name>) or timm (timm:<name>)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # the architecture's keywords
    weights: str | None = None  # .safetensors, or a torch.save state dict (weights_only)

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSource:
        given = [self.program, self.torchscript, self.arch]
        if sum(value is not None for value in given) != 1:
            raise ValueError("give one of program, torchscript, or arch with weights")
        if self.arch is not None and self.weights is None:
            raise ValueError("arch needs weights (a state dict file)")
        return self


class PartyConfig(Strict):
    name: str = Field(min_length=1)
    address: str = "127.0.0.1:0"  # host:port to listen on; port 0 picks a free one
    model: ModelSource
    class_names: list[str] = Field(min_length=1)  # in the order of the model's outputs
    input_shape: tuple[int, int, int]  # (C, H, W)
    normalization: Normalization = Normalization()
    policy: Policy = Policy()  # deny by default
    audit_log: str = "audit.jsonl"  # relative to the config file's folder
    # the agent's secret key for the log's MACs and seal (made at first start); null: none
    audit_key: str | None = "audit.key"
    device: DeviceName = "auto"  # auto | cpu | cuda | cuda:N | mps: where the model runs
    max_message_mb: int = Field(64, ge=1)
    max_concurrent_rpcs: int = Field(16, ge=1)  # further calls are refused, not queued
    # freed memory the agent keeps for its next calls (glibc; 0: the C library's defaults)
    keep_freed_mb: int = Field(1024, ge=0, le=2047)
    # intra-op threads of the model thread; 0: torch's default, one per core. Agents that share
    # a machine each take their share of its cores
    torch_threads: int = Field(0, ge=0)
    # a Predict's forward pass runs in slices whose widest activation fits this many MiB of
    # cache (CPU only); 0: the whole request at once
    slice_mb: float = Field(4.0, ge=0)
    tls: TlsFiles | None = None  # mutual TLS; None needs `amalgam party serve --insecure`
    # identity -> "sha256:<hex digest of its bearer token>"; a caller must then present one
    tokens: dict[str, str] = Field(default_factory=dict)

    @field_validator("address")
    @classmethod
    def _explicit_port(cls, address: str) -> str:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(
                f"{address!r} is not host:port; give the port explicitly, e.g. 0.0.0.0:50051 "
                "(port 0 picks a free one)"
            )
        return address

    @model_validator(mode="after")
    def _unique_classes(self) -> PartyConfig:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        return self

    @model_validator(mode="after")
    def _identities_named(self) -> PartyConfig:
        if self.tls is not None and self.policy.callers is None:
            raise ValueError(
                "policy.callers: with tls, list the identities that may call and what each "
                "may use (deny by default)"
            )
        for identity, digest in self.tokens.items():
            algorithm, _, hex_digest = digest.partition(":")
            if algorithm != "sha256" or len(hex_digest) != 64:
                raise ValueError(f"tokens.{identity}: expected sha256:<64 hex digits>")
            try:
                bytes.fromhex(hex_digest)
            except ValueError:
                raise ValueError(f"tokens.{identity}: expected sha256:<64 hex digits>") from None
        return self


def load_party_config(path: str | Path, overrides: Sequence[str] = ()) -> PartyConfig:
    """Validate ``path`` with ``overrides`` (``key.path=value``, see
    :func:`amalgam.protocol.loading.apply_overrides`); relative file paths inside it are taken
    from the file's folder."""
    config = load_yaml(path, PartyConfig, overrides)
    base = Path(path).resolve().parent

    def resolve(p: str | None) -> str | None:
        return None if p is None else str(base / p)

    model = config.model.model_copy(
        update={
            "program": resolve(config.model.program),
            "torchscript": resolve(config.model.torchscript),
            "weights": resolve(config.model.weights),
        }
    )
    update = {
        "model": model,
        "audit_log": resolve(config.audit_log),
        "audit_key": resolve(config.audit_key),
    }
    if config.tls is not None:
        update["tls"] = resolve_tls(config.tls, Path(path))
    return config.model_copy(update=update)
