"""Model composition (paper 000): every teacher's predictions on the coordinator's unlabeled
images, mapped to the union of their classes, filtered by entropy and aggregated into
pseudo-labels by a rule, on which one student is trained. Detection parties are composed by
:mod:`amalgam.fusion.detection`.

The coordinator imports only what is listed here.
"""

from amalgam.fusion.composition.pipeline import (
    CompositionConfig,
    CompositionResult,
    Predictions,
    align_priors,
    compose,
    compose_predictions,
    described_alignment,
    gather,
    pseudo_label_stats,
)
from amalgam.fusion.composition.rules import RULES, Aggregate, Rule, aggregate

__all__ = [
    "RULES",
    "Aggregate",
    "CompositionConfig",
    "CompositionResult",
    "Predictions",
    "Rule",
    "aggregate",
    "align_priors",
    "compose",
    "compose_predictions",
    "described_alignment",
    "gather",
    "pseudo_label_stats",
]
