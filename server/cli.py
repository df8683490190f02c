"""The ``amalgam`` command line.

    amalgam party serve --config party.yaml   run a party agent (TLS, or --insecure)
    amalgam party check --address H:P ...     is an agent up, and what does it grant?
    amalgam plan job.yaml                     which methods the parties' policies allow
    amalgam fuse job.yaml                     run a fusion job, write runs/<job-id>/
    amalgam fuse --resume JOB_ID              go on with an interrupted job
    amalgam certs --out certs --party NAME... a federation CA and mTLS certificates
    amalgam audit verify LOG --key KEY        check an audit log's chain, MACs and seal
    amalgam predict --run RUN IMAGE...        a run's student on image files
    amalgam market --parties N --engine flower  N local parties composed over gRPC or Flower
    amalgam demo                              the simulated marketplace on loopback
    amalgam --version                         the installed version

Bad input ends with one line on stderr and exit code 2; an unreachable or refusing party
with exit code 1; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

USAGE_ERROR = 2
RUNTIME_ERROR = 1


def _party_serve(args: argparse.Namespace) -> int:
    from amalgam.fusion.config import first_line
    from amalgam.party.config import load_party_config
    from amalgam.party.handler import PartyHandler
    from amalgam.party.service import serve

    config = load_party_config(args.config)
    if config.tls is None and not args.insecure:
        raise _Failure(
            f"{args.config}: tls: no certificates (make them with `amalgam certs`), or pass "
            "--insecure to serve plaintext on a private network",
            USAGE_ERROR,
        )
    try:
        handler = PartyHandler.from_config(config)
    except (OSError, RuntimeError, ValueError) as error:
        raise _Failure(f"{args.config}: {first_line(error)}", USAGE_ERROR) from None
    try:
        serve(config, handler, insecure=args.insecure)
    except ValueError as error:  # the address cannot be listened on
        raise _Failure(f"{args.config}: {first_line(error)}", USAGE_ERROR) from None
    return 0


def _party_check(args: argparse.Namespace) -> int:
    """Health, then Describe, of a running agent, as the identity of ``--cert``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from amalgam.protocol.schemas import TlsFiles
    from amalgam.protocol.tls import channel_credentials
    from amalgam.server.remote import RemoteTeacher

    files = [args.cert, args.key, args.ca]
    if any(files) and not all(files):
        raise _Failure("give --cert, --key and --ca together", USAGE_ERROR)
    if not any(files) and not args.insecure:
        raise _Failure("give --cert, --key and --ca (mTLS), or --insecure", USAGE_ERROR)
    tls = TlsFiles(cert=args.cert, key=args.key, ca=args.ca) if all(files) else None
    credentials = channel_credentials(tls) if tls else None
    channel = (
        grpc.secure_channel(args.address, credentials)
        if credentials
        else grpc.insecure_channel(args.address)
    )
    with channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=args.deadline
            )
        except grpc.RpcError as error:
            raise _Failure(
                f"party at {args.address}: health check failed: {error.code().name}: "
                f"{error.details()}",
                RUNTIME_ERROR,
            ) from None
    serving = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
    if args.health_only:
        print(f"party at {args.address}: {serving}")
        return 0 if serving == "SERVING" else RUNTIME_ERROR
    with RemoteTeacher("agent", args.address, deadline_s=args.deadline, retries=0,
                       credentials=credentials) as teacher:  # fmt: skip
        info = teacher.info
    print(f"party {info.name} at {args.address}: {serving}")
    print(f"  classes {','.join(info.class_names)}; input {list(info.input_shape)}")
    print(f"  admits this caller; its policy grants {', '.join(info.capabilities) or 'nothing'}"
          + (f" (predict releases {info.output_form})" if info.output_form else ""))  # fmt: skip
    return 0 if serving == "SERVING" else RUNTIME_ERROR


