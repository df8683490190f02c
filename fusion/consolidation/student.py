"""The multi-head student of paper 001 (section 2): a backbone phi_s with the generalist's head
h_s^0 and one head h_s^i per task-specific teacher."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from amalgam.fusion.models import Classifier


class MultiHeadStudent(nn.Module):
    """``model`` is a copy of the generalist (backbone phi_s and head h_s^0, both initialised
    from it); ``teacher_heads[i - 1]`` is h_s^i, a randomly initialised linear layer over the
    backbone's features with teacher i's number of classes.

    Parameters
    ----------
    generalist : the generalist's network; it is copied, never changed.
    head_classes : number of classes of each task-specific teacher, in teacher order.
    seed : initialises the teacher heads.
    """

    def __init__(self, generalist: Classifier, head_classes: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        self.model = copy.deepcopy(generalist)
        generator = torch.Generator().manual_seed(seed)
        heads = []
        for classes in head_classes:
            head = nn.Linear(generalist.num_features, classes)
            bound = generalist.num_features**-0.5  # nn.Linear's default range, seeded here
            with torch.no_grad():
                head.weight.uniform_(-bound, bound, generator=generator)
                head.bias.uniform_(-bound, bound, generator=generator)
            heads.append(head.to(next(generalist.parameters())))
        self.teacher_heads = nn.ModuleList(heads)

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.model.head.parameters()}
        return [p for p in self.model.parameters() if id(p) not in head]

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.model.head.parameters(), *self.teacher_heads.parameters()]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every head on ``x`` (B, C, H, W): ``[(B, K_0), (B, K_1), ...]``."""
        features = self.model.forward_features(x)  # (B, D)
        return [self.model.forward_head(features), *(h(features) for h in self.teacher_heads)]
