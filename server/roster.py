"""The parties still taking part in a job.

A party that becomes unreachable (its calls failed through every retry and deadline) or that
answers with malformed data is dropped, with the reason, and the job goes on degraded as long
as ``min_parties`` remain; below that it stops with :class:`TooFewParties`, naming every party
it lost and why. Refusals (a denied capability, an exhausted budget) are not failures of the
party: they stop the job as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from amalgam.fusion.teacher import Teacher
from amalgam.protocol.errors import ModelFailure
from amalgam.server.fanout import fan_out
from amalgam.server.remote import MalformedResponse, PartyUnavailable

LOST = (PartyUnavailable, MalformedResponse, ModelFailure)  # in-process parties raise the last


def party_name(teacher: Teacher) -> str:
    """The party's name without asking it: a lost party cannot answer Describe."""
    name = getattr(teacher, "name", None)
    return name if isinstance(name, str) else teacher.info.name


class TooFewParties(RuntimeError):
    """Fewer parties than the job's ``min_parties`` are left."""


@dataclass
class Dropped:
    reason: str
    at: float  # time.monotonic() when it was dropped


@dataclass
class Roster:
    """Parameters
    ----------
    min_parties : the fewest parties the job may go on with.
    log : where a drop is announced.
    """

    min_parties: int
    log: Callable[[str], None] = print
    dropped: dict[str, Dropped] = field(default_factory=dict)

    def map(self, fn: Callable[[Teacher], object], teachers: Sequence[Teacher]) -> list:
        """``[fn(t) for t in teachers]`` in parallel; ``None`` for each teacher whose party
        was lost on the way (it is dropped)."""

        def guarded(teacher: Teacher):
            try:
                return fn(teacher), None
            except LOST as error:
                return None, error

        answers = fan_out(guarded, teachers)
        for teacher, (_, error) in zip(teachers, answers):
            if error is not None:
                self.drop(party_name(teacher), str(error))
        alive = sum(error is None for _, error in answers)
        if alive < self.min_parties:
            lost = "; ".join(f"{name}: {d.reason}" for name, d in self.dropped.items())
            raise TooFewParties(
                f"{alive} of {len(teachers)} parties left, the job needs {self.min_parties} "
                f"(min_parties): {lost}"
            )
        return [value for value, _ in answers]

    def drop(self, name: str, reason: str) -> None:
        self.dropped[name] = Dropped(reason, time.monotonic())
        self.log(f"WARNING: party {name} dropped, the job goes on without it: {reason}")

    def summary(self) -> list[str]:
        """Report lines, one per dropped party."""
        return [
            f"DEGRADED: party {name} was dropped: {d.reason}" for name, d in self.dropped.items()
        ]
