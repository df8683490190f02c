"""Amalgam jobs on Flower's simulation engine: one virtual SuperNode per party agent running on
this machine, each bridging to its agent as a deployed SuperNode would
(:mod:`amalgam.party.flower_app`); the coordinator is the same ServerApp logic as a deployment's
(:func:`amalgam.server.flower.run_over_grid`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
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


RAY_START_ATTEMPTS = 3


def start_ray() -> None:
    """Start Ray for Flower's simulation engine as its Ray backend would (no dashboard; workers
    import what this process imports), trying again when a start times out: on a busy machine
    Ray's GCS server or raylet can miss its start-up deadline, and neither Ray nor Flower
    tries again. Flower's backend uses a Ray already started and shuts it down at the end."""
    import ray

    if ray.is_initialized():
        return
    env = {"PYTHONPATH": os.pathsep.join(sys.path)}
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(include_dashboard=False, runtime_env={"env_vars": env})
            return
        except Exception as error:  # "Timed out waiting for file", "timed out during startup"
            ray.shutdown()
            _end_ray_processes(os.path.dirname(ray.__file__))
            if "timed out" not in str(error).lower() or attempt == RAY_START_ATTEMPTS:
                raise
            print(f"Ray did not start in time (attempt {attempt} of {RAY_START_ATTEMPTS}); "
                  "starting it again", file=sys.stderr, flush=True)  # fmt: skip


def _end_ray_processes(ray_folder: str) -> None:
    """Kill what a failed Ray start left running: this process's descendants that run Ray's
    own programs (its GCS server, raylet, monitors)."""
    strays = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(ray_folder in part for part in child.cmdline()):
                strays.append(child)
        except psutil.Error:
            continue
    for child in strays:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(strays, timeout=10)


def simulate(spec: JobSpec, agents: list[str], cpus_per_node: float = 1.0) -> tuple[Path, list]:
    """Run ``spec`` on Flower's simulation engine: one virtual SuperNode per party agent in
    ``agents`` (``host:port``). Returns the run folder and the teachers (with their call
    statistics); a job that fails raises its error here."""
    from flwr.simulation import run_simulation

    from amalgam.party.flower_app import bridge_app

    outcome: list = []
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        start_ray()
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
