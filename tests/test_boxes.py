"""Box geometry: IoU under the VOC +1 convention, equal to torchvision's to the bit, without importing torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from torchvision.ops import box_iou as torchvision_box_iou

from rcnn.utils.boxes import INCLUSIVE_SHIFT, box_iou


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    corner = rng.uniform(0, 500, (n, 2))
    size = rng.uniform(0, 200, (n, 2))
    return np.concatenate([corner, corner + size], axis=1).astype(np.float32)


def test_iou_is_torchvisions_on_shifted_corners_bit_for_bit():
    rng = np.random.default_rng(0)
    for n, m in [(1, 1), (37, 500), (300, 7)]:
        a, b = _random_boxes(rng, n), _random_boxes(rng, m)
        b[:1] = a[:1]  # an identical pair
        ours = box_iou(a, b)
        theirs = torchvision_box_iou(torch.from_numpy(a + INCLUSIVE_SHIFT), torch.from_numpy(b + INCLUSIVE_SHIFT))
        assert ours.dtype == np.float32 and np.array_equal(ours, theirs.numpy())
        assert ours[0, 0] == 1.0


def test_iou_counts_pixels_inclusively_and_handles_empty_inputs():
    # 10x10 boxes overlapping in a 5x10 strip: 50 / (100 + 100 - 50)
    assert box_iou(np.array([[0, 0, 9, 9]]), np.array([[5, 0, 14, 9]]))[0, 0] == np.float32(50 / 150)
    assert box_iou(np.array([[0, 0, 9, 9]]), np.array([[10, 0, 19, 9]]))[0, 0] == 0.0  # touching, no shared pixel
    assert box_iou(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)


def test_the_geometry_module_does_not_import_torch():
    code = ("import sys, numpy as np; from rcnn.utils.boxes import box_iou; box_iou(np.ones((2, 4)), np.ones((3, 4))); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
