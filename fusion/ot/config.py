"""How weight fusion aligns and averages networks (paper 002): the choices of OT fusion and
CLAFusion, each default written once."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from amalgam.fusion.config import Config
from amalgam.fusion.ot.balance import SignEstimate
from amalgam.fusion.ot.transport import GroundMetric, Plan


class AlignmentConfig(Config):
    """How networks are aligned and averaged (paper 002; defaults follow its experiments)."""

    # how neurons are compared: "activation" (pre-activations on probe inputs, as in all of
    # paper 002's experiments; on its MNIST MLPs and on CIFAR-10 VGGs it aligned better than
    # weights) or "weight" (needs no inputs)
    ground_metric: GroundMetric = "activation"
    plan: Plan = "emd"  # exact OT, or entropic with `reg`
    reg: float = Field(0.05, gt=0)  # entropic regularisation of "sinkhorn"
    # fusion weight of each model (the paper's w_A, w_B = 1 - w_A); None: uniform
    weights: list[float] | None = None
    # "many_to_one" aligns every model to the base, then averages; "iterative" fuses the base
    # with model 1, the result with model 2, ... (weights renormalised each step)
    mode: Literal["many_to_one", "iterative"] = "many_to_one"
    # CLAFusion: "add" identity layers to the shallower networks, or "merge" layers of the
    # deeper ones (MLPs only)
    balance: Literal["add", "merge"] = "add"
    sign: SignEstimate = "sum"  # how merging estimates which neurons fire


class OTFusionConfig(AlignmentConfig):
    """:class:`AlignmentConfig` and the base: the index of the model whose neurons (and
    widths) the others are aligned to; None: model 0 for OT fusion, the shallowest network
    for CLAFusion (deepened by identity layers with ``balance="add"``, as paper 002 adds
    layers to model B; on the MNIST MLPs of its Table 10, seeds 0-2, this measured 92.7% on
    average against 93.6% with the deeper base: neither wins every seed)."""

    base: int | None = Field(None, ge=0)

    def check(self, count: int) -> None:
        """Raise ``ValueError`` naming the first field that does not fit ``count`` models."""
        if self.weights is not None:
            if len(self.weights) != count:
                raise ValueError(f"weights: {len(self.weights)} given for {count} models")
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError("weights: must be non-negative with a positive sum")
        if self.base is not None and not 0 <= self.base < count:
            raise ValueError(f"base={self.base}: there are {count} models")
