"""Which of a party's layers its policy releases (``Activations``, ``Gram``), and which of
those end a unit of the model's graph: the feature layers a party advertises for
amalgamation (:mod:`amalgam.fusion.amalgamation.points`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from amalgam.fusion.activations import layer_names
from amalgam.fusion.amalgamation.points import feature_points
from amalgam.protocol.schemas import FeatureLayer, LayersPolicy


def released_layers(model: nn.Module, rule: LayersPolicy | None, field: str) -> list[str]:
    """The layers ``rule`` (the policy's ``field``) releases, in the model's order; a name
    the model lacks is a configuration error naming ``policy.<field>.layers``."""
    if rule is None:
        return []
    names = layer_names(model)
    if "*" in rule.layers:
        return names
    unknown = [layer for layer in rule.layers if layer not in names]
    if unknown:
        raise ValueError(f"policy.{field}.layers: the model has no layer {unknown[0]!r}")
    return [name for name in names if name in rule.layers]


def unit_outputs(
    model: nn.Module, input_shape: Sequence[int], released: Sequence[str]
) -> list[FeatureLayer]:
    """The ``released`` layers that end a unit of the model's graph, in forward order, with
    their shapes; none where the model cannot be traced (amalgamation then says so)."""
    wanted = set(released)
    if not wanted:
        return []
    try:
        points = feature_points(model, input_shape)
    except Exception:  # the model's own code: untraceable, unsupported operations
        return []
    return [FeatureLayer(name=p.name, shape=p.shape) for p in points if p.name in wanted]
