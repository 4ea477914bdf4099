"""Models: ImageNet backbones, the detector interface and its post-processing, the shared two-stage model."""
