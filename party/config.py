"""A party's configuration file (``amalgam party serve --config party.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from protocol.loading import load_yaml
from protocol.schemas import Normalization, Policy, _Strict


class ModelSource(_Strict):
    """Either a TorchScript file, or a registered architecture plus a state dict."""

    torchscript: str | None = None  # path to a torch.jit.save file
    arch: str | None = None  # a name from fusion.models.list_models()
    kwargs: dict[str, Any] = Field(default_factory=dict)  # the architecture's keywords
    weights: str | None = None  # .safetensors, or a torch.save state dict (weights_only)

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSource:
        if (self.torchscript is None) == (self.arch is None):
            raise ValueError("give either torchscript, or arch with weights")
        if self.arch is not None and self.weights is None:
            raise ValueError("arch needs weights (a state dict file)")
        return self


class PartyConfig(_Strict):
    name: str = Field(min_length=1)
    address: str = "127.0.0.1:0"  # host:port to listen on; port 0 picks a free one
    model: ModelSource
    class_names: list[str] = Field(min_length=1)  # in the order of the model's outputs
    input_shape: tuple[int, int, int]  # (C, H, W)
    normalization: Normalization = Normalization()
    policy: Policy = Policy()  # deny by default
    audit_log: str = "audit.jsonl"  # relative to the config file's folder
    max_message_mb: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _unique_classes(self) -> PartyConfig:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        return self


def load_party_config(path: str | Path) -> PartyConfig:
    """Validate ``path``; relative file paths inside it are taken from the file's folder."""
    config = load_yaml(path, PartyConfig)
    base = Path(path).resolve().parent

    def resolve(p: str | None) -> str | None:
        return None if p is None else str(base / p)

    model = config.model.model_copy(
        update={
            "torchscript": resolve(config.model.torchscript),
            "weights": resolve(config.model.weights),
        }
    )
    return config.model_copy(update={"model": model, "audit_log": resolve(config.audit_log)})
