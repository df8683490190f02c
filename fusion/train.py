"""Training loops shared by every method: supervised or distillation on soft targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from amalgam.fusion.config import Config, first_line
from amalgam.fusion.device import Hardware, to_model
from amalgam.fusion.models import Classifier, create_model, load_state_dict
from amalgam.fusion.progress import progress_bar
from amalgam.fusion.zoo import check_forward


class StudentConfig(Config):
    """The student network and how it is trained (Adam with a cosine schedule, :func:`fit`);
    a job's ``student:`` section. Data-free fusion uses the network and its own schedule (its
    method parameters)."""

    # the registry's (amalgam.fusion.models.list_models()), torchvision's or timm's
    arch: str = "small_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)  # the architecture's own keywords
    init: str | None = None  # a local weights file (safetensors or state dict) to start from
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)

    def schedule(self) -> dict:
        """The keywords of :func:`fit` it sets: epochs, batch size, learning rate, decay."""
        return self.model_dump(exclude={"arch", "kwargs", "init"})


def build_student(
    student: StudentConfig,
    in_shape: tuple[int, ...],
    num_classes: int,
    log: Callable[[str], None] = print,
) -> Classifier:
    """A fresh ``student.arch`` for (C, H, W) inputs and ``num_classes`` outputs, started
    from ``student.init`` where given; a network that cannot take the inputs raises
    ``ValueError`` naming ``student.arch`` (a dry forward pass)."""
    try:
        model = create_model(student.arch, in_shape=tuple(in_shape), num_classes=num_classes,
                             **student.kwargs)  # fmt: skip
    except (TypeError, ValueError) as error:
        raise ValueError(f"student.arch: {student.arch}: {first_line(error)}") from None
    problem = check_forward(model, tuple(in_shape), num_classes)
    if problem is not None:
        raise ValueError(f"student.arch: {student.arch}: {problem[1]}")
    if student.init is not None:
        loaded, skipped = start_from(model, student.init)
        log(f"student: {loaded} tensors from {student.init}, {skipped} left fresh")
    return model


def start_from(model: nn.Module, path: str) -> tuple[int, int]:
    """Load the tensors of the state dict at ``path`` that fit ``model`` (or, for a torchvision
    or timm student, its ``body`` under the library's own names); tensors of another shape,
    such as a classifier over other classes, stay as they are. Returns (loaded, left fresh);
    a file that fits nothing raises ``ValueError``."""
    try:
        state = load_state_dict(path)
    except ValueError as error:
        raise ValueError(f"student.init: {error}") from None
    body = getattr(model, "body", None)
    targets = [model, body] if isinstance(body, nn.Module) else [model]
    best, fitting = model, {}
    for target in targets:
        own = target.state_dict()
        matches = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if len(matches) > len(fitting):
            best, fitting = target, matches
    if not fitting:
        raise ValueError(f"student.init: {path} fits none of the student's tensors")
    best.load_state_dict(fitting, strict=False)
    return len(fitting), len(model.state_dict()) - len(fitting)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``-sum_u q_u log softmax(z)_u`` averaged over the batch; (B, U) logits and targets."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class Checkpoint(Protocol):
    """Where one training run keeps its progress: ``load`` gives the last saved state or
    ``None``; ``save`` replaces it (atomically, so that a crash leaves the previous one)."""

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


def fit(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    optimizer: str = "adam",
    momentum: float = 0.5,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    on_epoch: Callable[[int], None] | None = None,
    checkpoint: Checkpoint | None = None,
    loss: Callable[[Tensor, Tensor], Tensor] = soft_cross_entropy,
    hardware: Hardware = Hardware(),
) -> list[float]:
    """Train ``model`` on (N, C, H, W) inputs against (N,) labels or (N, U) soft targets.

    ``optimizer="adam"``: Adam with a cosine learning-rate schedule; ``"sgd"``: SGD with
    ``momentum`` at a constant rate (paper 002's MLP set-up: lr 0.01, momentum 0.5, no weight
    decay). ``on_epoch(k)`` runs after epoch k (1-based) with the model in eval mode, e.g. to
    record a learning curve. With ``checkpoint``, the model, optimiser, schedule, data order
    and random state are saved after every epoch, and a run that finds a saved state goes on
    from it: the result is that of an uninterrupted run. The model and the data move to
    ``hardware.device`` (the model stays there), where the steps run in
    ``hardware.precision``. Returns the mean loss of each epoch.
    """
    if targets.ndim == 1:
        targets = F.one_hot(targets.long(), model.head.out_features).float()
    hardware.place(model)
    x, targets = hardware.put(x), hardware.put(targets)  # one copy, not one per batch
    scaler = hardware.scaler()
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, -(-len(x) // batch_size))
    if optimizer == "adam":
        step_rule = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(step_rule, epochs * steps_per_epoch)
    elif optimizer == "sgd":
        step_rule = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        schedule = torch.optim.lr_scheduler.ConstantLR(step_rule, factor=1.0)
    else:
        raise ValueError(f"optimizer={optimizer!r}: choose adam or sgd")
    history: list[float] = []
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        step_rule.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
    bar = progress_bar(desc=desc, unit="epoch", show=progress, iterable=range(len(history), epochs))
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x), generator=generator, device="cpu").to(hardware.device)
        total = torch.zeros((), device=hardware.device)  # summed on the device: no sync a step
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:  # BatchNorm needs two samples
                continue
            with hardware.autocast():
                value = loss(model(x[index]), targets[index])
            step_rule.zero_grad()
            scaler.scale(value).backward()
            scaler.step(step_rule)
            scaler.update()
            schedule.step()
            total += value.detach().float() * len(index)
        history.append(total.item() / len(x))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
        if checkpoint is not None:
            checkpoint.save(
                {
                    "model": model.state_dict(),
                    "optimizer": step_rule.state_dict(),
                    "schedule": schedule.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                }
            )
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch + 1)
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """(N, K) float32 logits of ``model`` in eval mode, on the host; the batches go to the
    model's device."""
    model.eval()
    chunks = [model(to_model(model, x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(chunks).float().cpu()


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of (N,) predicted labels equal to (N,) true labels."""
    return float((predictions == labels).float().mean()) if len(labels) else 0.0
