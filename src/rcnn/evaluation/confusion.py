"""A detection confusion matrix: which class each object was detected as, which it was missed, and which
detections hit no object, as the records DVC's ``confusion`` plot template counts.

Per image, detections scoring at least ``score_threshold`` are matched one-to-one to ground-truth objects
at IoU >= 0.5 (VOC ``+1`` IoU), highest IoU first, whatever their classes: a matched pair is a record
``(actual = object's class, predicted = detection's class)``, an unmatched object ``(class, "missed")``,
an unmatched detection ``("background", class)``. A detection on a ``difficult`` object counts nowhere, as
in the VOC metric.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from rcnn.data.voc import Annotation
from rcnn.evaluation.voc_eval import Detections
from rcnn.utils.boxes import box_iou

MISSED, BACKGROUND = "missed", "background"


def _greedy_pairs(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one (object, detection) pairs with IoU >= ``threshold``, highest IoU first (ties: index order)."""
    rows, cols = np.nonzero(iou >= threshold)
    order = np.lexsort((cols, rows, -iou[rows, cols]))
    pairs, used_rows, used_cols = [], set(), set()
    for r, c in zip(rows[order], cols[order]):
        if r not in used_rows and c not in used_cols:
            pairs.append((int(r), int(c)))
            used_rows.add(r)
            used_cols.add(c)
    return pairs


def confusion_records(detections: Mapping[str, Detections], annotations: Sequence[Annotation],
                      classes: Sequence[str], score_threshold: float, iou_threshold: float = 0.5) -> list[dict]:
    """``[{"actual": ..., "predicted": ...}, ...]`` over ``annotations``' images, in image order."""
    records = []
    for ann in annotations:
        found = detections.get(ann.image_id, Detections.empty())
        keep = found.scores >= score_threshold
        boxes, labels = found.boxes[keep], found.labels[keep]
        easy = ~ann.difficult
        pairs = _greedy_pairs(box_iou(ann.boxes[easy], boxes), iou_threshold)
        matched_gt, matched_det = {g for g, _ in pairs}, {d for _, d in pairs}
        gt_labels = ann.labels[easy]
        records += [{"actual": classes[gt_labels[g] - 1], "predicted": classes[labels[d] - 1]} for g, d in pairs]
        records += [{"actual": classes[label - 1], "predicted": MISSED}
                    for g, label in enumerate(gt_labels) if g not in matched_gt]
        unmatched = np.array([d for d in range(len(labels)) if d not in matched_det], np.int64)
        on_difficult = (box_iou(boxes[unmatched], ann.boxes[~easy]) >= iou_threshold).any(axis=1)
        records += [{"actual": BACKGROUND, "predicted": classes[labels[d] - 1]}
                    for d, hidden in zip(unmatched, on_difficult) if not hidden]
    return records
