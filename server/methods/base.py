"""What a fusion method is to the coordinator: one :class:`Method` record per method, in the
method table (:mod:`amalgam.server.methods`). The job schema, the job checks, the planner, the
clients and the job runner read the record; nothing else lists methods."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, create_model

from amalgam.fusion.models import Classifier
from amalgam.fusion.teacher import Teacher, TeacherInfo

if TYPE_CHECKING:
    from amalgam.server.jobspec import JobSpec


@dataclass
class Outcome:
    """What a method's runner hands back to :func:`amalgam.server.job.run_job`."""

    student: Classifier  # or a detector (amalgam.fusion.detection.models)
    class_names: list[str]
    results: dict[str, float]  # row -> accuracy
    extra: dict = field(default_factory=dict)  # goes to metrics.json
    summary: list[str] = field(default_factory=list)  # method-specific lines of report.md
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # PNG writers
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # other artefacts
    metric: str = "accuracy"  # what the results rows measure (detection: mAP)


# runner(spec, teachers, progress, log, checkpoints): ``checkpoints(name)`` gives a
# :class:`amalgam.fusion.train.Checkpoint` per training run (or is None); a runner that does
# not use it restarts its training when a job is resumed (the parties' answers are replayed).
Runner = Callable[
    ["JobSpec", Sequence[Teacher], bool, Callable[[str], None], Callable | None], Outcome
]


@dataclass(frozen=True)
class Need:
    """One thing a party's policy must grant (DESIGN.md, "What each method needs")."""

    capability: str
    output_forms: tuple[str, ...] = ()  # for predict: forms that serve the method
    batchnorm: bool = False  # the teacher must have BatchNorm layers
    layers: Callable[[TeacherInfo], str | None] | None = None  # what the released layers lack

    def problem(self, info: TeacherInfo) -> str | None:
        """Why ``info``'s party does not meet this need; None when it does."""
        if self.capability not in info.capabilities:
            return f"{self.capability} is not granted"
        if self.batchnorm and info.batchnorm_layers == 0:
            return "the teacher has no BatchNorm layers"
        if self.output_forms and info.output_form not in self.output_forms:
            return f"predict releases {info.output_form}, needs {' or '.join(self.output_forms)}"
        if self.layers is not None:
            return self.layers(info)
        return None


@dataclass(frozen=True)
class Grants:
    """A way of running a method: what every party must grant for it. ``label`` names the
    way where a method has several (e.g. a mode or family of variants)."""

    needs: tuple[Need, ...]
    label: str = ""

    def problems(self, info: TeacherInfo) -> list[str]:
        return [p for need in self.needs if (p := need.problem(info)) is not None]


# planner: the parties' infos -> (the labels of the ways every party allows, and, when there
# is none, one reason per party that blocks the method)
Planner = Callable[[Sequence[TeacherInfo]], tuple[list[str], list[str]]]


def every_party(*ways: Grants) -> Planner:
    """The planner of a method every party serves alike: possible in each way that every
    party's policy allows; otherwise each blocking party's problems with the way it comes
    closest to."""

    def plan(infos: Sequence[TeacherInfo]) -> tuple[list[str], list[str]]:
        possible = [w.label for w in ways if not any(w.problems(info) for info in infos)]
        if possible:
            return possible, []
        reasons = []
        for info in infos:
            problems = min((w.problems(info) for w in ways), key=len)
            if problems:
                reasons.append(f"{info.name}: {'; '.join(problems)}")
        return [], reasons

    return plan


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Method:
    """One fusion method as the coordinator runs it.

    Attributes
    ----------
    name : what a job's ``method.name`` says.
    summary : one line: what it does, and the paper.
    params : the model of the job's ``method.params``; its defaults are the method's.
    run : turns a validated job and its teachers into an :class:`Outcome`.
    plan : which ways the parties' policies allow (``amalgam plan``).
    check : what the schema cannot see (e.g. a party named in the params that the job does
        not list): a one-line problem ``<field>: <what is wrong>``, or None.
    float16 : capabilities whose tensors travel as float16 when ``params.half`` is set.
    """

    name: str
    summary: str
    params: type[BaseModel]
    run: Runner
    plan: Planner
    check: Callable[[JobSpec], str | None] = lambda spec: None
    float16: frozenset[str] = frozenset()

    def section(self) -> type[BaseModel]:
        """The model of a job's ``method:`` section for this method; ``params`` may be left
        out where every parameter has a default."""
        try:
            default = self.params()
        except ValueError:  # a required parameter: the job must give params
            params = (self.params, ...)
        else:
            params = (self.params, default)
        return create_model(
            f"{self.name.capitalize()}Method",
            __base__=_Section,
            name=(Literal[self.name], ...),
            params=params,
        )

    def half(self, spec: JobSpec) -> frozenset[str]:
        """The capabilities that travel as float16 in ``spec``."""
        return self.float16 if getattr(spec.method.params, "half", False) else frozenset()
