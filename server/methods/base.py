"""What a fusion method is to the coordinator: one :class:`Method` per method, in the method
table (:mod:`amalgam.server.methods`). The job schema, the job checks, the planner, the clients
and the job runner read it; nothing else lists methods."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, create_model

from amalgam.fusion.models import Classifier
from amalgam.fusion.run import RunContext
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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Method(ABC):
    """One fusion method as the coordinator runs it; a module of the method table defines a
    subclass and exports one instance as ``METHOD``.

    Attributes
    ----------
    name : what a job's ``method.name`` says.
    summary : one line: what it does, and the paper.
    params : the model of the job's ``method.params``; its defaults are the method's.
    grants : the ways of running it, each with what every party must grant (``amalgam plan``).
    float16 : capabilities whose tensors travel as float16 when ``params.half`` is set.
    """

    name: str
    summary: str
    params: type[BaseModel]
    grants: tuple[Grants, ...] = ()
    float16: frozenset[str] = frozenset()

    @abstractmethod
    def run(self, spec: JobSpec, teachers: Sequence[Teacher], context: RunContext) -> Outcome:
        """Fuse ``teachers`` as ``spec`` says; ``context`` carries the job's seed and baselines,
        the parallel fan-out over the parties, progress, log and checkpoints (a method whose
        training keeps none restarts it when a job is resumed; the parties' answers are
        replayed anyway)."""

    def check(self, spec: JobSpec) -> str | None:
        """What the schema cannot see (e.g. a party named in the params that the job does not
        list): a one-line problem ``<field>: <what is wrong>``, or None."""
        return None

    def plan(self, infos: Sequence[TeacherInfo]) -> tuple[list[str], list[str]]:
        """The labels of the ways the parties' policies allow; where there is none, one reason
        per party that blocks the method: its problems with the way it comes closest to."""
        possible = [w.label for w in self.grants if not any(w.problems(i) for i in infos)]
        if possible:
            return possible, []
        reasons = []
        for info in infos:
            problems = min((w.problems(info) for w in self.grants), key=len)
            if problems:
                reasons.append(f"{info.name}: {'; '.join(problems)}")
        return [], reasons

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
