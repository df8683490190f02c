"""Pydantic schemas of what crosses between the coordinator and a party: what a party
advertises (:class:`PartyInfo`), the owner's policy, and the TLS files both sides name.

Every YAML file a user writes is validated into a strict model (unknown keys are errors, so a
typo never silently falls back to a default); a job's schema is the coordinator's own
(:mod:`amalgam.server.jobspec`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

OutputForm = Literal["logits", "probs", "topk", "label"]
CAPABILITIES = ("predict", "bn_feedback", "synthesize", "activations", "gram", "weights")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalization(Strict):
    """Per-channel ``(x - mean) / std`` that the party applies to the inputs it receives."""

    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])

    @model_validator(mode="after")
    def _same_length(self) -> Normalization:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std need one value per channel each")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class FeatureLayer(Strict):
    """A released layer that ends a unit of the model's graph, and its output's shape."""

    name: str = Field(min_length=1)
    shape: tuple[int, ...]


class PartyInfo(Strict):
    """What a party advertises: its classes, input spec and what its policy grants."""

    name: str = Field(min_length=1)
    class_names: list[str] = Field(min_length=1)
    input_shape: tuple[int, ...]
    normalization: Normalization = Normalization()
    capabilities: list[str] = Field(default_factory=list)
    output_form: OutputForm | Literal["detections", ""] = ""
    max_batch: int = 0
    batchnorm_layers: int = 0
    layers: list[str] = Field(default_factory=list)  # released by Activations / Gram
    task: Literal["classification", "detection"] = "classification"
    feature_layers: list[FeatureLayer] = Field(default_factory=list)  # where units end


# --- the owner's policy -------------------------------------------------------------------


class PredictPolicy(Strict):
    """How predictions are released."""

    output: OutputForm = "probs"  # logits | probs | topk (probs, zero outside the top k) | label
    temperature: float = Field(1.0, gt=0)  # softmax temperature before probs/topk
    top_k: int = Field(1, ge=1)  # with output: topk
    round_decimals: int | None = Field(None, ge=0, le=8)  # round released values
    # detection parties: the boxes released per image
    score_threshold: float = Field(0.05, ge=0, le=1)  # none below this confidence
    max_detections: int = Field(20, ge=1)  # the most confident ones, at most this many


class BnFeedbackPolicy(Strict):
    """BatchNorm feedback for generator training: logits, the BN loss and an input gradient."""

    cost: int = Field(4, ge=1)  # budget charged per sample, in predictions
    allow_half: bool = True  # may answer with float16 tensors when asked


class SynthesizePolicy(Strict):
    """Party-side synthesis: the party trains a generator against its own teacher and releases
    generated images only."""

    cost: int = Field(1, ge=1)  # budget charged per teacher evaluation (steps x batch)
    max_steps: int = Field(2000, ge=1)  # generator steps in one call
    max_samples: int = Field(4096, ge=1)  # images returned by one call


class LayersPolicy(Strict):
    """Outputs of named layers on the caller's inputs (Activations), or only their centered
    Gram matrices (Gram: enough for CKA, the activations stay home)."""

    layers: list[str] = Field(min_length=1)  # module names of the model; ["*"]: every module
    cost: int = Field(1, ge=1)  # budget charged per sample, in predictions
    allow_half: bool = True  # may answer with float16 tensors when asked


class WeightsPolicy(Strict):
    """Opt-in export of the model: architecture and safetensors weights, streamed in chunks."""

    chunk_bytes: int = Field(1 << 20, ge=1024, le=32 << 20)  # bytes per streamed message


class RateLimit(Strict):
    """A token bucket per caller, in the units of the sample budget (``cost`` per sample)."""

    samples_per_s: float = Field(gt=0)  # refill rate
    burst: int = Field(ge=1)  # bucket size: the most one caller may spend at once


class Policy(Strict):
    """The owner's rules. Deny by default: a capability is granted only when it is written
    here, and, where ``callers`` is written, only to the identities it lists."""

    predict: PredictPolicy | None = None  # None: Predict is denied
    bn_feedback: BnFeedbackPolicy | None = None  # None: BatchNormFeedback is denied
    synthesize: SynthesizePolicy | None = None  # None: Synthesize is denied
    activations: LayersPolicy | None = None  # None: Activations is denied
    gram: LayersPolicy | None = None  # None: Gram is denied
    weights: WeightsPolicy | None = None  # None: ExportWeights is denied
    max_batch: int = Field(256, ge=1)  # samples in one request
    sample_budget: int | None = Field(100_000, ge=0)  # samples per caller; None: unlimited
    rate_limit: RateLimit | None = None  # None: no rate limit
    # identity (certificate common name) -> the granted capabilities it may use; None: every
    # caller may use every granted capability (only allowed without TLS)
    callers: dict[str, list[str]] | None = None

    @property
    def capabilities(self) -> list[str]:
        return [name for name in CAPABILITIES if getattr(self, name) is not None]

    @model_validator(mode="after")
    def _callers_use_granted_capabilities(self) -> Policy:
        for identity, capabilities in (self.callers or {}).items():
            for capability in capabilities:
                if capability not in CAPABILITIES:
                    raise ValueError(
                        f"callers.{identity}: unknown capability {capability!r} "
                        f"(known: {', '.join(CAPABILITIES)})"
                    )
                if getattr(self, capability) is None:
                    raise ValueError(
                        f"callers.{identity}: {capability} is not granted (add a "
                        f"{capability}: section to grant it)"
                    )
        return self

    def allows(self, caller: str, capability: str | None) -> bool:
        """Whether ``caller`` may use ``capability`` (``None``: Describe, for any listed
        caller); the capability must also be granted."""
        if capability is not None and getattr(self, capability) is None:
            return False
        if self.callers is None:
            return True
        return caller in self.callers and (capability is None or capability in self.callers[caller])


class TlsFiles(Strict):
    """PEM files for mutual TLS (``amalgam certs`` makes them); paths are relative to the
    YAML file that names them."""

    cert: str  # this side's certificate: its subject common name is its identity
    key: str  # its private key
    ca: str  # the federation CA that signed every peer's certificate
