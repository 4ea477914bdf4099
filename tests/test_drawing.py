"""Drawing detections, the contact-sheet grid and the render stage."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from rcnn.data import voc
from rcnn.evaluation.drawing import class_color, draw_detections, make_grid, run_render_stage, text_color, write_image
from rcnn.evaluation.voc_eval import Detections, save_detections
from rcnn.pipeline.params import Params, RenderParams
from rcnn.utils.errors import RcnnError

CLASSES = ["car", "dog", "person"]


def dets(boxes, scores, labels):
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(labels, np.int64))


def test_palette_is_deterministic_distinct_and_text_contrasts():
    colors = [class_color(i) for i in range(1, 21)]
    assert colors == [class_color(i) for i in range(1, 21)]
    assert len(set(colors)) == 20
    assert text_color((255, 255, 255)) == (0, 0, 0) and text_color((0, 0, 0)) == (255, 255, 255)


def test_draw_respects_threshold_and_keeps_input():
    image = np.full((120, 160, 3), 128, np.uint8)
    d = dets([[10, 20, 60, 80], [90, 30, 150, 100]], [0.9, 0.3], [1, 2])
    out = draw_detections(image, d, CLASSES, score_threshold=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (image == 128).all()  # input untouched
    assert (out[50, 10] != 128).any()  # left edge of the kept box is drawn
    assert (out[60, 150] == 128).all()  # right edge of the low-scoring box is not
    with_gt = draw_detections(image, Detections.empty(), CLASSES, 0.5, np.array([[90, 30, 150, 100]], np.float32),
                              np.array([2]))
    assert (with_gt[30, 90:151] != 128).any(axis=1).sum() < 61  # dashed, not a solid line
    assert (with_gt[30, 90:151] != 128).any()


def test_grid_tiles_share_height_and_wrap_columns():
    images = [np.zeros((100, 200, 3), np.uint8), np.zeros((50, 50, 3), np.uint8), np.zeros((80, 40, 3), np.uint8)]
    grid = make_grid(images, columns=2, tile_height=60, gap=4)
    assert grid.shape == (60 * 2 + 4, 120 + 4 + 60, 3)
    with pytest.raises(ValueError):
        make_grid([], 2)


def test_write_image_rejects_unknown_extension(tmp_path):
    with pytest.raises(RcnnError, match="extension"):
        write_image(tmp_path / "x.notanimage", np.zeros((4, 4, 3), np.uint8))


def test_render_stage_writes_decodable_images_and_grid(tmp_path, synthetic_voc):
    ids = voc.read_split(synthetic_voc, "val")
    detections = {}
    for k, image_id in enumerate(ids):
        a = voc.parse_annotation(voc.annotation_path(synthetic_voc, image_id), CLASSES)
        detections[image_id] = dets(a.boxes, np.linspace(0.9, 0.6, len(a.boxes)), a.labels) if k % 2 else \
            Detections.empty()
    det_dir = tmp_path / "detections"
    save_detections(det_dir / "detections.npz", "val", CLASSES, detections)
    params = dataclasses.replace(Params(), render=RenderParams(num_images=3, grid_columns=2))
    written = run_render_stage(params, synthetic_voc, det_dir, tmp_path / "render")
    names = sorted(p.name for p in (tmp_path / "render").iterdir())
    assert names == sorted([f"{i}-predictions.jpg" for i in ids[:3]] + ["grid.jpg"]) == sorted(p.name for p in written)
    for image_id in ids[:3]:
        out = cv2.imread(str(tmp_path / "render" / f"{image_id}-predictions.jpg"))
        src = voc.read_image(voc.image_path(synthetic_voc, image_id))
        assert out is not None and out.shape == src.shape
    grid = cv2.imread(str(tmp_path / "render" / "grid.jpg"))
    assert grid is not None and grid.shape[0] == 2 * 240 + 4
    with pytest.raises(RcnnError, match="evaluate stage"):
        run_render_stage(params, synthetic_voc, tmp_path / "nothing", tmp_path / "render2")
