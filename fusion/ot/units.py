"""Sections and units of a traced network: what cross-layer alignment maps and balancing
inserts (paper 002, section 3.1), derived from the graph.

A node that every path from the input to the output passes through is a *cut*. The graph is
split at its cuts into segments: a VGG layer gives three (convolution, BatchNorm,
activation), a residual block one for its two paths up to the addition and one for the
activation after it. A *unit* starts with a segment that holds a convolution or linear layer
(a layer, a block) and takes in the shape-keeping segments after it (normalisation,
activation, dropout, a squeeze-and-excitation gate). A section holds consecutive units at one
resolution: a segment that changes the shape without weights -- pooling, flattening,
adapting the input -- ends it, and so does a unit with another output resolution (a strided
convolution, a downsampling block). A unit that adds a branch to its input is *residual*:
cross-layer alignment matches units of one kind only. The classifier, whose outputs are
the classes, is no unit.

A unit is represented by its last convolution, linear layer or normalisation called once on
its longest path: a layer's pre-activation, a block's last BatchNorm before the addition
(not its shortcut's). Its *output* is the cut it ends at; amalgamation reads it from the
innermost module, called once, that returns it (a VGG layer's activation, a residual block).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from amalgam.fusion.models import Section, Unit

FIXED = 0  # the group of the input's channels and of the outputs
ADDITIONS = {operator.add, operator.iadd, torch.add, "add", "add_"}
WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
REPRESENTATIVES = (*WEIGHTED, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class TracedUnit(Unit):
    """A unit of a traced network.

    Attributes
    ----------
    keys : its parameters and buffers, in the order the forward pass reads them.
    residual : it adds a branch to its input (a residual block): zeroing the branch makes
        it the identity.
    end : the ``torch.fx`` node of its output (a cut).
    end_module : the module whose output that is, None when no module called once returns
        it (a functional activation after a functional addition); only with the channels on
        axis 1.
    shape : its output's shape for one sample, e.g. (C, H, W).
    """

    keys: tuple[str, ...]
    residual: bool
    end: str = ""
    end_module: str | None = None
    shape: tuple[int, ...] = ()


@dataclass
class _Segment:
    nodes: list[fx.Node]
    end: fx.Node  # the cut it ends at
    before: tuple[int, ...]  # the shape it starts from, and the one it ends with
    after: tuple[int, ...]
    adds: bool  # it adds two tensors computed from the input (a residual addition)
    gates: bool  # it multiplies two (a squeeze-and-excitation gate)


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else ()


def _cuts(nodes: list[fx.Node], data: set[fx.Node]) -> list[int]:
    """Positions of the data nodes that no edge between data nodes jumps over."""
    position = {node: k for k, node in enumerate(nodes)}
    cuts, reach = [], 0
    for k, node in enumerate(nodes):
        if node not in data:
            continue
        if reach <= k:
            cuts.append(k)
        ends = [position[user] for user in node.users]
        reach = max([reach, *ends])
    return cuts


def _segments(graph: fx.GraphModule, channels: dict[fx.Node, tuple[int, int]]) -> list[_Segment]:
    nodes = list(graph.graph.nodes)
    data = {node for node in nodes if node.op == "placeholder"}
    for node in nodes:  # what depends on the input
        if node.op != "output" and any(arg in data for arg in node.all_input_nodes):
            data.add(node)
    cuts = [k for k in _cuts(nodes, data) if nodes[k] in channels]
    segments = []
    for start, end in zip(cuts, cuts[1:]):
        inside = nodes[start + 1 : end + 1]
        joins = [n for n in inside if len([a for a in n.all_input_nodes if a in data]) > 1]
        adds = any(n.target in ADDITIONS for n in joins)
        segments.append(
            _Segment(
                inside,
                nodes[end],
                _shape(nodes[start]),
                _shape(nodes[end]),
                adds,
                bool(joins) and not adds,
            )  # fmt: skip
        )
    return segments


def _module(graph: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return graph.get_submodule(node.target) if node.op == "call_module" else None


def _returned_outputs(graph: fx.GraphModule) -> dict[fx.Node, str]:
    """For each node that is the output of a module called once, the innermost such module
    (the module whose last node it is)."""
    stacks = {n: n.meta.get("nn_module_stack") or {} for n in graph.graph.nodes}
    calls: dict[str, set[str]] = {}  # module -> its calls' keys ("relu", "relu@1", ...)
    last: dict[str, fx.Node] = {}
    for node, stack in stacks.items():
        for key, (path, _) in stack.items():
            calls.setdefault(path, set()).add(key)
            last[path] = node
    returned: dict[fx.Node, str] = {}
    for path, node in last.items():
        innermost = returned.get(node)
        if len(calls[path]) == 1 and (innermost is None or path.count(".") > innermost.count(".")):
            returned[node] = path
    return returned


def _unit(
    graph: fx.GraphModule,
    segments: list[_Segment],
    channels: dict[fx.Node, tuple[int, int]],
    calls: dict[str, int],
    returned: dict[fx.Node, str],
) -> TracedUnit | None:
    """The unit of ``segments`` (its first one weighted); None for the classifier."""
    group, dim = channels[segments[-1].end]
    if group == FIXED:
        return None
    nodes = [node for segment in segments for node in segment.nodes]
    keys: dict[str, None] = {}
    depth: dict[fx.Node, int] = {}  # layers on the longest path from the unit's input
    representative, deepest = None, -1
    for node in nodes:
        module = _module(graph, node)
        depth[node] = max((depth.get(a, 0) for a in node.all_input_nodes), default=0)
        if module is not None:
            keys |= dict.fromkeys(module.state_dict(prefix=f"{node.target}."))
            depth[node] += 1
            if isinstance(module, REPRESENTATIVES) and calls[node.target] == 1:
                if depth[node] >= deepest:  # the main branch, not a shortcut
                    representative, deepest = node.target, depth[node]
        elif node.op == "get_attr":
            keys[node.target] = None
    first = next(node.target for node in nodes if isinstance(_module(graph, node), WEIGHTED))
    end, shape = segments[-1].end, segments[-1].after
    end_module = returned.get(end) if dim == 1 else None
    return TracedUnit(first, representative or first, shape[dim], tuple(keys),
                      segments[0].adds, end.name, end_module, shape[1:])  # fmt: skip


def _resolution(segment: _Segment, channels: dict[fx.Node, tuple[int, int]]) -> tuple:
    """The shape of a segment's output without the batch and channel axes."""
    _, dim = channels[segment.end]
    shape = segment.after
    return shape[1:dim] + shape[dim + 1 :]


