"""Pydantic schemas shared by the coordinator and the party agent.

Every YAML file a user writes (a party's config, a job) is validated into one of these models;
unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OutputForm = Literal["logits", "probs", "topk", "label"]
CAPABILITIES = ("predict", "bn_feedback", "synthesize", "activations", "gram", "weights")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalization(_Strict):
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


class PartyInfo(_Strict):
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


# --- the owner's policy -------------------------------------------------------------------


class PredictPolicy(_Strict):
    """How predictions are released."""

    output: OutputForm = "probs"  # logits | probs | topk (probs, zero outside the top k) | label
    temperature: float = Field(1.0, gt=0)  # softmax temperature before probs/topk
    top_k: int = Field(1, ge=1)  # with output: topk
    round_decimals: int | None = Field(None, ge=0, le=8)  # round released values
    # detection parties: the boxes released per image
    score_threshold: float = Field(0.05, ge=0, le=1)  # none below this confidence
    max_detections: int = Field(20, ge=1)  # the most confident ones, at most this many


class BnFeedbackPolicy(_Strict):
    """BatchNorm feedback for generator training: logits, the BN loss and an input gradient."""

    cost: int = Field(4, ge=1)  # budget charged per sample, in predictions
    allow_half: bool = True  # may answer with float16 tensors when asked


class SynthesizePolicy(_Strict):
    """Party-side synthesis: the party trains a generator against its own teacher and releases
    generated images only."""

    cost: int = Field(1, ge=1)  # budget charged per teacher evaluation (steps x batch)
    max_steps: int = Field(2000, ge=1)  # generator steps in one call
    max_samples: int = Field(4096, ge=1)  # images returned by one call


class LayersPolicy(_Strict):
    """Outputs of named layers on the caller's inputs (Activations), or only their centered
    Gram matrices (Gram: enough for CKA, the activations stay home)."""

    layers: list[str] = Field(min_length=1)  # module names of the model; ["*"]: every module
    cost: int = Field(1, ge=1)  # budget charged per sample, in predictions
    allow_half: bool = True  # may answer with float16 tensors when asked


class WeightsPolicy(_Strict):
    """Opt-in export of the model: architecture and safetensors weights, streamed in chunks."""

    chunk_bytes: int = Field(1 << 20, ge=1024, le=32 << 20)  # bytes per streamed message


class RateLimit(_Strict):
    """A token bucket per caller, in the units of the sample budget (``cost`` per sample)."""

    samples_per_s: float = Field(gt=0)  # refill rate
    burst: int = Field(ge=1)  # bucket size: the most one caller may spend at once


class Policy(_Strict):
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


class TlsFiles(_Strict):
    """PEM files for mutual TLS (``amalgam certs`` makes them); paths are relative to the
    YAML file that names them."""

    cert: str  # this side's certificate: its subject common name is its identity
    key: str  # its private key
    ca: str  # the federation CA that signed every peer's certificate


# --- jobs ---------------------------------------------------------------------------------


class PartyRef(_Strict):
    name: str = Field(min_length=1)
    address: str = Field(pattern=r"^[^\s:]+:\d{1,5}$")  # host:port
    token_env: str | None = None  # environment variable holding a bearer token for it


class CompositionParams(_Strict):
    """Model composition by pseudo-labels (paper 000, Algorithm 1)."""

    rule: str = "restricted-fit"  # aggregation rule, see fusion.composition.RULES
    entropy_threshold: float = Field(0.5, gt=0, le=1)  # normalized entropy tau, paper 3.1
    targets: Literal["hard", "soft"] = "soft"  # train on labels or on the aggregated distribution
    finetune_fraction: float = Field(0.0, ge=0, lt=1)  # labelled fraction for fine-tuning
    finetune_epochs: int = Field(5, ge=1)
    # detection parties (paper 000, Algorithm 2): the vote per object, then Soft-NMS
    detection_rule: Literal["unanimous", "consensus", "affirmative"] = "consensus"
    iou_threshold: float = Field(0.5, gt=0, lt=1)  # same category and IoU above: one object
    score_threshold: float = Field(0.5, ge=0, le=1)  # confidence filter before the vote
    soft_nms_sigma: float = Field(0.5, gt=0)


class CompositionMethod(_Strict):
    name: Literal["composition"]
    params: CompositionParams = CompositionParams()


class DataFreeParams(_Strict):
    """Data-free fusion with generator assistants (paper 003, Algorithm 1) or a baseline."""

    variant: str = "dfmf"  # dfmf | dfq | dfq_no_adv | dafl | zskt (fusion.datafree.VARIANTS)
    warmup: int = Field(200, ge=0)  # generator warm-up steps, fidelity loss only
    iterations: int = Field(1000, ge=1)  # main-loop iterations
    student_steps: int = Field(10, ge=1)  # M_S: student updates per iteration
    batch_size: int = Field(128, ge=2)  # B: samples per generator step
    latent_dim: int = Field(100, ge=1)
    generator_width: int = Field(32, ge=1)
    alpha: float = Field(0.1, ge=0)  # weight of the fidelity loss in Eq. 6
    temperature: float = Field(3.0, gt=0)  # tau of the KD and adversarial divergences
    lr_generator: float = Field(1e-3, gt=0)
    lr_student: float = Field(0.05, gt=0)  # SGD, Nesterov, cosine (student and assistants)
    augment_shift: int = Field(2, ge=0)  # random translation of generated images, pixels
    half: bool = False  # float16 tensors on the wire
    mode: Literal["coordinator", "party"] = "coordinator"  # where the generators train
    rounds: int = Field(20, ge=1)  # party mode: Synthesize + Predict round trips per party


class DataFreeMethod(_Strict):
    name: Literal["datafree"]
    params: DataFreeParams = DataFreeParams()


class WeightFusionParams(_Strict):
    """Weight fusion (paper 002): ``ot`` fuses equally deep networks layer by layer;
    ``clafusion`` first aligns and balances networks of different depths."""

    ground_metric: Literal["weight", "activation"] = "activation"  # how neurons are compared
    plan: Literal["emd", "sinkhorn"] = "emd"  # exact OT, or entropic with `reg`
    reg: float = Field(0.05, gt=0)
    weights: list[float] | None = None  # per party, in the order of `parties`; None: equal
    base: str | None = None  # party whose network the others align to; None: the first
    # party (ot), the shallowest network (clafusion)
    mode: Literal["many_to_one", "iterative"] = "many_to_one"
    balance: Literal["add", "merge"] = "add"  # clafusion: identity layers, or merge (MLPs)
    sign: Literal["sum", "vote", "average"] = "sum"  # merge: which neurons fire
    probe_size: int = Field(200, ge=2)  # images of data.unlabeled for CKA / activations
    recompute_batchnorm: bool = True  # BN statistics re-estimated on data.unlabeled
    finetune_epochs: int = Field(0, ge=0)  # on data.finetune, with the student's optimiser


class WeightFusionMethod(_Strict):
    name: Literal["ot", "clafusion"]
    params: WeightFusionParams = WeightFusionParams()


class TransferTask(_Strict):
    """A downstream task for judging a representation: labelled sources the coordinator owns."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    train: str  # the linear probe's training images (k per class are drawn)
    test: str  # every image is scored
    classes: list[str] | None = None  # only these classes of both sources; None: all
    related: bool | None = None  # to a teacher's task (shown in the report); None: unknown


