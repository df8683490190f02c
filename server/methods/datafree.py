"""``datafree`` (paper 003): generators trained against every party's BatchNorm statistics
synthesise the images on which the student learns from the parties' logits; no data at all."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from amalgam.fusion.data import fit_to_shape, load_source
from amalgam.fusion.datafree import VARIANTS, DataFreeConfig, DataFreeFusion, PartySideFusion
from amalgam.fusion.evaluate import evaluate
from amalgam.fusion.labels import relabel
from amalgam.fusion.run import RunContext
from amalgam.server.figures import plot_curves, plot_samples
from amalgam.server.methods.base import Grants, Method, Need, Outcome


class DataFreeParams(DataFreeConfig):
    """Data-free fusion, with the generators at the coordinator or at the parties."""

    half: bool = False  # float16 tensors on the wire
    mode: Literal["coordinator", "party"] = "coordinator"  # where the generators train
    rounds: int = Field(20, ge=1)  # party mode: Synthesize + Predict round trips per party


LOGITS = Need("predict", ("logits",))


class DataFree(Method):
    name = "datafree"
    summary = "generators synthesise the images the student learns on; no data (paper 003)"
    params = DataFreeParams
    grants = (
        Grants((LOGITS, Need("bn_feedback", batchnorm=True)), "generators at the coordinator"),
        # DAFL and ZSKT train generators through input gradients alone, without BN statistics
        Grants((LOGITS, Need("bn_feedback")), "variants dafl, zskt"),
        # generators and assistants trained at the parties: Synthesize + Predict only
        Grants((LOGITS, Need("synthesize", batchnorm=True)), "mode party"),
    )
    float16 = frozenset({"bn_feedback", "synthesize", "activations"})

    def check(self, spec) -> str | None:
        params = spec.method.params
        if params.mode == "party" and VARIANTS[params.variant].adversary == "student":
            return (
                f"method.params.mode: {params.variant} plays against the student, which stays "
                "at the coordinator; use mode coordinator"
            )
        return None

    def run(self, spec, teachers, context: RunContext) -> Outcome:
        params = spec.method.params
        context.log(
            f"data-free fusion ({params.variant}, generators at the {params.mode}) of "
            f"{len(teachers)} teachers, no data"
        )
        options = dict(student=spec.student, context=context)
        if params.mode == "party":
            fusion = PartySideFusion(teachers, params, rounds=params.rounds, **options)
        else:
            fusion = DataFreeFusion(teachers, params, **options)
        result = fusion.run()
        classes = list(teachers[0].info.class_names)
        x, y = relabel(load_source(spec.data.test), classes)
        x = fit_to_shape(x, tuple(teachers[0].info.input_shape))
        rows, per_class = evaluate(
            teachers, {"student": result.student}, x, y, context.map_teachers
        )
        names = [t.info.name for t in teachers]
        figures = {
            f"samples-{name}.png": (
                lambda path, k=k: plot_samples([s[k] for s in result.samples], path)
            )
            for k, name in enumerate(names)
        }
        figures["losses.png"] = lambda path: plot_curves(result.history, path)
        summary = [
            f"Test: {spec.data.test} ({len(y)} images). Teacher queries (samples): "
            + ", ".join(f"{n} {q}" for n, q in result.queries.items())
            + ".",
            *[f"WARNING: {w}" for w in result.warnings],
        ]
        extra = {
            "per_class": {
                row: [None if math.isnan(v) else v for v in accs] for row, accs in per_class.items()
            },
            "class_names": classes,
            "queries": result.queries,
            "warnings": result.warnings,
            "final_losses": {k: v[-1] for k, v in result.history.items() if v},
        }
        return Outcome(result.student, classes, rows, extra, summary, figures)


METHOD = DataFree()
