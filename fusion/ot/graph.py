"""The alignment structure of any traceable network, derived from its graph.

The network is traced with ``torch.fx``, its tensor shapes are propagated on a probe batch, and
the channel axis of every tensor is followed through the graph as a *group* (the neuron space
of :class:`amalgam.fusion.ot.spec.Group`):

- a convolution (``groups=1``) or a linear layer starts a new group on its output channels;
  its weight's axes are (output group, input group, kernel...), its bias (output group,);
- a depthwise convolution (one filter per input channel) keeps its input's group: its filters
  move with the channels they read;
- BatchNorm, a LayerNorm over the channels and a GroupNorm of one group carry the group on all
  their vectors; activations, dropout, pooling and reductions over other axes pass it on;
- an elementwise operation between two tensors -- a residual addition, the product of a
  squeeze-and-excitation block -- ties their groups into one, and a parameter it reads (a
  layer scale) carries the group on its broadcast channel axis;
- ``permute`` moves the channel axis (channels-last blocks); ``flatten(1)`` keeps it as the
  (C*h*w) axis that a following linear layer reads;
- what comes from the input or reaches the output keeps its order: the input channels and
  the classes; any operation on the input alone (resizing it, repeating a grey channel)
  passes that on.

Anything else -- a concatenation, a grouped convolution, a reshape other than a flatten, a
call the rules do not know -- is named in one line (:class:`UnsupportedNetwork`) before any
work. A group's *producers* are the weights that create it and read only groups created
before it (the weight-based ground metric compares their rows with the inputs already
aligned); its *probe* is the last module called once whose output carries it on axis 1 (the
activation-based metric records that module's output).
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.ops import stochastic_depth

from amalgam.fusion.ot.spec import FusionSpec, Group, UnsupportedNetwork
from amalgam.fusion.ot.units import FIXED, traced_sections

PROBE_BATCH = 2

PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
PASS_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.dropout,
    F.adaptive_avg_pool2d, F.max_pool2d, F.avg_pool2d, torch.relu, torch.sigmoid, torch.tanh,
    operator.neg, stochastic_depth,  # torchvision's drop path: the identity in evaluation
}  # fmt: skip
PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "float"}
ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul,
               operator.truediv, torch.add, torch.sub, torch.mul, torch.div}  # fmt: skip
ELEMENTWISE_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
REDUCTIONS = {"mean", "sum", "amax"}


@dataclass(frozen=True)
class Channels:
    """A tensor's channel axis: the group it carries, on axis ``dim`` of ``rank`` axes."""

    group: int
    dim: int
    rank: int


