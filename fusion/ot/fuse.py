"""One-shot weight fusion of N networks: OT fusion of equally deep networks, and CLAFusion
(cross-layer alignment + layer balancing + OT fusion) of networks of different depths
(paper 002, Fig. 1, section 3.3 for more than two networks)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from amalgam.fusion.models import Classifier, Section, create_model
from amalgam.fusion.ot.balance import add_identity_units, balanced_copy, merge_hidden_layers
from amalgam.fusion.ot.cka import cka_cost
from amalgam.fusion.ot.cla import cross_layer_alignment
from amalgam.fusion.ot.config import OTFusionConfig
from amalgam.fusion.ot.graph import traced_spec
from amalgam.fusion.ot.probe import Probe
from amalgam.fusion.ot.spec import FusionSpec, UnsupportedNetwork, fusion_spec, input_shape
from amalgam.fusion.ot.transport import align
from amalgam.fusion.ot.units import TracedUnit

OTHER_KIND_COST = 1e3  # a residual unit against one that is not: never the optimal match


@dataclass
class FusionResult:
    """The fused model and what the fusion found.

    Attributes
    ----------
    model : the fused network (the base's architecture after balancing).
    base : index of the base model.
    transport_costs : per model, the transport cost of each group.
    alignments : per section, per model, the cross-layer map (CLAFusion only).
    cka : per section, per model, the (m, n) CKA matrix between the deeper and the
        shallower network's units (CLAFusion only).
    cka_layers : per section, per model, the layer names of the CKA matrix's rows (the
        deeper network) and columns (the shallower).
    balanced : the depth-aligned input models.
    depth_reference : the network the cross-layer maps of the others were found against:
        the base for the registry's networks, the deepest network for traced ones.
    aligned : per model, its state aligned to the fused network's neurons (the base's own
        for the base); :meth:`aligned_models` builds them.
    """

    model: Classifier
    base: int
    transport_costs: list[dict[str, float]] = field(default_factory=list)
    alignments: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    cka: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    cka_layers: dict[str, dict[int, tuple[list[str], list[str]]]] = field(default_factory=dict)
    balanced: list[Classifier] = field(default_factory=list)
    aligned: list[dict[str, Tensor]] = field(default_factory=list)
    depth_reference: int | None = None

    def aligned_models(self) -> list[nn.Module]:
        """The input networks after alignment, each of the fused network's architecture."""
        return [_build_like(self.model, state) for state in self.aligned]


def _normalised(weights: list[float] | None, count: int) -> list[float]:
    weights = weights if weights is not None else [1.0] * count
    return [w / sum(weights) for w in weights]


def _as_probe(probe: Tensor | Probe | None) -> Probe | None:
    return probe if probe is None or isinstance(probe, Probe) else Probe(probe)


