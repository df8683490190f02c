"""Amalgam's Python API, importable as ``amalgam``: what a user of a fused model needs without
the command line.

>>> import amalgam
>>> student, card = amalgam.load_student("runs/<job-id>")

Its names are imported on first use (PEP 562), so that importing a light part of the package
(``amalgam.party.flower_app``, the Flower bridge that starts afresh for every message) does
not import PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amalgam.server.student import Student, load_student

__all__ = ["Student", "load_student"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("amalgam.server.student"), name)
    raise AttributeError(f"module 'amalgam' has no attribute {name!r}")
