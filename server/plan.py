"""Which fusion methods the parties' policies allow, and why not (``amalgam plan job.yaml``),
read from the method table: the names are those a job accepts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from amalgam.fusion.teacher import TeacherInfo
from amalgam.server.methods import METHODS


@dataclass(frozen=True)
class MethodPlan:
    method: str  # the job's method.name
    possible: bool
    ways: tuple[str, ...]  # the ways every party allows, where a method has several
    reasons: tuple[str, ...]  # why not, one per party that blocks it


def plan(infos: Sequence[TeacherInfo]) -> list[MethodPlan]:
    """For every method, whether all parties allow it; otherwise each blocking party's reason."""
    plans = []
    for name, method in METHODS.items():
        ways, reasons = method.plan(infos)
        plans.append(MethodPlan(name, bool(ways), tuple(w for w in ways if w), tuple(reasons)))
    return plans
