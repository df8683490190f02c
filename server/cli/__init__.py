"""The amalgam command line.

    amalgam party serve --config party.yaml   run a party agent (TLS, or --insecure)
    amalgam party check --address H:P ...     is an agent up, and what does it grant?
    amalgam plan job.yaml                     which methods the parties' policies allow
    amalgam fuse job.yaml                     run a fusion job, write runs/<job-id>/
    amalgam fuse --resume JOB_ID              go on with an interrupted job
    amalgam jobs ls | show | log | stop       the jobs of a job store (runs/jobs.sqlite)
    amalgam certs --out certs --party NAME... a federation CA and mTLS certificates
    amalgam audit verify LOG --key KEY        check an audit log's chain, MACs and seal
    amalgam predict --run RUN IMAGE...        a run's student on image files
    amalgam market --parties N --engine flower  N local parties composed over gRPC or Flower
    amalgam demo                              the simulated marketplace on loopback
    amalgam --version                         the installed version

Every command takes -v (debug messages, gRPC's own log) and -q (warnings only, no progress);
plan, party check, fuse and jobs ls/show take --json; plan, fuse and party serve take
--set key.path=value to override a value of their file. Messages go to stderr, results to
stdout. Bad input ends with one line per problem on stderr and exit code 2; an unreachable or
refusing party with exit code 1; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from amalgam.server.cli import jobs, party, tools
from amalgam.server.cli.common import (
    RUNTIME_ERROR,
    STOPPED,
    USAGE_ERROR,
    Failure,
    configure_logging,
)

# the optional dependency group (pyproject.toml) that brings each optional package
EXTRAS = {
    "timm": "party",
    "ot": "coordinator",
    "sklearn": "coordinator",
    "matplotlib": "coordinator",
    "jinja2": "coordinator",
    "flwr": "flower",
    "ray": "flower",
    "pycocotools": "detection",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
}

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amalgam",
        description="Fuse the models of organizations that keep their data at home.",
        epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    party.add_commands(commands)
    jobs.add_commands(commands, _MethodsEpilog)
    tools.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args)
    from amalgam.fusion.data import SourceUnavailable
    from amalgam.protocol.errors import PartyError
    from amalgam.protocol.loading import ConfigError
    from amalgam.server.remote import MalformedResponse, PartyCallError, PartyUnavailable
    from amalgam.server.roster import TooFewParties
    from amalgam.server.stopping import JobStopped

    try:
        return args.run(args)
    except ConfigError as error:
        code, message = USAGE_ERROR, str(error)
    except Failure as error:
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
    except JobStopped as error:
        code, message = STOPPED, str(error)
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except ModuleNotFoundError as error:  # an optional group this install lacks
        package = (error.name or "").partition(".")[0]
        if package not in EXTRAS:
            raise
        extra = EXTRAS[package]
        code = USAGE_ERROR
        message = (f"this needs amalgam[{extra}] ({package} is not installed): "
                   f"pip install 'amalgam[{extra}]'")  # fmt: skip
    except BrokenPipeError:  # stdout closed early (`amalgam jobs ls | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return RUNTIME_ERROR
    for line in message.splitlines() or [""]:
        print(f"amalgam: error: {line}", file=sys.stderr)
    return code
