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

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from amalgam.fusion.models import MLP, BasicBlock, Classifier, create_model
from amalgam.fusion.ot.spec import UnsupportedNetwork, fusion_spec

SignEstimate = Literal["sum", "vote", "average"]

Init = Callable[[dict[str, Tensor], str, int], None]


def _identity_linear(state: dict[str, Tensor], prefix: str, width: int) -> None:
    weight = state[f"{prefix}.weight"]
    state[f"{prefix}.weight"] = torch.eye(width, dtype=weight.dtype, device=weight.device)
    state[f"{prefix}.bias"] = torch.zeros_like(state[f"{prefix}.bias"])


def _identity_batchnorm(state: dict[str, Tensor], prefix: str, eps: float) -> None:
    """BN(x) = (x - 0) / sqrt(1 + eps) * sqrt(1 + eps) + 0 = x."""
    mean = state[f"{prefix}.running_mean"]
    state[f"{prefix}.running_mean"] = torch.zeros_like(mean)
    state[f"{prefix}.running_var"] = torch.ones_like(mean)
    state[f"{prefix}.weight"] = torch.full_like(mean, (1.0 + eps) ** 0.5)
    state[f"{prefix}.bias"] = torch.zeros_like(mean)


def identity_kernel(channels: int, kernel_size: int, like: Tensor) -> Tensor:
    """(C, C, k, k) convolution kernel that copies its input; ``k`` odd."""
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size}: an identity convolution needs an odd size")
    kernel = torch.zeros(
        channels, channels, kernel_size, kernel_size, dtype=like.dtype, device=like.device
    )
    centre = kernel_size // 2
    kernel[torch.arange(channels), torch.arange(channels), centre, centre] = 1.0
    return kernel


def _identity_conv_layer(state: dict[str, Tensor], prefix: str, width: int) -> None:
    weight = state[f"{prefix}.conv.weight"]
    state[f"{prefix}.conv.weight"] = identity_kernel(width, weight.shape[-1], weight)
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
