"""Training loops shared by every method: supervised or distillation on soft targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from amalgam.fusion.config import Config
from amalgam.fusion.progress import progress_bar


class StudentConfig(Config):
    """The student network and how it is trained (Adam with a cosine schedule, :func:`fit`);
    a job's ``student:`` section. Data-free fusion uses ``arch`` and its own schedule (its
    method parameters)."""

    arch: str = "small_cnn"  # a name from amalgam.fusion.models.list_models()
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)

    def schedule(self) -> dict:
        """The keywords of :func:`fit` it sets: epochs, batch size, learning rate, decay."""
        return self.model_dump(exclude={"arch"})


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
) -> list[float]:
    """Train ``model`` on (N, C, H, W) inputs against (N,) labels or (N, U) soft targets.

    ``optimizer="adam"``: Adam with a cosine learning-rate schedule; ``"sgd"``: SGD with
    ``momentum`` at a constant rate (paper 002's MLP set-up: lr 0.01, momentum 0.5, no weight
    decay). ``on_epoch(k)`` runs after epoch k (1-based) with the model in eval mode, e.g. to
    record a learning curve. With ``checkpoint``, the model, optimiser, schedule, data order
    and random state are saved after every epoch, and a run that finds a saved state goes on
    from it: the result is that of an uninterrupted run. Returns the mean loss of each epoch.
    """
    if targets.ndim == 1:
        targets = F.one_hot(targets.long(), model.head.out_features).float()
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
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:  # BatchNorm needs two samples
                continue
            value = loss(model(x[index]), targets[index])
            step_rule.zero_grad()
            value.backward()
            step_rule.step()
            schedule.step()
            total += value.item() * len(index)
        history.append(total / len(x))
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
    """(N, K) logits of ``model`` in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of (N,) predicted labels equal to (N,) true labels."""
    return float((predictions == labels).float().mean()) if len(labels) else 0.0
