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
from amalgam.server.fanout import fan_out
from amalgam.server.methods.base import Grants, Method, Need, Outcome, every_party
from amalgam.server.report import plot_curves, plot_samples


class DataFreeParams(DataFreeConfig):
    """Data-free fusion, with the generators at the coordinator or at the parties."""

    half: bool = False  # float16 tensors on the wire
    mode: Literal["coordinator", "party"] = "coordinator"  # where the generators train
    rounds: int = Field(20, ge=1)  # party mode: Synthesize + Predict round trips per party


def _check(spec) -> str | None:
    params = spec.method.params
    if params.mode == "party" and VARIANTS[params.variant].adversary == "student":
        return (
            f"method.params.mode: {params.variant} plays against the student, which stays at "
            "the coordinator; use mode coordinator"
        )
    return None


def _run(spec, teachers, progress, log, checkpoints=None) -> Outcome:
    params = spec.method.params
    log(
        f"data-free fusion ({params.variant}, generators at the {params.mode}) of "
        f"{len(teachers)} teachers, no data"
    )
    options = dict(student_arch=spec.student.arch, seed=spec.seed, map_teachers=fan_out,
                   progress=progress, log=log)  # fmt: skip
    if params.mode == "party":
        fusion = PartySideFusion(teachers, params, rounds=params.rounds, **options)
    else:
        fusion = DataFreeFusion(teachers, params, **options)
    result = fusion.run()
    classes = list(teachers[0].info.class_names)
    x, y = relabel(load_source(spec.data.test), classes)
    x = fit_to_shape(x, tuple(teachers[0].info.input_shape))
    rows, per_class = evaluate(teachers, {"student": result.student}, x, y, fan_out)
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


LOGITS = Need("predict", ("logits",))
METHOD = Method(
    name="datafree",
    summary="generators synthesise the images the student learns on; no data (paper 003)",
    params=DataFreeParams,
    run=_run,
    plan=every_party(
        Grants((LOGITS, Need("bn_feedback", batchnorm=True)), "generators at the coordinator"),
        # DAFL and ZSKT train generators through input gradients alone, without BN statistics
        Grants((LOGITS, Need("bn_feedback")), "variants dafl, zskt"),
        # generators and assistants trained at the parties: Synthesize + Predict only
        Grants((LOGITS, Need("synthesize", batchnorm=True)), "mode party"),
    ),
    check=_check,
    float16=frozenset({"bn_feedback", "synthesize"}),
)
