"""Stopping a running job from outside (``amalgam jobs stop``): SIGTERM becomes
:class:`JobStopped` in the job's main thread, which leaves the job resumable."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class JobStopped(BaseException):
    """The job was asked to stop (SIGTERM); like an interrupt, it leaves the job
    resumable (``amalgam fuse --resume``)."""


@contextlib.contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`JobStopped` in the main thread; the previous
    handler comes back after it (elsewhere than in the main thread, nothing changes)."""

    def stop(signum, frame) -> None:
        raise JobStopped("stopped (SIGTERM)")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
