"""Representation consolidation (paper 001): a multi-head student distilled on unlabeled proxy
data from task-specific teachers and a generalist, so that its backbone transfers to new tasks
better than any teacher's.

The coordinator imports only what is listed here.
"""

from amalgam.fusion.consolidation.pipeline import (
    Consolidation,
    ConsolidationParams,
    TransferTask,
    consolidate_parties,
)
from amalgam.fusion.consolidation.trainer import ConsolidationConfig, consolidate

__all__ = [
    "Consolidation",
    "ConsolidationConfig",
    "ConsolidationParams",
    "TransferTask",
    "consolidate",
    "consolidate_parties",
]
