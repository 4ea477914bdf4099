"""Images and boxes as torchvision's detection models take them: RGB float tensors, continuous corners
(the pipeline's inclusive corners plus :data:`rcnn.utils.boxes.INCLUSIVE_SHIFT`), mirrored boxes for a
flipped image, and padding that keeps an extreme aspect ratio resizable."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from rcnn.modeling.roi_heads import FEATURE_STRIDE
from rcnn.utils.boxes import INCLUSIVE_SHIFT


def pad_to_resizable(image: torch.Tensor, max_size: int) -> torch.Tensor:
    """``image`` (C,H,W) padded at the bottom or right so that, resized to fit ``max_size``, its short
    side keeps at least one feature cell (:data:`FEATURE_STRIDE` px). An image over 25 times longer
    than wide would otherwise shrink to a 0-pixel side; padding there moves no box coordinate."""
    h, w = image.shape[-2:]
    short = -(-FEATURE_STRIDE * max(h, w) // max_size)
    if min(h, w) >= short:
        return image
    pad_w, pad_h = (short - w, 0) if w < h else (0, short - h)
    return nn.functional.pad(image, (0, max(pad_w, 0), 0, max(pad_h, 0)))


def image_tensor(image_bgr: np.ndarray) -> torch.Tensor:
    """BGR uint8 (H,W,3) -> RGB float (3,H,W) in 0..1, what GeneralizedRCNNTransform expects."""
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


def to_continuous(boxes: np.ndarray) -> torch.Tensor:
    """Inclusive-corner boxes -> torchvision's continuous corners (float32 tensor)."""
    return torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4) + INCLUSIVE_SHIFT)


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Continuous-corner boxes mirrored for an image of ``width`` pixels flipped left to right."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
