"""Layer balancing (paper 002, section 3.2): make two networks equally deep along a
cross-layer alignment, by adding identity layers to the shallower one or merging layers of
the deeper one.

Adding is function-preserving: an identity linear layer (or an identity convolution with an
identity BatchNorm) after a ReLU passes ``ReLU(x) = x`` for ``x >= 0``; a ResNet block whose
convolutions are zero passes ``ReLU(0 + x) = x``. Merging hidden layer j of an MLP replaces
``W_{j+1} ReLU(W_j x + b_j) + b_{j+1}`` by ``W_{j+1} D (W_j x + b_j) + b_{j+1}`` with a
diagonal ``D`` estimated from the layer's pre-activations on probe inputs; it is exact only
where the estimate of which neurons fire is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from amalgam.fusion.models import MLP, BasicBlock, Classifier, Section, create_model
from amalgam.fusion.ot.spec import FusionSpec, UnsupportedNetwork, fusion_spec
from amalgam.fusion.ot.units import TracedUnit
from amalgam.fusion.ot.widths import resized

IDENTITY_TOLERANCE = 1e-4  # outputs a balanced copy may differ by, relative to their size

SignEstimate = Literal["sum", "vote", "average"]

Init = Callable[[dict[str, Tensor], str, int], None]


def _identity_linear(state: dict[str, Tensor], prefix: str, width: int) -> None:
    weight = state[f"{prefix}.weight"]
    state[f"{prefix}.weight"] = torch.eye(width, dtype=weight.dtype, device=weight.device)
    state[f"{prefix}.bias"] = torch.zeros_like(state[f"{prefix}.bias"])


def _identity_batchnorm(state: dict[str, Tensor], prefix: str, eps: float) -> None:
    """BN(x) = (x - 0) / sqrt(1 + eps) * sqrt(1 + eps) + 0 = x."""
    identity = {"running_mean": 0.0, "running_var": 1.0, "weight": (1.0 + eps) ** 0.5, "bias": 0.0}
    for name, value in identity.items():
        if f"{prefix}.{name}" in state:
            state[f"{prefix}.{name}"] = torch.full_like(state[f"{prefix}.{name}"], value)


def identity_kernel(like: Tensor) -> Tensor:
    """A convolution kernel of ``like``'s shape (C, C, k, ...) or, depthwise, (C, 1, k, ...)
    that copies its input; every ``k`` odd."""
    channels, per_group, *sizes = like.shape
    if any(size % 2 == 0 for size in sizes):
        raise ValueError(f"kernel size {sizes}: an identity convolution needs odd sizes")
    kernel = torch.zeros_like(like)
    rows = torch.arange(channels)
    columns = rows if per_group == channels else torch.zeros_like(rows)
    kernel[(rows, columns, *(size // 2 for size in sizes))] = 1.0
    return kernel


def _identity_conv_layer(state: dict[str, Tensor], prefix: str, width: int) -> None:
    weight = state[f"{prefix}.conv.weight"]
    state[f"{prefix}.conv.weight"] = identity_kernel(weight)
    state[f"{prefix}.conv.bias"] = torch.zeros_like(state[f"{prefix}.conv.bias"])
    _identity_batchnorm(state, f"{prefix}.bn", eps=1e-5)


def _zero_residual_block(state: dict[str, Tensor], prefix: str, width: int) -> None:
    for conv in ("conv1", "conv2"):
        state[f"{prefix}.{conv}.weight"] = torch.zeros_like(state[f"{prefix}.{conv}.weight"])
    for bn in ("bn1", "bn2"):
        _identity_batchnorm(state, f"{prefix}.{bn}", eps=1e-5)


def _new_order(count: int, insert_after: Sequence[int]) -> list[int | None]:
    """Old unit index at each new position; ``None`` where an identity unit is inserted."""
    if any(not 0 <= i < count for i in insert_after):
        raise ValueError(f"insert after units {sorted(insert_after)} of {count}")
    order: list[int | None] = []
    for k in range(count):
        order.append(k)
        order += [None] * list(insert_after).count(k)
    return order


def _rebuilt(model: Classifier, arch: dict, renames: dict[str, str], inits: list) -> Classifier:
    """A model of ``arch`` holding ``model``'s tensors (unit prefixes renamed) and identity
    units where ``inits`` says."""
    new = create_model(arch["name"], **arch["kwargs"])
    new = new.to(next(model.parameters()).dtype).to(next(model.parameters()).device)
    state = new.state_dict()
    ordered = sorted(renames, key=len, reverse=True)
    for key, tensor in model.state_dict().items():
        target = key
        for old in ordered:
            if key.startswith(old + "."):
                target = renames[old] + key[len(old) :]
                break
        state[target] = tensor.clone()
    for init, prefix, width in inits:
        init(state, prefix, width)
    new.load_state_dict(state)
    return new.train(model.training)


def _identity_init(layer: nn.Module) -> Init:
    """How a unit like ``layer`` is made the identity."""
    if isinstance(layer, nn.Linear):
        return _identity_linear
    if isinstance(layer, BasicBlock):
        return _zero_residual_block
    return _identity_conv_layer


def add_identity_units(model: Classifier, insert_after: dict[str, Sequence[int]]) -> Classifier:
    """A deeper copy of ``model`` computing the same function (paper 002, Fig. 3a).

    Parameters
    ----------
    model : an MLP, VGG or ResNetCifar built by ``create_model``.
    insert_after : section name -> unit indices; one identity unit is inserted after each
        listed unit (repeat an index to insert several). A ResNet gains zero-residual blocks.
    """
    fusion_spec(model)  # raises for unsupported networks
    sections = {section.name: section.units for section in model.sections()}
    unknown = [s for s in insert_after if s not in sections]
    if unknown:
        raise ValueError(f"no section {unknown[0]!r}; sections: {', '.join(sections)}")
    orders = {name: _new_order(len(units), insert_after.get(name, ())) for name, units in
              sections.items()}  # fmt: skip
    widths: dict[str, list[int]] = {}
    for name, order in orders.items():  # an inserted unit is as wide as the one before it
        widths[name] = []
        for old in order:
            widths[name].append(widths[name][-1] if old is None else sections[name][old].width)
    arch = model.arch_with(widths)
    new_units = {s.name: s.units for s in create_model(arch["name"], **arch["kwargs"]).sections()}
    renames: dict[str, str] = {}
    inits: list = []
    for name, order in orders.items():
        for position, old in enumerate(order):
            target = new_units[name][position]
            if old is None:
                init = _identity_init(model.get_submodule(sections[name][0].module))
                inits.append((init, target.module, target.width))
            else:
                renames[sections[name][old].module] = target.module
    return _rebuilt(model, arch, renames, inits)


def firing_estimate(pre_activation: Tensor, sign: str = "sum") -> Tensor:
    """Diagonal of ``D`` (paper 002, section 3.2) from a (t, p) pre-activation matrix.

    ``"sum"``: step(sum over samples); ``"vote"``: 1 where at least half the samples are >= 0;
    ``"average"``: the fraction of samples >= 0. ``step(x) = 1`` for ``x >= 0``.
    """
    if sign == "sum":
        return (pre_activation.sum(dim=0) >= 0).to(pre_activation.dtype)
    if sign == "vote":
        fires = (pre_activation >= 0).sum(dim=0)
        return (2 * fires >= len(pre_activation)).to(pre_activation.dtype)
    if sign == "average":
        return (pre_activation >= 0).to(pre_activation.dtype).mean(dim=0)
    raise ValueError(f"sign={sign!r}: choose one of {', '.join(get_args(SignEstimate))}")


def merge_hidden_layers(
    model: MLP, remove: Sequence[int], pre_activations: dict[int, Tensor], sign: str = "sum"
) -> MLP:
    """A shallower MLP without the hidden layers ``remove`` (paper 002, Fig. 3b).

    Hidden layer j is folded into its successor: ``W' = W_{j+1} D W_j`` and
    ``b' = W_{j+1} D b_j + b_{j+1}``, with ``D = diag(firing_estimate(Z_j, sign))`` from
    ``pre_activations[j]`` (t, p_j), the layer's pre-activations on probe inputs.
    """
    if not isinstance(model, MLP):
        raise UnsupportedNetwork(
            f"{type(model).__name__}: merging layers works on MLPs only (paper 002, section "
            "3.2); balance with 'add'"
        )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hidden = list(model.hidden)
    layers = [unit.module for unit in model.sections()[0].units] + ["head"]
    for j in sorted(set(remove), reverse=True):  # later layers first: Z_j stays valid
        if not 0 <= j < len(hidden) or len(hidden) == 1:
            raise ValueError(f"cannot remove hidden layer {j} of {len(hidden)}")
        firing = firing_estimate(pre_activations[j], sign)  # (p_j,)
        inner, outer = layers[j], layers[j + 1]
        w_next = state[f"{outer}.weight"] * firing  # (p_{j+1}, p_j) = W_{j+1} D
        state[f"{outer}.weight"] = w_next @ state[f"{inner}.weight"]
        state[f"{outer}.bias"] = w_next @ state[f"{inner}.bias"] + state[f"{outer}.bias"]
        del state[f"{inner}.weight"], state[f"{inner}.bias"]
        del layers[j], hidden[j]
    arch = model.arch_with({"hidden": hidden})
    new = create_model(arch["name"], **arch["kwargs"])
    targets = [unit.module for unit in new.sections()[0].units] + ["head"]
    renamed = {}
    for target, prefix in zip(targets, layers, strict=True):
        renamed[f"{target}.weight"] = state[f"{prefix}.weight"]
        renamed[f"{target}.bias"] = state[f"{prefix}.bias"]
    reference = next(model.parameters())
    new = new.to(reference.dtype).to(reference.device)
    new.load_state_dict(renamed)
    return new.train(model.training)


def _identity_traced_unit(state: dict[str, Tensor], model: nn.Module, unit: TracedUnit) -> None:
    """Make ``unit`` of ``model`` the identity in ``state``: a residual unit by zeroing its
    branch (its BatchNorms the identity), any other by identity convolutions, linear layers
    and BatchNorms (which pass ``ReLU(x) = x`` for the non-negative output of the unit
    before)."""
    by_module: dict[str, list[str]] = {}
    for key in unit.keys:
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    for prefix, keys in by_module.items():
        module = model.get_submodule(prefix)
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            _identity_batchnorm(state, prefix, module.eps)
        elif unit.residual:
            for key in keys:
                if state[key].is_floating_point():
                    state[key] = torch.zeros_like(state[key])
        elif isinstance(module, nn.Linear) and module.in_features == module.out_features:
            _identity_linear(state, prefix, module.out_features)
        elif (
            isinstance(module, nn.modules.conv._ConvNd)
            and module.in_channels == module.out_channels
            and module.groups in (1, module.in_channels)
            and all(size % 2 for size in module.kernel_size)
            and set(module.stride) == {1}
        ):
            state[f"{prefix}.weight"] = identity_kernel(weight)
            if f"{prefix}.bias" in state:
                state[f"{prefix}.bias"] = torch.zeros_like(state[f"{prefix}.bias"])
        else:
            raise UnsupportedNetwork(
                f"layer {prefix!r} ({type(module).__name__}) of unit {unit.module!r} cannot be "
                "made the identity"
            )


def _paired(targets: Sequence[str], sources: Sequence[str]) -> dict[str, str]:
    """``{target key: source key}`` in order, or a one-line error where the counts differ."""
    if len(targets) != len(sources):
        raise UnsupportedNetwork(
            f"{len(sources)} tensors ({sources[0] if sources else '-'} ...) cannot take the "
            f"place of {len(targets)} ({targets[0] if targets else '-'} ...)"
        )
    return dict(zip(targets, sources, strict=True))


def _balanced_sizes(
    spec: FusionSpec,
    template: dict[str, Tensor],
    source: dict[str, Tensor],
    pairs: Mapping[str, str],
    inserted: Sequence[TracedUnit],
) -> dict[str, int]:
    """The size of each group of the balanced copy: that of the tensors placed in it; a
    group only inserted units carry scales the template's by the ratio of the unit's input
    group (an identity layer is as wide as its input)."""
    sizes: dict[str, int] = {}
    for target, key in pairs.items():
        for group, size in zip(spec.axes[target], source[key].shape, strict=False):
            if group is not None and sizes.setdefault(group, size) != size:
                raise UnsupportedNetwork(
                    f"{key!r} gives its layer {size} neurons where the layers around it have "
                    f"{sizes[group]}"
                )
    original = spec.group_sizes_of(template)
    for unit in inserted:
        axes = [spec.axes[k] for k in unit.keys if len(spec.axes.get(k, ())) > 1]
        entry = next((a[1] for a in axes if a[1] is not None), None)
        ratio = sizes[entry] / original[entry] if entry in sizes else 1.0
        for key in unit.keys:
            for group in spec.axes.get(key, ()):
                if group is not None and group not in sizes:
                    sizes[group] = max(1, round(original[group] * ratio))
    return sizes


@torch.no_grad()
def balanced_copy(
    template: nn.Module,
    template_spec: FusionSpec,
    model: nn.Module,
    model_sections: Sequence[Section],
    mapping: Mapping[str, Sequence[int]],
    x: Tensor,
) -> nn.Module:
    """A copy of the deeper network ``template`` computing ``model``'s function (paper 002,
    Fig. 3a, for traced networks): ``model``'s unit i of each section takes the place of
    ``template``'s unit ``mapping[section][i]``, every other unit of ``template`` becomes the
    identity, and what lies outside the units (stem, classifier) is ``model``'s. The copy
    has ``model``'s widths (:func:`amalgam.fusion.ot.widths.resized`).

    The copy is checked on the inputs ``x`` (t, C, H, W): outputs that differ from
    ``model``'s by more than :data:`IDENTITY_TOLERANCE` (relative) raise
    :class:`UnsupportedNetwork`.
    """
    theirs = model.state_dict()
    pairs: dict[str, str] = {}
    inserted: list[TracedUnit] = []
    for deep, shallow in zip(template_spec.sections, model_sections, strict=True):
        positions = list(mapping[deep.name])
        for i, unit in enumerate(shallow.units):
            pairs |= _paired(deep.units[positions[i]].keys, unit.keys)
        inserted += [u for j, u in enumerate(deep.units) if j not in positions]
    in_units = [{k for s in sections for u in s.units for k in u.keys}
                for sections in (template_spec.sections, model_sections)]  # fmt: skip
    template_state = template.state_dict()
    pairs |= _paired([k for k in template_state if k not in in_units[0]],
                     [k for k in theirs if k not in in_units[1]])  # fmt: skip
    sizes = _balanced_sizes(template_spec, template_state, theirs, pairs, inserted)
    balanced = resized(template, template_spec, sizes).eval()
    state = {key: tensor.clone() for key, tensor in balanced.state_dict().items()}
    for target, source in pairs.items():
        if state[target].shape != theirs[source].shape:
            raise UnsupportedNetwork(
                f"{source!r} {list(theirs[source].shape)} cannot take the place of {target!r} "
                f"{list(template_state[target].shape)}"
            )
        state[target] = theirs[source].clone()
    for unit in inserted:
        _identity_traced_unit(state, balanced, unit)
    balanced.load_state_dict(state)
    model_training = model.training
    expected, found = model.eval()(x), balanced(x)
    model.train(model_training)
    error = float((expected - found).abs().max())
    if error > IDENTITY_TOLERANCE * (1.0 + float(expected.abs().max())):
        names = ", ".join(u.module for u in inserted)
        raise UnsupportedNetwork(
            f"identity units at {names} change the network's outputs by up to {error:.3g}: "
            "their inputs are not what they pass unchanged (e.g. negative before a ReLU)"
        )
    return balanced