def _connect_options(args: argparse.Namespace, spec) -> None:
    """Refuse a job without TLS unless ``--insecure`` says so; warn when it does."""
    if spec.tls is None and not args.insecure:
        raise _Failure(
            f"{args.job}: tls: no certificates for the coordinator (make them with `amalgam "
            "certs`), or pass --insecure to call the parties in plaintext",
            USAGE_ERROR,
        )
    if spec.tls is None:
        print("WARNING: calling the parties without TLS", file=sys.stderr, flush=True)


def _plan(args: argparse.Namespace) -> int:
    from amalgam.server.fanout import fan_out
    from amalgam.server.job import clients, load_job
    from amalgam.server.plan import plan
    from amalgam.server.remote import PartyUnavailable, RemoteTeacher

    spec = load_job(args.job)
    _connect_options(args, spec)
    teachers = clients(spec, retries=1)

    def describe(teacher: RemoteTeacher):
        try:
            return teacher.info
        except PartyUnavailable as error:
            print(f"unreachable: {error}")
            return None

    infos = [info for info in fan_out(describe, teachers) if info is not None]
    for info in infos:
        print(
            f"party {info.name}: classes {','.join(info.class_names)}; grants "
            f"{', '.join(info.capabilities) or 'nothing'}"
            + (f" (predict releases {info.output_form})" if info.output_form else "")
        )
    for method in plan(infos):
        verdict = "possible" if method.possible and len(infos) == len(teachers) else "not possible"
        ways = f" ({'; '.join(method.ways)})" if method.possible and method.ways else ""
        reasons = "".join(f"\n    - {r}" for r in method.reasons)
        print(f"{method.method:16s} {verdict}{ways}{reasons}")
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from amalgam.server.job import connect, load_job, run_job
    from amalgam.server.report import results_table
    from amalgam.server.store import JobStore, UnknownJob

    if (args.job is None) == (args.resume is None):
        raise _Failure("give a job file, or --resume <job-id>", USAGE_ERROR)
    if args.resume is not None:
        store = JobStore.beside(args.runs)
        try:
            job = store.get(args.resume)
        except UnknownJob as error:
            raise _Failure(str(error), USAGE_ERROR) from None
        if job.status == "done":
            raise _Failure(f"job {job.id} has finished: see {job.run_dir}", USAGE_ERROR)
        spec = job.spec
        store.set_status(job.id, "running")
        args.job = f"job {job.id}"  # what _connect_options names
        print(f"resuming job {job.id} in {job.run_dir}", flush=True)
    else:
        spec = load_job(args.job)
        store = JobStore.beside(spec.output_dir)
    _connect_options(args, spec)
    teachers = connect(spec)
    if args.resume is None:
        job = store.create(spec)
        print(f"job {job.id} in {job.run_dir} (if interrupted: amalgam fuse --resume {job.id}"
              f" --runs {spec.output_dir})", flush=True)  # fmt: skip
    run_dir = run_job(spec, teachers, progress=not args.quiet, store=store, job=job,
                      exports=tuple(args.export))  # fmt: skip
    import json

    print(results_table(json.loads((run_dir / "metrics.json").read_text())["results"]))
    print(f"wrote {run_dir}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    """The student of a run folder on image files: the ``--top`` classes of each."""
    import torch

    from amalgam.fusion.detection import DETECTORS
    from amalgam.fusion.imagefiles import read_images
    from amalgam.server.student import load_student

    student, card = load_student(args.run_dir)
    if card["arch"] in DETECTORS:
        raise _Failure(
            f"{args.run_dir}: its student is a detector; predict classifies", USAGE_ERROR
        )
    images = read_images(args.images, tuple(card["input_shape"]))  # (N, C, H, W) in [0, 1]
    with torch.no_grad():
        probs = torch.softmax(student(images), dim=1)  # (N, K)
    top = probs.topk(min(args.top, probs.shape[1]), dim=1)
    for path, values, indices in zip(args.images, top.values, top.indices):
        named = ", ".join(f"{card['class_names'][i]} {100 * v:.1f}%" for v, i in
                          zip(values.tolist(), indices.tolist()))  # fmt: skip
        print(f"{path}: {named}")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from amalgam.protocol.tls import write_federation

    try:
        written = write_federation(
            args.out, args.party, args.coordinator, args.host, args.days, args.key_type,
            args.supernode,
        )  # fmt: skip
    except ValueError as error:
        raise _Failure(str(error), USAGE_ERROR) from None
    for path in written:
        print(f"wrote {path}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from amalgam.party.audit import load_key, verify_file

    key = None
    if args.key is not None:
        try:
            key = load_key(args.key)
        except ValueError as error:
            raise _Failure(str(error), USAGE_ERROR) from None
    report = verify_file(args.log, key)
    print(report.message)
    return 0 if report.intact else RUNTIME_ERROR


def _market(args: argparse.Namespace) -> int:
    from amalgam.server.simulation.market import run_market

    metrics = run_market(
        args.parties, args.engine, args.data, args.seed, args.output_dir, args.epochs
    )
    results = metrics["results"]
    teachers = [v for k, v in results.items() if k.startswith("teacher:")]
    print(f"\n{args.parties} parties over {args.engine}, composition in {metrics['seconds']:.1f}s")
    print(f"mean teacher {100 * sum(teachers) / len(teachers):.1f}%, best teacher "
          f"{100 * results['best_teacher']:.1f}%, ensemble {100 * results['ensemble']:.1f}%, "
          f"student {100 * results['student']:.1f}%")  # fmt: skip
    print(f"wrote {metrics['run_dir']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from amalgam.server.simulation.demo import run_demo

    if args.prepare:
        from amalgam.server.simulation.demo_parties import prepare_federation

        for path in prepare_federation(Path(args.prepare)):
            print(f"wrote {path}")
        return 0
    run_demo(args.output_dir, progress=not args.quiet)
    return 0


class _MethodsEpilog(argparse.RawDescriptionHelpFormatter):
    """Help that ends with the method table (read only when the help is shown: the table
    imports every method)."""

    def format_help(self) -> str:
        from amalgam.server.methods import METHODS

        lines = [f"  {m.name:12s} {m.summary}" for m in METHODS.values()]
        self.add_text("methods (a job's method.name):\n" + "\n".join(lines))
        return super().format_help()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amalgam")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


class _Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amalgam", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    party = commands.add_parser("party", help="run a party agent")
    party_commands = party.add_subparsers(dest="party_command", required=True)
    serve = party_commands.add_parser("serve", help="serve the party's model under its policy")
    serve.add_argument("--config", required=True, help="the party's YAML configuration")
    serve.add_argument(
        "--insecure", action="store_true", help="serve plaintext without a tls: section"
    )
    serve.set_defaults(run=_party_serve)
    check = party_commands.add_parser("check", help="is an agent up, and what does it grant?")
    check.add_argument("--address", required=True, help="host:port of the agent")
    check.add_argument("--cert", help="this caller's certificate (amalgam certs)")
    check.add_argument("--key", help="its private key")
    check.add_argument("--ca", help="the federation CA")
    check.add_argument("--insecure", action="store_true", help="plaintext, for --insecure agents")
    check.add_argument("--deadline", type=float, default=10.0, help="seconds per call")
    check.add_argument(
        "--health-only",
        action="store_true",
        help="only the health service (any certificate of the CA will do; for probes)",
    )
    check.set_defaults(run=_party_check)

    plan = commands.add_parser("plan", help="which methods the parties' policies allow")
    plan.add_argument("job", help="job YAML")
    plan.add_argument("--insecure", action="store_true", help="plaintext, for a job without tls")
    plan.set_defaults(run=_plan)

    fuse = commands.add_parser("fuse", help="run a fusion job", formatter_class=_MethodsEpilog)
    fuse.add_argument("job", nargs="?", help="job YAML")
    fuse.add_argument("--resume", metavar="JOB_ID", help="go on with an interrupted job")
    fuse.add_argument(
        "--runs", default="runs", help="with --resume: the folder of the job store (runs)"
    )
    fuse.add_argument("--quiet", action="store_true", help="no progress bars")
    fuse.add_argument("--insecure", action="store_true", help="plaintext, for a job without tls")
    fuse.add_argument(
        "--export", action="append", default=[], choices=["onnx"],
        help="also write the student as student.onnx (beside student.pt2)",
    )  # fmt: skip
    fuse.set_defaults(run=_fuse)

    predict = commands.add_parser("predict", help="classify image files with a run's student")
    predict.add_argument("--run", dest="run_dir", required=True,
                         help="the run folder (runs/<job-id>)")  # fmt: skip
    predict.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    predict.add_argument("--top", type=int, default=1, help="classes shown per image (1)")
    predict.set_defaults(run=_predict)

    certs = commands.add_parser("certs", help="make a federation CA and mTLS certificates")
    certs.add_argument("--out", required=True, help="folder for the PEM files")
    certs.add_argument("--party", action="append", default=[], help="a party identity (repeatable)")
    certs.add_argument(
        "--coordinator", action="append", default=[], help="a coordinator identity (repeatable)"
    )
    certs.add_argument(
        "--supernode",
        action="append",
        default=[],
        help="a Flower SuperNode: a certificate for its bridge and an authentication key pair",
    )
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP the parties serve on (repeatable; default localhost, 127.0.0.1)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity, at most 365")
    certs.add_argument("--key-type", choices=["ec", "rsa"], default="ec", help="P-256 or RSA-3072")
    certs.set_defaults(run=_certs)

    audit = commands.add_parser("audit", help="party audit logs")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="check a log's hash chain")
    verify.add_argument("log", help="the party's audit.jsonl")
    verify.add_argument(
        "--key", help="the agent's audit key: also check every MAC and the seal (a rewritten "
        "chain, lines removed from the end)",
    )  # fmt: skip
    verify.set_defaults(run=_audit_verify)

    market = commands.add_parser("market", help="a simulated marketplace of N local parties")
    market.add_argument("--parties", type=int, default=10, help="how many (default 10)")
    market.add_argument("--engine", choices=["grpc", "flower"], default="grpc")
    market.add_argument(
        "--data", choices=["digits", "mnist", "fashion_mnist"], default="digits",
        help="digits (embedded) or a set from the shared data folder",
    )  # fmt: skip
    market.add_argument("--seed", type=int, default=0)
    market.add_argument("--epochs", type=int, default=20, help="student epochs")
    market.add_argument("--output-dir", default="runs")
    market.set_defaults(run=_market)

    demo = commands.add_parser("demo", help="simulated marketplace of three parties on loopback")
    demo.add_argument("--output-dir", default="runs")
    demo.add_argument(
        "--prepare",
        metavar="DIR",
        help="only write the configs, certificates and job of deploy/compose.yaml's federation",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from amalgam.fusion.data import SourceUnavailable
    from amalgam.protocol.errors import PartyError
    from amalgam.protocol.loading import ConfigError
    from amalgam.server.remote import MalformedResponse, PartyCallError, PartyUnavailable
    from amalgam.server.roster import TooFewParties

    try:
        return args.run(args)
    except ConfigError as error:
        code, message = USAGE_ERROR, str(error)
    except _Failure as error:
        code, message = error.code, str(error)
    except (
        PartyUnavailable,
        PartyCallError,
        PartyError,
        MalformedResponse,
        TooFewParties,
        SourceUnavailable,
        FloatingPointError,  # training diverged
    ) as error:
        code, message = RUNTIME_ERROR, str(error)
    except ValueError as error:  # e.g. no pseudo-label passed the filter
        code, message = USAGE_ERROR, str(error)
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    print(f"amalgam: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
