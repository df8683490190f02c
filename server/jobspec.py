"""A fusion job as a user writes it (``amalgam fuse job.yaml``): the parties, the method and
its parameters, the student, the coordinator's data. Every method's section comes from the
method table, so a job accepts exactly the methods the coordinator runs."""

from __future__ import annotations

import re
from typing import Annotated, Union

from pydantic import Field, field_validator, model_validator

from amalgam.fusion.device import DeviceName, Precision
from amalgam.fusion.train import StudentConfig
from amalgam.protocol.schemas import Strict, TlsFiles
from amalgam.server.methods import METHODS


class PartyRef(Strict):
    name: str = Field(min_length=1)
    address: str  # host:port
    token_env: str | None = None  # environment variable holding a bearer token for it

    @field_validator("address")
    @classmethod
    def _host_port(cls, address: str) -> str:
        if not re.fullmatch(r"[^\s:]+:\d{1,5}", address):
            raise ValueError(f"{address!r} is not host:port, e.g. org1.example.com:50051")
        return address


class DataSpec(Strict):
    """Where the coordinator's own data comes from: a source name or an ``.npz`` path."""

    # e.g. digits:public, mnist:train; composition needs it. Detection parties: canvases of
    # digits, e.g. canvases:digits:public (amalgam.fusion.detection.load_canvases)
    unlabeled: str | None = None
    test: str  # labelled, e.g. digits:test
    finetune: str | None = None  # labelled, for fine-tuning a fused network


# ``method:`` is one of the table's sections, told apart by its ``name``
MethodSection = Annotated[
    Union[tuple(method.section() for method in METHODS.values())],  # noqa: UP007
    Field(discriminator="name"),
]


class JobSpec(Strict):
    name: str = Field(min_length=1)  # letters, digits, '_', '.', '-': it names run folders
    seed: int = 0
    parties: list[PartyRef] = Field(min_length=1)
    method: MethodSection
    student: StudentConfig = StudentConfig()
    data: DataSpec
    output_dir: str = "runs"
    deadline_s: float = Field(30.0, gt=0)  # per gRPC call
    tls: TlsFiles | None = None  # mutual TLS with every party; None needs --insecure
    min_parties: int | None = Field(None, ge=1)  # parties a job may drop to; None: all
    baselines: bool = True  # also train vanilla distillation and the supervised bound
    device: DeviceName = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Precision = "fp32"  # bf16 / fp16: autocast in the student's training loops

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{name!r}: use only letters, digits, '_', '.' and '-' (it names "
                             "the run folders)")  # fmt: skip
        return name

    @field_validator("parties")
    @classmethod
    def _unique_names(cls, parties: list[PartyRef]) -> list[PartyRef]:
        names = [p.name for p in parties]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"party names must be unique, repeated: {', '.join(duplicates)}")
        return parties

    @model_validator(mode="after")
    def _enough_parties(self) -> JobSpec:
        if self.min_parties is not None and self.min_parties > len(self.parties):
            raise ValueError(
                f"min_parties: {self.min_parties} exceeds the {len(self.parties)} parties listed"
            )
        return self
