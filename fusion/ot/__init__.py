"""Weight fusion across parties (paper 002): linear CKA, cross-layer alignment (CLA), layer
balancing and layer-wise optimal-transport fusion (OTFusion) for the registry's MLPs,
VGG-style CNNs and ResNets, and OT fusion of any network whose traced graph the alignment
rules follow (torchvision, timm: :mod:`amalgam.fusion.ot.graph`); REPAIR of the fused
network's channel statistics (:mod:`amalgam.fusion.ot.repair`).

The coordinator imports only what is listed here.
"""

from amalgam.fusion.ot.config import AlignmentConfig, OTFusionConfig
from amalgam.fusion.ot.fuse import FusionResult, clafusion, ot_fuse
from amalgam.fusion.ot.graph import traced_spec
from amalgam.fusion.ot.pipeline import (
    Incompatible,
    WeightFusion,
    WeightFusionParams,
    fuse_parties,
)
from amalgam.fusion.ot.repair import repair
from amalgam.fusion.ot.spec import UnsupportedNetwork, fusion_spec

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
    "fusion_spec",
    "ot_fuse",
    "repair",
    "traced_spec",
]
