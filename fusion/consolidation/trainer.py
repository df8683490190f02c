"""Training the consolidated student on unlabeled proxy data (paper 001, section 2 and
Appendix A): SGD with momentum, a learning rate for the heads and a lower one for the
backbone, step decay at 50% and 80% of training, BatchNorm statistics frozen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from amalgam.fusion.config import Config
from amalgam.fusion.consolidation.loss import consolidation_loss
from amalgam.fusion.consolidation.student import MultiHeadStudent
from amalgam.fusion.device import Hardware
from amalgam.fusion.models import Classifier
from amalgam.fusion.progress import progress_bar
from amalgam.fusion.train import predict_logits


class ConsolidationConfig(Config):
    """Representation consolidation's training (paper 001, section 2 and Appendix A); the
    defaults are the paper's except the number of epochs."""

    generalist_weight: float = Field(1.0, ge=0)  # lambda_0 of Eq. 1; 0: plain distillation
    teacher_weights: list[float] | None = None  # lambda_1..lambda_N per teacher; None: 1/N each
    temperature: float = Field(2.0, gt=0)  # T of the KD loss
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=2)
    backbone_lr: float = Field(1e-3, gt=0)  # SGD of phi_s; decay x0.1 at 50% and 80%
    head_lr: float = Field(1e-2, gt=0)  # SGD of every head h_s^i
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    freeze_batchnorm: bool = True  # keep the generalist's BatchNorm running statistics

    def loss_weights(self, teachers: int) -> list[float]:
        """``[lambda_0, lambda_1, ..., lambda_N]``; raises ``ValueError`` naming the field."""
        weights = self.teacher_weights
        if weights is None:
            weights = [1.0 / teachers] * teachers
        if len(weights) != teachers:
            raise ValueError(f"teacher_weights: {len(weights)} given for {teachers} teachers")
        every = [self.generalist_weight, *weights]
        if min(every) < 0 or sum(every) <= 0:
            raise ValueError("loss weights must be non-negative with a positive sum")
        return every


@dataclass
class ConsolidationResult:
    student: MultiHeadStudent
    losses: list[float] = field(default_factory=list)  # mean loss of each epoch


def _freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _optimiser(student: MultiHeadStudent, config: ConsolidationConfig, steps_per_epoch: int):
    """SGD with the backbone and head learning rates, decayed by 10 at 50% and 80% of the
    steps (paper 001, Appendix A)."""
    optimiser = torch.optim.SGD(
        [
            {"params": student.backbone_parameters(), "lr": config.backbone_lr},
            {"params": student.head_parameters(), "lr": config.head_lr},
        ],
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    total = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimiser, milestones=[int(0.5 * total), int(0.8 * total)], gamma=0.1
    )
    return optimiser, schedule


