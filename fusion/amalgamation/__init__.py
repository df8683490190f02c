"""Knowledge amalgamation (paper 004): one compact student for the union of the teachers'
class sets, learned from their features (feature amalgamation, Eq. 1 and 4), layer by layer
through feature adaptation modules (Eq. 3 and 5), then jointly on their score vectors. The
student is the paper's ``vgg_cnn`` or any traceable network, learned at the feature points
(unit outputs) it shares with teachers of any traceable architecture.

The coordinator imports only what is listed here.
"""

from amalgam.fusion.amalgamation.evaluate import amalgamation_rows, parameter_counts
from amalgam.fusion.amalgamation.features import FeatureCache
from amalgam.fusion.amalgamation.scores import TARGETS
from amalgam.fusion.amalgamation.student import Layout
from amalgam.fusion.amalgamation.trainer import AmalgamationConfig, AmalgamationResult, amalgamate

__all__ = [
    "TARGETS",
    "AmalgamationConfig",
    "AmalgamationResult",
    "FeatureCache",
    "Layout",
    "amalgamate",
    "amalgamation_rows",
    "parameter_counts",
]
