"""Images and boxes as torchvision's detection models take them: RGB float tensors, continuous corners
(the pipeline's inclusive corners plus :data:`rcnn.utils.boxes.INCLUSIVE_SHIFT`), mirrored boxes for a
flipped image, padding that keeps an extreme aspect ratio resizable, and batches padded to a bounded set of
canvases."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from rcnn.modeling.roi_heads import FEATURE_STRIDE
from rcnn.utils.boxes import FLIPS, INCLUSIVE_SHIFT


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


def flipped(image: torch.Tensor, boxes: Sequence[torch.Tensor],
            flips: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``image`` (C,H,W) and its continuous-corner ``boxes`` mirrored by each of ``flips`` in turn: ``horizontal``
    (left to right), ``vertical`` (top to bottom), ``diagonal`` (about the top-left to bottom-right diagonal: x and
    y swapped; with the other two, every rotation by right angles)."""
    out = list(boxes)
    for name in flips:
        height, width = image.shape[-2:]
        if name == "horizontal":
            image, out = image.flip(-1), [flip_boxes(b, width) for b in out]
        elif name == "vertical":
            image = image.flip(-2)
            out = [torch.stack([b[:, 0], height - b[:, 3], b[:, 2], height - b[:, 1]], dim=1) for b in out]
        elif name == "diagonal":
            image, out = image.transpose(-1, -2).contiguous(), [b[:, [1, 0, 3, 2]] for b in out]
        else:
            raise ValueError(f"unknown flip {name!r}: expected one of {FLIPS}")
    return image, out


class CanvasTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` that can, for one batch (:meth:`shaped`), resize every image to one given
    training size and pad the batch to a canvas from a fixed set: the short side to that size (rounded up to
    ``size_divisible``), the long side to a multiple of ``canvas`` up to ``max_size``'s. For batches of one
    orientation that is at most ``2 x sizes x ceil(max_size / canvas)`` shapes in a whole run, whatever the
    images (a batch mixing orientations, the leftovers of an epoch, pads both sides to ``canvas``). Outside
    :meth:`shaped` it is the torchvision transform unchanged."""

    canvas = 0  # pixels; 0: torchvision's padding to size_divisible on both sides

    @contextlib.contextmanager
    def shaped(self, size: int, canvas: int) -> Iterator[None]:
        """Inside, resize to ``size`` (0: the transform's own choice) and pad to canvases of ``canvas`` pixels."""
        kept = self.min_size, self.canvas
        self.min_size = (size,) if size else self.min_size
        self.canvas = canvas
        try:
            yield
        finally:
            self.min_size, self.canvas = kept

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        if not self.canvas:
            return super().batch_images(images, size_divisible)
        height, width = (max(sides) for sides in zip(*(img.shape[-2:] for img in images)))
        short = -(-max(self.min_size) // size_divisible) * size_divisible
        long_side = -(-max(height, width) // self.canvas) * self.canvas
        if min(height, width) <= short:
            height, width = (long_side, short) if height >= width else (short, long_side)
        else:  # landscape and portrait images together
            height, width = (-(-side // self.canvas) * self.canvas for side in (height, width))
        batched = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for image, slot in zip(images, batched):
            slot[:, :image.shape[-2], :image.shape[-1]].copy_(image)
        return batched
