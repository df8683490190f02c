"""Training loops shared by every method: supervised or distillation on soft targets."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``-sum_u q_u log softmax(z)_u`` averaged over the batch; (B, U) logits and targets."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


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
) -> list[float]:
    """Train ``model`` on (N, C, H, W) inputs against (N,) labels or (N, U) soft targets.

    ``optimizer="adam"``: Adam with a cosine learning-rate schedule; ``"sgd"``: SGD with
    ``momentum`` at a constant rate (paper 002's MLP set-up: lr 0.01, momentum 0.5, no weight
    decay). ``on_epoch(k)`` runs after epoch k (1-based) with the model in eval mode, e.g. to
    record a learning curve. Returns the mean loss of each epoch.
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
    bar = tqdm(
        range(epochs), desc=desc, unit="epoch", disable=None if progress else True, leave=False
    )
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:  # BatchNorm needs two samples
                continue
            loss = soft_cross_entropy(model(x[index]), targets[index])
            step_rule.zero_grad()
            loss.backward()
            step_rule.step()
            schedule.step()
            total += loss.item() * len(index)
        history.append(total / len(x))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
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
