"""What a job method hands back to :func:`amalgam.server.job.run_job`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from amalgam.fusion.models import Classifier
from amalgam.fusion.teacher import Teacher
from amalgam.protocol.schemas import JobSpec


@dataclass
class Outcome:
    student: Classifier  # or a detector (fusion.detection.models)
    class_names: list[str]
    results: dict[str, float]  # row -> accuracy
    extra: dict = field(default_factory=dict)  # goes to metrics.json
    summary: list[str] = field(default_factory=list)  # method-specific lines of report.md
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # PNG writers
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # other artefacts
    metric: str = "accuracy"  # what the results rows measure (detection: mAP)


# runner(spec, teachers, progress, log, checkpoints): ``checkpoints(name)`` gives a
# :class:`amalgam.fusion.train.Checkpoint` per training run (or is None); a runner that does not use
# it restarts its training when a job is resumed (the parties' answers are replayed anyway).
Runner = Callable[
    [JobSpec, Sequence[Teacher], bool, Callable[[str], None], Callable | None], Outcome
]
