"""Model composition for detection (paper 000, Algorithm 1 with Algorithm 2 as the
aggregation): every party's detections on the unlabeled canvases, mapped to the union of the
categories, voted and thinned into pseudo-labels, on which one student detector of any
architecture is trained; optionally fine-tuned on a few labelled canvases."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from amalgam.fusion.detection.aggregate import AggregationConfig, AggregationStats, aggregate
from amalgam.fusion.detection.canvas import DetectionSet
from amalgam.fusion.detection.coco import evaluate_map
from amalgam.fusion.detection.models import create_detector
from amalgam.fusion.detection.train import detect, fit_detector
from amalgam.fusion.device import Hardware
from amalgam.fusion.labels import known_mask, union_classes
from amalgam.fusion.teacher import Detections, DetectorTeacher


@dataclass(frozen=True)
class DetectionCompositionConfig:
    """Parameters
    ----------
    aggregation : the vote, filter and Soft-NMS settings (Algorithm 2).
    student_arch : ``frcnn`` | ``fcos`` | ``retinanet`` (:func:`create_detector`).
    width : the student backbone's channels.
    epochs, batch_size, lr : student training on the pseudo-labels.
    finetune_epochs : on the labelled canvases, when there are any.
    finetune_mix : fine-tune on the labelled canvases together with the pseudo-labelled
        rest of the unlabeled ones (:func:`finetune_set`); else on the labelled ones alone.
    finetune_label_share : with ``finetune_mix``, the labelled canvases are repeated until
        they make at least this share of the fine-tuning set, so that a few labels are not
        drowned by the pseudo-labels; None: each once.
    finetune_interpolation : the student kept is (1 - a) w0 + a w1 for this a, w0 its weights
        before fine-tuning and w1 after (weight-space ensembling, Wortsman et al. 2022,
        "WiSE-FT"), so that a few labels move it without undoing what the pseudo-labels
        taught; 1: the fine-tuned weights.
    seed : student initialisation and data order.
    """

    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    student_arch: str = "fcos"
    width: int = 32
    epochs: int = 12
    batch_size: int = 16
    lr: float = 2e-3
    finetune_epochs: int = 6
    finetune_mix: bool = True
    finetune_label_share: float | None = 0.25
    finetune_interpolation: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.finetune_interpolation <= 1:
            raise ValueError(
                f"finetune_interpolation: {self.finetune_interpolation} is outside (0, 1]"
            )


@dataclass
class DetectionComposition:
    """What one composition produced: the student, the pseudo-labels, every party's raw
    detections (labels in the union), the aggregation counts and the union of categories."""

    student: nn.Module
    pseudo_labels: list[Detections]
    raw: list[list[Detections]]
    stats: AggregationStats
    union: list[str]


def to_union_labels(found: Sequence[Detections], classes: Sequence[str], union: Sequence[str]):
    """Relabel one party's detections from its own category order to the union's."""
    mapping = torch.tensor([list(union).index(c) for c in classes], dtype=torch.long)
    return [Detections(d.boxes, mapping[d.labels], d.scores) for d in found]


def gather_detections(
    teachers: Sequence[DetectorTeacher],
    images: Tensor,
    map_teachers: Callable | None = None,
) -> tuple[list[list[Detections]], list[str], Tensor]:
    """Every teacher's detections on (N, 1, S, S) ``images`` in union labels, the union and
    the (models, categories) knowledge matrix. ``map_teachers(fn, teachers)`` runs the calls
    (the job's roster, which fans out and drops unreachable parties); a teacher answered
    with ``None`` is left out."""
    run = map_teachers or (lambda fn, ts: [fn(t) for t in ts])
    answers = run(lambda t: t.detect(images), teachers)
    alive = [(t, a) for t, a in zip(teachers, answers) if a is not None]
    union = union_classes([t.info.class_names for t, _ in alive])
    raw = [to_union_labels(a, t.info.class_names, union) for t, a in alive]
    return raw, union, known_mask([t.info.class_names for t, _ in alive], union)


def finetune_set(
    unlabeled: Tensor,
    pseudo: Sequence[Detections],
    labelled: DetectionSet,
    labelled_index: Sequence[int] | None = None,
    label_share: float | None = None,
) -> DetectionSet:
    """The canvases of mixed fine-tuning: the ``labelled`` ones with their boxes, then every
    (N, 1, S, S) ``unlabeled`` canvas that is not one of them with its ``pseudo``-labels.

    ``labelled_index``: the positions in ``unlabeled`` of the labelled canvases (their
    pseudo-labels are left out, not used twice); None when they are other canvases. Training
    on the labels alone forgets what the pseudo-labels taught (paper 000 fine-tunes a
    student that keeps them). ``label_share``: the labelled canvases come r times, the least
    r >= 1 with r n / (r n + m) >= label_share for n labelled and m pseudo-labelled ones."""
    if label_share is not None and not 0 <= label_share < 1:
        raise ValueError(f"finetune_label_share: {label_share} is outside [0, 1)")
    taken = set(labelled_index or ())
    rest = [i for i in range(len(unlabeled)) if i not in taken]
    repeats = 1
    if label_share and len(labelled):
        wanted = label_share * len(rest) / ((1 - label_share) * len(labelled))
        repeats = max(1, math.ceil(wanted - 1e-9))  # not one more for a rounding error
    return DetectionSet(
        torch.cat([labelled.images.repeat(repeats, 1, 1, 1), unlabeled[rest]]),
        list(labelled.targets) * repeats + [pseudo[i] for i in rest],
        labelled.class_names,
    )


def interpolate_weights(model: nn.Module, before: dict[str, Tensor], weight: float) -> None:
    """Set every floating-point parameter and buffer of ``model`` to (1 - weight) x its value
    in ``before`` + weight x its current value; integer buffers keep their current value."""
    now = model.state_dict()
    model.load_state_dict(
        {
            k: torch.lerp(before[k], v, weight) if v.is_floating_point() else v
            for k, v in now.items()
        }
    )


def finetune(
    student: nn.Module,
    canvases: DetectionSet,
    config: DetectionCompositionConfig,
    *,
    epochs: int,
    desc: str = "fine-tune on labels",
    progress: bool = True,
    hardware: Hardware = Hardware(),
) -> None:
    """Fine-tune the composed ``student`` on ``canvases`` (labelled, or :func:`finetune_set`'s
    mix) for ``epochs`` at half the student's learning rate, then keep the interpolation
    ``config.finetune_interpolation`` between its weights before and after."""
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    fit_detector(student, canvases, epochs=epochs, batch_size=config.batch_size,
                 lr=config.lr / 2, seed=config.seed, desc=desc, progress=progress,
                 hardware=hardware)  # fmt: skip
    interpolate_weights(student, before, config.finetune_interpolation)


def compose_detection(
    teachers: Sequence[DetectorTeacher],
    unlabeled: Tensor,
    config: DetectionCompositionConfig,
    labelled: DetectionSet | None = None,
    map_teachers: Callable | None = None,
    progress: bool = True,
    hardware: Hardware = Hardware(),
    labelled_index: Sequence[int] | None = None,
) -> DetectionComposition:
    """Algorithm 1 for detection: gather, aggregate (Algorithm 2), train the student (on
    ``hardware``) on the pseudo-labels, then fine-tune on ``labelled`` canvases when given
    (their boxes of categories outside the union are dropped): with ``config.finetune_mix``
    together with the pseudo-labelled rest (``labelled_index`` as :func:`finetune_set` takes
    it), keeping the interpolation of :func:`finetune`."""
    raw, union, knows = gather_detections(teachers, unlabeled, map_teachers)
    pseudo, stats = aggregate(raw, knows, config.aggregation)
    torch.manual_seed(config.seed)
    student = create_detector(config.student_arch, len(union), size=unlabeled.shape[-1],
                              width=config.width)  # fmt: skip
    fit_detector(student, DetectionSet(unlabeled, pseudo, union), epochs=config.epochs,
                 batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                 desc="student on pseudo-labels", progress=progress,
                 hardware=hardware)  # fmt: skip
    if labelled is not None and len(labelled):
        labelled = labelled.restrict(union)  # the union's category order
        if config.finetune_mix:
            labelled = finetune_set(unlabeled, pseudo, labelled, labelled_index,
                                    config.finetune_label_share)  # fmt: skip
        finetune(student, labelled, config, epochs=config.finetune_epochs, progress=progress,
                 hardware=hardware)  # fmt: skip
    return DetectionComposition(student, pseudo, raw, stats, union)


def detection_map(model: nn.Module, test: DetectionSet) -> dict:
    """mAP@[.5:.95], mAP@.5 and per-category AP of ``model`` on labelled test canvases."""
    return evaluate_map(test.targets, detect(model, test.images), test.class_names,
                        size=test.images.shape[-1])  # fmt: skip


@dataclass
class DetectionScores:
    """A detection composition judged on labelled canvases (COCO mAP@[.5:.95]).

    Attributes
    ----------
    rows : ``teacher:<party>`` (on the categories it knows) and ``student``.
    student : the student's ``map``, ``map50`` and ``per_category`` AP.
    pseudo_labels : the same metrics of the teachers' aggregated boxes on the test canvases.
    """

    rows: dict[str, float]
    student: dict
    pseudo_labels: dict


def score_composition(
    teachers: Sequence[DetectorTeacher],
    student: nn.Module,
    test: DetectionSet,
    aggregation: AggregationConfig,
) -> DetectionScores:
    """Each teacher on the categories it knows, the aggregation of their boxes and the
    student, on the ``test`` canvases of the teachers' categories; one Predict per party."""
    size = test.images.shape[-1]
    raw, union, knows = gather_detections(teachers, test.images)
    scored = test.restrict(union)
    rows = {}
    for teacher, found in zip(teachers, raw):  # each on the categories it knows
        known = torch.tensor([union.index(c) for c in teacher.info.class_names])
        truth = [d.select(torch.isin(d.labels, known)) for d in scored.targets]
        rows[f"teacher:{teacher.info.name}"] = evaluate_map(truth, found, union, size)["map"]
    pseudo, _ = aggregate(raw, knows, aggregation)
    metrics = detection_map(student, scored)
    rows["student"] = metrics["map"]
    return DetectionScores(rows, metrics, evaluate_map(scored.targets, pseudo, union, size))
