"""``ot`` (paper 002, OTFusion): the parties' exported networks of one depth, their neurons
aligned layer by layer by optimal transport and averaged into one network."""

from __future__ import annotations

import dataclasses

from amalgam.fusion.data import load_source
from amalgam.fusion.ot import WeightFusion, WeightFusionParams, fuse_parties
from amalgam.fusion.run import RunContext
from amalgam.server.figures import plot_heatmap, plot_transport_costs
from amalgam.server.methods.base import Grants, Method, Need, Outcome


class OT(Method):
    """OT fusion; :class:`amalgam.server.methods.clafusion.CLAFusion` aligns depths first."""

    name = "ot"
    summary = "networks of one depth aligned by optimal transport and averaged (paper 002)"
    params = WeightFusionParams
    # CKA and activations are asked of parties that grant Gram / Activations, and otherwise
    # computed by the coordinator from the exported weights
    grants = (Grants((Need("weights"),)),)
    cross_layer = False  # align networks of different depths first (CLAFusion)

    def check(self, spec) -> str | None:
        params, names = spec.method.params, [p.name for p in spec.parties]
        if params.weights is not None and len(params.weights) != len(names):
            return f"method.params.weights: {len(params.weights)} given for {len(names)} parties"
        if params.weights is not None and (min(params.weights) < 0 or sum(params.weights) <= 0):
            return "method.params.weights: must be non-negative with a positive sum"
        if params.base is not None and params.base not in names:
            return f"method.params.base: {params.base!r} is not one of the parties"
        if spec.data.unlabeled is None:
            if self.cross_layer:
                return f"data.unlabeled: {self.name} needs probe images for CKA"
            if params.ground_metric == "activation":
                return (
                    "data.unlabeled: ground_metric activation (the default) needs probe images"
                    " (or set method.params.ground_metric: weight)"
                )
            if params.recompute_batchnorm:
                return "data.unlabeled: recompute_batchnorm needs images (or set it to false)"
            if params.repair:
                return "data.unlabeled: repair needs probe images (or set it to false)"
        if params.finetune_epochs and spec.data.finetune is None:
            return "data.finetune: finetune_epochs > 0 needs labelled images"
        return None

    def run(self, spec, teachers, context: RunContext) -> Outcome:
        data = spec.data
        fused = fuse_parties(
            teachers,
            spec.method.params,
            load_source(data.test),
            cross_layer=self.cross_layer,
            unlabeled=load_source(data.unlabeled) if data.unlabeled else None,
            finetune=load_source(data.finetune) if data.finetune else None,
            student=spec.student,
            context=dataclasses.replace(
                context, log=lambda message: context.log(f"{self.name}: {message}")
            ),
        )
        return _outcome(fused, spec.data.test, teachers[0].info)


def _summary(fused: WeightFusion, test: str) -> list[str]:
    result, names = fused.fusion, fused.names
    lines = [
        f"Test: {test} ({fused.test_images} images).",
        f"Base network: {names[result.base]}'s; fused architecture {result.model.arch}.",
    ]
    for section, maps in result.alignments.items():
        for k, mapping in maps.items():
            lines.append(
                f"Cross-layer map, {section}, {names[k]} and {names[result.depth_reference]} "
                f"(the shallower network's layers -> the deeper's): {mapping}."
            )
    if fused.supplied:
        lines.append("Computed at the parties: " + "; ".join(fused.supplied) + ".")
    if fused.repaired:
        lines.append(
            f"REPAIR set the channel statistics of {len(fused.repaired)} layers to the "
            "interpolation of the parties' networks' on the probe images."
        )
    return lines


def _figures(fused: WeightFusion) -> dict:
    result, names = fused.fusion, fused.names

    def transport(path):
        plot_transport_costs(result.transport_costs, names, path)

    def heatmap(section: str, k: int):
        mapping = result.alignments[section][k]
        deep, shallow = result.cka_layers[section][k]
        return lambda path: plot_heatmap(
            result.cka[section][k].numpy(),
            path,
            title=f"linear CKA between {names[k]} and {names[result.depth_reference]}, section "
            f"{section}; red: the cross-layer map",
            marks=[(j, i) for i, j in enumerate(mapping)],
            rows=("the deeper network's layers", deep),
            columns=("the shallower network's layers", shallow),
        )

    figures = {"transport-cost.png": transport}
    for section, matrices in result.cka.items():
        for k in matrices:
            figures[f"cka-{section}-{names[k]}.png"] = heatmap(section, k)
    return figures


def _outcome(fused: WeightFusion, test: str, info) -> Outcome:
    result, names = fused.fusion, fused.names
    extra = {
        "per_class": fused.per_class,
        "class_names": fused.class_names,
        "base": names[result.base],
        "alignments": {
            s: {names[k]: m for k, m in maps.items()} for s, maps in result.alignments.items()
        },
        "transport_costs": {names[k]: c for k, c in enumerate(result.transport_costs)},
        "fused_architecture": result.model.arch,
        "repaired_layers": fused.repaired,
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
    }
    return Outcome(
        fused.networks["student"],
        fused.class_names,
        fused.rows,
        extra,
        _summary(fused, test),
        _figures(fused),
    )


METHOD = OT()
