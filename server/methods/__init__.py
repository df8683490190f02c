"""The method table: every fusion method the coordinator runs, by the name a job gives it.

Each method is one module exporting one :class:`~amalgam.server.methods.base.Method` record
(``METHOD``); adding a method is adding a module and its line here.
"""

from __future__ import annotations

from amalgam.server.methods import amalgamate, clafusion, composition, consolidate, datafree, ot
from amalgam.server.methods.base import Method, Outcome, Runner

METHODS: dict[str, Method] = {
    module.METHOD.name: module.METHOD
    for module in (composition, datafree, ot, clafusion, consolidate, amalgamate)
}

__all__ = ["METHODS", "Method", "Outcome", "Runner"]
