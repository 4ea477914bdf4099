"""Scoring a detector on labelled training or validation images while it trains: the AP that selects the
best epoch, and the per-class recall of the regions it scored (did a class fail at proposals or at
classification?)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from rcnn.data import voc
from rcnn.evaluation.voc_eval import Detections, evaluate_detections
from rcnn.modeling.detector_interface import Detector
from rcnn.proposals.region_boxes import ImageBoxes
from rcnn.proposals.selective_search import proposal_recall
from rcnn.utils.errors import RcnnError


def labelled_split_ap(detector: Detector, paths: Sequence[Path], items: Sequence[ImageBoxes],
                      max_proposals: int | None = None, with_proposal_recall: bool = False) -> dict:
    """AP and AP07 of ``detector`` on the images at ``paths`` whose proposals and ground truth the regions
    stage stored in ``items`` (each image's first ``max_proposals`` proposals; all when None): the training
    loops' validation AP, with ``detector`` set up by :func:`postprocess_settings` and ``max_proposals`` =
    ``evaluate.max_proposals``, as the evaluate stage scores. An unreadable image counts with no
    detections (training warned about it). ``with_proposal_recall`` adds the per-class recall of the regions
    the detector scored (``proposal_recall``)."""
    found, rois = {}, []
    for path, item in zip(paths, items):
        try:
            found[item.image_id] = detector.detect(voc.read_image(path), item.proposals[:max_proposals])
        except RcnnError:
            rois.append(np.zeros((0, 4), np.float32))
            continue
        rois.append(detector.last_rois if detector.last_rois is not None else item.proposals[:max_proposals])
    return split_ap(found, rois, items, detector.classes, with_proposal_recall)


def split_ap(found: dict[str, Detections], rois: Sequence[np.ndarray], items: Sequence[ImageBoxes],
             classes: Sequence[str], with_proposal_recall: bool = False) -> dict:
    """``map`` and ``map07`` of the detections ``found`` (by image id) against the items' ground truth, and with
    ``with_proposal_recall`` the per-class recall of the scored regions ``rois`` (one array per item)."""
    result = evaluate_detections(found, [item.annotation() for item in items], classes)
    out: dict = {"map": _finite(result.map), "map07": _finite(result.map07)}
    if with_proposal_recall:
        out["proposal_recall"] = items_proposal_recall(items, rois, classes)
    return out


def items_proposal_recall(items: Sequence[ImageBoxes], rois: Sequence[np.ndarray], classes: Sequence[str]) -> dict:
    """Per-class recall of ``rois`` (one array per item) over the items' non-difficult ground truth."""
    keep = [~item.gt_difficult for item in items]
    return proposal_recall(rois, [item.gt_boxes[k] for item, k in zip(items, keep)],
                           [item.gt_labels[k] for item, k in zip(items, keep)], classes)


def scored_regions_recall(detector: Detector, paths: Sequence[Path], items: Sequence[ImageBoxes],
                          max_proposals: int | None = None) -> dict:
    """Per-class recall of the regions ``detector`` scores on these images: the stored proposals' first
    ``max_proposals`` for a detector that takes proposals (no model run), else its own (run once per image)."""
    if detector.takes_proposals:
        return items_proposal_recall(items, [item.proposals[:max_proposals] for item in items], detector.classes)
    rois = []
    for path, item in zip(paths, items):
        try:
            detector.detect(voc.read_image(path), None)
            rois.append(detector.last_rois)
        except RcnnError:
            rois.append(np.zeros((0, 4), np.float32))
    return items_proposal_recall(items, rois, detector.classes)


def warn_if_unscorable(items: Sequence[ImageBoxes], split: str) -> None:
    """A validation split without a non-difficult object gives AP 0 every epoch: say that the best epoch is
    then chosen by the validation loss alone, instead of letting it look like a selection by AP."""
    if not any((~item.gt_difficult).any() for item in items):
        warnings.warn(f"the validation split {split!r} holds no object that AP can score (none, or all "
                      f"difficult): the best epoch is chosen by the validation loss alone", RuntimeWarning,
                      stacklevel=2)


def _finite(value: float) -> float:
    return value if value == value else 0.0