class _Tracer:
    """One pass over a traced graph, in execution order, recording groups with union-find."""

    def __init__(self, model: nn.Module, graph: fx.GraphModule) -> None:
        self.model, self.graph = model, graph
        self.parent = [FIXED]  # union-find over group ids; FIXED is group 0
        self.values: dict[fx.Node, Channels | None] = {}
        self.axes: dict[str, tuple[int | None, ...]] = {}
        # (producing weight, its output group, the output's shape), in forward order
        self.created: list[tuple[str, int, tuple[int, ...]]] = []
        # (module called once, group it outputs on axis 1, the output's shape)
        self.outputs: list[tuple[str, int, tuple[int, ...]]] = []
        self.calls = Counter(n.target for n in graph.graph.nodes if n.op == "call_module")

    # -- union-find --------------------------------------------------------------------------
    def new_group(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:  # FIXED stays the root of whatever it absorbs
            low, high = min(a, b), max(a, b)
            self.parent[high] = low

    # -- the pass -------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                self.values[node] = self._channels(node, FIXED, 1)
            elif node.op == "get_attr":
                self.values[node] = None
            elif node.op == "call_module":
                self.values[node] = self._module(node)
            elif node.op in ("call_function", "call_method"):
                self.values[node] = self._function(node)
            elif node.op == "output":
                for value in _nodes(node.args):
                    if self.values.get(value) is not None:
                        self.union(self.values[value].group, FIXED)

    def _channels(self, node: fx.Node, group: int, dim: int) -> Channels | None:
        meta = node.meta.get("tensor_meta")
        if not hasattr(meta, "shape") or len(meta.shape) <= dim:
            return None
        return Channels(group, dim, len(meta.shape))

    def _input(self, node: fx.Node) -> Channels:
        source = node.args[0] if node.args else None
        value = self.values.get(source) if isinstance(source, fx.Node) else None
        if value is None:
            raise self._unsupported(node, "its input's channels cannot be followed")
        return value

    def _unsupported(self, node: fx.Node, why: str) -> UnsupportedNetwork:
        target = node.target if isinstance(node.target, str) else node.target.__name__
        return UnsupportedNetwork(f"layer {node.name!r} ({target}): {why}")

    def _record(self, node: fx.Node, out: Channels | None) -> Channels | None:
        if out is not None and out.dim == 1 and self.calls[node.target] == 1:
            self.outputs.append((node.target, out.group, _shape(node)))
        return out

    def _module(self, node: fx.Node) -> Channels | None:
        module = self.model.get_submodule(node.target)
        prefix = node.target
        x = self._input(node)
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            if x.dim != 1:
                raise self._unsupported(node, "a convolution over a channels-last tensor")
            spatial = (None,) * (module.weight.ndim - 2)
            if module.groups == 1:
                out = self.new_group()
                self.axes[f"{prefix}.weight"] = (out, x.group, *spatial)
            elif module.groups == module.in_channels == module.out_channels:  # depthwise
                out = x.group
                self.axes[f"{prefix}.weight"] = (out, None, *spatial)
            else:
                raise self._unsupported(node, f"a grouped convolution (groups={module.groups})")
            self.created.append((f"{prefix}.weight", out, _shape(node)))
            self.axes[f"{prefix}.bias"] = (out,)
            return self._record(node, self._channels(node, out, 1))
        if isinstance(module, nn.Linear):
            if x.dim != x.rank - 1:
                raise self._unsupported(node, "a linear layer over an axis other than channels")
            out = self.new_group()
            self.axes[f"{prefix}.weight"] = (out, x.group)
            self.axes[f"{prefix}.bias"] = (out,)
            self.created.append((f"{prefix}.weight", out, _shape(node)))
            return self._record(node, self._channels(node, out, x.dim))
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for name in ("weight", "bias", "running_mean", "running_var"):
                self.axes[f"{prefix}.{name}"] = (x.group,)
        elif isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) != 1 or x.dim != x.rank - 1:
                raise self._unsupported(node, "a LayerNorm over more than the channels")
            self.axes[f"{prefix}.weight"] = self.axes[f"{prefix}.bias"] = (x.group,)
        elif isinstance(module, nn.GroupNorm):
            if module.num_groups != 1:
                raise self._unsupported(node, f"a GroupNorm of {module.num_groups} groups")
            self.axes[f"{prefix}.weight"] = self.axes[f"{prefix}.bias"] = (x.group,)
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or x.dim != 1:
                raise self._unsupported(node, "a flatten other than flatten(1) of (B, C, ...)")
        elif not isinstance(module, PASS_MODULES):
            raise self._unsupported(node, f"{type(module).__name__} is not supported")
        return self._record(node, self._channels(node, x.group, x.dim))

    def _function(self, node: fx.Node) -> Channels | None:
        target = node.target
        is_method = node.op == "call_method"
        tensors = [n for n in _nodes(node.args) if self.values.get(n) is not None]
        if not tensors or not hasattr(node.meta.get("tensor_meta"), "shape"):
            return None  # sizes, shapes, constants: no channels to follow
        if all(self.find(self.values[n].group) == FIXED for n in tensors):
            return self._channels(node, FIXED, 1)  # on the input alone: nothing moves there
        if target is torch.cat:
            raise self._unsupported(node, "a concatenation of channels")
        if (target in ELEMENTWISE) or (is_method and target in ELEMENTWISE_METHODS):
            return self._elementwise(node, tensors)
        x = self._input(node)
        if target in PASS_FUNCTIONS or (is_method and target in PASS_METHODS):
            return self._channels(node, x.group, x.dim)
        if target is torch.flatten or (is_method and target == "flatten"):
            start = _argument(node, 1, "start_dim", 0)
            if start == 1 and x.dim == 1:
                return self._channels(node, x.group, 1)
        elif is_method and target in ("view", "reshape"):
            shape = node.meta["tensor_meta"].shape
            if len(shape) == 2 and x.dim == 1:  # (B, -1): a flatten
                return self._channels(node, x.group, 1)
        elif target is torch.permute or (is_method and target == "permute"):
            order = [a if isinstance(a, int) else None for a in _flat(node.args[1:])]
            order = [d % x.rank for d in order if d is not None]
            if sorted(order) == list(range(x.rank)):
                return self._channels(node, x.group, order.index(x.dim))
        elif (is_method and target in REDUCTIONS) or target in (torch.mean, torch.sum):
            dims = _argument(node, 1, "dim", None)
            keep = _argument(node, 2, "keepdim", False)
            dims = [d % x.rank for d in ((dims,) if isinstance(dims, int) else dims or ())]
            if dims and x.dim not in dims:
                shift = 0 if keep else sum(d < x.dim for d in dims)
                return self._channels(node, x.group, x.dim - shift)
        elif target is F.layer_norm:
            shape = _argument(node, 1, "normalized_shape", ())
            if len(shape) == 1 and x.dim == x.rank - 1:
                for position, key in ((2, "weight"), (3, "bias")):
                    self._parameter_axes(_argument(node, position, key, None), x)
                return self._channels(node, x.group, x.dim)
        elif target is F.batch_norm and x.dim == 1:
            for position, key in enumerate(("running_mean", "running_var", "weight", "bias"), 1):
                argument = _argument(node, position, key, None)
                if isinstance(argument, fx.Node):  # (C,) vectors: read along the channels
                    view = self._parameter(argument)
                    if view is not None:
                        self.axes[view.name] = (x.group,)
            return self._channels(node, x.group, x.dim)
        raise self._unsupported(node, "this operation is not supported by weight fusion")

    def _elementwise(self, node: fx.Node, tensors: list[fx.Node]) -> Channels | None:
        first = self.values[tensors[0]]
        for other in tensors[1:]:
            value = self.values[other]
            if value.rank - value.dim != first.rank - first.dim:
                raise self._unsupported(node, "operands carry their channels on other axes")
            self.union(first.group, value.group)
        for operand in _nodes(node.args):
            self._parameter_axes(operand, first)
        return self._channels(node, first.group, first.dim)

    def _parameter(self, node: fx.Node) -> ParameterView | None:
        """What the graph's own tensor ``node`` is: a parameter or a reshaped view of it."""
        if node.op == "get_attr":
            tensor = functools.reduce(getattr, node.target.split("."), self.graph)
            if isinstance(tensor, Tensor):
                return ParameterView.of(node.target, tuple(tensor.shape))
        if node.op == "call_method" and node.target in ("reshape", "view") and node.args:
            source = node.args[0]
            view = self._parameter(source) if isinstance(source, fx.Node) else None
            if view is not None:
                return view.reshaped(tuple(node.meta["tensor_meta"].shape))
        return None

    def _parameter_axes(self, node: fx.Node | None, x: Channels) -> None:
        """A parameter read by a call on ``x``: the axis that broadcasting lines up with
        ``x``'s channels carries their group."""
        view = self._parameter(node) if isinstance(node, fx.Node) else None
        if view is None:
            return
        axes: list[int | None] = [None] * view.ndim
        source = view.axes.get(len(view.shape) - (x.rank - x.dim))
        if source is not None:
            axes[source] = x.group
        self.axes[view.name] = tuple(axes)


