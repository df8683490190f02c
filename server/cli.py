"""The ``amalgam`` command line.

    amalgam party serve --config party.yaml   run a party agent
    amalgam plan job.yaml                     which methods the parties' policies allow
    amalgam fuse job.yaml                     run a fusion job, write runs/<job-id>/
    amalgam demo                              the simulated marketplace on loopback

Bad input ends with one line on stderr and exit code 2; an unreachable or refusing party
with exit code 1; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

USAGE_ERROR = 2
RUNTIME_ERROR = 1


def _party_serve(args: argparse.Namespace) -> int:
    from party.config import load_party_config
    from party.handler import PartyHandler
    from party.service import serve

    config = load_party_config(args.config)
    try:
        handler = PartyHandler.from_config(config)
    except (OSError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise _Failure(f"{args.config}: model: cannot load: {first_line}", USAGE_ERROR) from None
    serve(handler, config.address, max_message_mb=config.max_message_mb)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from server.fanout import fan_out
    from server.job import load_job
    from server.plan import plan
    from server.remote import PartyUnavailable, RemoteTeacher

    spec = load_job(args.job)
    teachers = [
        RemoteTeacher(p.name, p.address, deadline_s=spec.deadline_s, retries=1)
        for p in spec.parties
    ]

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
        print(f"{method.method:16s} {verdict}" + "".join(f"\n    - {r}" for r in method.reasons))
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from server.job import connect, load_job, run_job
    from server.report import results_table

    spec = load_job(args.job)
    run_dir = run_job(spec, connect(spec), progress=not args.quiet)
    import json

    print(results_table(json.loads((run_dir / "metrics.json").read_text())["results"]))
    print(f"wrote {run_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    run_demo(args.output_dir, progress=not args.quiet)
    return 0


class _Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amalgam", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    party = commands.add_parser("party", help="run a party agent")
    party_commands = party.add_subparsers(dest="party_command", required=True)
    serve = party_commands.add_parser("serve", help="serve the party's model under its policy")
    serve.add_argument("--config", required=True, help="the party's YAML configuration")
    serve.set_defaults(run=_party_serve)

    plan = commands.add_parser("plan", help="which methods the parties' policies allow")
    plan.add_argument("job", help="job YAML")
    plan.set_defaults(run=_plan)

    fuse = commands.add_parser("fuse", help="run a fusion job")
    fuse.add_argument("job", help="job YAML")
    fuse.add_argument("--quiet", action="store_true", help="no progress bars")
    fuse.set_defaults(run=_fuse)

    demo = commands.add_parser("demo", help="simulated marketplace of three parties on loopback")
    demo.add_argument("--output-dir", default="runs")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fusion.data import SourceUnavailable
    from protocol.errors import PartyError
    from protocol.loading import ConfigError
    from server.remote import PartyCallError, PartyUnavailable

    try:
        return args.run(args)
    except ConfigError as error:
        code, message = USAGE_ERROR, str(error)
    except _Failure as error:
        code, message = error.code, str(error)
    except (PartyUnavailable, PartyCallError, PartyError, SourceUnavailable) as error:
        code, message = RUNTIME_ERROR, str(error)
    except ValueError as error:  # e.g. no pseudo-label passed the filter
        code, message = USAGE_ERROR, str(error)
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    print(f"amalgam: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
