"""Feature points of any traced network: where amalgamation reads the teachers' features and
where it cuts a library student into the steps of layer-wise learning (paper 004, Eq. 3).

A feature point is the output of an alignment unit (:mod:`amalgam.fusion.ot.units`: a layer
with its normalisation and activation, a residual block), read from the module that returns
it. Every unit output is a cut of the graph, so the network between two points is a function
of one tensor: a step. Teachers and student are matched resolution by resolution
(:func:`match_points`): at every spatial size (or the unpooled vector) they all reach, every
point when they have as many there, else the last one -- the features the resolution ends
with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, fx, nn

from amalgam.fusion.ot.graph import traced_spec


@dataclass(frozen=True)
class FeaturePoint:
    """``name``: the module whose output it is; ``shape``: that output for one sample,
    (C, H, W) or (C,); ``node``: its ``torch.fx`` node (for cutting the network there)."""

    name: str
    shape: tuple[int, ...]
    node: str = ""

    @property
    def resolution(self) -> tuple[int, ...]:
        return self.shape[1:]


def feature_points(model: nn.Module, in_shape: Sequence[int]) -> list[FeaturePoint]:
    """The unit outputs of ``model`` (taking (B, *in_shape) inputs) that a module returns, in
    forward order; raises :class:`amalgam.fusion.ot.UnsupportedNetwork` (one line) when the
    network cannot be traced."""
    spec = traced_spec(model, tuple(in_shape))
    return [
        FeaturePoint(unit.end_module, unit.shape, unit.end)
        for section in spec.sections
        for unit in section.units
        if getattr(unit, "end_module", None)
    ]


def match_points(
    networks: Mapping[str, Sequence[FeaturePoint]], student: Sequence[FeaturePoint]
) -> list[dict[str, FeaturePoint]]:
    """Per matched position, in the student's forward order, ``{network: point}`` with the
    student under ``"student"``.

    Every resolution of the student (in order) takes, in each network, the smallest of its
    resolutions after the one taken before that is at least as large (the vector takes the
    vector): the same one where both reach it, else the next larger one (a teacher's 28x28,
    14x14, 7x7 for a student's 16x16, 8x8, 4x4 that upsamples 28x28 inputs to 32x32); a
    resolution some network has no level for is left out. At each taken level, all points
    are matched in order where every network has as many there as the student, else each
    one's last.
    Features of another size are pooled to the student's (:func:`pooled`).

    Raises ``ValueError`` naming a network that has a level for no resolution of the
    student, or when no resolution has one in every network."""
    levels = {name: list(dict.fromkeys(p.resolution for p in points))
              for name, points in networks.items()}  # fmt: skip
    resolutions = list(dict.fromkeys(p.resolution for p in student))
    for name, own in levels.items():
        if all(_level(own, resolution, -1) is None for resolution in resolutions):
            raise ValueError(
                f"party {name}: none of its feature maps is as large as one of the student's "
                f"({', '.join(map(_size, resolutions))})"
            )
    taken = dict.fromkeys(networks, -1)  # per network, the index of its last level taken
    matched = []
    for resolution in resolutions:
        found = {name: _level(levels[name], resolution, taken[name]) for name in networks}
        if any(k is None for k in found.values()):
            continue
        taken.update(found)
        there = {name: [p for p in points if p.resolution == levels[name][found[name]]]
                 for name, points in networks.items()}  # fmt: skip
        there["student"] = [p for p in student if p.resolution == resolution]
        count = len(there["student"])
        if any(len(points) != count for points in there.values()):
            there = {name: points[-1:] for name, points in there.items()}
        matched += [dict(zip(there, row, strict=True)) for row in zip(*there.values())]
    if not matched:
        raise ValueError("no size of the student's features has a match in every party")
    return matched


def _level(levels: list[tuple[int, ...]], wanted: tuple[int, ...], after: int) -> int | None:
    """The index of the smallest of ``levels[after + 1:]`` at least ``wanted`` on every axis
    (a vector only for a vector)."""
    fits = [k for k in range(after + 1, len(levels)) if len(levels[k]) == len(wanted)
            and all(a >= b for a, b in zip(levels[k], wanted, strict=True))]  # fmt: skip
    return min(fits, key=lambda k: math.prod(levels[k]), default=None)


def pooled(features: Tensor, resolution: tuple[int, ...]) -> Tensor:
    """(t, C, H, W) features averaged to (t, C, *resolution) where their size differs
    (adaptive average pooling); vectors and features of that size as they are."""
    if tuple(features.shape[2:]) == tuple(resolution):
        return features
    return F.adaptive_avg_pool2d(features.float(), resolution)


def _size(resolution: tuple[int, ...]) -> str:
    return "x".join(map(str, resolution)) or "vector"


def split_at(model: nn.Module, points: Sequence[FeaturePoint]) -> list[nn.Module]:
    """``model`` cut at ``points`` (its own, in forward order) into ``len(points) + 1``
    steps, each a ``torch.fx`` module of one tensor sharing ``model``'s parameters: chained
    from the input they compute ``model``; step k ends at point k, the last at the output.
    A step that would read more than the tensor at its start raises ``ValueError``."""
    ends = {point.node: point.name for point in points}
    steps: list[nn.Module] = []
    graph, env = fx.Graph(), {}
    where = "the input"

    def value(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise ValueError(f"the network after {where} reads more than the tensor there")
            env[node] = graph.node_copy(node)  # a parameter or constant: read where used
        return env[node]

    for node in fx.symbolic_trace(model).graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "output":
            graph.output(fx.map_arg(node.args[0], value))
            steps.append(fx.GraphModule(model, graph))
        elif node.op != "get_attr":
            env[node] = graph.node_copy(node, value)
            if node.name in ends:
                graph.output(env[node])
                steps.append(fx.GraphModule(model, graph))
                graph, where = fx.Graph(), ends[node.name]
                env = {node: graph.placeholder(node.name)}
    return steps
