"""Labelled proposals per image: every proposal of a split, not a sample of warped crops.

Fast R-CNN pools each proposal from the image's feature map and R-CNN fine-tuning warps crops
on the fly, both drawing a fresh foreground/background sample every epoch; hard-negative mining
scores every background proposal. For them the regions stage stores, per image, *every*
proposal with its label (class, 0 background, -1 ignored: see :func:`rcnn.proposals.labelling.label_candidates`)
and the ground truth, in one ``<dir>/<split>/boxes.npz`` per split (no pickles, loaded with
``allow_pickle=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rcnn.data import voc
from rcnn.utils.boxes import box_iou
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import atomic_path, load_npz

BOXES_FILE = "boxes.npz"


@dataclass(frozen=True)
class ImageBoxes:
    """One image's proposals with labels and its ground truth (inclusive 0-based corners)."""

    image_id: str
    width: int
    height: int
    proposals: np.ndarray  # (N, 4) float32, best first
    labels: np.ndarray  # (N,) int64: class, 0 background, -1 ignored
    gt_boxes: np.ndarray  # (M, 4) float32
    gt_labels: np.ndarray  # (M,) int64
    gt_difficult: np.ndarray  # (M,) bool

    def training_targets(self, difficult_as_foreground: bool,
                         bg_iou_low: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Proposals a detector may learn from and the indices of the objects it must find.

        Ignored proposals are left out. Difficult objects are never targets unless
        ``difficult_as_foreground``; proposals that overlap them are already labelled ignored, so
        they are not taught as background either. With ``bg_iou_low > 0`` background proposals
        overlapping no object by at least that much are left out too (Fast R-CNN's [0.1, 0.5)
        background: near misses are the informative negatives); images without objects keep all.
        """
        keep_gt = np.ones(len(self.gt_labels), bool) if difficult_as_foreground else ~self.gt_difficult
        keep = self.labels >= 0
        if bg_iou_low > 0 and len(self.gt_boxes):
            near = box_iou(self.proposals, self.gt_boxes).max(axis=1) >= bg_iou_low
            keep &= (self.labels > 0) | near
        return self.proposals[keep], np.flatnonzero(keep_gt)


    def annotation(self) -> voc.Annotation:
        """The image's ground truth as the evaluator reads it (truncation is not stored: False)."""
        return voc.Annotation(self.image_id, self.width, self.height, self.gt_boxes, self.gt_labels,
                              self.gt_difficult, np.zeros(len(self.gt_labels), bool))


def image_boxes(annotation: voc.Annotation, proposals: np.ndarray, labels: np.ndarray) -> ImageBoxes:
    """Bundle an image's labelled proposals with its annotation."""
    return ImageBoxes(annotation.image_id, annotation.width, annotation.height,
                      np.asarray(proposals, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                      annotation.boxes.astype(np.float32).reshape(-1, 4), annotation.labels.astype(np.int64),
                      annotation.difficult.astype(bool))


def save_boxes(path: str | Path, items: Sequence[ImageBoxes]) -> None:
    """Write a split's labelled boxes atomically as flat arrays plus per-image offsets."""
    def offsets(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)

    def joined(arrays: list[np.ndarray], shape: tuple, dtype: type) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)

    arrays = {
        "image_ids": np.array([i.image_id for i in items], dtype=str),
        "sizes": np.array([[i.width, i.height] for i in items], np.int64).reshape(-1, 2),
        "proposal_offsets": offsets([i.proposals for i in items]),
        "proposals": joined([i.proposals for i in items], (0, 4), np.float32),
        "labels": joined([i.labels for i in items], (0,), np.int64),
        "gt_offsets": offsets([i.gt_boxes for i in items]),
        "gt_boxes": joined([i.gt_boxes for i in items], (0, 4), np.float32),
        "gt_labels": joined([i.gt_labels for i in items], (0,), np.int64),
        "gt_difficult": joined([i.gt_difficult for i in items], (0,), bool),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_boxes(path: str | Path, num_classes: int | None = None) -> list[ImageBoxes]:
    """The labelled boxes of a split written by :func:`save_boxes`, in image-id order.

    A file that loads but cannot be right (offsets that do not match the arrays, boxes outside their
    image or not finite, labels outside ``0..num_classes``) is one error naming the file, not a
    crash or a wrong message several steps later.
    """
    a = load_npz(path, "labelled-boxes", "regions")
    try:
        problem = _inconsistency(a, num_classes)
        if problem is None:
            p_off, g_off = a["proposal_offsets"], a["gt_offsets"]
            return [ImageBoxes(str(image_id), int(w), int(h), a["proposals"][p_off[k]:p_off[k + 1]].reshape(-1, 4),
                               a["labels"][p_off[k]:p_off[k + 1]], a["gt_boxes"][g_off[k]:g_off[k + 1]].reshape(-1, 4),
                               a["gt_labels"][g_off[k]:g_off[k + 1]], a["gt_difficult"][g_off[k]:g_off[k + 1]])
                    for k, (image_id, (w, h)) in enumerate(zip(a["image_ids"], a["sizes"]))]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        problem = str(err)
    raise RcnnError(f"{path} is not a valid labelled-boxes file ({problem}); rerun the regions stage")


def _offsets_problem(offsets: np.ndarray, images: int, rows: int, name: str) -> str | None:
    if offsets.shape != (images + 1,) or offsets[0] != 0 or offsets[-1] != rows or (np.diff(offsets) < 0).any():
        return f"{name} do not split {rows} rows over {images} images"
    return None


def _boxes_problem(boxes: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, name: str) -> str | None:
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
        return f"{name} are not finite (N, 4) boxes"
    owner = np.repeat(np.arange(len(sizes)), np.diff(offsets))
    w, h = sizes[owner, 0], sizes[owner, 1]
    inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w - 1) & (boxes[:, 3] <= h - 1)
    ordered = (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    return None if (inside & ordered).all() else f"{int((~(inside & ordered)).sum())} {name} lie outside their image"


def _inconsistency(a: dict[str, np.ndarray], num_classes: int | None) -> str | None:
    """What makes the arrays of a labelled-boxes file impossible, or None."""
    images = len(a["image_ids"])
    sizes = a["sizes"]
    if a["image_ids"].ndim != 1 or sizes.shape != (images, 2) or (sizes < 1).any():
        return "image ids and sizes do not match"
    proposals, labels, gt_boxes = a["proposals"], a["labels"], a["gt_boxes"]
    gt_labels, gt_difficult = a["gt_labels"], a["gt_difficult"]
    if labels.shape != (len(proposals),):
        return f"{len(labels)} labels for {len(proposals)} proposals"
    if gt_labels.shape != (len(gt_boxes),) or gt_difficult.shape != (len(gt_boxes),):
        return f"{len(gt_labels)} labels and {len(gt_difficult)} difficult flags for {len(gt_boxes)} objects"
    top = np.inf if num_classes is None else num_classes
    if len(labels) and (labels.min() < -1 or labels.max() > top):
        return f"proposal labels outside -1..{top}"
    if len(gt_labels) and (gt_labels.min() < 1 or gt_labels.max() > top):
        return f"object labels outside 1..{top}"
    return (_offsets_problem(a["proposal_offsets"], images, len(proposals), "proposal offsets")
            or _offsets_problem(a["gt_offsets"], images, len(gt_boxes), "object offsets")
            or _boxes_problem(proposals, a["proposal_offsets"], sizes, "proposals")
            or _boxes_problem(gt_boxes, a["gt_offsets"], sizes, "object boxes"))
