"""Fixtures shared by the unit tests."""

from __future__ import annotations

import psutil
import pytest
import torch
from processes import describe, left_behind, snapshot

pytest_plugins = ["pytester"]  # tests/test_processes.py runs a test that leaks on purpose


@pytest.fixture(autouse=True)
def no_process_left_behind(tmp_path_factory):
    """Fail a test that leaves a process of its own, or of a federation it started, running
    (and end that process)."""
    folder = tmp_path_factory.getbasetemp()
    before = snapshot(folder)
    yield
    leaked = left_behind(before, folder)
    names = [describe(process) for process in leaked]  # while they still have a command line
    for process in leaked:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    if leaked:
        pytest.fail("left running: " + "; ".join(names))


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-tensor math on one intra-op thread, then restore the setting.

    On a busy 2-core machine, OpenMP's thread barriers make a 150-step Adam loop on a (16, 4)
    tensor take seconds instead of tens of milliseconds. Opt in with
    ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """A wheel of the project, built once from a copy of its sources."""
    from wheels import build_wheel

    parts = ("protocol", "party", "server", "fusion")
    return build_wheel(tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist"), parts)
