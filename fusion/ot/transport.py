"""Layer-wise neuron alignment by optimal transport (OTFusion, Singh & Jaggi 2020; the
layer-wise fusion step of paper 002, section 2.3).

Groups are aligned in forward order. For group g with ``p_A`` neurons in model A and ``p_B``
in the base model B, the ground metric compares A's neurons with B's — their incoming weights
after A's inputs were aligned with the transports already found (weight-based), or their
activations on the same probe inputs (activation-based) — and the transport plan ``T``
(p_A, p_B) with uniform marginals couples them. Every axis of A's tensors that carries group
g — the axis that defines the neurons (weight rows, bias, BatchNorm parameters and statistics)
and the next layer's input axis that reads them — is mapped with ``T_g = T / (1/p_B)``, whose
columns sum to 1: ``W' = T_g^T W`` along that axis. With equal widths and exact OT, ``T_g`` is
a permutation and a neuron-permuted copy of B comes back as B exactly.

With unequal widths this is OTFusion's barycentric approximation: each of B's neurons becomes
the average of the A neurons coupled to it, on both sides. Splitting the outgoing weights
instead (``T / (1/p_A)`` on input axes) would keep A's function exactly when B is wider, but
measured worse once averaged with B (benchmarks/otfusion.py, mlp-hetero: 52% instead of 86%
for CLAFusion with added layers), so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from amalgam.fusion.ot.spec import FusionSpec, Group

Plan = Literal["emd", "sinkhorn"]  # exact OT, or entropic
GroundMetric = Literal["weight", "activation"]  # compare incoming weights, or activations
PLANS: tuple[str, ...] = get_args(Plan)
GROUND_METRICS: tuple[str, ...] = get_args(GroundMetric)


def transport_plan(cost: Tensor, *, method: str = "emd", reg: float = 0.05) -> Tensor:
    """Transport plan between uniform measures on the rows and the columns of ``cost``.

    Parameters
    ----------
    cost : (p_A, p_B) ground cost.
    method : ``"emd"`` (exact, ``ot.emd``) or ``"sinkhorn"`` (entropic, ``ot.sinkhorn`` in
        the log domain, on the cost scaled to a maximum of 1).
    reg : entropic regularisation of ``"sinkhorn"``.

    Returns
    -------
    (p_A, p_B) plan with row sums 1/p_A and column sums 1/p_B, in ``cost``'s dtype and device.
    """
    import ot  # POT, a coordinator dependency: party agents trace graphs without it

    if method not in PLANS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(PLANS)}")
    if not torch.isfinite(cost).all():
        raise ValueError("transport cost contains NaN or infinite entries")
    m = cost.double()
    a = torch.full((m.shape[0],), 1.0 / m.shape[0], dtype=torch.float64, device=m.device)
    b = torch.full((m.shape[1],), 1.0 / m.shape[1], dtype=torch.float64, device=m.device)
    if method == "emd":
        plan = ot.emd(a, b, m)
    else:
        scale = m.max() if m.max() > 0 else torch.ones((), dtype=m.dtype)
        plan = ot.sinkhorn(a, b, m / scale, reg, method="sinkhorn_log")
    if not torch.isfinite(plan).all():
        raise FloatingPointError(f"{method} transport plan contains NaN; raise reg (now {reg})")
    return plan.to(cost.dtype)


def apply_transport(tensor: Tensor, axis: int, coupling: Tensor) -> Tensor:
    """Map ``axis`` of ``tensor`` from A's p_A neurons onto B's p_B neurons: ``T^T W``.

    ``coupling`` is (p_A, p_B): ``W'[j] = sum_i coupling[i, j] W[i]``. When the axis is a flattened
    (channels x spatial) axis — a linear layer after ``Flatten`` — of length ``p_A * s``,
    it is viewed as (p_A, s) and the channels are mapped.
    """
    p_a, p_b = coupling.shape
    moved = tensor.movedim(axis, 0)  # (L, ...) with L = p_A or p_A * s
    length, rest = moved.shape[0], moved.shape[1:]
    if length % p_a:
        raise ValueError(f"axis {axis} of length {length} does not hold {p_a} neurons")
    spatial = length // p_a
    grouped = moved.reshape(p_a, spatial, -1)  # (p_A, s, rest)
    mapped = torch.einsum("ij,isr->jsr", coupling.to(tensor.dtype), grouped)  # (p_B, s, rest)
    return mapped.reshape(p_b * spatial, *rest).movedim(0, axis)


def _map_axes(tensor: Tensor, axes: tuple[str | None, ...], plans: dict[str, Tensor]) -> Tensor:
    """Map every axis of ``tensor`` whose group has a plan with ``T / (1/p_B)``."""
    for axis, group in enumerate(axes):
        if group in plans:
            plan = plans[group]
            tensor = apply_transport(tensor, axis, plan * plan.shape[1])
    return tensor


def neuron_features(activation: Tensor) -> Tensor:
    """(t, p, ...) activations of a layer -> (p, t * ...) one row per neuron."""
    return activation.movedim(1, 0).reshape(activation.shape[1], -1)


def group_features(activations: dict[str, Tensor], group: Group) -> Tensor:
    """(p, F): the neuron features of every probe layer of ``group``, side by side."""
    return torch.cat([neuron_features(activations[layer]) for layer in group.probes], dim=1)


@dataclass
class Alignment:
    """Model A's tensors mapped onto the base's neurons, with what each group cost.

    Attributes
    ----------
    state : A's state dict with every grouped axis in the base's neuron order and width.
    plans : (p_A, p_B) transport plan of each group (marginals 1/p_A, 1/p_B).
    costs : transport cost ``<T, M>`` of each group (0 for a model aligned to itself).
    """

    state: dict[str, Tensor]
    plans: dict[str, Tensor]
    costs: dict[str, float]


def align(
    state: dict[str, Tensor],
    base: dict[str, Tensor],
    spec: FusionSpec,
    *,
    ground_metric: str = "weight",
    method: str = "emd",
    reg: float = 0.05,
    activations: dict[str, Tensor] | None = None,
    base_activations: dict[str, Tensor] | None = None,
) -> Alignment:
    """Align model A (``state``) to the base model (``base``), group by group.

    Parameters
    ----------
    state, base : state dicts of two networks with the same structure ``spec`` (same groups,
        widths may differ).
    ground_metric : ``"weight"`` — Euclidean distance between A's incoming weights (inputs
        already aligned) and B's; ``"activation"`` — Euclidean distance between the neurons'
        activations on the same probe inputs (``activations`` / ``base_activations``, keyed by
        each group's ``probe``).
    method, reg : the transport plan (:func:`transport_plan`).
    """
    if ground_metric not in GROUND_METRICS:
        raise ValueError(
            f"ground_metric={ground_metric!r}: choose one of {', '.join(GROUND_METRICS)}"
        )
    if ground_metric == "activation" and (activations is None or base_activations is None):
        raise ValueError("ground_metric='activation' needs the activations of both models")
    plans: dict[str, Tensor] = {}
    costs: dict[str, float] = {}
    for group in spec.groups:
        if ground_metric == "weight":
            ours = torch.cat(
                [_map_axes(state[p], spec.axes[p], plans).flatten(1) for p in group.producers],
                dim=1,
            )  # (p_A, fan_in summed over producers)
            theirs = torch.cat([base[p].flatten(1) for p in group.producers], dim=1)
        else:
            ours = group_features(activations, group)  # (p_A, F)
            theirs = group_features(base_activations, group)  # (p_B, F)
        cost = torch.cdist(ours.double(), theirs.double())  # (p_A, p_B)
        plan = transport_plan(cost, method=method, reg=reg)
        costs[group.name] = float((plan * cost).sum())
        plans[group.name] = plan
    aligned = {
        name: _map_axes(tensor, spec.axes[name], plans)
        if tensor.is_floating_point()
        else base[name].clone()
        for name, tensor in state.items()
    }
    return Alignment(aligned, plans, costs)