@dataclass(frozen=True)
class ParameterView:
    """A parameter as an operation reads it: its name and rank, the shape it is read in, and
    which of its axes (longer than 1) each axis of that shape is."""

    name: str
    ndim: int
    shape: tuple[int, ...]
    axes: dict[int, int]  # axis of ``shape`` -> axis of the parameter

    @classmethod
    def of(cls, name: str, shape: tuple[int, ...]) -> ParameterView:
        return cls(name, len(shape), shape, {k: k for k, n in enumerate(shape) if n > 1})

    def reshaped(self, shape: tuple[int, ...]) -> ParameterView | None:
        """The view in ``shape``, where that only adds or drops axes of length 1."""
        old = [k for k, n in enumerate(self.shape) if n > 1]
        new = [k for k, n in enumerate(shape) if n > 1]
        if [self.shape[k] for k in old] != [shape[k] for k in new]:
            return None
        return ParameterView(self.name, self.ndim, shape,
                             {k: self.axes[o] for k, o in zip(new, old, strict=True)})  # fmt: skip


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else ()


def _flat(items) -> list:
    out = []
    for item in items:
        out += _flat(item) if isinstance(item, (list, tuple)) else [item]
    return out


def _nodes(items) -> list[fx.Node]:
    return [item for item in _flat(items if isinstance(items, (list, tuple)) else [items])
            if isinstance(item, fx.Node)]  # fmt: skip


