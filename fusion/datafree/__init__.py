"""Data-free fusion with generator assistants (paper 003): generators, generator assistants,
the teacher-side objective a party evaluates, and the training schedules of DFMF and its
baselines, with the generators at the coordinator or at the parties.

The coordinator imports only what is listed here.
"""

from amalgam.fusion.datafree.party_side import PartySideFusion, SynthesisParams
from amalgam.fusion.datafree.trainer import (
    VARIANTS,
    DataFreeConfig,
    DataFreeFusion,
    DataFreeResult,
    Variant,
)

__all__ = [
    "VARIANTS",
    "DataFreeConfig",
    "DataFreeFusion",
    "DataFreeResult",
    "PartySideFusion",
    "SynthesisParams",
    "Variant",
]
