"""``amalgam party serve`` and ``amalgam party check``."""

from __future__ import annotations

import argparse
import dataclasses

from amalgam.server.cli.common import (
    RUNTIME_ERROR,
    USAGE_ERROR,
    Failure,
    json_option,
    output_options,
    print_json,
)


def serve(args: argparse.Namespace) -> int:
    from amalgam.fusion.config import first_line
    from amalgam.party.config import load_party_config
    from amalgam.party.handler import PartyHandler
    from amalgam.party.service import serve

    config = load_party_config(args.config, args.set)
    if config.tls is None and not args.insecure:
        raise Failure(
            f"{args.config}: tls: no certificates (make them with `amalgam certs`), or pass "
            "--insecure to serve plaintext on a private network",
            USAGE_ERROR,
        )
    try:
        handler = PartyHandler.from_config(config)
    except (OSError, RuntimeError, ValueError) as error:
        raise Failure(f"{args.config}: {first_line(error)}", USAGE_ERROR) from None
    try:
        serve(config, handler, insecure=args.insecure)
    except ValueError as error:  # the address cannot be listened on
        raise Failure(f"{args.config}: {first_line(error)}", USAGE_ERROR) from None
    return 0


def check(args: argparse.Namespace) -> int:
    """Health, then Describe, of a running agent, as the identity of ``--cert``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from amalgam.protocol.schemas import TlsFiles
    from amalgam.protocol.tls import channel_credentials
    from amalgam.server.remote import RemoteTeacher

    files = [args.cert, args.key, args.ca]
    if any(files) and not all(files):
        raise Failure("give --cert, --key and --ca together", USAGE_ERROR)
    if not any(files) and not args.insecure:
        raise Failure("give --cert, --key and --ca (mTLS), or --insecure", USAGE_ERROR)
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
            raise Failure(
                f"party at {args.address}: health check failed: {error.code().name}: "
                f"{error.details()}",
                RUNTIME_ERROR,
            ) from None
    serving = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
    code = 0 if serving == "SERVING" else RUNTIME_ERROR
    info = None
    if not args.health_only:
        with RemoteTeacher("agent", args.address, deadline_s=args.deadline, retries=0,
                           credentials=credentials) as teacher:  # fmt: skip
            info = teacher.info
    if args.json:
        print_json({"address": args.address, "health": serving,
                    "party": None if info is None else dataclasses.asdict(info)})  # fmt: skip
    elif info is None:
        print(f"party at {args.address}: {serving}")
    else:
        print(f"party {info.name} at {args.address}: {serving}")
        print(f"  classes {','.join(info.class_names)}; input {list(info.input_shape)}")
        print(f"  admits this caller; its policy grants {grants(info)}")
    return code


def grants(info) -> str:
    """What a party's policy grants, in words: ``predict, gram (predict releases probs)``."""
    granted = ", ".join(info.capabilities) or "nothing"
    return granted + (f" (predict releases {info.output_form})" if info.output_form else "")


def add_commands(commands) -> None:
    party = commands.add_parser("party", help="run a party agent, or check one")
    party_commands = party.add_subparsers(dest="party_command", required=True)
    run = party_commands.add_parser("serve", parents=[output_options()],
                                    help="serve the party's model under its policy")  # fmt: skip
    run.add_argument("--config", required=True, help="the party's YAML configuration")
    run.add_argument("--insecure", action="store_true", help="serve plaintext without tls:")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a value of the configuration (repeatable)")  # fmt: skip
    run.set_defaults(run=serve)
    probe = party_commands.add_parser("check", parents=[output_options(), json_option()],
                                      help="is an agent up, and what does it grant?")  # fmt: skip
    probe.add_argument("--address", required=True, help="host:port of the agent")
    probe.add_argument("--cert", help="this caller's certificate (amalgam certs)")
    probe.add_argument("--key", help="its private key")
    probe.add_argument("--ca", help="the federation CA")
    probe.add_argument("--insecure", action="store_true", help="plaintext, for --insecure agents")
    probe.add_argument("--deadline", type=float, default=10.0, help="seconds per call")
    probe.add_argument(
        "--health-only",
        action="store_true",
        help="only the health service (any certificate of the CA will do; for probes)",
    )
    probe.set_defaults(run=check)
