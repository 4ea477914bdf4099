"""Sliding windows shaped like the training boxes, added to selective search's proposals.

Selective search groups regions of similar colour and texture, so it misses objects that *are* a
texture over a textured background (neu's crazing and rolled-in scale: 55% and 60% of their
validation boxes found at IoU 0.5). Windows of the few box shapes the training set has — the
shapes clustered by IoU as YOLOv2 derives its anchor priors, relative to the image's size — slid
over every image at a fraction of their size find those (neu validation recall@0.5 0.70 -> 0.95
with 16 shapes). The shapes come from the training split only and travel with the model, so that
``rcnn-detect`` proposes the same windows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rcnn.voc import Annotation

KMEANS_ROUNDS = 50


def _centred_iou(shapes: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """IoU of boxes of ``shapes`` and ``centres`` (``(N, 2)``, ``(K, 2)`` widths and heights) sharing a centre."""
    inter = np.minimum(shapes[:, None, 0], centres[None, :, 0]) * np.minimum(shapes[:, None, 1], centres[None, :, 1])
    union = shapes[:, None, 0] * shapes[:, None, 1] + centres[None, :, 0] * centres[None, :, 1] - inter
    return inter / union


def window_shapes(annotations: Sequence[Annotation], count: int) -> list[list[float]]:
    """Up to ``count`` box shapes (width, height as fractions of the image's) that cover the training boxes
    best: k-means under 1 - IoU, started from the shapes at evenly spaced quantiles of box area (no random
    start, so the same boxes always give the same shapes); sorted by area."""
    shapes = np.concatenate([np.zeros((0, 2))] + [
        np.stack([(a.boxes[:, 2] - a.boxes[:, 0] + 1) / a.width, (a.boxes[:, 3] - a.boxes[:, 1] + 1) / a.height], 1)
        for a in annotations if len(a.boxes)]).clip(1e-6, 1.0)
    unique = np.unique(shapes, axis=0)
    if count <= 0 or not len(unique):
        return []
    by_area = unique[np.argsort(unique[:, 0] * unique[:, 1], kind="stable")]
    centres = by_area[np.linspace(0, len(by_area) - 1, min(count, len(by_area))).round().astype(int)]
    for _ in range(KMEANS_ROUNDS):
        nearest = _centred_iou(shapes, centres).argmax(axis=1)
        moved = np.stack([np.median(shapes[nearest == k], axis=0) if np.any(nearest == k) else centres[k]
                          for k in range(len(centres))])
        if np.array_equal(moved, centres):
            break
        centres = moved
    centres = np.unique(centres.round(4), axis=0)
    return centres[np.argsort(centres[:, 0] * centres[:, 1], kind="stable")].tolist()


def sliding_windows(shapes: Sequence[Sequence[float]], width: int, height: int, step: float) -> np.ndarray:
    """Windows of every shape (fractions of ``width`` x ``height``) on a grid ``step`` of the window's size
    apart, centred in the image: ``(N, 4)`` float32 inclusive corners, smallest shape first."""
    out = [np.zeros((0, 4), np.float32)]
    for rel_w, rel_h in shapes:
        w, h = max(1, round(rel_w * width)), max(1, round(rel_h * height))
        xs = _positions(width, w, step)
        ys = _positions(height, h, step)
        x, y = (a.ravel() for a in np.meshgrid(xs, ys))
        out.append(np.stack([x, y, x + w - 1, y + h - 1], axis=1).astype(np.float32))
    return np.concatenate(out)


def _positions(size: int, window: int, step: float) -> np.ndarray:
    """Left (top) edges of windows ``window`` long every ``step * window`` pixels, the grid centred in ``size``."""
    room = max(size - window, 0)
    stride = max(1.0, step * window)
    count = int(room // stride) + 1
    first = (room - (count - 1) * stride) / 2
    return np.round(first + stride * np.arange(count))


def training_windows(annotations: Sequence[Annotation], count: int, step: float) -> dict | None:
    """What a checkpoint carries so detection adds the windows training saw: ``{"shapes", "step"}``, or
    None with ``proposals.windows: 0``."""
    return {"shapes": window_shapes(annotations, count), "step": step} if count else None
