"""The one seam between the algorithms and the parties: the :class:`Teacher` protocol and
everything that crosses it -- what a teacher is (:class:`TeacherInfo`), what it returns
(:class:`Feedback`, :class:`Synthesis`, :class:`Weights`, :class:`Detections`), what generator
training asks of it (:class:`GeneratorObjective`) -- and how the coordinator calls many
teachers (:data:`TeacherMap`, :func:`predict_all`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load as safetensors_load
from torch import Tensor

from amalgam.fusion.data import fit_to_shape
from amalgam.fusion.models import Classifier, create_model
from amalgam.fusion.progress import progress_bar


@dataclass(frozen=True)
class TeacherInfo:
    """What the coordinator knows of a teacher.

    Attributes
    ----------
    name : the party's name.
    class_names : the classes the teacher predicts, in the order of its output columns.
    input_shape : ``(C, H, W)`` of one sample.
    output_form : how predictions are released: logits | probs | topk | label.
    capabilities : what the owner's policy grants, e.g. ``("predict", "bn_feedback")``.
    max_batch : the largest batch one call may carry (0: no limit known).
    batchnorm_layers : BatchNorm layers with running statistics in the teacher.
    layers : layers whose activations or Gram matrices the policy releases.
    mean, std : per-channel normalisation the party applies before its model; exported
        weights expect inputs normalised so.
    task : classification | detection (Predict answers with boxes).
    feature_layers : ``(name, shape)`` of the released layers that end a unit of the model's
        graph, in forward order (:mod:`amalgam.fusion.amalgamation.points`).
    """

    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    output_form: str
    capabilities: tuple[str, ...] = ("predict",)
    max_batch: int = 0
    batchnorm_layers: int = 0
    layers: tuple[str, ...] = ()
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    task: str = "classification"
    feature_layers: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @classmethod
    def from_dict(cls, data: dict) -> TeacherInfo:
        """Build from a mapping such as a dumped ``PartyInfo``; unknown keys are ignored."""
        return cls(
            name=data["name"],
            class_names=tuple(data["class_names"]),
            input_shape=tuple(data["input_shape"]),
            output_form=data.get("output_form", ""),
            capabilities=tuple(data.get("capabilities", ())),
            max_batch=int(data.get("max_batch", 0)),
            batchnorm_layers=int(data.get("batchnorm_layers", 0)),
            layers=tuple(data.get("layers", ())),
            mean=tuple(data.get("normalization", {}).get("mean", (0.0,))),
            std=tuple(data.get("normalization", {}).get("std", (1.0,))),
            task=data.get("task", "classification"),
            feature_layers=tuple(
                (f["name"], tuple(f["shape"])) for f in data.get("feature_layers", ())
            ),
        )


@dataclass(frozen=True)
class GeneratorObjective:
    """Weights of the teacher-side generator loss (paper 003, Eq. 3, 5, 6), evaluated where
    the teacher lives (:func:`amalgam.fusion.datafree.losses.teacher_side_loss`).

    ``total = bn * L_BN + instance_entropy * E[H(T(x))] - batch_entropy * H(E[T(x)])
    - adversarial * KL(T(x) || A(x))`` at ``temperature`` for the KL term.
    """

    bn: float = 1.0
    instance_entropy: float = 0.0
    batch_entropy: float = 0.0
    adversarial: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


@dataclass(frozen=True)
class Feedback:
    """What a party returns for generator training (paper 003, Eq. 3-6).

    Attributes
    ----------
    logits : (B, K) the teacher's logits on the batch.
    losses : the teacher-side loss terms (``bn``, ``instance_entropy``, ``batch_entropy``,
        ``adversarial`` as asked) and their weighted ``total``.
    input_grad : (B, C, H, W) gradient of ``total + <grad_logits, logits>`` with respect to
        the inputs.
    """

    logits: Tensor
    losses: dict[str, float]
    input_grad: Tensor


@dataclass(frozen=True)
class Synthesis:
    """Images a party generated with its own generator (party-side synthesis mode).

    Attributes
    ----------
    samples : (N, C, H, W) images in [0, 1].
    losses : mean of each generator loss term over the steps of the call.
    steps_done : generator steps of the session so far.
    """

    samples: Tensor
    losses: dict[str, float]
    steps_done: int


@dataclass(frozen=True)
class Weights:
    """A party's model as it exported it (opt-in).

    Attributes
    ----------
    architecture : ``{"name": <registered model>, "kwargs": {...}}``.
    state_dict : the parameters and buffers.
    """

    architecture: dict
    state_dict: dict[str, Tensor]

    @classmethod
    def from_safetensors(cls, architecture: dict, payload: bytes) -> Weights:
        return cls(dict(architecture), safetensors_load(payload))

    def build(self) -> Classifier:
        """The model in eval mode; an unknown architecture raises ``ValueError``."""
        model = create_model(self.architecture["name"], **self.architecture.get("kwargs", {}))
        model.load_state_dict(self.state_dict)
        return model.eval()


@dataclass
class Detections:
    """Boxes of one image, as a detection party releases them (or as ground truth).

    Attributes
    ----------
    boxes : (M, 4) float32 ``x1, y1, x2, y2`` in pixels.
    labels : (M,) int64 category indices.
    scores : (M,) float32 confidences (1 for ground truth).
    """

    boxes: Tensor
    labels: Tensor
    scores: Tensor

    @classmethod
    def empty(cls) -> Detections:
        return cls(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def select(self, keep: Tensor) -> Detections:
        return Detections(self.boxes[keep], self.labels[keep], self.scores[keep])

    @staticmethod
    def split(boxes: Tensor, scores: Tensor, labels: Tensor, counts: Tensor) -> list[Detections]:
        """Per-image detections from a batch's rows, image i owning the next ``counts[i]``
        (the wire layout of ``Predict`` for detection parties)."""
        sizes = counts.tolist()
        return [
            Detections(b, l_, s)
            for b, s, l_ in zip(boxes.split(sizes), scores.split(sizes), labels.split(sizes))
        ]


class Normaliser:
    """Inputs in [0, 1] -> what a party's exported network expects: fitted to its input shape
    and normalised per channel as the party does before its model."""

    def __init__(self, info: TeacherInfo) -> None:
        self.shape = tuple(info.input_shape)
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (fit_to_shape(x, self.shape) - self.mean) / self.std


@runtime_checkable
class Teacher(Protocol):
    """A private model behind its owner's policy."""

    info: TeacherInfo

    def predict(self, x: Tensor) -> Tensor:
        """Predictions on ``x`` of shape ``(B, C, H, W)`` in the form ``info.output_form``:
        ``(B, K)`` logits or probabilities (topk: zeros outside the top k), or ``(B,)`` labels."""
        ...

    def bn_feedback(
        self,
        x: Tensor,
        objective: GeneratorObjective,
        adversary_logits: Tensor | None = None,
        grad_logits: Tensor | None = None,
    ) -> Feedback:
        """The teacher-side generator loss on ``x`` (B, C, H, W) and its input gradient in one
        pass where the teacher lives."""
        ...

    def synthesize(self, params: dict, session: str, steps: int, samples: int) -> Synthesis:
        """Advance the party's own generator ``session`` by ``steps`` steps with the data-free
        hyper-parameters ``params``, then return ``samples`` generated images."""
        ...

    def activations(self, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
        """Outputs ``{layer: (t, ...)}`` of the named layers on ``x`` of shape (t, C, H, W)."""
        ...

    def gram(self, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
        """Centered Gram matrices ``{layer: (t, t)}`` of the named layers' outputs on ``x``."""
        ...

    def weights(self) -> Weights:
        """The architecture and state dict, where the owner opted in."""
        ...


class DetectorTeacher(Protocol):
    """A party whose model detects: ``detect`` returns, per image, boxes whose labels index
    ``info.class_names``."""

    info: TeacherInfo

    def detect(self, x: Tensor) -> list[Detections]: ...


# ``map_teachers(fn, teachers)``: ``[fn(t) for t in teachers]``, where the coordinator may run
# the calls in parallel and answer ``None`` for a teacher that dropped out of the job (its
# party became unreachable).
TeacherMap = Callable[[Callable[[Teacher], object], Sequence[Teacher]], list]


def sequential_map(fn: Callable[[Teacher], object], teachers: Sequence[Teacher]) -> list:
    """The plain :data:`TeacherMap`: one teacher after the other, in this process."""
    return [fn(t) for t in teachers]


PREDICT_CHUNK = 8192  # images per progress step (over Flower, per message) collecting predictions


def predict_all(teacher: Teacher, x: Tensor, position: int = 0, progress: bool = True) -> Tensor:
    """``teacher.predict`` on all of ``x`` (fitted to its input shape), with a progress bar
    (``position``: its line, when several teachers answer at once)."""
    x = fit_to_shape(x, teacher.info.input_shape)
    outputs = []
    with progress_bar(
        len(x), f"predict {teacher.info.name}", unit="img", position=position, show=progress
    ) as bar:
        for start in range(0, len(x), PREDICT_CHUNK):
            outputs.append(teacher.predict(x[start : start + PREDICT_CHUNK]))
            bar.update(len(outputs[-1]))
    return torch.cat(outputs)


def split_chunks(x: Tensor, chunk: int) -> list[Tensor]:
    """Consecutive slices of ``x`` of at most ``chunk`` samples (``chunk <= 0``: all of it);
    an empty ``x`` is one empty slice."""
    if chunk <= 0 or len(x) <= chunk:
        return [x]
    return [x[i : i + chunk] for i in range(0, len(x), chunk)]


def in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int) -> Tensor:
    """Apply ``fn`` to consecutive slices of at most ``chunk`` samples and concatenate."""
    parts = split_chunks(x, chunk)
    return fn(x) if len(parts) == 1 else torch.cat([fn(part) for part in parts])


def concat_chunks(
    fn: Callable[[Tensor], dict[str, Tensor]], x: Tensor, chunk: int
) -> dict[str, Tensor]:
    """Like :func:`in_chunks` for functions that return named tensors."""
    parts = [fn(part) for part in split_chunks(x, chunk)]
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
