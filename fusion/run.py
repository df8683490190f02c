"""How one fusion run is carried out, whatever the method: its seed, whether the baselines are
trained beside the student, how the teachers are called, and what it reports on the way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from amalgam.fusion.device import Hardware
from amalgam.fusion.teacher import TeacherMap, sequential_map
from amalgam.fusion.train import Checkpoint


def _silent(message: str) -> None:
    """The default log: say nothing."""


@dataclass(frozen=True)
class RunContext:
    """Attributes
    ----------
    seed : every initialisation, data order and draw of the run.
    baselines : also train the method's baselines (vanilla distillation, the supervised
        bound, fine-tuned inputs, ...) for the report.
    map_teachers : how every teacher is called (the coordinator fans out in parallel and
        answers ``None`` for a party that dropped out).
    progress : progress bars, on a terminal.
    log : where the run says what it is doing.
    checkpoints : ``checkpoints(name)`` keeps the progress of the training run ``name`` (see
        :func:`amalgam.fusion.train.fit`); None: nothing is kept.
    hardware : the device and precision of its training loops.
    """

    seed: int = 0
    baselines: bool = True
    map_teachers: TeacherMap = sequential_map
    progress: bool = True
    log: Callable[[str], None] = _silent
    checkpoints: Callable[[str], Checkpoint] | None = None
    hardware: Hardware = Hardware()

    def checkpoint(self, name: str) -> Checkpoint | None:
        """Where the training run ``name`` keeps its progress, if anywhere."""
        return None if self.checkpoints is None else self.checkpoints(name)