def _train(
    student: MultiHeadStudent,
    config: ConsolidationConfig,
    seed: int,
    size: int,
    batch_loss: Callable[[Tensor], Tensor],
    desc: str,
    progress: bool,
) -> list[float]:
    """``config.epochs`` passes over ``size`` samples in seeded random batches of indices;
    ``batch_loss(index)`` gives the loss of one batch (on the student's device). Returns the
    mean loss of each epoch."""
    optimiser, schedule = _optimiser(student, config, -(-size // config.batch_size))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = progress_bar(desc=desc, unit="epoch", show=progress, iterable=range(config.epochs))
    for epoch in bar:
        student.train()
        if config.freeze_batchnorm:
            _freeze_batchnorm(student)
        order = torch.randperm(size, generator=generator)
        running = 0.0
        for start in range(0, size, config.batch_size):
            index = order[start : start + config.batch_size]
            if len(index) < 2 and not config.freeze_batchnorm:  # BatchNorm needs two samples
                continue
            loss = batch_loss(index)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: the loss became {loss.item()} in epoch {epoch + 1}; lower the "
                    "learning rates (backbone_lr, head_lr)"
                )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            running += loss.item() * len(index)
        losses.append(running / size)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    student.eval()
    return losses


def consolidate(
    generalist: Classifier,
    proxy: Tensor,
    teacher_logits: Sequence[Tensor],
    config: ConsolidationConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    hardware: Hardware = Hardware(),
) -> ConsolidationResult:
    """Distil the generalist and the task-specific teachers into one multi-head student.

    Parameters
    ----------
    generalist : phi_t^0 with head h_t^0; the student's backbone and head 0 start from it.
    proxy : (P, C, H, W) unlabeled proxy images, already in the generalist's input form.
    teacher_logits : one (P, K_i) tensor per task-specific teacher on ``proxy`` (see
        :func:`amalgam.fusion.labels.as_logits` for released probabilities).
    hardware : where the student trains (the proxy images and targets are copied there once).
    """
    config = config or ConsolidationConfig()
    weights = config.loss_weights(len(teacher_logits))
    for i, logits in enumerate(teacher_logits, start=1):
        if logits.shape[0] != len(proxy):
            raise ValueError(
                f"teacher {i}: {logits.shape[0]} predictions for {len(proxy)} proxy images"
            )
    targets = [predict_logits(generalist, proxy), *teacher_logits]  # [(P, K_i)] * (N + 1)
    student = hardware.place(
        MultiHeadStudent(generalist, [t.shape[1] for t in teacher_logits], seed)
    )
    proxy, targets = hardware.put(proxy), [hardware.put(t) for t in targets]

    def batch_loss(index: Tensor) -> Tensor:
        outputs = student(proxy[index])
        return consolidation_loss(outputs, [t[index] for t in targets], weights, config.temperature)

    losses = _train(student, config, seed, len(proxy), batch_loss, "consolidate", progress)
    return ConsolidationResult(student, losses)


def multitask_oracle(
    generalist: Classifier,
    tasks: Sequence[tuple[Tensor, Tensor]],
    config: ConsolidationConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    hardware: Hardware = Hardware(),
) -> ConsolidationResult:
    """The multi-task learning oracle of paper 001 (section 3, baseline 6): the same student,
    initialised from the generalist, trained with the same optimiser on labelled data instead
    of proxy distillation — it sees the teachers' training data, which consolidation never
    does, and so bounds what consolidation can reach.

    Parameters
    ----------
    tasks : ``[(x_0, y_0), (x_1, y_1), ...]``: the generalist's labelled data for head 0, then
        each teacher's for head i; (N_i, C, H, W) images and (N_i,) class indices. An epoch is a
        pass over task 0; every step also draws a batch of each other task, cycling through it.
    """
    config = config or ConsolidationConfig()
    weights = config.loss_weights(len(tasks) - 1)
    classes = [int(y.max()) + 1 for _, y in tasks[1:]]
    student = hardware.place(MultiHeadStudent(generalist, classes, seed))
    tasks = [(hardware.put(x), hardware.put(y)) for x, y in tasks]
    generator = torch.Generator().manual_seed(seed + 1)
    orders = [torch.randperm(len(y), generator=generator) for _, y in tasks]
    cursor = [0] * len(tasks)

    def next_batch(i: int, size: int) -> Tensor:
        """The next ``size`` indices of task i's shuffled order, wrapping around."""
        picked = orders[i][(cursor[i] + torch.arange(size)) % len(orders[i])]
        cursor[i] = (cursor[i] + size) % len(orders[i])
        return picked

    def batch_loss(index: Tensor) -> Tensor:
        indices = [index, *(next_batch(i, len(index)) for i in range(1, len(tasks)))]
        heads = [student(tasks[i][0][idx])[i] for i, idx in enumerate(indices)]
        terms = [
            w * F.cross_entropy(h, tasks[i][1][idx])
            for i, (h, idx, w) in enumerate(zip(heads, indices, weights))
            if w
        ]
        return torch.stack(terms).sum()

    losses = _train(
        student, config, seed, len(tasks[0][1]), batch_loss, "multi-task oracle", progress
    )
    return ConsolidationResult(student, losses)
