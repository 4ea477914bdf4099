import numpy as np
import torch

from rcnn.families.rcnn.bbox_regression import fit_box_regressor, refine_boxes
from rcnn.utils.boxes import box_iou, decode_boxes, encode_boxes


def test_targets_round_trip():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (50, 2))
    props = np.hstack([xy, xy + rng.uniform(5, 100, (50, 2))]).astype(np.float32)
    gts = props + rng.uniform(-10, 10, (50, 4)).astype(np.float32)
    gts[:, 2:] = np.maximum(gts[:, 2:], gts[:, :2] + 2)
    np.testing.assert_allclose(decode_boxes(props, encode_boxes(props, gts)), gts, atol=1e-3)
    np.testing.assert_allclose(decode_boxes(props, np.zeros((50, 4))), props, atol=1e-3)


def _shifted_problem(rng, n):
    """Ground truth boxes and proposals shifted right by a fraction of their width encoded in the features."""
    gts = np.hstack([rng.uniform(0, 100, (n, 2)), np.zeros((n, 2))]).astype(np.float32)
    size = rng.uniform(30, 80, (n, 2)).astype(np.float32)
    gts[:, 2:] = gts[:, :2] + size - 1
    shift = rng.uniform(-0.2, 0.2, n).astype(np.float32)
    props = gts.copy()
    props[:, [0, 2]] += (shift * size[:, 0])[:, None]
    features = np.hstack([shift[:, None], rng.normal(0, 1, (n, 7))]).astype(np.float32)
    return features, props, gts


def test_regressor_moves_boxes_towards_ground_truth():
    rng = np.random.default_rng(1)
    features, props, gts = _shifted_problem(rng, 400)
    labels = np.ones(len(props), dtype=np.int64)
    ious = np.diag(box_iou(props, gts))
    reg = fit_box_regressor(features, labels, props, gts, ious, num_classes=2, min_iou=0.0, ridge_lambda=1e-3)
    assert bool(reg["fitted"][1]) and not bool(reg["fitted"][0])
    test_features, test_props, test_gts = _shifted_problem(rng, 100)
    refined = refine_boxes(reg, torch.from_numpy(test_features), test_props)[:, 1]
    before = np.diag(box_iou(test_props, test_gts)).mean()
    after = np.diag(box_iou(refined, test_gts)).mean()
    assert after > before + 0.05, (before, after)
    # The background "class" is never fitted: its boxes are the proposals unchanged.
    np.testing.assert_allclose(refine_boxes(reg, torch.from_numpy(test_features), test_props)[:, 0], test_props,
                               atol=1e-3)


def test_low_iou_proposals_and_rare_classes_are_not_fitted():
    rng = np.random.default_rng(2)
    features, props, gts = _shifted_problem(rng, 50)
    labels = np.ones(50, dtype=np.int64)
    reg = fit_box_regressor(features, labels, props, gts, np.full(50, 0.4), num_classes=2, min_iou=0.6)
    assert not bool(reg["fitted"].any())
    assert torch.count_nonzero(reg["weight"]) == 0
