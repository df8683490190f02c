"""Weight fusion across parties (paper 002): linear CKA, cross-layer alignment (CLA), layer
balancing and layer-wise optimal-transport fusion (OTFusion) for MLPs, VGG-style CNNs and
ResNets with biases and BatchNorm.

The coordinator imports only what is listed here.
"""

from amalgam.fusion.ot.config import AlignmentConfig, OTFusionConfig
from amalgam.fusion.ot.fuse import FusionResult, clafusion, ot_fuse
from amalgam.fusion.ot.pipeline import (
    Incompatible,
    WeightFusion,
    WeightFusionParams,
    fuse_parties,
)
from amalgam.fusion.ot.spec import UnsupportedNetwork

__all__ = [
    "AlignmentConfig",
    "FusionResult",
    "Incompatible",
    "OTFusionConfig",
    "UnsupportedNetwork",
    "WeightFusion",
    "WeightFusionParams",
    "clafusion",
    "fuse_parties",
    "ot_fuse",
]
