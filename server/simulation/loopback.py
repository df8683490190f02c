"""A Flower deployment on this machine's loopback: a SuperLink with TLS and SuperNode
authentication, and one registered SuperNode per party agent, each bridging to its agent over
mutual TLS. For tests, benchmarks and trying a federation out before deploying it for real.

Every process it starts runs in a process group of its own, and leaving the federation (its
``with`` block, or :meth:`LoopbackFederation.stop`) ends each group with everything in it --
SuperExec helpers, ClientApp and ServerApp processes -- and the helpers the SuperLink detaches
into sessions of their own (:mod:`amalgam.server.simulation.processes`).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from amalgam.protocol.tls import write_federation
from amalgam.server.simulation.processes import end, spawn

APP = Path(__file__).resolve().parents[2] / "deploy" / "flower-app"  # in the repository
CONNECTION = "loopback"
START_TIMEOUT_S = 90.0


def free_port() -> int:
    """A port free right now (Flower's servers take no port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f}s")
        time.sleep(0.2)


class LoopbackFederation:
    """Parameters
    ----------
    folder : where certificates, logs and the Flower CLI's configuration go.
    agents : ``{party: "host:port"}`` of the running party agents (mTLS, with the CA in
        ``folder/certs``: make their certificates with :meth:`certificates` first).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.certs = folder / "certs"
        self.logs = folder / "logs"
        self.home = folder / "flwr-home"
        self.processes: list[subprocess.Popen] = []
        self.port = 0
        bin_dir = str(Path(sys.executable).parent)  # flower-superexec & co. are found on PATH
        self.env = dict(
            os.environ,
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
            FLWR_HOME=str(self.home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2",
        )

    # -- set-up ------------------------------------------------------------------------------

    def certificates(self, parties: list[str], coordinators: list[str] = ()) -> None:
        """A federation CA, the SuperLink's certificate, and for each party its agent's
        certificate and a SuperNode (``<party>-node``: bridge certificate + key pair)."""
        write_federation(
            self.certs,
            parties,
            ["superlink", *coordinators],
            ["127.0.0.1", "localhost"],
            supernodes=[f"{party}-node" for party in parties],
        )

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        process = spawn(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder
        )
        log.close()
        self.processes.append(process)
        return process

    def flwr(self, *args: str, timeout_s: float = 120.0) -> str:
        """The Flower CLI against this SuperLink; its stdout."""
        done = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), *args],
            env=self.env, cwd=self.folder, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)}: {done.stderr.strip() or done.stdout}")
        return done.stdout

    def start_superlink(self) -> None:
        self.port = free_port()
        c = self.certs
        self._spawn("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-certfile", str(c / "superlink.pem"), "--ssl-keyfile", str(c / "superlink.key"),
            "--ssl-ca-certfile", str(c / "ca.pem"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        ])  # fmt: skip
        context = ssl.create_default_context(cafile=str(c / "ca.pem"))

        def healthy() -> bool:
            if self.processes[0].poll() is not None:
                raise RuntimeError(f"the SuperLink exited: see {self.logs / 'superlink.log'}")
            try:
                url = f"https://127.0.0.1:{self.port}/health"
                return urllib.request.urlopen(url, context=context, timeout=2).status == 200
            except OSError:
                return False

        _wait(healthy, START_TIMEOUT_S, "the SuperLink did not become healthy")
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{c / "ca.pem"}"\n'
        )

    def register(self, node: str) -> None:
        """Register a SuperNode's public key with the SuperLink (before it starts)."""
        self.flwr("supernode", "register", str(self.certs / f"{node}.ssh.pub"), CONNECTION)

    def start_supernode(self, node: str, agent: str, max_retries: int | None = None):
        """A SuperNode that bridges to ``agent`` with its own certificate as identity."""
        c = self.certs
        config = (
            f"agent='{agent}' tls-cert='{c / (node + '.pem')}' tls-key='{c / (node + '.key')}' "
            f"tls-ca='{c / 'ca.pem'}'"
        )
        command = [
            "flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(c / "ca.pem"),
            "--auth-supernode-private-key", str(c / f"{node}.ssh"),
            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", config,
        ]  # fmt: skip
        if max_retries is not None:
            command += ["--max-retries", str(max_retries)]
        return self._spawn(node, command)

    def wait_online(self, count: int) -> None:
        def online() -> bool:
            nodes = json.loads(self.flwr("supernode", "ls", CONNECTION, "--format", "json"))
            return sum(n["status"] == "online" for n in nodes["nodes"]) >= count

        _wait(online, START_TIMEOUT_S, f"{count} SuperNodes did not come online")

    # -- runs --------------------------------------------------------------------------------

    def run(self, job: Path, timeout_s: float = 600.0) -> dict:
        """Submit the Amalgam app with ``job`` and wait for the run to end; returns the run's
        entry of ``flwr ls`` (``status``, ``status-details``, elapsed time, traffic)."""
        submitted = self.flwr(
            "run", str(APP), CONNECTION, "--format", "json",
            "--run-config", f"job='{job.resolve()}'",
        )  # fmt: skip
        run_id = str(json.loads(submitted)["run-id"])
        with open(self.logs / f"run-{run_id}.log", "w") as log:
            subprocess.run(
                [str(Path(sys.executable).parent / "flwr"), "log", run_id, CONNECTION, "--stream"],
                env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                timeout=timeout_s,
            )  # fmt: skip
        listing = json.loads(self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json"))
        return listing["runs"][0]

    # -- tear-down ---------------------------------------------------------------------------

    def stop(self) -> None:
        """End every process of the federation and everything they started (Flower's
        SuperExec helpers and the ClientApp and ServerApp processes they launch)."""
        end(self.processes)
        self.processes.clear()

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
