"""``amalgam predict``, ``certs``, ``audit verify``, ``market`` and ``demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from amalgam.server.cli.common import RUNTIME_ERROR, USAGE_ERROR, Failure, output_options


def predict(args: argparse.Namespace) -> int:
    """The student of a run folder on image files: the ``--top`` classes of each."""
    import torch

    from amalgam.fusion.detection import DETECTORS
    from amalgam.fusion.imagefiles import read_images
    from amalgam.server.student import load_student

    student, card = load_student(args.run_dir)
    if card["arch"] in DETECTORS:
        raise Failure(f"{args.run_dir}: its student is a detector; predict classifies", USAGE_ERROR)
    images = read_images(args.images, tuple(card["input_shape"]))  # (N, C, H, W) in [0, 1]
    with torch.no_grad():
        probs = torch.softmax(student(images), dim=1)  # (N, K)
    top = probs.topk(min(args.top, probs.shape[1]), dim=1)
    for path, values, indices in zip(args.images, top.values, top.indices):
        named = ", ".join(f"{card['class_names'][i]} {100 * v:.1f}%" for v, i in
                          zip(values.tolist(), indices.tolist()))  # fmt: skip
        print(f"{path}: {named}")
    return 0


def certs(args: argparse.Namespace) -> int:
    from amalgam.protocol import tls

    identities = args.party or args.coordinator or args.supernode
    if sum(map(bool, (identities, args.csr, args.request))) != 1:
        raise Failure("give identities (--party, --coordinator, --supernode), or --csr FILE, "
                      "or --request NAME", USAGE_ERROR)  # fmt: skip
    try:
        if args.request:
            written = tls.write_request(args.out, args.request, args.host, args.key_type)
        elif args.csr:
            try:
                csr = Path(args.csr).read_bytes()
            except OSError as error:
                raise Failure(f"{args.csr}: cannot read: {error.strerror}", USAGE_ERROR) from None
            written = tls.write_signed(args.out, csr, args.host, args.days, args.force)
        else:
            written = tls.write_federation(
                args.out, args.party, args.coordinator, args.host, args.days, args.key_type,
                args.supernode, args.force,
            )  # fmt: skip
    except ValueError as error:
        where = f"{args.csr}: " if args.csr else ""
        raise Failure(f"{where}{error}", USAGE_ERROR) from None
    for path in written:
        print(f"wrote {path}")
    return 0


def audit_verify(args: argparse.Namespace) -> int:
    from amalgam.party.audit import load_key, verify_file

    key = None
    if args.key is not None:
        try:
            key = load_key(args.key)
        except ValueError as error:
            raise Failure(str(error), USAGE_ERROR) from None
    report = verify_file(args.log, key)
    print(report.message)
    return 0 if report.intact else RUNTIME_ERROR


def market(args: argparse.Namespace) -> int:
    from amalgam.server.simulation.market import run_market

    try:
        metrics = run_market(args.parties, args.engine, args.data, args.seed, args.output_dir,
                             args.epochs, pretrained=args.pretrained)  # fmt: skip
    except ValueError as error:  # e.g. more parties than the data set has images for
        raise Failure(str(error), USAGE_ERROR) from None
    results = metrics["results"]
    teachers = [v for k, v in results.items() if k.startswith("teacher:")]
    print(f"\n{args.parties} parties over {args.engine}, composition in {metrics['seconds']:.1f}s")
    print(f"mean teacher {100 * sum(teachers) / len(teachers):.1f}%, best teacher "
          f"{100 * results['best_teacher']:.1f}%, ensemble {100 * results['ensemble']:.1f}%, "
          f"student {100 * results['student']:.1f}%")  # fmt: skip
    print(f"wrote {metrics['run_dir']}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from amalgam.server.simulation.demo import run_demo

    if args.prepare:
        from amalgam.server.simulation.demo_parties import prepare_federation

        written = prepare_federation(Path(args.prepare), one_host=args.one_host)
        for path in written:
            print(f"wrote {path}")
        if args.one_host:
            *configs, job = [path for path in written if path.suffix == ".yaml"]
            print("then, each in a terminal of its own:")
            for config in configs:
                print(f"  amalgam party serve --config {config}")
            print(f"  amalgam fuse {job}")
        return 0
    run_demo(args.output_dir, progress=not args.quiet)
    return 0


def completion(args: argparse.Namespace) -> int:
    """The shell's completion script for ``amalgam`` (shtab), to source or install."""
    import shtab

    from amalgam.server.cli import build_parser

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def add_commands(commands) -> None:
    output = output_options()
    classify = commands.add_parser("predict", parents=[output],
                                   help="classify image files with a run's student")  # fmt: skip
    classify.add_argument("--run", dest="run_dir", required=True,
                          help="the run folder (runs/<job-id>)")  # fmt: skip
    classify.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    classify.add_argument("--top", type=int, default=1, help="classes shown per image (1)")
    classify.set_defaults(run=predict)

    make = commands.add_parser("certs", parents=[output],
                               help="make a federation CA and mTLS certificates")  # fmt: skip
    make.add_argument("--out", required=True, help="folder for the PEM files")
    make.add_argument("--party", action="append", default=[], help="a party identity (repeatable)")
    make.add_argument(
        "--coordinator", action="append", default=[], help="a coordinator identity (repeatable)"
    )
    make.add_argument(
        "--supernode",
        action="append",
        default=[],
        help="a Flower SuperNode: a certificate for its bridge and an authentication key pair",
    )
    make.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP the parties serve on (repeatable; default localhost, 127.0.0.1)",
    )
    make.add_argument(
        "--csr", metavar="FILE",
        help="sign an organization's certificate request with the CA in --out (it keeps its key)",
    )  # fmt: skip
    make.add_argument(
        "--request", metavar="NAME",
        help="make a key and a certificate request for NAME in --out, to send to the CA",
    )  # fmt: skip
    make.add_argument("--force", action="store_true",
                      help="issue again an identity that --out holds already")  # fmt: skip
    make.add_argument("--days", type=int, default=365, help="validity, at most 365")
    make.add_argument("--key-type", choices=["ec", "rsa"], default="ec", help="P-256 or RSA-3072")
    make.set_defaults(run=certs)

    audit = commands.add_parser("audit", help="party audit logs")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", parents=[output], help="check a log's chain")
    verify.add_argument("log", help="the party's audit.jsonl")
    verify.add_argument(
        "--key", help="the agent's audit key: also check every MAC and the seal (a rewritten "
        "chain, lines removed from the end)",
    )  # fmt: skip
    verify.set_defaults(run=audit_verify)

    simulated = commands.add_parser("market", parents=[output],
                                    help="a simulated marketplace of N local parties")  # fmt: skip
    simulated.add_argument("--parties", type=int, default=10, help="how many (default 10)")
    simulated.add_argument("--engine", choices=["grpc", "flower"], default="grpc")
    simulated.add_argument(
        "--data", choices=["digits", "mnist", "fashion_mnist"], default="digits",
        help="digits (embedded) or a set from the shared data folder",
    )  # fmt: skip
    simulated.add_argument("--seed", type=int, default=0)
    simulated.add_argument("--epochs", type=int, default=20, help="student epochs")
    simulated.add_argument("--output-dir", default="runs")
    simulated.add_argument(
        "--pretrained", metavar="DIR", help="keep the parties' teachers in DIR and reuse them on "
        "the next run with the same data, parties and seed (default: train them every run)",
    )  # fmt: skip
    simulated.set_defaults(run=market)

    show = commands.add_parser(
        "demo", parents=[output], help="simulated marketplace of three parties on loopback"
    )
    show.add_argument("--output-dir", default="runs")
    show.add_argument(
        "--prepare",
        metavar="DIR",
        help="only write the configs, certificates and job of deploy/compose.yaml's federation",
    )
    show.add_argument(
        "--one-host", action="store_true",
        help="with --prepare: files that run on this machine as they are (ports 50051-50053)",
    )  # fmt: skip
    show.set_defaults(run=demo)

    complete = commands.add_parser(
        "completion",
        help="print a shell completion script",
        description="bash: amalgam completion bash > ~/.local/share/bash-completion/"
        "completions/amalgam; zsh: amalgam completion zsh > ~/.zfunc/_amalgam",
    )
    complete.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    complete.set_defaults(run=completion)
