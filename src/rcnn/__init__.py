"""Reproducible R-CNN object detection: a library of one module per concept, driven by DVC stages."""

__version__ = "0.1.0"
