"""Run one fusion job: validate the spec, reach the parties, fuse, and write ``runs/<job-id>/``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from safetensors.torch import save_file

from amalgam.fusion.detection import DETECTORS
from amalgam.fusion.models import list_models
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import Teacher
from amalgam.protocol.loading import ConfigError, load_yaml
from amalgam.protocol.tls import channel_credentials, resolve_tls
from amalgam.server.fanout import fan_out
from amalgam.server.jobspec import JobSpec
from amalgam.server.methods import METHODS
from amalgam.server.remote import RemoteTeacher
from amalgam.server.report import plot_accuracy, report_markdown
from amalgam.server.roster import Roster
from amalgam.server.store import Checkpoints, JobRecord, JobStore, ReplayTeacher, new_job_id


class PartyMismatch(ValueError):
    """The address of a party in the job answers with another party's name."""


def load_job(path: str | Path) -> JobSpec:
    """Validate a job file, including the names that only the algorithms know; TLS files
    are taken from the job file's folder."""
    spec = load_yaml(path, JobSpec)
    problem = METHODS[spec.method.name].check(spec)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    if spec.tls is not None:
        spec = spec.model_copy(update={"tls": resolve_tls(spec.tls, Path(path))})
    known = [*list_models(), *DETECTORS]  # detectors: for detection parties
    if spec.student.arch not in known:
        raise ConfigError(
            f"{path}: student.arch: unknown architecture {spec.student.arch!r}"
            f" (registered: {', '.join(known)})"
        )
    return spec


def clients(spec: JobSpec, **options) -> list[RemoteTeacher]:
    """One client per party, over mutual TLS when the job names certificates, with the
    party's bearer token when it names one; ``options`` go to :class:`RemoteTeacher`."""
    credentials = channel_credentials(spec.tls) if spec.tls is not None else None
    half = METHODS[spec.method.name].half(spec)
    return [
        RemoteTeacher(
            p.name,
            p.address,
            deadline_s=spec.deadline_s,
            credentials=credentials,
            token=_token(p.token_env, index) if p.token_env else None,
            half=half,
            **options,
        )
        for index, p in enumerate(spec.parties)
    ]


def _token(variable: str, index: int) -> str:
    if variable not in os.environ:
        raise ConfigError(
            f"parties.{index}.token_env: the environment variable {variable} is not set"
        )
    return os.environ[variable]


def connect(spec: JobSpec, log: Callable[[str], None] = print) -> list[RemoteTeacher]:
    """:func:`clients`, each asking its party's Describe so that an unreachable party is
    found here, before any work is done: it is left out while ``min_parties`` remain (the
    report says so), else the job stops naming it."""
    teachers = clients(spec)
    infos = Roster(spec.min_parties or len(teachers), log).map(lambda t: t.info, teachers)
    for index, (teacher, info) in enumerate(zip(teachers, infos)):
        if info is not None and info.name != teacher.name:
            raise PartyMismatch(
                f"parties.{index}: the party at {teacher.address} is {info.name!r}, "
                f"not {teacher.name!r}"
            )
    return [teacher for teacher, info in zip(teachers, infos) if info is not None]


def run_job(
    spec: JobSpec,
    teachers: Sequence[Teacher],
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    store: JobStore | None = None,
    job: JobRecord | None = None,
) -> Path:
    """Fuse ``teachers`` as ``spec`` says; returns the run folder with the student,
    ``metrics.json``, ``report.md`` and its figures.

    With ``store`` the job is recorded there (``job``: one of its jobs to resume, else a new
    one): every party answer is kept and replayed on a resume, and training runs keep
    checkpoints in ``<run folder>/checkpoints`` (removed once the job is done).
    """
    started = time.perf_counter()
    checkpoints = None
    if store is not None:
        job = job or store.create(spec)
        job_id, run_dir = job.id, job.run_dir
        teachers = [ReplayTeacher(t, store, job_id) for t in teachers]
        checkpoints = Checkpoints(run_dir / "checkpoints")
    else:
        job_id = new_job_id(spec)
        run_dir = Path(spec.output_dir) / job_id
        run_dir.mkdir(parents=True, exist_ok=False)
    try:
        context = RunContext(seed=spec.seed, baselines=spec.baselines, map_teachers=fan_out,
                             progress=progress, log=log, checkpoints=checkpoints)  # fmt: skip
        outcome = METHODS[spec.method.name].run(spec, teachers, context)
    except Exception as error:
        if store is not None:
            store.set_status(job_id, "failed", str(error))
        raise
    reached = {t.info.name for t in teachers}
    unreached = [p.name for p in spec.parties if p.name not in reached]
    outcome.summary += [
        f"DEGRADED: party {name} was not reached at the start" for name in unreached
    ]
    save_file(outcome.student.state_dict(), str(run_dir / "student.safetensors"))
    architecture = {
        "arch": outcome.student.arch["name"],
        "kwargs": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in outcome.student.arch["kwargs"].items()
        },
        "class_names": outcome.class_names,
    }
    if "normalization" in outcome.extra:  # the inputs a fused party network expects
        architecture["normalization"] = outcome.extra["normalization"]
    (run_dir / "student.json").write_text(json.dumps(architecture, indent=2))
    stats = {t.info.name: dataclasses.asdict(t.stats) for t in teachers if hasattr(t, "stats")}
    described = spec.model_dump(mode="json")
    metrics = {
        "job_id": job_id,
        "job": described,
        "results": outcome.results,
        "extra": outcome.extra,
        "parties": stats,
        "wall_seconds": time.perf_counter() - started,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    figures = {"accuracy.png": lambda path: plot_accuracy(outcome.results, path, outcome.metric)}
    figures.update(outcome.figures)
    for name, write in {**figures, **outcome.files}.items():
        write(run_dir / name)
    report = report_markdown(
        described,
        outcome.results,
        outcome.summary,
        stats,
        list(figures),
        outcome.extra.get("per_class"),
        outcome.class_names,
        outcome.metric,
    )
    (run_dir / "report.md").write_text(report)
    if store is not None:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        store.set_status(job_id, "done")
    return run_dir
