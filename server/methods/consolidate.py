"""``consolidate`` (paper 001): the generalist party's network and the other parties'
predictions on proxy images become one student whose representation transfers to new tasks;
judged by few-shot linear probes on the job's downstream tasks."""

from __future__ import annotations

from collections.abc import Sequence

from safetensors.torch import save_file

from amalgam.fusion.consolidation import Consolidation, ConsolidationParams, consolidate_parties
from amalgam.fusion.data import load_source
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import TeacherInfo
from amalgam.server.methods.base import Grants, Method, Need, Outcome
from amalgam.server.report import markdown_table

GENERALIST = Grants((Need("weights"),))
TEACHER = Grants((Need("predict", ("logits", "probs")),))


class Consolidate(Method):
    name = "consolidate"
    summary = "a generalist and task teachers distilled into one transferable student (paper 001)"
    params = ConsolidationParams

    def plan(self, infos: Sequence[TeacherInfo]) -> tuple[list[str], list[str]]:
        """Possible when one party grants its weights (the generalist) and every other one
        releases logits or probabilities."""
        generalists = [info for info in infos if not GENERALIST.problems(info)]
        if not generalists:
            return [], ["no party grants weights (the generalist's network)"]
        for generalist in generalists:
            blocked = [
                f"{info.name}: {'; '.join(problems)}"
                for info in infos
                if info is not generalist and (problems := TEACHER.problems(info))
            ]
            if not blocked:
                return [f"generalist {generalist.name}"], []
        return [], blocked

    def check(self, spec) -> str | None:
        params, names = spec.method.params, [p.name for p in spec.parties]
        if params.generalist not in names:
            return f"method.params.generalist: {params.generalist!r} is not one of the parties"
        teachers = len(names) - 1
        if not teachers:
            return "parties: consolidation needs a task-specific teacher besides the generalist"
        if params.teacher_weights is not None and len(params.teacher_weights) != teachers:
            return (
                f"method.params.teacher_weights: {len(params.teacher_weights)} given for "
                f"{teachers} teachers (every party but the generalist)"
            )
        if params.teacher_weights is not None and min(params.teacher_weights) < 0:
            return "method.params.teacher_weights: must be non-negative"
        if params.generalist_weight == 0 and not sum(params.teacher_weights or [1.0]):
            return "method.params: every loss weight is zero"
        if spec.data.unlabeled is None:
            return "data.unlabeled: consolidation needs proxy images"
        tasks = [t.name for t in params.tasks]
        repeated = sorted({t for t in tasks if tasks.count(t) > 1})
        if repeated:
            return f"method.params.tasks: names must be unique, repeated: {', '.join(repeated)}"
        return None

    def run(self, spec, teachers, context: RunContext) -> Outcome:
        params = spec.method.params
        proxy = load_source(spec.data.unlabeled)
        result = consolidate_parties(teachers, params, proxy, load_source(spec.data.test), context)
        generalist = next(t.info for t in teachers if t.info.name == params.generalist)
        summary = [
            f"Proxy: {spec.data.unlabeled} ({len(proxy)} images, unlabeled); generalist "
            f"{params.generalist}; teachers {', '.join(t.info.name for t in result.experts)}.",
            "",
            f"{params.shots}-shot linear probe on frozen features, mean ± std over "
            f"{params.draws} draws, accuracy %:",
            "",
            _table(params, result.scores),
        ]
        if result.withheld:
            summary += [
                "",
                f"No feature rows for {', '.join(result.withheld)}: penultimate not released.",
            ]
        extra = {
            "few_shot": {
                n: {t: list(v) for t, v in per.items()} for n, per in result.scores.items()
            },
            "losses": result.losses,
            "normalization": {"mean": list(generalist.mean), "std": list(generalist.std)},
            "teacher_heads": {t.info.name: list(t.info.class_names) for t in result.experts},
        }
        return Outcome(
            result.students["consolidated"].model,
            list(generalist.class_names),
            result.rows,
            extra,
            summary,
            files={"heads.safetensors": _heads_writer(result)},
        )


def _table(params: ConsolidationParams, scores: dict[str, dict[str, tuple[float, float]]]):
    related = {True: " (related)", False: " (unrelated)", None: ""}
    header = ["representation"] + [f"{t.name}{related[t.related]}" for t in params.tasks]
    rows = [
        [name] + [f"{100 * per[t.name][0]:.1f} ± {100 * per[t.name][1]:.1f}" for t in params.tasks]
        for name, per in scores.items()
    ]
    return markdown_table(header, rows)


def _heads_writer(result: Consolidation):
    """The consolidated student's teacher heads as safetensors, ``<party>.<tensor>``."""
    student = result.students["consolidated"]

    def write(path):
        tensors = {
            f"{teacher.info.name}.{key}": value.float().cpu().contiguous()
            for teacher, head in zip(result.experts, student.teacher_heads, strict=True)
            for key, value in head.state_dict().items()
        }
        save_file(tensors, str(path))

    return write


METHOD = Consolidate()
