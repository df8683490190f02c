"""``clafusion`` (paper 002): networks of different depths aligned layer to layer by linear
CKA, balanced to one depth, then fused by optimal transport as ``ot`` does."""

from __future__ import annotations

from amalgam.server.methods.ot import OT


class CLAFusion(OT):
    name = "clafusion"
    summary = "networks of different depths aligned by CKA, balanced, then OT-fused (paper 002)"
    cross_layer = True


METHOD = CLAFusion()
