"""Which weights share a neuron space: the alignment structure of each supported network.

OT fusion (paper 002, section 2.3 / OTFusion) aligns one *group* of neurons at a time: the
output channels of a layer, which the layer's own weight, bias and BatchNorm carry on one axis
and the next layer's weight carries on its input axis. In a ResNet every block of a stage adds
into the same residual stream, so the stem (or the stage's projection shortcut) and each
block's second convolution all write the stream's group. A :class:`FusionSpec` lists the
groups in forward order and, for every parameter and buffer, the group of each axis.

Cross-layer alignment (section 3.1) works on *units* inside *sections*, as the model declares
them (:meth:`amalgam.fusion.models.Classifier.sections`): the hidden layers of an MLP; the conv
layers of each VGG stage (between poolings) and its fully connected layers; the blocks of each
ResNet stage. A unit is represented by its pre-activation (paper 002); for a ResNet block, that
of its second convolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from amalgam.fusion.models import MLP, VGG, ResNetCifar, Section


class UnsupportedNetwork(ValueError):
    """A network, or one of its layers, that weight fusion cannot align."""


@dataclass(frozen=True)
class Group:
    """One hidden neuron space.

    Attributes
    ----------
    name : unique within the network, identical for corresponding groups of two networks
        of the same depth.
    producers : weights whose axis 0 is this group and whose inputs are aligned before it.
    probe : the module whose output carries this group on dim 1 (its activations give the
        activation-based ground metric).
    also : further modules whose outputs carry the group on dim 1 (a residual stream is
        written by several layers: the metric compares the neurons on all of them).
    """

    name: str
    producers: tuple[str, ...]
    probe: str
    also: tuple[str, ...] = ()

    @property
    def probes(self) -> tuple[str, ...]:
        """Every module whose output the activation-based metric compares."""
        return (self.probe, *self.also)


@dataclass
class FusionSpec:
    groups: list[Group] = field(default_factory=list)
    axes: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)

    def group_sizes(self, model: nn.Module) -> dict[str, int]:
        """Number of neurons of each group in ``model``."""
        return self.group_sizes_of(model.state_dict())

    def group_sizes_of(self, state: dict[str, Tensor]) -> dict[str, int]:
        """Number of neurons of each group in the tensors ``state``."""
        return {g.name: state[g.producers[0]].shape[0] for g in self.groups}


def _linear(spec: FusionSpec, prefix: str, out: str | None, inp: str | None) -> None:
    spec.axes[f"{prefix}.weight"] = (out, inp)
    spec.axes[f"{prefix}.bias"] = (out,)


def _batchnorm(spec: FusionSpec, prefix: str, group: str) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        spec.axes[f"{prefix}.{name}"] = (group,)
    spec.axes[f"{prefix}.num_batches_tracked"] = ()


def _hidden_linear(spec: FusionSpec, section: Section, previous: str | None) -> str | None:
    """Each linear layer of ``section`` is a group ``fc<k>`` reading the group ``previous``;
    returns the last one."""
    for k, unit in enumerate(section.units):
        group = f"fc{k}"
        spec.groups.append(Group(group, (f"{unit.module}.weight",), unit.output))
        _linear(spec, unit.module, group, previous)
        previous = group
    return previous


def _mlp_spec(model: MLP) -> FusionSpec:
    spec = FusionSpec(sections=model.sections())
    _linear(spec, "head", None, _hidden_linear(spec, spec.sections[0], None))
    return spec


def _vgg_spec(model: VGG) -> FusionSpec:
    """Each conv layer (``conv`` with bias, then ``bn``) and each hidden linear layer is a
    group; the first linear layer reads the last stage's (C*h*w) flattened maps."""
    *stages, fc = model.sections()
    spec = FusionSpec(sections=[*stages, fc] if fc.units else stages)
    previous: str | None = None
    for s, section in enumerate(stages):
        for k, unit in enumerate(section.units):
            prefix, group = unit.module, f"conv{s}.{k}"
            spec.groups.append(Group(group, (f"{prefix}.conv.weight",), unit.output))
            spec.axes[f"{prefix}.conv.weight"] = (group, previous, None, None)
            spec.axes[f"{prefix}.conv.bias"] = (group,)
            _batchnorm(spec, f"{prefix}.bn", group)
            previous = group
    _linear(spec, "head", None, _hidden_linear(spec, fc, previous))
    return spec


def _resnet_spec(model: ResNetCifar) -> FusionSpec:
    """The stem and every block's second convolution (and projection shortcut) write one
    residual stream per stage; each block's first convolution is a group of its own."""
    spec = FusionSpec(sections=model.sections())
    stream = "stem"
    spec.groups.append(Group(stream, ("stem.0.weight",), "stem.1"))
    spec.axes["stem.0.weight"] = (stream, None, None, None)
    _batchnorm(spec, "stem.1", stream)
    for s, section in enumerate(spec.sections):
        for b, unit in enumerate(section.units):
            prefix = unit.module
            block = model.get_submodule(prefix)
            inner = f"block{s}.{b}"
            spec.groups.append(Group(inner, (f"{prefix}.conv1.weight",), f"{prefix}.bn1"))
            spec.axes[f"{prefix}.conv1.weight"] = (inner, stream, None, None)
            _batchnorm(spec, f"{prefix}.bn1", inner)
            previous_stream = stream
            if not isinstance(block.shortcut, nn.Identity):
                stream = f"stream{s}" if b == 0 else f"stream{s}.{b}"
                producers = (f"{prefix}.conv2.weight", f"{prefix}.shortcut.0.weight")
                spec.groups.append(Group(stream, producers, prefix))
                spec.axes[f"{prefix}.shortcut.0.weight"] = (stream, previous_stream, None, None)
                _batchnorm(spec, f"{prefix}.shortcut.1", stream)
            spec.axes[f"{prefix}.conv2.weight"] = (stream, inner, None, None)
            _batchnorm(spec, f"{prefix}.bn2", stream)
    _linear(spec, "head", None, stream)
    return spec


def input_shape(model: nn.Module, given: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """The (C, H, W) inputs of ``model``: ``given``, else those its registry description
    names (``model.arch``), else ``None``."""
    if given is not None:
        return tuple(given)
    arch = getattr(model, "arch", None)
    return tuple(arch["kwargs"]["in_shape"]) if arch and "in_shape" in arch["kwargs"] else None


def fusion_spec(model: nn.Module, in_shape: tuple[int, ...] | None = None) -> FusionSpec:
    """The alignment structure of ``model``: the hand-written one of the registry's own
    families, else derived from the traced graph of ``model`` on (B, *in_shape) inputs
    (:func:`amalgam.fusion.ot.graph.traced_spec`; ``in_shape`` defaults to
    :func:`input_shape`). Raises :class:`UnsupportedNetwork` naming the first layer that
    cannot be aligned."""
    builders = {MLP: _mlp_spec, VGG: _vgg_spec, ResNetCifar: _resnet_spec}
    builder = builders.get(type(model))
    if builder is None:
        from amalgam.fusion.ot.graph import traced_spec  # it builds on this module's classes

        in_shape = input_shape(model, in_shape)
        if in_shape is None:
            raise UnsupportedNetwork(
                f"{type(model).__name__}: give the input shape to trace its alignment structure"
            )
        return traced_spec(model, in_shape)
    spec = builder(model)
    state = model.state_dict()
    unknown = [name for name in state if name not in spec.axes]
    if unknown:
        raise UnsupportedNetwork(f"layer {unknown[0]!r}: not covered by the alignment structure")
    return spec
