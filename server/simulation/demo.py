"""``amalgam demo``: a simulated marketplace on loopback.

Three party agents run as separate processes, each serving a teacher trained on a private,
overlapping subset of the digits classes over mutual TLS (a fresh federation CA signs the
parties' and the coordinator's certificates); the coordinator composes them over gRPC into
one student and prints how it compares with each teacher, the ensembles and the baselines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from amalgam.party.audit import read_records, verify_chain
from amalgam.protocol.tls import write_federation
from amalgam.server.job import connect, load_job, run_job
from amalgam.server.report import party_table, results_table
from amalgam.server.simulation.demo_parties import (
    COORDINATOR,
    DEMO_PARTIES,
    demo_job,
    demo_party_config,
)
from amalgam.server.simulation.processes import end, spawn

STARTUP_TIMEOUT_S = 120.0


def serve_command(config: Path, insecure: bool = False) -> list[str]:
    """``amalgam party serve`` for ``config`` with this interpreter (plaintext: ``insecure``)."""
    command = [sys.executable, "-m", "amalgam.server.cli", "party", "serve", "--config"]
    return command + [str(config)] + (["--insecure"] if insecure else [])


class PartyProcess:
    """``amalgam party serve`` in a child process of its own process group; the bound address
    is read from its first line of output."""

    def __init__(self, config: Path, insecure: bool = False) -> None:
        self.config = config
        self.process = spawn(serve_command(config, insecure), stdout=subprocess.PIPE, text=True)
        self.address = self._wait_for_address()

    def _wait_for_address(self) -> str:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()))
        reader.start()
        reader.join(STARTUP_TIMEOUT_S)
        if not line or " serving on " not in line[0]:
            self.stop()
            raise RuntimeError(
                f"party from {self.config} did not start within {STARTUP_TIMEOUT_S:.0f}s"
            )
        return line[0].strip().rsplit(" ", 1)[1]

    def stop(self) -> None:
        """SIGTERM (the agent stops gracefully) to it and anything it started, SIGKILL for
        what outlives the deadline."""
        end([self.process])
        if self.process.stdout:
            self.process.stdout.close()


def run_demo(output_dir: str = "runs", progress: bool = True) -> Path:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="amalgam-demo-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        print("preparing the parties' private teachers (trained once, then cached)")
        certs = folder / "certs"
        write_federation(certs, [p.name for p in DEMO_PARTIES], [COORDINATOR])
        configs = [demo_party_config(p, folder, certs) for p in DEMO_PARTIES]
        parties = []
        for config in configs:
            party = PartyProcess(config)
            stack.callback(party.stop)
            parties.append(party)
        addresses = {p.name: party.address for p, party in zip(DEMO_PARTIES, parties)}
        for name, address in addresses.items():
            classes = next(p.classes for p in DEMO_PARTIES if p.name == name)
            print(f"party {name} serving mTLS on {address}, classes {','.join(classes)}")
        job_path = folder / "job.yaml"
        job_path.write_text(yaml.safe_dump(demo_job(addresses, output_dir, certs), sort_keys=False))
        spec = load_job(job_path)
        run_dir = run_job(spec, connect(spec), progress=progress)
        for party in parties:
            party.stop()
        audit = {p.name: read_records(folder / f"{p.name}-audit.jsonl") for p in DEMO_PARTIES}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print()
    print(results_table(metrics["results"]))
    print()
    print(party_table(metrics["parties"]))
    print()
    for name, records in audit.items():
        chain = "intact" if verify_chain(records) else "BROKEN"
        print(f"audit log of {name}: {len(records)} calls recorded, hash chain {chain}")
    print(
        f"\nstudent, metrics.json, report.md and report.html in {run_dir} "
        f"({time.perf_counter() - started:.0f}s in all)"
    )
    return run_dir
