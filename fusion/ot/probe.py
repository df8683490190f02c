"""Probe inputs, and what the networks' owners already computed on them.

CKA (cross-layer alignment), the activation-based ground metric and layer merging read the
outputs of named layers on one probe batch. A party that grants ``Gram`` or ``Activations``
computes them where its model lives; the coordinator computes the rest — networks it changed
itself (balanced, fused) — from their weights. Both give the same numbers.
"""

from __future__ import annotations

from torch import Tensor, nn

from amalgam.fusion.activations import layer_grams, layer_outputs


class Probe:
    """Inputs ``x`` (t, C, H, W), already normalised as the networks expect, plus answers
    supplied for particular network objects."""

    def __init__(self, x: Tensor) -> None:
        self.x = x
        # (id(model), kind) -> (model, values); holding the model keeps its id unique
        self._supplied: dict[tuple[int, str], tuple[nn.Module, dict[str, Tensor]]] = {}

    def supply(self, model: nn.Module, kind: str, values: dict[str, Tensor]) -> None:
        """Record ``kind`` ("grams" or "outputs") of ``model``'s layers computed elsewhere."""
        if kind not in ("grams", "outputs"):
            raise ValueError(f"kind={kind!r}: choose grams or outputs")
        self._supplied.setdefault((id(model), kind), (model, {}))[1].update(values)

    def _lookup(self, model: nn.Module, kind: str, layers: list[str], compute) -> dict:
        _, known = self._supplied.get((id(model), kind), (model, {}))
        missing = [layer for layer in layers if layer not in known]
        computed = compute(model, self.x, missing) if missing else {}
        return {layer: known.get(layer, computed.get(layer)) for layer in layers}

    def grams(self, model: nn.Module, layers: list[str]) -> dict[str, Tensor]:
        """Centered (t, t) Gram matrices of the named layers' outputs."""
        return self._lookup(model, "grams", layers, layer_grams)

    def outputs(self, model: nn.Module, layers: list[str]) -> dict[str, Tensor]:
        """(t, ...) outputs of the named layers."""
        return self._lookup(model, "outputs", layers, layer_outputs)
