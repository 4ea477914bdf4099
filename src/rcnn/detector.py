"""The detector interface every family implements, and the post-processing they share.

Post-processing is vectorised: every (region, object class) pair scoring at least
``score_threshold`` is a candidate (a low threshold such as 0.05 keeps the recall mAP needs;
the tutorial's 0.5 before NMS threw it away), one ``torchvision.ops.batched_nms`` call runs
class-wise NMS, and the ``max_detections`` best survive. The same settings score every
validation AP that selects a model (:func:`postprocess_settings`).
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms
from tqdm import tqdm

from rcnn import voc
from rcnn.boxes import INCLUSIVE_SHIFT
from rcnn.errors import RcnnError
from rcnn.evaluation import Detections, evaluate_detections
from rcnn.params import Params
from rcnn.proposals import proposal_recall
from rcnn.region_boxes import ImageBoxes


def postprocess_detections(boxes: np.ndarray, probs: np.ndarray, score_threshold: float = 0.05,
                           nms_iou: float = 0.3, max_detections: int = 100) -> Detections:
    """Per-class thresholding, class-wise NMS and a top-k cut, all vectorised.

    ``boxes``: ``(N, 4)`` proposals shared by every class, or ``(N, C+1, 4)`` per-class boxes
    (column 0, background, unused). ``probs``: ``(N, C+1)`` softmax scores. NMS uses the VOC
    ``+1`` IoU (torchvision's has none, so far corners are shifted by one pixel first).
    Returns detections sorted by descending score (ties: proposal order, then class).
    """
    probs = np.asarray(probs, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = probs[:, 1:]
    idx_box, idx_cls = np.nonzero(scores >= score_threshold)  # row-major: proposal order, then class
    if len(idx_box) == 0:
        return Detections.empty()
    cand_boxes = boxes[idx_box] if boxes.ndim == 2 else boxes[idx_box, idx_cls + 1]
    cand_scores = scores[idx_box, idx_cls]
    keep = batched_nms(torch.from_numpy(cand_boxes + INCLUSIVE_SHIFT), torch.from_numpy(cand_scores),
                       torch.from_numpy(idx_cls), nms_iou).numpy()
    keep = keep[np.lexsort((keep, -cand_scores[keep]))][:max_detections]  # deterministic tie order
    return Detections(cand_boxes[keep], cand_scores[keep], (idx_cls[keep] + 1).astype(np.int64))


@dataclass
class Timings:
    """Seconds spent in each part of detection, summed over images."""

    proposals_load: float = 0.0
    crops: float = 0.0
    cnn: float = 0.0
    postprocess: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in vars(self).items()}


@dataclass
class Detector(abc.ABC):
    """A trained model of any family plus the settings that turn its scores into detections; each family
    subclasses it (:mod:`rcnn.detectors` picks the subclass a checkpoint names)."""

    model: torch.nn.Module
    meta: dict
    device: torch.device
    score_threshold: float = 0.05
    nms_iou: float = 0.3
    max_detections: int = 100
    batch_size: int = 64
    timings: Timings = field(default_factory=Timings)
    takes_proposals: ClassVar[bool] = True  # False for a detector that proposes its own regions (Faster R-CNN)
    last_rois: np.ndarray | None = None  # the regions the last image was scored on (inclusive corners)

    @classmethod
    @abc.abstractmethod
    def from_payload(cls, payload: dict, path: str | Path, device: torch.device, **settings: float) -> "Detector":
        """The detector of a checkpoint payload of this family (see :func:`rcnn.detectors.load_detector`)."""

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @abc.abstractmethod
    def detect(self, image_bgr: np.ndarray, proposals: np.ndarray | None) -> Detections:
        """Detections of one BGR image given its ranked proposals (inclusive corners; None where the
        detector proposes its own regions)."""

    def detect_images(self, paths: Sequence[Path], proposals: Sequence[np.ndarray | None],
                      desc: str = "detect") -> Iterator[Detections]:
        """Detections of many images, one at a time with a progress bar (after each, :attr:`last_rois` holds
        the regions that image was scored on).

        Reading and warping run in the same thread as the CNN: on the 2-core CPU they take
        about 1 % of the time and a prefetch thread only competed with torch's own threads.
        """
        with tqdm(total=len(paths), desc=desc, unit="img") as bar:
            for path, props in zip(paths, proposals):
                found = self.detect(voc.read_image(path), props)
                bar.update()  # before handing it over: a caller that stops at the last image sees n of n
                yield found


def postprocess_settings(params: Params) -> dict[str, float]:
    """The evaluate stage's post-processing, which every validation AP that selects a model uses too."""
    e = params.evaluate
    return {"score_threshold": e.score_threshold, "nms_iou": e.nms_iou, "max_detections": e.max_detections}


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
    result = evaluate_detections(found, [item.annotation() for item in items], detector.classes)
    out: dict = {"map": _finite(result.map), "map07": _finite(result.map07)}
    if with_proposal_recall:
        out["proposal_recall"] = items_proposal_recall(items, rois, detector.classes)
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
