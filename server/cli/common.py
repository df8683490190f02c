"""What every command shares: exit codes, the one-line failure, log levels, JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

USAGE_ERROR = 2
RUNTIME_ERROR = 1
STOPPED = 143  # 128 + SIGTERM

logger = logging.getLogger("amalgam")


class Failure(Exception):
    """Ends a command with one line on stderr and ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def output_options() -> argparse.ArgumentParser:
    """``-v``/``-q``, which every command takes (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    level = parent.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true",
                       help="debug messages, gRPC's own log included")  # fmt: skip
    level.add_argument("-q", "--quiet", action="store_true",
                       help="warnings and errors only, no progress")  # fmt: skip
    return parent


def json_option() -> argparse.ArgumentParser:
    """``--json``: the command's result as one JSON document on stdout (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON on stdout; messages go to stderr",
    )
    return parent


def configure_logging(args: argparse.Namespace) -> None:
    """Messages of the ``amalgam`` loggers go to stderr as plain lines: INFO and up, DEBUG
    with ``-v``, WARNING and up with ``-q``. gRPC's C core says nothing unless ``-v`` (set
    before grpc is imported)."""
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    os.environ["GRPC_VERBOSITY"] = "DEBUG" if verbose else "NONE"


def say(args: argparse.Namespace, text: str) -> None:
    """A line of the command's result: stdout, or stderr when stdout carries ``--json``."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


def print_json(document: object) -> None:
    print(json.dumps(document, indent=2, default=str))


def connect_options(args: argparse.Namespace, spec) -> None:
    """Refuse a job without TLS unless ``--insecure`` says so; warn when it does."""
    if spec.tls is None and not args.insecure:
        raise Failure(
            f"{args.job}: tls: no certificates for the coordinator (make them with `amalgam "
            "certs`), or pass --insecure to call the parties in plaintext",
            USAGE_ERROR,
        )
    if spec.tls is None:
        logger.warning("WARNING: calling the parties without TLS")
