"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest
import torch


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
