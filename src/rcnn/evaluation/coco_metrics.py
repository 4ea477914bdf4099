"""COCO-style detection metrics by pycocotools (the reference implementation), from the detections the VOC
figures are computed from.

AP averaged over IoU 0.50:0.95 shows localisation quality that VOC's AP at 0.5 hides. Boxes are the
project's inclusive pixel corners, passed to COCO as ``[x, y, w + 1, h + 1]`` for ground truth and
detections alike, so IoUs are the VOC ``+1`` ones. VOC ``difficult`` objects become COCO ``iscrowd``
regions: a detection on one is neither a hit nor a false positive, and it is never a positive.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Mapping, Sequence

import numpy as np

from rcnn.data.voc import Annotation
from rcnn.evaluation.voc_eval import Detections

# The keys written under ``coco`` in metrics/eval.json, and their index in COCOeval.stats.
COCO_KEYS = {"ap": 0, "ap50": 1, "ap75": 2, "ap_small": 3, "ap_medium": 4, "ap_large": 5, "ar100": 8}


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2] + 1.0])


def coco_metrics(detections: Mapping[str, Detections], annotations: Sequence[Annotation],
                 classes: Sequence[str]) -> dict[str, float | None]:
    """``{ap, ap50, ap75, ap_small, ap_medium, ap_large, ar100}`` over ``annotations``' images; a figure
    without any object to score (e.g. no large objects) is None, as pycocotools' -1 means."""
    from pycocotools.coco import COCO  # imported here: only the evaluate stage needs it
    from pycocotools.cocoeval import COCOeval

    images, objects, found = [], [], []
    for number, ann in enumerate(annotations, start=1):
        images.append({"id": number, "width": int(ann.width), "height": int(ann.height)})
        for box, label, difficult in zip(_xywh(ann.boxes), ann.labels, ann.difficult):
            objects.append({"id": len(objects) + 1, "image_id": number, "category_id": int(label),
                            "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": int(difficult)})
        dets = detections.get(ann.image_id, Detections.empty())
        for box, score, label in zip(_xywh(dets.boxes), dets.scores, dets.labels):
            found.append({"image_id": number, "category_id": int(label), "bbox": box.tolist(), "score": float(score)})
    if not any(not o["iscrowd"] for o in objects):
        return dict.fromkeys(COCO_KEYS)
    if not found:
        return {key: 0.0 for key in COCO_KEYS} | _missing_sizes(objects)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = {"images": images, "annotations": objects,
                         "categories": [{"id": i, "name": name} for i, name in enumerate(classes, start=1)]}
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(found), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {key: (float(evaluation.stats[i]) if evaluation.stats[i] >= 0 else None) for key, i in COCO_KEYS.items()}


def _missing_sizes(objects: list[dict]) -> dict[str, None]:
    """The size figures (COCO's area ranges) that have no object to score: None rather than 0."""
    ranges = {"ap_small": (0, 32 ** 2), "ap_medium": (32 ** 2, 96 ** 2), "ap_large": (96 ** 2, math.inf)}
    areas = [o["area"] for o in objects if not o["iscrowd"]]  # pycocotools' ranges include both ends
    return {key: None for key, (low, high) in ranges.items() if not any(low <= a <= high for a in areas)}
