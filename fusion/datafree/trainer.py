"""Data-free fusion (paper 003, Algorithm 1) and its baselines, in one code path.

Every teacher is reached through :class:`amalgam.fusion.teacher.Teacher`: generator steps send the
synthetic batch and the adversary's logits to ``bn_feedback`` (one round trip per generator
step per party) and back-propagate the returned input gradient into the generator; student
steps ask every teacher's ``predict`` on the union of all generators' samples (Eq. 1).

The variants differ only in their losses (paper Table 1):

========== ===================== =================== ==================================
variant    generator fidelity    adversary           notes
========== ===================== =================== ==================================
dfmf       BN + ICE - BCE        per-teacher GA      Eq. 6, GA trained with Eq. 2
dfq        BN + ICE - BCE        the student         DFQ [3]
dfq_no_adv BN + ICE - BCE        none                generators frozen after warm-up
dafl       ICE - 5 BCE           none                DAFL [2] (no BN; no activation loss)
zskt       none                  the student         ZSKT [17]
========== ===================== =================== ==================================

The VID term of Eq. 1-2 (``beta``, :mod:`amalgam.fusion.datafree.vid`) matches the student's
and each assistant's last feature map to the teacher's, read through ``Activations`` from the
parties that release one; ``beta = 0`` leaves it out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from amalgam.fusion.config import Config
from amalgam.fusion.datafree.generator import Generator, augment
from amalgam.fusion.datafree.losses import (
    batch_entropy,
    confidence_weights,
    kd_kl,
    softened_kl,
)
from amalgam.fusion.datafree.vid import VIDTerm, last_feature_map
from amalgam.fusion.device import Hardware, to_host, to_model
from amalgam.fusion.labels import as_logits
from amalgam.fusion.models import Classifier, create_model
from amalgam.fusion.progress import progress_bar
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import GeneratorObjective, Teacher
from amalgam.fusion.train import StudentConfig, build_student


@dataclass(frozen=True)
class Losses:
    """What one variant trains with (paper Table 1)."""

    fidelity: GeneratorObjective  # teacher-side terms, before the alpha weighting of Eq. 6
    adversary: str | None  # "assistant", "student" or None
    freeze_after_warmup: bool = False


FIDELITY = GeneratorObjective(bn=1.0, instance_entropy=1.0, batch_entropy=1.0)
VARIANTS: dict[str, Losses] = {
    "dfmf": Losses(FIDELITY, "assistant"),
    "dfq": Losses(FIDELITY, "student"),
    "dfq_no_adv": Losses(FIDELITY, None, freeze_after_warmup=True),
    "dafl": Losses(GeneratorObjective(bn=0.0, instance_entropy=1.0, batch_entropy=5.0), None),
    "zskt": Losses(GeneratorObjective(bn=0.0), "student"),
}
Variant = Literal["dfmf", "dfq", "dfq_no_adv", "dafl", "zskt"]  # the keys of VARIANTS


class DataFreeConfig(Config):
    """Data-free fusion with generator assistants (paper 003, Algorithm 1) or a baseline;
    paper Sec. 4's settings scaled to small CPU runs."""

    variant: Variant = "dfmf"  # the paper's method, or a baseline of its Table 1
    warmup: int = Field(200, ge=0)  # generator warm-up steps, fidelity loss only (per generator)
    iterations: int = Field(1000, ge=1)  # main-loop iterations (N x M)
    student_steps: int = Field(10, ge=1)  # M_S: student updates per iteration
    assistant_steps: int = Field(5, ge=1)  # M_GA: updates of each assistant per iteration
    batch_size: int = Field(128, ge=2)  # B: samples per generator step; the student sees B // K
    latent_dim: int = Field(256, ge=1)  # z of each generator
    generator_width: int = Field(64, ge=1)  # channels of its last block (2x in the first two)
    # weight of the fidelity loss in Eq. 6: DFQ's 1 (adversarial 1 : BN 1 : one-hot 1); the
    # paper's 0.1 lets the adversary pull the samples off the teachers' data
    alpha: float = Field(1.0, ge=0)
    beta: float = Field(0.0, ge=0)  # weight of the VID term in Eq. 1-2; 0: KL alone
    temperature: float = Field(3.0, gt=0)  # tau of the KD and adversarial divergences
    # w_k of Eq. 1: "uniform" 1 / K (the paper), "confidence" sample-wise by each teacher's
    # confidence (the paper's Sec. 5 outlook, CA-MKD)
    teacher_weighting: Literal["uniform", "confidence"] = "uniform"
    lr_generator: float = Field(1e-3, gt=0)
    lr_student: float = Field(0.05, gt=0)  # SGD, Nesterov, cosine (student and assistants)
    augment_shift: int = Field(2, ge=0)  # random translation of generated images, pixels
    collapse_entropy: float = Field(0.5, ge=0, le=1)  # batch entropy / log K below this ...
    collapse_patience: int = Field(50, ge=1)  # ... for this many steps: warn of a collapse


