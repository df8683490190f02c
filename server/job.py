"""Run one fusion job: validate the spec, reach the parties, fuse, and write ``runs/<job-id>/``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from amalgam.fusion.data import check_source
from amalgam.fusion.detection import CANVAS_PREFIX, DETECTORS
from amalgam.fusion.device import Hardware, resolve_device
from amalgam.fusion.models import is_architecture, list_models
from amalgam.fusion.run import RunContext
from amalgam.fusion.teacher import Teacher
from amalgam.protocol.loading import ConfigError, load_yaml
from amalgam.protocol.tls import channel_credentials, resolve_tls
from amalgam.server.confusion import student_confusion
from amalgam.server.fanout import fan_out
from amalgam.server.figures import plot_accuracy, plot_confusion
from amalgam.server.html_report import report_html
from amalgam.server.jobspec import JobSpec
from amalgam.server.methods import METHODS
from amalgam.server.remote import RemoteTeacher
from amalgam.server.report import report_markdown
from amalgam.server.roster import Roster
from amalgam.server.stopping import JobStopped
from amalgam.server.store import Checkpoints, JobRecord, JobStore, ReplayTeacher, new_job_id
from amalgam.server.student import write_student


class PartyMismatch(ValueError):
    """The address of a party in the job answers with another party's name."""


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Validate a job file with ``overrides`` (``key.path=value``, see
    :func:`amalgam.protocol.loading.apply_overrides`), including what only the algorithms and
    this machine know (the student's architecture, local files); TLS files and
    ``student.init`` are taken from the job file's folder."""
    spec = load_yaml(path, JobSpec, overrides)
    problem = METHODS[spec.method.name].check(spec)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    folder = Path(path).resolve().parent
    if spec.tls is not None:
        spec = spec.model_copy(update={"tls": resolve_tls(spec.tls, Path(path))})
    for field, source in spec.data.model_dump(exclude_none=True).items():
        problem = None if source.startswith(CANVAS_PREFIX) else check_source(source)
        if problem:
            raise ConfigError(f"{path}: data.{field}: {problem}")
    try:
        device = resolve_device(spec.device)
    except ValueError as error:
        raise ConfigError(f"{path}: device: {error}") from None
    try:
        Hardware(device, spec.precision)
    except ValueError as error:  # says which field
        raise ConfigError(f"{path}: {error}") from None
    if Path(spec.output_dir).exists() and not Path(spec.output_dir).is_dir():
        raise ConfigError(f"{path}: output_dir: {spec.output_dir} is a file, not a folder")
    student = spec.student
    if student.arch not in DETECTORS and not is_architecture(student.arch):
        raise ConfigError(
            f"{path}: student.arch: unknown architecture {student.arch!r}: neither the registry "
            f"({', '.join(list_models())}), torchvision nor timm has it"
        )
    if student.init is not None:
        init = folder / student.init
        if not init.is_file():
            raise ConfigError(f"{path}: student.init: {init} does not exist")
        student = student.model_copy(update={"init": str(init)})
        spec = spec.model_copy(update={"student": student})
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


def student_card(outcome, spec: JobSpec, job_id: str, teachers: Sequence[Teacher]) -> dict:
    """What a user of the student needs besides its weights (``student.json``)."""
    arch = outcome.student.arch
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in arch["kwargs"].items()}
    in_shape = kwargs.get("in_shape") or list(teachers[0].info.input_shape)
    return {
        "arch": arch["name"],
        "kwargs": kwargs,
        "class_names": outcome.class_names,
        "input_shape": list(in_shape),
        "input_range": [0.0, 1.0],
        # applied inside student.pt2 / student.onnx / load_student, not by the caller
        "normalization": outcome.extra.get("normalization", {"mean": [0.0], "std": [1.0]}),
        "job": {"id": job_id, "name": spec.name, "method": spec.method.name},
        "metrics": outcome.results,
    }


def _recorded(log: Callable[[str], None], store: JobStore, job_id: str) -> Callable[[str], None]:
    """``log`` that also keeps each line in the job store (``amalgam jobs log``)."""

    def both(line: str) -> None:
        log(line)
        store.log(job_id, line)

    return both