def _weighted_average(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    fused = {}
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            fused[name] = sum(w * s[name] for w, s in zip(weights, states, strict=True))
        else:
            fused[name] = tensor.clone()
    return fused


def cross_layer_spec(model: nn.Module, in_shape: tuple[int, ...] | None = None) -> FusionSpec:
    """:func:`fusion_spec` of a network that cross-layer alignment can balance: one whose
    sections (units between resolution changes) the registry declares."""
    spec = fusion_spec(model, in_shape)
    if not spec.sections:
        name = getattr(model, "arch", {}).get("name", type(model).__name__)
        raise UnsupportedNetwork(
            f"{name}: found no hidden layers or blocks to align across depths; fuse networks "
            "of equal depth with OT"
        )
    return spec


def _check_inputs(models: list[nn.Module]) -> None:
    shapes = [input_shape(m) for m in models]
    for k, shape in enumerate(shapes[1:], start=1):
        if shape != shapes[0]:
            raise UnsupportedNetwork(f"model {k}: input shape {shape} differs from {shapes[0]}")


def _check_same_structure(specs: list[FusionSpec]) -> None:
    names = [g.name for g in specs[0].groups]
    for k, spec in enumerate(specs[1:], start=1):
        other = [g.name for g in spec.groups]
        if other != names:
            first = next((a for a, b in zip(names, other) if a != b), None) or "depth"
            raise UnsupportedNetwork(
                f"model {k}: layers differ from model 0 at {first!r}; use CLAFusion to fuse "
                "networks of different depths"
            )


def ot_fuse(
    models: list[nn.Module],
    config: OTFusionConfig | None = None,
    probe: Tensor | Probe | None = None,
    in_shape: tuple[int, ...] | None = None,
) -> FusionResult:
    """Fuse equally deep networks of one family by layer-wise OT alignment and averaging.

    Parameters
    ----------
    models : N >= 1 networks with the same groups (widths may differ): registry networks,
        or any network whose graph :func:`amalgam.fusion.ot.graph.traced_spec` can follow.
    config : see :class:`OTFusionConfig`; ``balance`` and ``sign`` are not used here.
    probe : (t, C, H, W) inputs (or a :class:`Probe` with answers the parties supplied) for
        ``ground_metric="activation"``.
    in_shape : the (C, H, W) inputs of networks outside the registry (for tracing them);
        by default that of the probe, if any.
    """
    config = config or OTFusionConfig()
    config.check(len(models))
    probe = _as_probe(probe)
    if config.ground_metric == "activation" and probe is None:
        raise ValueError(
            "ground_metric='activation' needs probe inputs (or use ground_metric='weight')"
        )
    _check_inputs(models)
    shape = in_shape or (tuple(probe.x.shape[1:]) if probe is not None else None)
    specs = [fusion_spec(m, shape) for m in models]
    _check_same_structure(specs)
    base = config.base if config.base is not None else 0
    weights = _normalised(config.weights, len(models))
    spec = specs[base]
    costs: list[dict[str, float]] = [{} for _ in models]
    states: list[dict[str, Tensor]] = [models[k].state_dict() for k in range(len(models))]

    def activations(model: nn.Module) -> dict[str, Tensor] | None:
        if config.ground_metric != "activation":
            return None
        return probe.outputs(model, [layer for g in spec.groups for layer in g.probes])

    def aligned_to(target: Classifier, target_acts: dict | None, k: int) -> dict[str, Tensor]:
        result = align(
            models[k].state_dict(),
            target.state_dict(),
            spec,
            ground_metric=config.ground_metric,
            method=config.plan,
            reg=config.reg,
            activations=activations(models[k]),
            base_activations=target_acts,
        )
        costs[k], states[k] = result.costs, result.state
        return result.state

    costs[base] = {g.name: 0.0 for g in spec.groups}  # the base is the target, never aligned
    if config.mode == "many_to_one":
        base_acts = activations(models[base])
        for k in (k for k in range(len(models)) if k != base):
            aligned_to(models[base], base_acts, k)
        fused = _build_like(models[base], _weighted_average(states, weights))
    else:
        fused, total = models[base], weights[base]
        for k in (k for k in range(len(models)) if k != base and weights[k] > 0):
            state = aligned_to(fused, activations(fused), k)
            share = weights[k] / (total + weights[k])
            average = _weighted_average([fused.state_dict(), state], [1 - share, share])
            fused = _build_like(models[base], average)
            total += weights[k]
        for k in (k for k in range(len(models)) if k != base and weights[k] == 0):
            aligned_to(fused, activations(fused), k)  # left out of the average, still aligned
    return FusionResult(fused, base, costs, balanced=list(models), aligned=states)


def vanilla_average(models: list[Classifier], weights: list[float] | None = None) -> Classifier:
    """Weighted average of the parameters of identically shaped networks, neurons unaligned
    (the baseline OT fusion improves on)."""
    weights = _normalised(weights, len(models))
    return _build_like(models[0], _weighted_average([m.state_dict() for m in models], weights))


def _build_like(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A network of ``model``'s architecture holding ``state``: a registry network is built
    anew from its description, any other is a copy of ``model``."""
    if not hasattr(model, "arch"):
        fused = copy.deepcopy(model)
    else:
        reference = next(model.parameters())
        fused = create_model(model.arch["name"], **model.arch["kwargs"]).to(reference.dtype)
        fused = fused.to(reference.device)
    fused.load_state_dict(state)
    return fused.eval()


def _unit_count(model: Classifier) -> int:
    return sum(len(s.units) for s in fusion_spec(model).sections)


def _cross_layer_map(
    deep: tuple[Section, dict[str, Tensor]],
    shallow: tuple[Section, dict[str, Tensor]],
    result: FusionResult,
    section: str,
    k: int,
) -> list[int]:
    """The cross-layer map (paper 002, Definition 1) of a section from the shallower
    network's units to the deeper's, each given with its Gram matrices on the probe, on the
    linear CKA cost (Eq. 3) -- residual units only matched to residual ones --; recorded in
    ``result`` for model ``k``."""
    (deep_section, deep_grams), (shallow_section, shallow_grams) = deep, shallow
    cost = cka_cost(
        [deep_grams[u.output] for u in deep_section.units],
        [shallow_grams[u.output] for u in shallow_section.units],
    )
    kinds = [
        [getattr(u, "residual", None) for u in s.units] for s in (deep_section, shallow_section)
    ]
    other_kind = torch.tensor([[a != b for b in kinds[1]] for a in kinds[0]])  # (m, n)
    mapping = cross_layer_alignment(cost + OTHER_KIND_COST * other_kind)
    result.alignments.setdefault(section, {})[k] = mapping
    result.cka.setdefault(section, {})[k] = 1.0 - cost
    layers = [u.output for u in deep_section.units], [u.output for u in shallow_section.units]
    result.cka_layers.setdefault(section, {})[k] = layers
    return mapping


def _depth_align_pair(
    base: Classifier,
    other: Classifier,
    probe: Probe,
    config: OTFusionConfig,
    result: FusionResult,
    k: int,
) -> tuple[Classifier, Classifier]:
    """Balance ``base`` and model ``k`` (``other``) to equal depth in every section.

    Per section, the cross-layer map runs from the shallower to the deeper network. With
    ``balance="add"`` the shallower one gains identity units (the base too, where model k is
    deeper); with ``"merge"`` the deeper one loses units, which must not be the base.
    """
    base_spec, other_spec = fusion_spec(base), fusion_spec(other)
    names = [s.name for s in base_spec.sections]
    if names != [s.name for s in other_spec.sections]:
        raise UnsupportedNetwork(
            f"model {k}: sections {[s.name for s in other_spec.sections]} differ from the "
            f"base's {names}"
        )
    base_grams = probe.grams(base, [u.output for s in base_spec.sections for u in s.units])
    other_grams = probe.grams(other, [u.output for s in other_spec.sections for u in s.units])
    insert: tuple[dict[str, list[int]], dict[str, list[int]]] = ({}, {})  # (base, other)
    remove: list[int] = []
    for ours, theirs in zip(base_spec.sections, other_spec.sections, strict=True):
        m, n = len(ours.units), len(theirs.units)
        base_deeper = m >= n
        pair = (ours, base_grams), (theirs, other_grams)
        mapping = _cross_layer_map(*(pair if base_deeper else pair[::-1]), result, ours.name, k)
        if m == n:
            continue
        if config.balance == "add":
            ends = mapping[1:] + [max(m, n)]
            gaps = [i for i, end in enumerate(ends) for _ in range(end - mapping[i] - 1)]
            insert[1 if base_deeper else 0][ours.name] = gaps
        elif base_deeper:
            raise UnsupportedNetwork(
                f"model {k} is shallower than the base in {ours.name!r}; with balance='merge' "
                "the base must be the shallowest network (leave base unset)"
            )
        else:
            remove += [j for j in range(n) if j not in mapping]
    if insert[0]:
        base = add_identity_units(base, insert[0])
    if insert[1]:
        other = add_identity_units(other, insert[1])
    if remove:
        units = [u.output for u in other_spec.sections[0].units]
        z = probe.outputs(other, [units[j] for j in remove])
        other = merge_hidden_layers(other, remove, {j: z[units[j]] for j in remove}, config.sign)
    return base, other


def clafusion(
    models: list[Classifier], probe: Tensor | Probe, config: OTFusionConfig | None = None
) -> FusionResult:
    """CLAFusion (paper 002): depth-align every network to the base by cross-layer alignment
    on linear CKA of the units' pre-activations on ``probe`` (t, C, H, W), balance the depths
    (``config.balance``), then OT-fuse (:func:`ot_fuse`).

    With ``balance="add"`` the fused network is, in every section, as deep as the deepest
    input: the base (by default the shallowest network) first gains identity units wherever
    another network is deeper, then every network is depth-aligned to it.
    """
    config = config or OTFusionConfig()
    config.check(len(models))
    _check_inputs(models)
    probe = _as_probe(probe)
    # unsupported networks fail here, before any work
    in_shape = tuple(probe.x.shape[1:])
    specs = [cross_layer_spec(model, in_shape) for model in models]
    traced = [isinstance(spec.sections[0].units[0], TracedUnit) for spec in specs]
    if any(traced):  # registry networks among them are seen as traced ones too
        specs = [
            spec if t else traced_spec(m, in_shape)
            for spec, t, m in zip(specs, traced, models, strict=True)
        ]
        return _traced_clafusion(models, specs, probe, config)
    if config.base is None:
        depths = [_unit_count(m) for m in models]
        base = depths.index(min(depths))
    else:
        base = config.base
    # the cross-layer maps reported are those of the networks as given (the first pass)
    result = FusionResult(models[base], base)
    others = [k for k in range(len(models)) if k != base]
    target = models[base]
    if config.balance == "add":  # grow the base to the deepest section of any network
        for k in others:
            target, _ = _depth_align_pair(target, models[k], probe, config, result, k)
    balanced = list(models)
    balanced[base] = target
    second_pass = FusionResult(target, base) if config.balance == "add" else result
    for k in others:
        _, balanced[k] = _depth_align_pair(target, models[k], probe, config, second_pass, k)
    return _with_maps(ot_fuse(balanced, _with_base(config, base), probe), result, balanced)


def _with_maps(fused: FusionResult, maps: FusionResult, balanced: list) -> FusionResult:
    """``fused`` with the cross-layer maps (and their CKA) found for ``balanced``."""
    fused.alignments, fused.cka, fused.cka_layers = maps.alignments, maps.cka, maps.cka_layers
    fused.balanced, fused.depth_reference = balanced, maps.base
    return fused


def _traced_clafusion(
    models: list[nn.Module], specs: list[FusionSpec], probe: Probe, config: OTFusionConfig
) -> FusionResult:
    """CLAFusion of traced networks (:func:`clafusion`): every network is depth-aligned to
    the one that is deepest in every section, whose architecture (at the base's widths) the
    fused network takes; identity units (:func:`balanced_copy`) fill the layers a shallower
    network lacks."""
    if config.balance != "add":
        raise UnsupportedNetwork(
            "balance='merge' removes hidden layers of the registry's MLPs only; traced "
            "networks are balanced with 'add'"
        )
    depths = [[len(section.units) for section in spec.sections] for spec in specs]
    for k, counts in enumerate(depths[1:], start=1):
        if len(counts) != len(depths[0]):
            raise UnsupportedNetwork(
                f"model {k}: {len(counts)} sections (units per section {counts}) where model "
                f"0 has {len(depths[0])} ({depths[0]}); cross-layer alignment maps units "
                "within matching sections"
            )
    deepest = [
        k for k, counts in enumerate(depths) if counts == [max(column) for column in zip(*depths)]
    ]
    if not deepest:
        raise UnsupportedNetwork(
            f"no network is the deepest in every section (units per section: {depths}); "
            "traced networks are balanced to the deepest one"
        )
    reference = deepest[0]
    base = config.base if config.base is not None else depths.index(min(depths, key=sum))
    maps = FusionResult(models[reference], reference)
    grams = [probe.grams(m, [u.output for s in spec.sections for u in s.units])
             for m, spec in zip(models, specs, strict=True)]  # fmt: skip
    balanced = list(models)
    for k in range(len(models)):
        if k == reference:
            continue
        sections = zip(specs[reference].sections, specs[k].sections, strict=True)
        mapping = {deep.name: _cross_layer_map((deep, grams[reference]), (shallow, grams[k]),
                                               maps, deep.name, k)
                   for deep, shallow in sections}  # fmt: skip
        try:
            balanced[k] = balanced_copy(models[reference], specs[reference], models[k],
                                        specs[k].sections, mapping, probe.x)  # fmt: skip
        except UnsupportedNetwork as error:
            raise UnsupportedNetwork(f"model {k}: {error}") from None
    fused = ot_fuse(balanced, _with_base(config, base), probe, tuple(probe.x.shape[1:]))
    return _with_maps(fused, maps, balanced)


def _with_base(config: OTFusionConfig, base: int) -> OTFusionConfig:
    return config.model_copy(update={"base": base})


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: Tensor, batch_size: int = 256) -> nn.Module:
    """Replace every BatchNorm's running statistics by their average over ``x`` (t, C, H, W),
    e.g. public data after fusion, where averaged statistics no longer match the fused
    weights."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = model.training
    model.train()
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        if len(batch) > 1:
            model(batch)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    return model.train(was_training)