def warmup_steps(config: DataFreeConfig) -> int:
    """Fidelity-only steps per generator before the main loop. A variant whose generators are
    frozen after warm-up warms up for the main loop's generator steps too, so that every
    variant makes the same number of generator updates (paper Sec. 4, DFQ w/o ADV)."""
    if VARIANTS[config.variant].freeze_after_warmup:
        return config.warmup + config.iterations
    return config.warmup


@dataclass
class DataFreeResult:
    student: Classifier
    generators: list[Generator]
    history: dict[str, list[float]] = field(default_factory=dict)  # loss curves
    samples: list[list[Tensor]] = field(default_factory=list)  # per checkpoint, per generator
    warnings: list[str] = field(default_factory=list)
    queries: dict[str, int] = field(default_factory=dict)  # samples sent to each teacher


def _agreement(votes: Tensor) -> float:
    """Fraction of samples on which every row of ``votes`` (M, B) names the same class.

    On real images the teachers of a data set mostly agree; a low teacher agreement on the
    generated samples says that they lie off the data the teachers learnt from.
    """
    return (votes == votes[0]).all(dim=0).float().mean().item()


def forward_tapped(model: nn.Module, x: Tensor, vid: VIDTerm | None) -> Tensor:
    """``model(x)``, its last feature map recorded for ``vid`` when VID is on."""
    if vid is None:
        return model(x)
    with vid.tap.recording():
        return model(x)


def plus_vid(
    loss: Tensor,
    vid: VIDTerm,
    maps: Sequence[Tensor | None],
    beta: float,
    history: History,
    name: str,
) -> Tensor:
    """``loss + beta * L^VID`` of the model's last tapped forward against the teachers'
    ``maps``; the VID term is recorded as ``name``."""
    term = vid(maps)
    history.record(name, term.item())
    return loss + beta * term


