"""The method table: every fusion method the coordinator runs, by the name a job gives it.

Each module of this package that exports ``METHOD`` (an instance of a :class:`~.base.Method`)
is one method; adding a method is adding such a module. The table lists them by module name.
"""

from __future__ import annotations

import importlib
import pkgutil

from amalgam.server.methods.base import Method, Outcome


def _discovered() -> dict[str, Method]:
    modules = [
        importlib.import_module(f"{__name__}.{found.name}")
        for found in sorted(pkgutil.iter_modules(__path__), key=lambda found: found.name)
    ]
    records = [module.METHOD for module in modules if hasattr(module, "METHOD")]
    return {method.name: method for method in records}


METHODS: dict[str, Method] = _discovered()

__all__ = ["METHODS", "Method", "Outcome"]
