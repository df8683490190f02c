"""Amalgam jobs on Flower's simulation engine: one virtual SuperNode per party agent running on
this machine, each bridging to its agent as a deployed SuperNode would
(:mod:`amalgam.party.flower_app`); the coordinator is the same ServerApp logic as a deployment's
(:func:`amalgam.server.flower.run_over_grid`)."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from amalgam.server.flower import run_over_grid
from amalgam.server.jobspec import JobSpec


def job_server_app(spec: JobSpec, outcome: list) -> ServerApp:
    """A ServerApp that runs ``spec`` over the Grid it is given and appends to ``outcome``
    either ``(run_dir, teachers)`` or the exception that stopped the job."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome.append(run_over_grid(grid, spec))
        except Exception as error:  # handed to the caller, whom Flower's log would not reach
            outcome.append(error)

    return app


def simulate(spec: JobSpec, agents: list[str], cpus_per_node: float = 1.0) -> tuple[Path, list]:
    """Run ``spec`` on Flower's simulation engine: one virtual SuperNode per party agent in
    ``agents`` (``host:port``). Returns the run folder and the teachers (with their call
    statistics); a job that fails raises its error here."""
    from flwr.simulation import run_simulation

    from amalgam.party.flower_app import bridge_app

    outcome: list = []
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(
            server_app=job_server_app(spec, outcome),
            client_app=bridge_app(agents),
            num_supernodes=len(agents),
            backend_config={"client_resources": {"num_cpus": cpus_per_node}},
        )
    finally:  # Flower's Ray backend sets PYTHONPATH to this process's sys.path for its workers
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    if not outcome:
        raise RuntimeError("the Flower run ended without a result (see its log above)")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]
