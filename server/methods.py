"""One runner per fusion method: each turns a validated job and its teachers into an
:class:`Outcome` that :func:`amalgam.server.job.run_job` writes to the run folder."""

from __future__ import annotations

import math

from amalgam.fusion.compose import CompositionConfig, compose, relabel
from amalgam.fusion.data import fit_to_shape, load_source
from amalgam.fusion.datafree.party_side import PartySideFusion
from amalgam.fusion.datafree.trainer import DataFreeConfig, DataFreeFusion
from amalgam.fusion.evaluate import evaluate
from amalgam.protocol.schemas import JobSpec
from amalgam.server.amalgamation import run_amalgamation
from amalgam.server.consolidation import run_consolidation
from amalgam.server.detection import run_detection_composition
from amalgam.server.fanout import fan_out
from amalgam.server.outcome import Outcome, Runner
from amalgam.server.report import plot_curves, plot_samples
from amalgam.server.roster import Roster
from amalgam.server.weightfusion import run_weight_fusion

DETECTION_PARAMS = {"detection_rule", "iou_threshold", "score_threshold", "soft_nms_sigma"}


def composition_config(spec: JobSpec) -> CompositionConfig:
    """The method's parameters and the student spec share the config's field names."""
    return CompositionConfig(
        **spec.method.params.model_dump(exclude=DETECTION_PARAMS),
        **spec.student.model_dump(),
        seed=spec.seed,
        baselines=spec.baselines,
    )


def run_composition(spec, teachers, progress, log, checkpoints=None) -> Outcome:
    tasks = {t.info.task for t in teachers}
    if tasks == {"detection"}:
        return run_detection_composition(spec, teachers, progress, log, checkpoints)
    if len(tasks) > 1:
        detectors = [t.info.name for t in teachers if t.info.task == "detection"]
        raise ValueError(f"parties: {', '.join(detectors)} detect and the others classify; "
                         "a composition job takes one kind")  # fmt: skip
    unlabeled, test = load_source(spec.data.unlabeled), load_source(spec.data.test)
    roster = Roster(spec.min_parties or len(spec.parties), log)
    result = compose(
        teachers,
        unlabeled,
        test,
        composition_config(spec),
        map_teachers=roster.map,
        progress=progress,
        log=log,
        checkpoints=checkpoints,
    )
    extra = result.extra
    extra["dropped_parties"] = {name: d.reason for name, d in roster.dropped.items()}
    kept = f"Pseudo-labels kept: {100 * extra['retention']:.1f}%"
    if "pseudo_label_accuracy" in extra:
        kept += f", of which correct: {100 * extra['pseudo_label_accuracy']:.1f}%"
    summary = [
        f"Data: unlabeled {spec.data.unlabeled} ({extra['unlabeled']} images), test "
        f"{spec.data.test} ({extra['test']} images of the union classes).",
        kept + ".",
        *roster.summary(),
    ]
    return Outcome(result.student, result.class_names, result.results, extra, summary)


def datafree_config(spec: JobSpec) -> DataFreeConfig:
    params = spec.method.params.model_dump(exclude={"half", "mode", "rounds"})
    return DataFreeConfig(**params, student_arch=spec.student.arch, seed=spec.seed)


def run_datafree(spec, teachers, progress, log, checkpoints=None) -> Outcome:
    config, params = datafree_config(spec), spec.method.params
    log(
        f"data-free fusion ({config.variant}, generators at the {params.mode}) of "
        f"{len(teachers)} teachers, no data"
    )
    options = dict(map_teachers=fan_out, progress=progress, log=log)
    if params.mode == "party":
        fusion = PartySideFusion(teachers, config, rounds=params.rounds, **options)
    else:
        fusion = DataFreeFusion(teachers, config, **options)
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


RUNNERS: dict[str, Runner] = {
    "composition": run_composition,
    "datafree": run_datafree,
    "ot": run_weight_fusion,
    "clafusion": run_weight_fusion,
    "consolidate": run_consolidation,
    "amalgamate": run_amalgamation,
}
