"""Post-processing every detector family shares: scores to detections.

It is vectorised: every (region, object class) pair scoring at least ``score_threshold`` is a
candidate (a low threshold such as 0.05 keeps the recall mAP needs; the tutorial's 0.5 before NMS
threw it away), one ``torchvision.ops.batched_nms`` call runs class-wise NMS, and the
``max_detections`` best survive. The same settings score every validation AP that selects a model
(:func:`postprocess_settings`).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms

from rcnn.evaluation.voc_eval import Detections
from rcnn.pipeline.params import Params
from rcnn.utils.boxes import INCLUSIVE_SHIFT


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


def postprocess_settings(params: Params) -> dict[str, float]:
    """The evaluate stage's post-processing, which every validation AP that selects a model uses too."""
    e = params.evaluate
    return {"score_threshold": e.score_threshold, "nms_iou": e.nms_iou, "max_detections": e.max_detections}
