"""``clafusion`` (paper 002): networks of different depths aligned layer to layer by linear
CKA, balanced to one depth, then fused by optimal transport as ``ot`` does."""

from __future__ import annotations

from amalgam.fusion.ot import WeightFusionParams
from amalgam.server.methods import ot
from amalgam.server.methods.base import Method

METHOD = Method(
    name="clafusion",
    summary="networks of different depths aligned by CKA, balanced, then OT-fused (paper 002)",
    params=WeightFusionParams,
    run=ot.run,
    plan=ot.WEIGHTS,
    check=ot.check,
)