def traced_sections(
    graph: fx.GraphModule, channels: dict[fx.Node, tuple[int, int]]
) -> list[Section]:
    """The sections of a traced network (shapes propagated) with the units in each.

    Parameters
    ----------
    graph : the network's ``torch.fx`` graph with ``tensor_meta`` on its nodes.
    channels : for every node whose channels the alignment follows, its group (resolved;
        ``FIXED`` for the input's and the outputs') and the axis that carries it.
    """
    calls: dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    returned = _returned_outputs(graph)
    sections: list[list[TracedUnit]] = [[]]
    current: list[_Segment] = []
    resolution = None  # that of the section's units

    def close_unit() -> None:
        nonlocal current, resolution
        if current:
            unit = _unit(graph, current, channels, calls, returned)
            if unit is not None:
                here = _resolution(current[-1], channels)
                if sections[-1] and here != resolution:
                    sections.append([])
                sections[-1].append(unit)
                resolution = here
        current = []

    for segment in _segments(graph, channels):
        weighted = any(isinstance(_module(graph, node), WEIGHTED) for node in segment.nodes)
        keeps_shape = segment.after == segment.before
        if weighted and not (current and segment.gates and keeps_shape):
            close_unit()
            current = [segment]
        elif current and keeps_shape:  # normalisation, activation, a gate on the channels
            current.append(segment)
        else:  # pooling, flattening, adapting the input: the section ends
            close_unit()
            if sections[-1]:
                sections.append([])
    close_unit()
    filled = [units for units in sections if units]
    return [Section(f"section{k}", tuple(units)) for k, units in enumerate(filled)]
