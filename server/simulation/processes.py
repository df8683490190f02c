"""Processes that a federation on this machine starts, and ending every one of them.

Each process is started in a session of its own, so that what it starts in turn (a SuperNode's
SuperExec and the ClientApp processes it launches, a party agent's helpers) shares its process
group, even once its parent has exited. Ending a process ends its whole group, and the groups
of the helpers Flower detaches into sessions of their own (``flower-superexec --parent-pid
<pid>``): SIGTERM first, SIGKILL for what is still alive at the deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable

import psutil

STOP_TIMEOUT_S = 15.0


def spawn(command: list[str], **options) -> subprocess.Popen:
    """``subprocess.Popen(command, **options)`` in a new session (its own process group)."""
    return subprocess.Popen(command, start_new_session=True, **options)


def _groups(pids: Iterable[int]) -> set[int]:
    """The process groups led by ``pids`` (started by :func:`spawn`, alive or not), those of
    their descendants, and those of the processes started with ``--parent-pid <pid>`` for any
    of them (Flower's detached helpers)."""
    pids = set(pids)
    groups = set(pids)
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            if process.pid in pids or any(
                a == "--parent-pid" and b in map(str, pids) for a, b in zip(cmdline, cmdline[1:])
            ):
                groups.add(os.getpgid(process.pid))
                groups |= {os.getpgid(child.pid) for child in process.children(recursive=True)}
        except (psutil.Error, ProcessLookupError):
            continue
    return groups - {os.getpgid(0)}  # never our own group


def _members(groups: set[int]) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) in groups:
                members.append(process)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


def end(processes: Iterable[subprocess.Popen], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Terminate ``processes`` with everything they started, wait up to ``timeout_s`` for all
    of it to exit, and kill what is left. ``processes`` are reaped through their ``Popen``
    (their return codes stay theirs)."""
    processes = list(processes)
    groups = _groups(p.pid for p in processes)
    ours = {p.pid for p in processes}
    others = [m for m in _members(groups) if m.pid not in ours]
    _signal(groups, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    psutil.wait_procs(others, timeout=max(0.0, deadline - time.monotonic()))
    _signal(groups, signal.SIGKILL)  # what outlived the deadline, or started meanwhile
    psutil.wait_procs(_members(groups), timeout=timeout_s)


def _signal(groups: set[int], signum: int) -> None:
    for group in groups:
        try:
            os.killpg(group, signum)
        except (ProcessLookupError, PermissionError):
            pass
