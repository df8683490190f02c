"""One thread runs the models of the process.

PyTorch's CPU kernels run on an OpenMP team that belongs to the thread that calls them, and a
team keeps spinning for a while after each parallel region. An agent that ran its model in
whichever gRPC worker thread took the call grew one team per worker: teams that spin against
each other on the same cores, and a model that met a cold team and a cold malloc arena at
almost every call. Here every forward pass of every party in the process goes through one
thread, so there is one team, always warm; in-process callers (:class:`amalgam.party.local.
LocalTeacher`) and gRPC callers run the model under the same threading. Calls from several
callers are answered one after the other, each with all of the process's intra-op threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

R = TypeVar("R")

_state = threading.local()  # ``inside``: whether this thread is the model thread
_executor: ThreadPoolExecutor | None = None
_owner_pid = 0  # the process that started it (a forked child starts its own)
_lock = threading.Lock()


def _mark_inside() -> None:
    _state.inside = True


def _model_executor() -> ThreadPoolExecutor:
    global _executor, _owner_pid
    with _lock:
        if _executor is None or _owner_pid != os.getpid():
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="amalgam-model", initializer=_mark_inside
            )
            _owner_pid = os.getpid()
        return _executor


def _with_threads(threads: int, fn: Callable[..., R], *args, **kwargs) -> R:
    if torch.get_num_threads() != threads:  # a thread keeps the count it started with
        torch.set_num_threads(threads)
    return fn(*args, **kwargs)


def on_model_thread(fn: Callable[..., R], *args, **kwargs) -> R:
    """``fn(*args, **kwargs)`` on the process's model thread, with as many intra-op threads as
    the calling thread has (``torch.set_num_threads``), waited for; its exception, if any, is
    raised here. Called from the model thread itself, it runs at once."""
    if getattr(_state, "inside", False):
        return fn(*args, **kwargs)
    threads = torch.get_num_threads()
    return _model_executor().submit(_with_threads, threads, fn, *args, **kwargs).result()
