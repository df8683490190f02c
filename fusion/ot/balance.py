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

import torch
from torch import Tensor

from amalgam.fusion.models import MLP, VGG, Classifier, ResNetCifar, create_model
from amalgam.fusion.ot.spec import UnsupportedNetwork, fusion_spec

SIGN_ESTIMATES = ("sum", "vote", "average")

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


def _unit_prefix(model: Classifier, section: str, index: int) -> str:
    if isinstance(model, MLP):
        return f"body.{1 + 2 * index}"
    if section == "fc":
        return f"fc.{1 + 2 * index}"
    return f"stages.{section.removeprefix('stage')}.{index}"


def _rebuilt(model: Classifier, kwargs: dict, renames: dict[str, str], inits: list) -> Classifier:
    """A model of ``kwargs`` holding ``model``'s tensors (unit prefixes renamed) and identity
    units where ``inits`` says."""
    arch = dict(model.arch)
    name = "resnet_cifar" if isinstance(model, ResNetCifar) else arch["name"]
    new = create_model(name, **{**arch["kwargs"], **kwargs})
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


def _section_widths(model: Classifier) -> dict[str, list[int]]:
    if isinstance(model, MLP):
        return {"hidden": list(model.hidden)}
    if isinstance(model, VGG):
        widths = {f"stage{s}": list(w) for s, w in enumerate(model.stage_widths)}
        return widths | {"fc": list(model.fc_widths)}
    if isinstance(model, ResNetCifar):
        return {f"stage{s}": [w] * c for s, (w, c) in enumerate(zip(model.widths, model.blocks))}
    raise UnsupportedNetwork(f"{type(model).__name__}: cannot add layers")


def add_identity_units(model: Classifier, insert_after: dict[str, Sequence[int]]) -> Classifier:
    """A deeper copy of ``model`` computing the same function (paper 002, Fig. 3a).

    Parameters
    ----------
    model : an MLP, VGG or ResNetCifar built by ``create_model``.
    insert_after : section name -> unit indices; one identity unit is inserted after each
        listed unit (repeat an index to insert several). A ResNet gains zero-residual blocks.
    """
    fusion_spec(model)  # raises for unsupported networks
    widths = _section_widths(model)
    unknown = [s for s in insert_after if s not in widths]
    if unknown:
        raise ValueError(f"no section {unknown[0]!r}; sections: {', '.join(widths)}")
    renames: dict[str, str] = {}
    inits: list = []
    new_widths = {}
    for section, section_widths in widths.items():
        order = _new_order(len(section_widths), insert_after.get(section, ()))
        new_widths[section] = []
        for position, old in enumerate(order):
            width = section_widths[old] if old is not None else new_widths[section][-1]
            new_widths[section].append(width)
            prefix = _unit_prefix(model, section, position)
            if old is None:
                init = _insert_init(model, section)
                inits.append((init, prefix, width))
            else:
                renames[_unit_prefix(model, section, old)] = prefix
    return _rebuilt(model, _widths_kwargs(model, new_widths), renames, inits)


def _insert_init(model: Classifier, section: str) -> Init:
    if isinstance(model, MLP) or section == "fc":
        return _identity_linear
    if isinstance(model, VGG):
        return _identity_conv_layer
    return _zero_residual_block


def _widths_kwargs(model: Classifier, widths: dict[str, list[int]]) -> dict:
    if isinstance(model, MLP):
        return {"hidden": tuple(widths["hidden"])}
    if isinstance(model, VGG):
        stages = tuple(tuple(widths[f"stage{s}"]) for s in range(len(model.stage_widths)))
        return {"stages": stages, "fc": tuple(widths["fc"])}
    return {"blocks": tuple(len(widths[f"stage{s}"]) for s in range(3))}


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
    raise ValueError(f"sign={sign!r}: choose one of {', '.join(SIGN_ESTIMATES)}")


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
    layers = [f"body.{1 + 2 * k}" for k in range(len(hidden))] + ["head"]
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
    new = create_model(model.arch["name"], **{**model.arch["kwargs"], "hidden": tuple(hidden)})
    renamed = {}
    for position, prefix in enumerate(layers):
        target = "head" if prefix == "head" else f"body.{1 + 2 * position}"
        renamed[f"{target}.weight"] = state[f"{prefix}.weight"]
        renamed[f"{target}.bias"] = state[f"{prefix}.bias"]
    reference = next(model.parameters())
    new = new.to(reference.dtype).to(reference.device)
    new.load_state_dict(renamed)
    return new.train(model.training)