def sgd(model: nn.Module, config: DataFreeConfig, steps_per_iteration: int):
    """Nesterov SGD with a cosine schedule over the run's ``iterations x steps_per_iteration``
    updates (students and assistants, Sec. 4)."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr_student, momentum=0.9, nesterov=True
    )
    steps = max(1, config.iterations * steps_per_iteration)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)


class History:
    """Loss curves by name, and the warnings raised along the way."""

    def __init__(self, log: Callable[[str], None] = lambda message: None) -> None:
        self.curves: dict[str, list[float]] = {}
        self.warnings: list[str] = []
        self.log = log

    def record(self, name: str, value: float) -> None:
        self.curves.setdefault(name, []).append(value)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self.log(message)


class GeneratorTrainer:
    """One generator, and for DFMF its assistant, against one teacher (Eq. 2-6).

    Used by the coordinator for every party (coordinator mode) and by a party for its own
    teacher (party-side synthesis mode).
    """

    def __init__(
        self,
        teacher: Teacher,
        config: DataFreeConfig,
        index: int,
        history: History,
        rng: torch.Generator,
        assistant_arch: str = "small_cnn",
        hardware: Hardware = Hardware(),
    ) -> None:
        self.teacher, self.config, self.index = teacher, config, index
        self.hardware = hardware
        self.variant = VARIANTS[config.variant]
        self.history, self.rng = history, rng
        self.num_classes = len(teacher.info.class_names)
        in_shape = tuple(teacher.info.input_shape)
        self.generator = hardware.place(
            Generator(in_shape, config.latent_dim, config.generator_width)
        )
        self.optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=config.lr_generator, betas=(0.5, 0.999)
        )
        self.assistant: Classifier | None = None
        self.assistant_vid: VIDTerm | None = None
        if self.variant.adversary == "assistant":
            self.assistant = hardware.place(
                create_model(assistant_arch, in_shape=in_shape, num_classes=self.num_classes)
            )
            if config.beta and last_feature_map(teacher.info) is not None:
                self.assistant_vid = hardware.place(
                    VIDTerm(self.assistant, in_shape, [teacher.info], history.log)
                )
            self.assistant_opt, self.assistant_sched = sgd(
                nn.ModuleList([self.assistant, self.assistant_vid]), config, config.assistant_steps
            )
        self.queries = 0
        self._low_entropy_steps = 0

    def objective(self, adversarial: bool) -> GeneratorObjective:
        """Fidelity only (warm-up), or Eq. 6: ``L_A + alpha * L_F``."""
        fidelity, c = self.variant.fidelity, self.config
        if not adversarial:
            return fidelity
        return GeneratorObjective(
            bn=c.alpha * fidelity.bn,
            instance_entropy=c.alpha * fidelity.instance_entropy,
            batch_entropy=c.alpha * fidelity.batch_entropy,
            adversarial=1.0 if self.variant.adversary else 0.0,
            temperature=c.temperature,
        )

    def step(self, adversary: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """One generator update; ``adversary`` None means the warm-up (fidelity only).

        Returns the batch (B, C, H, W) and the teacher's logits on it (B, K).
        """
        c, name = self.config, f"generator{self.index}"
        self.generator.train()
        x = self.generator.sample(c.batch_size, self.rng)  # graph into the generator
        weights = self.objective(adversarial=adversary is not None)
        adversary_logits = None
        if adversary is not None:
            adversary.eval()
            adversary_logits = adversary(x)  # (B, K), graph into x through the adversary
        feedback = self.teacher.bn_feedback(
            to_host(x),
            weights,
            None if adversary_logits is None else to_host(adversary_logits),
        )
        self.queries += len(x)
        teacher_logits = feedback.logits.to(x)
        # the teacher's part of dL/dx came back from the party; the adversary's part is local
        tensors, grads = [x], [feedback.input_grad.to(x)]
        if adversary_logits is not None and weights.adversarial:
            divergence = softened_kl(teacher_logits, adversary_logits, c.temperature)
            tensors.append(-weights.adversarial * divergence)
            grads.append(None)
        self.optimizer.zero_grad()
        torch.autograd.backward(tensors, grads)
        self.optimizer.step()
        for term, value in feedback.losses.items():
            self.history.record(f"{name}/{term}", value)
        self._watch_collapse(teacher_logits)
        return x.detach(), teacher_logits

    def train_assistant(self, x: Tensor, teacher_logits: Tensor) -> None:
        """``assistant_steps`` (M_GA) updates of the assistant (Algorithm 1, lines 17-22):
        on the generator's latest batch ``x`` (B, C, H, W), whose ``teacher_logits`` (B, K)
        are known, then on fresh batches of B samples that the teacher labels (``predict``,
        counted in ``queries``)."""
        self.assistant_step(x, teacher_logits)
        for _ in range(self.config.assistant_steps - 1):
            fresh = self.sample(self.config.batch_size)  # (B, C, H, W)
            answers = self.teacher.predict(to_host(fresh))
            logits = as_logits(answers, self.teacher.info.output_form, self.num_classes)
            self.queries += len(fresh)
            self.assistant_step(fresh, logits.to(fresh))

    def assistant_step(self, x: Tensor, teacher_logits: Tensor) -> None:
        """Eq. 2 on one batch whose teacher logits are known (the teacher's feature map, for
        VID, is asked on the augmented batch)."""
        c = self.config
        self.assistant.train()
        x = augment(x, c.augment_shift, self.rng)
        outputs = forward_tapped(self.assistant, x, self.assistant_vid)
        loss = kd_kl(teacher_logits, outputs, c.temperature)
        self.history.record(f"assistant{self.index}/kl", loss.item())
        if self.assistant_vid is not None:
            maps = self.assistant_vid.teacher_maps([self.teacher], to_host(x))
            name = f"assistant{self.index}/vid"
            loss = plus_vid(loss, self.assistant_vid, maps, c.beta, self.history, name)
        self.assistant_opt.zero_grad()
        loss.backward()
        self.assistant_opt.step()
        self.assistant_sched.step()

    def _watch_collapse(self, logits: Tensor) -> None:
        """Warn when the batch entropy stays low: the generator draws one or few classes."""
        normalized = batch_entropy(logits).item() / math.log(self.num_classes)
        self.history.record(f"generator{self.index}/batch_entropy_normalized", normalized)
        low = normalized < self.config.collapse_entropy
        self._low_entropy_steps = self._low_entropy_steps + 1 if low else 0
        if self._low_entropy_steps == self.config.collapse_patience:
            self.history.warn(
                f"generator of {self.teacher.info.name} may have collapsed: batch entropy "
                f"{normalized:.2f} of the maximum for {self.config.collapse_patience} steps"
            )

    def sample(self, count: int, rng: torch.Generator | None = None) -> Tensor:
        """``count`` images (count, C, H, W), drawn a batch at a time: a party-side pool of
        thousands would otherwise hold the generator's widest feature map for all at once."""
        self.generator.eval()
        step = self.config.batch_size
        with torch.no_grad():
            return torch.cat(
                [
                    self.generator.sample(min(step, count - start), rng or self.rng)
                    for start in range(0, count, step)
                ]
            )


