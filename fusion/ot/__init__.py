"""Weight fusion across parties (paper 002): linear CKA, cross-layer alignment (CLA), layer
balancing and layer-wise optimal-transport fusion (OTFusion) for MLPs, VGG-style CNNs and
ResNets with biases and BatchNorm."""
