"""``amalgam plan``, ``amalgam fuse`` and ``amalgam jobs ls | show | log | stop`` (the job
store, ``<runs>/jobs.sqlite``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import time
from datetime import datetime
from pathlib import Path

from amalgam.server.cli.common import (
    RUNTIME_ERROR,
    USAGE_ERROR,
    Failure,
    connect_options,
    json_option,
    logger,
    output_options,
    print_json,
    say,
)
from amalgam.server.cli.party import grants

STOP_WAIT_S = 60.0  # how long `jobs stop` waits for the job to mark itself stopped
FOLLOW_POLL_S = 0.5


def plan_methods(args: argparse.Namespace) -> int:
    from amalgam.server.fanout import fan_out
    from amalgam.server.job import clients, load_job
    from amalgam.server.plan import plan
    from amalgam.server.remote import PartyUnavailable, RemoteTeacher

    spec = load_job(args.job, args.set)
    connect_options(args, spec)
    teachers = clients(spec, retries=1)
    unreachable: list[str] = []

    def describe(teacher: RemoteTeacher):
        try:
            return teacher.info
        except PartyUnavailable as error:
            unreachable.append(str(error))
            return None

    infos = [info for info in fan_out(describe, teachers) if info is not None]
    methods = [
        dataclasses.replace(m, possible=m.possible and len(infos) == len(teachers))
        for m in plan(infos)
    ]
    if args.json:
        print_json({"parties": [dataclasses.asdict(info) for info in infos],
                    "unreachable": unreachable,
                    "methods": [dataclasses.asdict(m) for m in methods]})  # fmt: skip
        return 0
    for problem in unreachable:
        print(f"unreachable: {problem}")
    for info in infos:
        print(f"party {info.name}: classes {','.join(info.class_names)}; grants {grants(info)}")
    for method in methods:
        verdict = "possible" if method.possible else "not possible"
        ways = f" ({'; '.join(method.ways)})" if method.possible and method.ways else ""
        reasons = "".join(f"\n    - {r}" for r in method.reasons)
        print(f"{method.method:16s} {verdict}{ways}{reasons}")
    return 0


def fuse(args: argparse.Namespace) -> int:
    from amalgam.server.job import connect, load_job, run_job
    from amalgam.server.report import results_table
    from amalgam.server.stopping import stopped_by_sigterm
    from amalgam.server.store import JobStore, UnknownJob

    if (args.job is None) == (args.resume is None):
        raise Failure("give a job file, or --resume <job-id>", USAGE_ERROR)
    if args.resume is not None:
        if args.set:
            raise Failure("--set changes a job file; a resumed job keeps its own", USAGE_ERROR)
        store = JobStore.beside(args.runs)
        try:
            job = store.get(args.resume)
        except UnknownJob as error:
            raise Failure(str(error), USAGE_ERROR) from None
        if job.status == "done":
            raise Failure(f"job {job.id} has finished: see {job.run_dir}", USAGE_ERROR)
        if job.status == "running" and job.alive():
            raise Failure(f"job {job.id} is running (process {job.pid})", USAGE_ERROR)
        spec = job.spec
        args.job = f"job {job.id}"  # what connect_options names
        say(args, f"resuming job {job.id} in {job.run_dir}")
    else:
        spec = load_job(args.job, args.set)
        store = JobStore.beside(spec.output_dir)
    connect_options(args, spec)
    teachers = connect(spec, log=logger.info)
    if args.resume is None:
        job = store.create(spec)
        say(args, f"job {job.id} in {job.run_dir} (if interrupted: amalgam fuse --resume "
                  f"{job.id} --runs {spec.output_dir})")  # fmt: skip
    with stopped_by_sigterm():
        run_dir = run_job(spec, teachers, progress=not args.quiet, log=logger.info,
                          store=store, job=job, exports=tuple(args.export))  # fmt: skip
    results = json.loads((run_dir / "metrics.json").read_text())["results"]
    if args.json:
        print_json({"job_id": job.id, "status": "done", "run_dir": run_dir, "results": results})
    else:
        print(results_table(results))
        print(f"wrote {run_dir}")
    return 0


def _store(args: argparse.Namespace):
    from amalgam.server.store import STORE_NAME, JobStore

    path = Path(args.runs) / STORE_NAME
    if not path.is_file():
        raise Failure(f"{path}: no job store (--runs: the output_dir of the jobs)", USAGE_ERROR)
    return JobStore(path)


def _job(store, job_id: str):
    from amalgam.server.store import UnknownJob

    try:
        return store.get(job_id)
    except UnknownJob as error:
        raise Failure(str(error), USAGE_ERROR) from None


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _summary(job) -> dict:
    return {"id": job.id, "name": job.spec.name, "method": job.spec.method.name,
            "state": job.state, "created": _when(job.created), "updated": _when(job.updated),
            "run_dir": str(job.run_dir), "error": job.error}  # fmt: skip


def jobs_ls(args: argparse.Namespace) -> int:
    rows = [_summary(job) for job in _store(args).jobs()]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print(f"no jobs in {args.runs}")
        return 0
    width = max(len(row["id"]) for row in rows)
    print(f"{'job':{width}s}  {'method':12s}  {'state':11s}  updated")
    for row in rows:
        print(f"{row['id']:{width}s}  {row['method']:12s}  {row['state']:11s}  {row['updated']}")
    return 0


def jobs_show(args: argparse.Namespace) -> int:
    from amalgam.server.report import results_table

    store = _store(args)
    job = _job(store, args.job_id)
    metrics_file = job.run_dir / "metrics.json"
    results = json.loads(metrics_file.read_text())["results"] if metrics_file.exists() else {}
    paid = store.paid(job.id)
    document = {**_summary(job), "parties": [p.name for p in job.spec.parties],
                "answers": {party: {"recorded": count, "bytes": size}
                            for party, (count, size) in paid.items()},
                "results": results, "spec": job.spec.model_dump(mode="json")}  # fmt: skip
    if args.json:
        print_json(document)
        return 0
    print(f"job {job.id}: {job.state} ({job.spec.method.name}, parties "
          f"{', '.join(document['parties'])})")  # fmt: skip
    print(f"  created {document['created']}, updated {document['updated']}")
    print(f"  run folder {job.run_dir}" + ("" if job.run_dir.exists() else " (none)"))
    if job.error:
        print(f"  {job.state}: {job.error}")
    for party, (count, size) in paid.items():
        print(f"  {party}: {count} answers recorded ({size / 1e6:.2f} MB)")
    if results:
        print(results_table(results))
    return 0


def jobs_log(args: argparse.Namespace) -> int:
    store = _store(args)
    job = _job(store, args.job_id)
    last = 0
    while True:
        for row, at, line in store.lines(job.id, last):
            print(f"{_when(at)}  {line}", flush=True)
            last = row
        job = store.get(job.id)
        if not args.follow or job.state != "running":
            break
        time.sleep(FOLLOW_POLL_S)
    if args.follow or job.state != "running":
        print(f"job {job.id}: {job.state}" + (f": {job.error}" if job.error else ""))
    return 0


def jobs_stop(args: argparse.Namespace) -> int:
    import os

    store = _store(args)
    job = _job(store, args.job_id)
    if job.state != "running":
        raise Failure(f"job {job.id} is not running: {job.state}", RUNTIME_ERROR)
    os.kill(job.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        job = store.get(job.id)
        if job.state != "running":
            print(f"job {job.id}: {job.state} (resume: amalgam fuse --resume {job.id} "
                  f"--runs {args.runs})")  # fmt: skip
            return 0
        time.sleep(FOLLOW_POLL_S)
    raise Failure(f"job {job.id}: process {job.pid} did not stop in {STOP_WAIT_S:.0f}s",
                  RUNTIME_ERROR)  # fmt: skip


def add_commands(commands, methods_epilog) -> None:
    output, as_json = output_options(), json_option()
    plan = commands.add_parser("plan", parents=[output, as_json],
                               help="which methods the parties' policies allow")  # fmt: skip
    plan.add_argument("job", help="job YAML")
    plan.add_argument("--insecure", action="store_true", help="plaintext, for a job without tls")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a value of the job file (repeatable)")  # fmt: skip
    plan.set_defaults(run=plan_methods)

    run = commands.add_parser("fuse", parents=[output, as_json], help="run a fusion job",
                              formatter_class=methods_epilog)  # fmt: skip
    run.add_argument("job", nargs="?", help="job YAML")
    run.add_argument("--resume", metavar="JOB_ID", help="go on with an interrupted job")
    run.add_argument("--runs", default="runs", help="with --resume: the folder of the job store")
    run.add_argument("--insecure", action="store_true", help="plaintext, for a job without tls")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a value of the job file, e.g. student.epochs=5")  # fmt: skip
    run.add_argument(
        "--export",
        action="append",
        default=[],
        choices=["onnx"],
        help="also write the student as student.onnx (beside student.pt2)",
    )
    run.set_defaults(run=fuse)

    jobs = commands.add_parser("jobs", help="the jobs of a job store: ls, show, log, stop")
    actions = jobs.add_subparsers(dest="jobs_command", required=True)
    for name, action, summary in [
        ("ls", jobs_ls, "every job: id, method, state, last update"),
        ("show", jobs_show, "one job: state, reason, answers paid for, results"),
        ("log", jobs_log, "a job's log"),
        ("stop", jobs_stop, "stop a running job (it stays resumable)"),
    ]:
        parents = [output, as_json] if name in ("ls", "show") else [output]
        command = actions.add_parser(name, parents=parents, help=summary)
        if name != "ls":
            command.add_argument("job_id", metavar="JOB_ID")
        if name == "log":
            command.add_argument("-f", "--follow", action="store_true",
                                 help="go on printing until the job ends")  # fmt: skip
        command.add_argument("--runs", default="runs", help="the folder of the job store (runs)")
        command.set_defaults(run=action)