class DataFreeFusion:
    """One run of a variant over ``teachers``; :meth:`run` returns the trained student, a
    ``student`` network (the assistants share its architecture)."""

    def __init__(
        self,
        teachers: Sequence[Teacher],
        config: DataFreeConfig,
        student: StudentConfig = StudentConfig(),
        context: RunContext = RunContext(),
        own_generators: bool = True,
    ) -> None:
        classes = {t.info.class_names for t in teachers}
        if len(classes) != 1:
            raise ValueError("data-free fusion needs teachers over the same classes, in order")
        forms = {t.info.name: t.info.output_form for t in teachers}
        for name, form in forms.items():
            if form not in ("logits", "probs"):
                raise ValueError(
                    f"party {name}: data-free fusion needs logits or probs, it releases {form!r}"
                )
        self.teachers = list(teachers)
        self.config, self.student_arch, self.context = config, student.arch, context
        self.variant = VARIANTS[config.variant]
        torch.manual_seed(context.seed)
        self.rng = torch.Generator().manual_seed(context.seed)
        self.history = History(context.log)
        self.trainers = (
            [
                GeneratorTrainer(
                    t, config, k, self.history, self.rng, student.arch, context.hardware
                )
                for k, t in enumerate(teachers)
            ]
            if own_generators
            else []
        )
        in_shape = tuple(teachers[0].info.input_shape)
        self.student = context.hardware.place(
            build_student(student, in_shape, len(next(iter(classes))), context.log)
        )
        self.vid: VIDTerm | None = None
        if config.beta:
            infos = [t.info for t in teachers]
            self.vid = context.hardware.place(VIDTerm(self.student, in_shape, infos, context.log))
        self.student_opt, self.student_sched = sgd(
            nn.ModuleList([self.student, self.vid]), config, config.student_steps
        )
        self.student_queries = {t.info.name: 0 for t in teachers}

    def _adversary(self, trainer: GeneratorTrainer) -> nn.Module | None:
        """The model the generator plays against; None: fidelity loss only."""
        if self.variant.adversary == "assistant":
            return trainer.assistant
        if self.variant.adversary == "student":
            return self.student
        return None

    def student_targets(self, x: Tensor) -> Tensor:
        """The teachers' soft labels at temperature tau, weighted by w_k of Eq. 1."""
        images = to_host(x)
        logits = self.context.map_teachers(
            lambda t: as_logits(t.predict(images), t.info.output_form, len(t.info.class_names)),
            self.teachers,
        )
        for teacher in self.teachers:
            self.student_queries[teacher.info.name] += len(x)
        stacked = torch.stack(logits)  # (K teachers, B, classes)
        self.history.record("samples/teacher_agreement", _agreement(stacked.argmax(dim=2)))
        probs = torch.softmax(stacked / self.config.temperature, dim=2)
        if self.config.teacher_weighting == "uniform":
            return probs.mean(dim=0).to(x)  # (B, classes)
        weights = confidence_weights(stacked)  # (K teachers, B)
        return (weights.unsqueeze(2) * probs).sum(dim=0).to(x)  # (B, classes)

    def distil(self, x: Tensor) -> None:
        """One student update on (B, C, H, W) ``x``, augmented, then labelled by every teacher
        (Eq. 1: their soft labels and, with ``beta``, their feature maps)."""
        x = augment(x, self.config.augment_shift, self.rng)
        maps = None if self.vid is None else self.vid.teacher_maps(self.teachers, to_host(x))
        self.student_step(x, self.student_targets(x), maps)

    def student_step(
        self, x: Tensor, target: Tensor, maps: list[Tensor | None] | None = None
    ) -> None:
        """One update of the student towards ``target`` (B, K) on ``x``, and towards the
        teachers' feature ``maps`` (VID) when given."""
        c = self.config
        x = to_model(self.student, x)
        target = target.to(x)
        self.student.train()
        student_logits = forward_tapped(self.student, x, self.vid)
        log_s = torch.log_softmax(student_logits / c.temperature, dim=1)
        kl = (target * (target.clamp_min(1e-12).log() - log_s)).sum(dim=1).mean()
        loss = kl * c.temperature**2
        self.history.record("student/kl", loss.item())
        if maps is not None:
            loss = plus_vid(loss, self.vid, maps, c.beta, self.history, "student/vid")
        self.student_opt.zero_grad()
        loss.backward()
        self.student_opt.step()
        self.student_sched.step()
        votes = torch.stack([student_logits.argmax(dim=1), target.argmax(dim=1)])
        self.history.record("samples/student_ensemble_agreement", _agreement(votes))

    def snapshot(self, count: int = 16) -> list[Tensor]:
        """``count`` samples of every generator, (count, C, H, W) each."""
        rng = torch.Generator().manual_seed(self.context.seed + 1)
        return [to_host(trainer.sample(count, rng)) for trainer in self.trainers]

    def result(self, samples: list[list[Tensor]], generator_queries: list[int]) -> DataFreeResult:
        self.student.eval()
        queries = {
            t.info.name: q + self.student_queries[t.info.name]
            for t, q in zip(self.teachers, generator_queries)
        }
        return DataFreeResult(
            student=self.student,
            generators=[trainer.generator for trainer in self.trainers],
            history=self.history.curves,
            samples=samples,
            warnings=self.history.warnings,
            queries=queries,
        )

    def run(self, checkpoints: int = 4) -> DataFreeResult:
        """Algorithm 1: warm-up of every generator, then generator, assistant and student
        updates; ``checkpoints`` sample snapshots are kept along the way."""
        c = self.config
        samples = [self.snapshot()]
        bar = progress_bar(
            len(self.teachers) * warmup_steps(c) + c.iterations, c.variant,
            show=self.context.progress,
        )  # fmt: skip
        for trainer in self.trainers:  # warm-up: fidelity only
            for _ in range(warmup_steps(c)):
                trainer.step()
                bar.update()
        every = max(1, c.iterations // max(1, checkpoints))
        per_generator = max(2, c.batch_size // len(self.trainers))
        for step in range(c.iterations):
            if not self.variant.freeze_after_warmup:
                for trainer in self.trainers:
                    x, teacher_logits = trainer.step(self._adversary(trainer))
                    if trainer.assistant is not None:
                        trainer.train_assistant(x, teacher_logits)
            for _ in range(c.student_steps):  # the union of all generators' samples
                self.distil(torch.cat([t.sample(per_generator) for t in self.trainers]))
            bar.update()
            if (step + 1) % every == 0:
                samples.append(self.snapshot())
        bar.close()
        return self.result(samples, [trainer.queries for trainer in self.trainers])
