"""Sliding windows shaped like the training boxes (proposals.windows): shapes, coverage, the stage, detection."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rcnn import proposals, voc
from rcnn.boxes import box_iou
from rcnn.detection import detect_image
from rcnn.errors import ParamError
from rcnn.params import Params, load_params
from rcnn.proposal_windows import sliding_windows, window_shapes
from rcnn.voc import Annotation

CLASSES = ["car", "dog", "person"]


def annotation(boxes: list[list[float]], width: int = 200, height: int = 100) -> Annotation:
    n = len(boxes)
    return Annotation("x", width, height, np.asarray(boxes, np.float32).reshape(-1, 4), np.ones(n, np.int64),
                      np.zeros(n, bool), np.zeros(n, bool))


def test_shapes_are_fractions_of_the_image_and_recover_distinct_box_shapes():
    # two shapes, each at several places and in images of two sizes: 0.2 x 0.5 and 0.6 x 0.3
    anns = [annotation([[0, 0, 39, 49], [100, 10, 139, 59], [10, 20, 129, 49]]),
            annotation([[5, 5, 84, 104], [0, 0, 239, 59]], width=400, height=200)]
    assert window_shapes(anns, 2) == [[0.2, 0.5], [0.6, 0.3]]
    assert window_shapes(anns, 8) == [[0.2, 0.5], [0.6, 0.3]]  # never more shapes than distinct boxes
    assert window_shapes(anns, 0) == [] and window_shapes([annotation([])], 4) == []


def test_shapes_are_the_same_for_the_same_boxes_in_any_order():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (60, 2))
    wh = rng.uniform(5, 90, (60, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).tolist()
    first = window_shapes([annotation(boxes, 300, 300)], 6)
    assert len(first) == 6 and first == window_shapes([annotation(boxes[::-1], 300, 300)], 6)
    areas = [w * h for w, h in first]
    assert areas == sorted(areas)


@pytest.mark.parametrize("width,height", [(200, 200), (333, 251)])
def test_a_box_of_a_training_shape_anywhere_in_the_image_is_found_by_a_window(width, height):
    shapes = [[0.3, 0.2], [0.5, 0.8]]
    windows = sliding_windows(shapes, width, height, step=0.25)
    assert windows[:, :2].min() >= 0 and windows[:, 2].max() <= width - 1 and windows[:, 3].max() <= height - 1
    rng = np.random.default_rng(1)
    for rel_w, rel_h in shapes:
        w, h = rel_w * width, rel_h * height
        x, y = rng.uniform(0, width - w, 50), rng.uniform(0, height - h, 50)
        boxes = np.stack([x, y, x + w - 1, y + h - 1], axis=1)
        assert box_iou(boxes, windows).max(axis=1).min() >= 0.5


def test_the_stage_adds_the_windows_after_selective_search_and_records_their_shapes(synthetic_voc, tmp_path):
    base = Params(classes=CLASSES)
    plain = dataclasses.replace(base.proposals, max_side=128, max_proposals=300, n_jobs=1)
    runs = {}
    for windows in (0, 4):
        p = dataclasses.replace(base, proposals=dataclasses.replace(plain, windows=windows, window_step=0.25))
        runs[windows] = proposals.run_proposals_stage(p, synthetic_voc, tmp_path / f"p{windows}", tmp_path / f"{windows}.json")
    assert runs[0]["windows"] is None
    shapes = runs[4]["windows"]["shapes"]
    train = voc.load_split(synthetic_voc, "train", CLASSES)
    assert shapes == window_shapes(train, 4) and len(shapes) == 4
    assert json.loads((tmp_path / "4.json").read_text())["windows"] == {"shapes": shapes, "step": 0.25}
    assert runs[4]["recall_iou70"] >= runs[0]["recall_iou70"]
    searched = proposals.load_proposals(proposals.proposal_file(tmp_path / "p0", "val", "fast"))
    added = proposals.load_proposals(proposals.proposal_file(tmp_path / "p4", "val", "fast"))
    for image_id, boxes in searched.items():
        ann = voc.parse_annotation(voc.annotation_path(synthetic_voc, image_id), CLASSES)
        expected = proposals.with_windows(boxes, shapes, 0.25, ann.width, ann.height, plain.min_size, 300)
        assert np.array_equal(added[image_id], expected)
        assert np.array_equal(added[image_id][:len(boxes)], boxes) and len(added[image_id]) <= 300


class RecordingDetector:
    """Stands in for a checkpoint's detector: keeps the proposals it was given."""

    takes_proposals = True

    def __init__(self, windows):
        self.meta = {"proposal_windows": windows}

    def detect(self, image, proposals):
        self.seen = proposals
        return proposals


def test_detection_on_a_new_image_adds_the_windows_the_model_was_trained_with():
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    without, with_windows = RecordingDetector(None), RecordingDetector({"shapes": [[0.5, 0.5]], "step": 0.5})
    detect_image(image, without, max_proposals=50, max_side=None)
    detect_image(image, with_windows, max_proposals=50, max_side=None)
    grid = sliding_windows([[0.5, 0.5]], 160, 120, 0.5)
    assert len(grid) == 9
    assert box_iou(grid, with_windows.seen).max(axis=1).min() == 1.0
    assert np.array_equal(with_windows.seen[:len(without.seen)], without.seen)


@pytest.mark.parametrize("key,value", [("windows", -1), ("windows", 65), ("window_step", 0), ("window_step", 1.5)])
def test_window_params_out_of_range_are_refused_by_name(tmp_path, key, value):
    path = tmp_path / "params.yaml"
    path.write_text(f"proposals:\n  {key}: {value}\n")
    with pytest.raises(ParamError, match=f"proposals.{key}"):
        load_params(path)