def _argument(node: fx.Node, position: int, keyword: str, default):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def traced_spec(model: nn.Module, in_shape: tuple[int, ...]) -> FusionSpec:
    """The alignment structure of ``model`` (taking (B, *in_shape) inputs), derived from its
    ``torch.fx`` graph; raises :class:`UnsupportedNetwork` naming the first layer or
    operation it cannot align, or a parameter that no rule covers."""
    try:
        graph = fx.symbolic_trace(model)
    except Exception as error:  # the model's own code: control flow on tensor values, ...
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnsupportedNetwork(f"{type(model).__name__} cannot be traced: {message}") from None
    was_training = model.training
    graph.eval()
    with torch.no_grad():
        parameter = next(model.parameters(), torch.zeros(()))  # inputs where the model is
        probe = torch.zeros(PROBE_BATCH, *in_shape, device=parameter.device, dtype=parameter.dtype)
        ShapeProp(graph).propagate(probe)
    graph.train(was_training)
    tracer = _Tracer(model, graph)
    tracer.run()
    spec = _assemble(tracer, model)
    channels = {node: (tracer.find(value.group), value.dim)
                for node, value in tracer.values.items() if value is not None}  # fmt: skip
    spec.sections = traced_sections(graph, channels)
    return spec


def _assemble(tracer: _Tracer, model: nn.Module) -> FusionSpec:
    """Groups in the order they are created, named after their first producer's module."""
    order: dict[int, int] = {}  # root -> rank in forward order
    names: dict[int, str] = {}
    first_shape: dict[int, tuple[int, ...]] = {}  # the output shape of its first producer
    for weight, group, shape in tracer.created:
        root = tracer.find(group)
        if root != FIXED and root not in order:
            order[root] = len(order)
            names[root] = weight.rpartition(".")[0]
            first_shape[root] = shape

    def resolved(axes: tuple[int | None, ...]) -> tuple[str | None, ...]:
        return tuple(names.get(tracer.find(g)) if g is not None else None for g in axes)

    state = model.state_dict()
    # (a layer without bias, a BatchNorm without statistics: what it lacks has no axes)
    spec = FusionSpec(axes={name: resolved(axes) for name, axes in tracer.axes.items()
                            if name in state})  # fmt: skip
    # the probe: the last output of the group's first shape (before pooling or flattening);
    # a group that several layers write (a residual stream) is compared on every output
    # that carries it
    probes = {tracer.find(group): module for module, group, shape in tracer.outputs
              if shape == first_shape.get(tracer.find(group))}  # fmt: skip
    outputs: dict[int, list[str]] = {}
    for module, group, _ in tracer.outputs:
        outputs.setdefault(tracer.find(group), []).append(module)
    for root in sorted(order, key=order.get):
        writers = [weight for weight, group, _ in tracer.created if tracer.find(group) == root]
        producers = [
            weight for weight in writers
            if all(order.get(tracer.find(g), -1) < order[root]
                   for g in tracer.axes[weight][1:] if g is not None)
        ]  # fmt: skip
        # a group that only reads itself (a layer inside its own residual) keeps every writer
        probe = probes.get(root, names[root])
        carriers = outputs.get(root, []) if len(writers) > 1 else []
        also = tuple(module for module in carriers if module != probe)
        spec.groups.append(Group(names[root], tuple(producers or writers), probe, also))
    for name, tensor in state.items():  # counters such as BatchNorm's num_batches_tracked
        if not tensor.is_floating_point():
            spec.axes.setdefault(name, (None,) * tensor.ndim)
    unknown = [name for name in state if name not in spec.axes]
    if unknown:
        raise UnsupportedNetwork(f"layer {unknown[0]!r}: not covered by the alignment structure")
    return spec
