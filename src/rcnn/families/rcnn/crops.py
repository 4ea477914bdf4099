"""Warping proposal boxes to fixed-size CNN inputs, the same way for training and detection."""

from __future__ import annotations

import cv2
import numpy as np

# ImageNet mean colour (RGB, 0..255): padding outside the image normalises to about zero.
PAD_RGB = (124, 116, 104)


def warp_crops(image_rgb: np.ndarray, boxes: np.ndarray, size: int, context: int = 0) -> np.ndarray:
    """Warp each box of an RGB uint8 image to ``size x size`` (R-CNN's anisotropic warp).

    With ``context = p`` the box is first grown so that, after warping, ``p`` pixels of
    surrounding image lie on each side (R-CNN uses 16 at 227). Parts outside the image are
    filled with the ImageNet mean colour. Returns ``(N, size, size, 3)`` uint8.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    inner = size - 2 * context
    if inner <= 0:
        raise ValueError(f"context {context} leaves no room in a {size}-pixel crop")
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        # Map the inclusive box [x1, x2+1) x [y1, y2+1) onto [context, size - context).
        sx = inner / max(x2 - x1 + 1.0, 1.0)
        sy = inner / max(y2 - y1 + 1.0, 1.0)
        matrix = np.array([[sx, 0.0, context - x1 * sx + 0.5 * sx - 0.5],
                           [0.0, sy, context - y1 * sy + 0.5 * sy - 0.5]])
        out[i] = cv2.warpAffine(image_rgb, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=PAD_RGB)
    return out
