"""Box geometry with one convention everywhere.

Boxes are ``[x1, y1, x2, y2]`` in 0-based *inclusive* pixel coordinates (VOC XML stores the
same corners 1-based), so a box's width is ``x2 - x1 + 1``: the VOC ``+1`` area convention.
IoU is torchvision's formula (``torchvision.ops.box_iou``, same float32 operations) on boxes whose far
corners are shifted by one pixel, which is exactly the ``+1`` rule, in NumPy: the proposals and regions
stages need no torch, whose import (with torchvision) costs a process about 3 s and 700 MB.
"""

from __future__ import annotations

import numpy as np

# Added to inclusive corners, gives the exclusive corners torchvision's IoU and NMS assume.
INCLUSIVE_SHIFT = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)

# The mirrorings of an image and its boxes that ``train.flips`` may name, in the order they are drawn and applied.
FLIPS = ("horizontal", "vertical", "diagonal")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (``len(a) x len(b)``) of inclusive-corner boxes under the VOC ``+1`` convention."""
    a = np.asarray(a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    a, b = a + INCLUSIVE_SHIFT, b + INCLUSIVE_SHIFT
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    corner_low = np.maximum(a[:, None, :2], b[None, :, :2])
    corner_high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    sides = np.clip(corner_high - corner_low, 0, None)
    inter = sides[..., 0] * sides[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def box_area(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)


def xywh_to_xyxy(rects: np.ndarray) -> np.ndarray:
    """OpenCV ``x, y, w, h`` rectangles (w, h in pixels) to inclusive corners."""
    rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
    return np.stack([rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2] - 1,
                     rects[:, 1] + rects[:, 3] - 1], axis=1)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip inclusive-corner boxes to an image of ``width x height`` pixels."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width - 1)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height - 1)
    return boxes


def encode_boxes(proposals: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """R-CNN regression targets ``(tx, ty, tw, th)`` that move each proposal onto its target box."""
    p = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(targets, dtype=np.float64).reshape(-1, 4)
    pw, ph = p[:, 2] - p[:, 0] + 1, p[:, 3] - p[:, 1] + 1
    gw, gh = g[:, 2] - g[:, 0] + 1, g[:, 3] - g[:, 1] + 1
    px, py = p[:, 0] + 0.5 * pw, p[:, 1] + 0.5 * ph
    gx, gy = g[:, 0] + 0.5 * gw, g[:, 1] + 0.5 * gh
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1).astype(np.float32)


def decode_boxes(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_boxes`: apply ``(tx, ty, tw, th)`` offsets to proposals."""
    p = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    d = np.asarray(deltas, dtype=np.float64).reshape(-1, 4)
    pw, ph = p[:, 2] - p[:, 0] + 1, p[:, 3] - p[:, 1] + 1
    px, py = p[:, 0] + 0.5 * pw, p[:, 1] + 0.5 * ph
    # Clamp log-scale offsets so a wild prediction cannot overflow.
    tw, th = np.minimum(d[:, 2], np.log(1000 / 16)), np.minimum(d[:, 3], np.log(1000 / 16))
    cx, cy = px + d[:, 0] * pw, py + d[:, 1] * ph
    w, h = pw * np.exp(tw), ph * np.exp(th)
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - 1, cy + 0.5 * h - 1], axis=1).astype(np.float32)