class ConsolidationParams(_Strict):
    """Representation consolidation (paper 001): the generalist and the task-specific
    teachers distilled into one multi-head student on data.unlabeled (the proxy)."""

    generalist: str  # the party whose network is the generalist: it must grant weights
    generalist_weight: float = Field(1.0, ge=0)  # lambda_0 of Eq. 1; 0: plain distillation
    teacher_weights: list[float] | None = None  # lambda_i per other party in order; None: 1/N
    temperature: float = Field(2.0, gt=0)  # T of the KD loss
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=2)
    backbone_lr: float = Field(1e-3, gt=0)  # SGD, momentum 0.9, decay x0.1 at 50% and 80%
    head_lr: float = Field(1e-2, gt=0)
    freeze_batchnorm: bool = True  # keep the generalist's BatchNorm statistics
    shots: int = Field(5, ge=1)  # few-shot linear probe: images per class
    draws: int = Field(20, ge=1)  # random few-shot training sets, averaged
    full_probe: bool = False  # also a linear probe on every training image of each task
    tasks: list[TransferTask] = Field(min_length=1)


class ConsolidationMethod(_Strict):
    name: Literal["consolidate"]
    params: ConsolidationParams


class AmalgamationParams(_Strict):
    """Knowledge amalgamation (paper 004, Algorithm 1): the teachers' features amalgamated
    layer by layer into a ``vgg_cnn`` student, then joint learning on their score vectors
    (the student's ``epochs``, ``batch_size``, ``lr`` and ``weight_decay``)."""

    scheme: Literal["dfa", "ifa"] = "dfa"  # all teachers' features at once, or two at a time
    # per_teacher: each teacher's softmax, concatenated and divided by N; concat: one softmax
    # over the concatenated logits; logits: the squared error of Eq. 5 on the logits
    score_target: Literal["per_teacher", "concat", "logits"] = "per_teacher"
    temperature: float = Field(2.0, gt=0)  # T of the softmax targets
    width_scale: float = Field(0.9, gt=0)  # student width: scale * sqrt(sum of C_i^2)
    feature_samples: int = Field(2000, ge=2)  # images of data.unlabeled whose features move
    autoencoder_epochs: int = Field(5, ge=0)  # after the PCA start (the optimum of a linear AE)
    layer_epochs: int = Field(20, ge=1)  # of each layer-wise step
    half: bool = True  # float16 features on the wire


class AmalgamationMethod(_Strict):
    name: Literal["amalgamate"]
    params: AmalgamationParams = AmalgamationParams()


class StudentSpec(_Strict):
    """The student; data-free fusion uses ``arch`` and its own schedule (method params)."""

    arch: str = "small_cnn"  # a name from fusion.models.list_models()
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)


class DataSpec(_Strict):
    """Where the coordinator's own data comes from: a source name or an ``.npz`` path."""

    # e.g. digits:public, mnist:train; composition needs it. Detection parties: canvases of
    # digits, e.g. canvases:digits:public (fusion.detection.canvas.load_canvases)
    unlabeled: str | None = None
    test: str  # labelled, e.g. digits:test
    finetune: str | None = None  # labelled, for fine-tuning a fused network


class JobSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    parties: list[PartyRef] = Field(min_length=1)
    method: (
        CompositionMethod
        | DataFreeMethod
        | WeightFusionMethod
        | ConsolidationMethod
        | AmalgamationMethod
    ) = Field(discriminator="name")
    student: StudentSpec = StudentSpec()
    data: DataSpec
    output_dir: str = "runs"
    deadline_s: float = Field(30.0, gt=0)  # per gRPC call
    tls: TlsFiles | None = None  # mutual TLS with every party; None needs --insecure
    min_parties: int | None = Field(None, ge=1)  # parties a job may drop to; None: all
    baselines: bool = True  # also train vanilla distillation and the supervised bound

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