def _write_reports(run_dir: Path, outcome, metrics: dict, test_source: str) -> None:
    """``metrics.json``, the figures, ``report.md`` and ``report.html`` of a finished run; for a
    student that classifies, also its confusion matrix and accuracy per class on the test
    set (where the method reported none of its own)."""
    figures = {"accuracy.png": lambda path: plot_accuracy(outcome.results, path, outcome.metric)}
    per_class, class_names = outcome.extra.get("per_class"), outcome.class_names
    confusion = student_confusion(run_dir, test_source)
    if confusion is not None:
        metrics["confusion"] = dataclasses.asdict(confusion)
        figures["confusion.png"] = lambda path: plot_confusion(
            confusion.class_names, confusion.matrix, path
        )
        if not per_class:
            per_class, class_names = {"student": confusion.per_class}, confusion.class_names
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    figures.update(outcome.figures)
    for name, write in {**figures, **outcome.files}.items():
        write(run_dir / name)
    shown = list(figures)
    markdown = report_markdown(
        metrics["job"],
        metrics["results"],
        outcome.summary,
        metrics["parties"],
        shown,
        per_class,
        class_names,
        outcome.metric,
    )
    page = report_html(run_dir, metrics, outcome.summary, shown, per_class, class_names,
                       outcome.metric)  # fmt: skip
    (run_dir / "report.md").write_text(markdown)
    (run_dir / "report.html").write_text(page)


def _scope_requests(teachers: Sequence[Teacher], job_id: str) -> None:
    """Derive the parties' request ids from ``job_id``: the job, resumed, asks its chunks again
    in the same words (answered without a second charge); another job is charged anew."""
    for teacher in teachers:
        if isinstance(teacher, RemoteTeacher):
            teacher.request_scope = job_id


def run_job(
    spec: JobSpec,
    teachers: Sequence[Teacher],
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    store: JobStore | None = None,
    job: JobRecord | None = None,
    exports: tuple[str, ...] = (),
) -> Path:
    """Fuse ``teachers`` as ``spec`` says; returns the run folder with the student,
    ``metrics.json``, ``report.md`` and its figures.

    With ``store`` the job is recorded there (``job``: one of its jobs to resume, else a new
    one): every party answer is kept and replayed on a resume, and training runs keep
    checkpoints in ``<run folder>/checkpoints`` (removed once the job is done). The student
    is delivered as :mod:`amalgam.server.student` says, plus ``exports`` (``"onnx"``).
    """
    started = time.perf_counter()
    checkpoints = None
    if store is not None:
        job = job or store.create(spec)
        job_id, run_dir = job.id, job.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)  # gone where bad input stopped it before
        store.claim(job_id)
        log = _recorded(log, store, job_id)
        _scope_requests(teachers, job_id)
        teachers = [ReplayTeacher(t, store, job_id) for t in teachers]
        checkpoints = Checkpoints(run_dir / "checkpoints")
    else:
        job_id = new_job_id(spec)
        run_dir = Path(spec.output_dir) / job_id
        run_dir.mkdir(parents=True, exist_ok=False)
        _scope_requests(teachers, job_id)
    try:
        hardware = Hardware(resolve_device(spec.device), spec.precision)
        log(f"computing on {hardware.device} in {hardware.precision}")
        context = RunContext(seed=spec.seed, baselines=spec.baselines, map_teachers=fan_out,
                             progress=progress, log=log, checkpoints=checkpoints,
                             hardware=hardware)  # fmt: skip
        outcome = METHODS[spec.method.name].run(spec, teachers, context)
    except (KeyboardInterrupt, JobStopped) as error:
        if store is not None:
            store.set_status(job_id, "stopped", str(error) or "interrupted")
        raise
    except Exception as error:
        if store is not None:
            store.set_status(job_id, "failed", str(error))
        if isinstance(error, ValueError):  # bad input: no half run folder is left behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    reached = {t.info.name for t in teachers}
    unreached = [p.name for p in spec.parties if p.name not in reached]
    outcome.summary += [
        f"DEGRADED: party {name} was not reached at the start" for name in unreached
    ]
    write_student(run_dir, outcome.student, student_card(outcome, spec, job_id, teachers),
                  exports, log)  # fmt: skip
    stats = {t.info.name: dataclasses.asdict(t.stats) for t in teachers if hasattr(t, "stats")}
    metrics = {
        "job_id": job_id,
        "job": spec.model_dump(mode="json"),
        "results": outcome.results,
        "extra": outcome.extra,
        "parties": stats,
        "wall_seconds": time.perf_counter() - started,
    }
    _write_reports(run_dir, outcome, metrics, spec.data.test)
    if store is not None:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        store.set_status(job_id, "done")
    return run_dir
