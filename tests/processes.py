"""What a test leaves running: the processes it started (children of the test process, at any
depth) and those whose command line points into the test run's temporary folder (a Flower
helper re-parented to init still names the folder it was started for)."""

from __future__ import annotations

from pathlib import Path

import psutil

EXIT_TIMEOUT_S = 10.0  # how long a process a test ended may take to exit


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def snapshot(folder: Path) -> set[psutil.Process]:
    """The live processes of this test process's tree or naming ``folder`` (a psutil process
    is identified by its pid and start time, so a reused pid is another process)."""
    me = psutil.Process()
    found = set(me.children(recursive=True))
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(folder) in part for part in process.info["cmdline"] or []):
                found.add(process)
        except psutil.Error:
            continue
    return {process for process in found - {me} if _alive(process)}


def left_behind(before: set[psutil.Process], folder: Path) -> list[psutil.Process]:
    """The processes found now that were not in ``before`` and are still alive after
    ``EXIT_TIMEOUT_S`` (a process being stopped is waited for, not reported)."""
    started = snapshot(folder) - before
    _, alive = psutil.wait_procs(list(started), timeout=EXIT_TIMEOUT_S)
    return [process for process in alive if _alive(process)]


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return str(process.pid)
