"""The train stage for Fast R-CNN: the shared two-stage trainer (:mod:`rcnn.roi_training`) with this family's
model; a module of its own so that detection does not load the trainer."""

from __future__ import annotations

from typing import Any

from rcnn import roi_training
from rcnn.families.fast_rcnn import model
from rcnn.params import Params


def run_train_stage(params: Params, *args: Any, **kwargs: Any) -> dict:
    """:func:`rcnn.roi_training.run_train_stage` with :func:`~rcnn.families.fast_rcnn.model.build_fast_rcnn`."""
    return roi_training.run_train_stage(params, model.build_fast_rcnn, model.FastRCNNDetector, *args, **kwargs)
