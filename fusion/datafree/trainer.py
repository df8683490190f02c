"""Data-free fusion (paper 003, Algorithm 1) and its baselines, in one code path.

Every teacher is reached through :class:`fusion.teacher.Teacher`: generator steps send the
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

The VID term of Eq. 1-2 needs the teachers' feature maps, which a party does not release
through these capabilities; here ``beta = 0``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion.datafree.generator import Generator, augment
from fusion.datafree.losses import GeneratorObjective, batch_entropy, kd_kl, softened_kl
from fusion.models import Classifier, create_model
from fusion.teacher import Teacher

TeacherMap = Callable[[Callable[[Teacher], Tensor], Sequence[Teacher]], list[Tensor]]


@dataclass(frozen=True)
class Variant:
    fidelity: GeneratorObjective  # teacher-side terms, before the alpha weighting of Eq. 6
    adversary: str | None  # "assistant", "student" or None
    freeze_after_warmup: bool = False


FIDELITY = GeneratorObjective(bn=1.0, instance_entropy=1.0, batch_entropy=1.0)
VARIANTS: dict[str, Variant] = {
    "dfmf": Variant(FIDELITY, "assistant"),
    "dfq": Variant(FIDELITY, "student"),
    "dfq_no_adv": Variant(FIDELITY, None, freeze_after_warmup=True),
    "dafl": Variant(GeneratorObjective(bn=0.0, instance_entropy=1.0, batch_entropy=5.0), None),
    "zskt": Variant(GeneratorObjective(bn=0.0), "student"),
}


@dataclass(frozen=True)
class DataFreeConfig:
    """Hyper-parameters (paper Sec. 4 defaults scaled to small CPU runs)."""

    variant: str = "dfmf"  # a key of VARIANTS
    student_arch: str = "small_cnn"
    assistant_arch: str | None = None  # None: the student's architecture
    warmup: int = 100  # generator warm-up steps with the fidelity loss only (per generator)
    iterations: int = 300  # main-loop iterations (N x M)
    student_steps: int = 2  # M_S: student updates per iteration
    batch_size: int = 128  # B: samples per generator step; the student sees B // K per generator
    latent_dim: int = 100
    generator_width: int = 32
    alpha: float = 0.1  # weight of the fidelity loss in Eq. 6
    temperature: float = 3.0  # tau of the KD and adversarial divergences
    lr_generator: float = 1e-3
    lr_student: float = 0.05  # SGD with Nesterov momentum and a cosine schedule (students, GAs)
    augment_shift: int = 2  # random translation of generated images, pixels
    collapse_entropy: float = 0.5  # batch entropy / log K below this for many steps: warn
    collapse_patience: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"unknown data-free variant {self.variant!r}; known: {', '.join(VARIANTS)}"
            )


@dataclass
class DataFreeResult:
    student: Classifier
    generators: list[Generator]
    history: dict[str, list[float]] = field(default_factory=dict)  # loss curves
    samples: list[list[Tensor]] = field(default_factory=list)  # per checkpoint, per generator
    warnings: list[str] = field(default_factory=list)
    queries: dict[str, int] = field(default_factory=dict)  # samples sent to each teacher


def as_logits(outputs: Tensor, form: str) -> Tensor:
    """Released logits as they are; released probabilities as log-probabilities (softmax of
    either at any temperature gives the same distribution up to a constant shift)."""
    if form == "logits":
        return outputs.float()
    if form == "probs":
        return outputs.float().clamp_min(1e-8).log()
    raise ValueError(f"data-free fusion needs logits or probs from the teachers, got {form!r}")


def _sequential(fn: Callable[[Teacher], Tensor], teachers: Sequence[Teacher]) -> list[Tensor]:
    return [fn(t) for t in teachers]


class DataFreeFusion:
    """One run of a variant over ``teachers``; :meth:`run` returns the trained student."""

    def __init__(
        self,
        teachers: Sequence[Teacher],
        config: DataFreeConfig,
        map_teachers: TeacherMap = _sequential,
        progress: bool = True,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        classes = {t.info.class_names for t in teachers}
        if len(classes) != 1:
            raise ValueError("data-free fusion needs teachers over the same classes, in order")
        self.teachers = list(teachers)
        self.config = config
        self.variant = VARIANTS[config.variant]
        self.map_teachers = map_teachers
        self.progress = progress
        self.log = log
        self.num_classes = len(next(iter(classes)))
        self.in_shape = tuple(teachers[0].info.input_shape)
        torch.manual_seed(config.seed)
        self.rng = torch.Generator().manual_seed(config.seed)
        self.generators = [
            Generator(self.in_shape, config.latent_dim, config.generator_width) for _ in teachers
        ]
        self.generator_opts = [
            torch.optim.Adam(g.parameters(), lr=config.lr_generator, betas=(0.5, 0.999))
            for g in self.generators
        ]
        self.student = self._classifier(config.student_arch)
        self.student_opt, self.student_sched = self._sgd(self.student)
        self.assistants: list[Classifier] = []
        self.assistant_opts = []
        if self.variant.adversary == "assistant":
            arch = config.assistant_arch or config.student_arch
            self.assistants = [self._classifier(arch) for _ in teachers]
            self.assistant_opts = [self._sgd(a) for a in self.assistants]
        self.history: dict[str, list[float]] = {}
        self.queries = {t.info.name: 0 for t in teachers}
        self.warnings: list[str] = []
        self._low_entropy_steps = [0] * len(teachers)

    # --- set-up -------------------------------------------------------------------------

    def _classifier(self, arch: str) -> Classifier:
        return create_model(arch, in_shape=self.in_shape, num_classes=self.num_classes)

    def _sgd(self, model: nn.Module):
        optimizer = torch.optim.SGD(
            model.parameters(), lr=self.config.lr_student, momentum=0.9, nesterov=True
        )
        steps = max(1, self.config.iterations * self.config.student_steps)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    def _record(self, name: str, value: float) -> None:
        self.history.setdefault(name, []).append(value)

    # --- generator (Eq. 3, 5, 6) --------------------------------------------------------

    def _adversary(self, k: int) -> nn.Module | None:
        if self.variant.adversary == "assistant":
            return self.assistants[k]
        if self.variant.adversary == "student":
            return self.student
        return None

    def generator_step(self, k: int, adversarial: bool) -> tuple[Tensor, Tensor]:
        """One update of generator ``k``; returns the batch and the teacher's logits on it."""
        c, teacher, generator = self.config, self.teachers[k], self.generators[k]
        generator.train()
        x = generator.sample(c.batch_size, self.rng)  # (B, C, H, W), graph into the generator
        adversary = self._adversary(k) if adversarial else None
        weights = self.variant.fidelity
        if adversarial:  # Eq. 6: L_A + alpha * L_F
            weights = GeneratorObjective(
                bn=c.alpha * weights.bn,
                instance_entropy=c.alpha * weights.instance_entropy,
                batch_entropy=c.alpha * weights.batch_entropy,
                adversarial=1.0 if adversary is not None else 0.0,
                temperature=c.temperature,
            )
        adversary_logits = None
        if adversary is not None:
            adversary.eval()
            adversary_logits = adversary(x)  # (B, K), graph into x through the adversary
        feedback = teacher.bn_feedback(
            x.detach(), weights, None if adversary_logits is None else adversary_logits.detach()
        )
        self.queries[teacher.info.name] += len(x)
        teacher_logits = feedback.logits.to(x.dtype)
        # the teacher's part of dL/dx came back from the party; the adversary's part is local
        tensors, grads = [x], [feedback.input_grad.to(x)]
        if adversary_logits is not None and weights.adversarial:
            divergence = softened_kl(teacher_logits, adversary_logits, c.temperature)
            local = -weights.adversarial * divergence
            tensors.append(local)
            grads.append(None)
        self.generator_opts[k].zero_grad()
        torch.autograd.backward(tensors, grads)
        self.generator_opts[k].step()
        for name, value in feedback.losses.items():
            self._record(f"generator{k}/{name}", value)
        self._watch_collapse(k, teacher_logits)
        return x.detach(), teacher_logits

    def _watch_collapse(self, k: int, logits: Tensor) -> None:
        """Warn when a generator's batch entropy stays low: it draws one or few classes."""
        normalized = batch_entropy(logits).item() / math.log(self.num_classes)
        self._record(f"generator{k}/batch_entropy_normalized", normalized)
        low = normalized < self.config.collapse_entropy
        self._low_entropy_steps[k] = self._low_entropy_steps[k] + 1 if low else 0
        if self._low_entropy_steps[k] == self.config.collapse_patience:
            message = (
                f"generator of {self.teachers[k].info.name} may have collapsed: batch entropy "
                f"{normalized:.2f} of the maximum for {self.config.collapse_patience} steps"
            )
            self.warnings.append(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            self.log(message)

    # --- assistants (Eq. 2) and student (Eq. 1) -------------------------------------------

    def assistant_step(self, k: int, x: Tensor, teacher_logits: Tensor) -> None:
        assistant = self.assistants[k]
        optimizer, schedule = self.assistant_opts[k]
        assistant.train()
        loss = kd_kl(
            teacher_logits,
            assistant(augment(x, self.config.augment_shift, self.rng)),
            self.config.temperature,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        self._record(f"assistant{k}/kl", loss.item())

    def student_batch(self) -> tuple[Tensor, Tensor]:
        """The union of all generators' samples (b = B // K each) and the teachers' averaged
        soft targets at temperature tau (w_k = 1 / K)."""
        per_generator = max(2, self.config.batch_size // len(self.generators))
        with torch.no_grad():
            for g in self.generators:
                g.eval()
            x = torch.cat([g.sample(per_generator, self.rng) for g in self.generators])
        logits = self.map_teachers(
            lambda t: as_logits(t.predict(x), t.info.output_form), self.teachers
        )
        for teacher in self.teachers:
            self.queries[teacher.info.name] += len(x)
        tau = self.config.temperature
        target = torch.stack([torch.softmax(z / tau, dim=1) for z in logits]).mean(dim=0)
        return x, target

    def student_step(self) -> None:
        x, target = self.student_batch()
        tau = self.config.temperature
        self.student.train()
        student_logits = self.student(augment(x, self.config.augment_shift, self.rng))
        log_s = torch.log_softmax(student_logits / tau, dim=1)
        loss = (target * (target.clamp_min(1e-12).log() - log_s)).sum(dim=1).mean() * tau**2
        self.student_opt.zero_grad()
        loss.backward()
        self.student_opt.step()
        self.student_sched.step()
        self._record("student/kl", loss.item())

    # --- Algorithm 1 ----------------------------------------------------------------------

    def snapshot(self, count: int = 16) -> list[Tensor]:
        """``count`` samples of every generator, (count, C, H, W) each."""
        rng = torch.Generator().manual_seed(self.config.seed + 1)
        with torch.no_grad():
            for g in self.generators:
                g.eval()
            return [g.sample(count, rng) for g in self.generators]

    def run(self, checkpoints: int = 4) -> DataFreeResult:
        """Algorithm 1: warm-up of every generator, then generator, assistant and student
        updates; ``checkpoints`` sample snapshots are kept along the way."""
        c = self.config
        samples = [self.snapshot()]
        bar = tqdm(
            total=len(self.teachers) * c.warmup + c.iterations,
            desc=c.variant,
            disable=None if self.progress else True,
            leave=False,
        )
        for k in range(len(self.teachers)):  # warm-up: fidelity only
            for _ in range(c.warmup):
                self.generator_step(k, adversarial=False)
                bar.update()
        every = max(1, c.iterations // max(1, checkpoints))
        for step in range(c.iterations):
            for k in range(len(self.teachers)):
                if self.variant.freeze_after_warmup:
                    continue
                x, teacher_logits = self.generator_step(k, adversarial=True)
                if self.assistants:
                    self.assistant_step(k, x, teacher_logits)
            for _ in range(c.student_steps):
                self.student_step()
            bar.update()
            if (step + 1) % every == 0:
                samples.append(self.snapshot())
        bar.close()
        self.student.eval()
        return DataFreeResult(
            student=self.student,
            generators=self.generators,
            history=self.history,
            samples=samples,
            warnings=self.warnings,
            queries=self.queries,
        )
