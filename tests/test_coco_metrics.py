"""COCO-style metrics (pycocotools) on constructed cases whose answer is known, and in metrics/eval.json."""

from __future__ import annotations

import numpy as np
import pytest

from rcnn.data.voc import Annotation
from rcnn.evaluation.coco_metrics import COCO_KEYS, coco_metrics
from rcnn.evaluation.voc_eval import Detections

CLASSES = ["cat", "dog"]


def _annotation(image_id: str, boxes: list[list[float]], labels: list[int], difficult: list[bool] | None = None,
                ) -> Annotation:
    n = len(boxes)
    return Annotation(image_id, 400, 300, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64),
                      np.array(difficult or [False] * n, bool), np.zeros(n, bool))


def _detections(boxes: list[list[float]], labels: list[int], scores: list[float] | None = None) -> Detections:
    return Detections(np.array(boxes, np.float32).reshape(-1, 4),
                      np.array(scores or [0.9] * len(boxes), np.float32), np.array(labels, np.int64))


# a small (20x20), a medium (60x60) and a large (120x120) object; inclusive corners
TRUTH = [_annotation("a", [[10, 10, 29, 29], [100, 50, 159, 109]], [1, 2]),
         _annotation("b", [[200, 100, 319, 219]], [1])]


def test_perfect_detections_score_one_everywhere():
    found = {t.image_id: _detections(t.boxes.tolist(), t.labels.tolist()) for t in TRUTH}
    result = coco_metrics(found, TRUTH, CLASSES)
    assert set(result) == set(COCO_KEYS)
    assert all(value == pytest.approx(1.0) for value in result.values()), result


def _shifted(box: np.ndarray, iou: float) -> list[float]:
    """``box`` moved right so that its (VOC +1) IoU with the original is ``iou``."""
    width = box[2] - box[0] + 1
    shift = width * (1 - iou) / (1 + iou)  # overlap (w - s) h / ((w + s) h) = iou
    return [box[0] + shift, box[1], box[2] + shift, box[3]]


def test_boxes_at_iou_0_62_count_at_0_5_but_not_at_0_75():
    found = {t.image_id: _detections([_shifted(b, 0.62) for b in t.boxes], t.labels.tolist()) for t in TRUTH}
    result = coco_metrics(found, TRUTH, CLASSES)
    assert result["ap50"] == pytest.approx(1.0) and result["ap75"] == pytest.approx(0.0)
    # IoU thresholds 0.50, 0.55 and 0.60 of the ten hit: AP 0.50:0.95 is 3/10
    assert result["ap"] == pytest.approx(0.3, abs=1e-6) and result["ar100"] == pytest.approx(0.3, abs=1e-6)


def test_difficult_objects_are_neither_hits_nor_misses():
    truth = [_annotation("a", [[10, 10, 109, 109], [200, 100, 299, 199]], [1, 1], [False, True])]
    only_easy = coco_metrics({"a": _detections([[10, 10, 109, 109]], [1])}, truth, CLASSES)
    both = coco_metrics({"a": _detections([[10, 10, 109, 109], [200, 100, 299, 199]], [1, 1], [0.9, 0.95])},
                        truth, CLASSES)
    assert only_easy["ap"] == pytest.approx(1.0) and both["ap"] == pytest.approx(1.0)


def test_no_detections_score_zero_and_sizes_without_objects_are_null():
    truth = [_annotation("a", [[10, 10, 109, 109]], [1])]  # one large object
    result = coco_metrics({}, truth, CLASSES)
    assert result["ap"] == 0.0 and result["ap_large"] == 0.0 and result["ar100"] == 0.0
    assert result["ap_small"] is None and result["ap_medium"] is None
    with_one = coco_metrics({"a": _detections([[10, 10, 109, 109]], [1])}, truth, CLASSES)
    assert with_one["ap_small"] is None and with_one["ap_large"] == pytest.approx(1.0)


def test_nothing_scorable_is_null_not_zero():
    truth = [_annotation("a", [[10, 10, 109, 109]], [1], [True]), _annotation("b", [], [])]
    assert coco_metrics({"a": _detections([[10, 10, 109, 109]], [1])}, truth, CLASSES) == dict.fromkeys(COCO_KEYS)
