"""Post-processing (threshold, class-wise NMS, top-k), the Detector, the CLI and the evaluate stage."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from rcnn.data import voc
from rcnn.detect_cli import main
from rcnn.evaluation.voc_eval import load_detections, read_voc_results
from rcnn.families.rcnn.model import RegionClassifier, save_checkpoint
from rcnn.modeling.postprocess import postprocess_detections
from rcnn.pipeline.evaluate_stage import run_evaluate_stage
from rcnn.pipeline.family_registry import load_detector
from rcnn.pipeline.params import EvaluateParams, Params
from rcnn.proposals.selective_search import proposal_file
from rcnn.utils.errors import RcnnError

CLASSES = ["car", "dog", "person"]


def probs_of(rows):
    """Rows of object-class scores -> (N, C+1) with background taking the rest."""
    rows = np.asarray(rows, np.float32)
    return np.concatenate([1 - rows.sum(1, keepdims=True), rows], axis=1)


def test_nms_keeps_higher_of_overlapping_same_class_and_both_of_different_classes():
    boxes = np.array([[10, 10, 50, 50], [12, 12, 52, 52], [100, 100, 140, 140]], np.float32)
    out = postprocess_detections(boxes, probs_of([[0.6, 0, 0], [0.8, 0, 0], [0, 0.5, 0]]), 0.05, 0.3)
    np.testing.assert_array_equal(out.boxes, boxes[[1, 2]])
    np.testing.assert_allclose(out.scores, [0.8, 0.5])
    np.testing.assert_array_equal(out.labels, [1, 2])
    # The same two boxes as different classes both survive.
    out = postprocess_detections(boxes[:2], probs_of([[0.6, 0, 0], [0, 0.8, 0]]), 0.05, 0.3)
    np.testing.assert_array_equal(out.labels, [2, 1])
    # One proposal can be a detection of several classes.
    out = postprocess_detections(boxes[:1], probs_of([[0.3, 0.3, 0.3]]), 0.05, 0.3)
    assert sorted(out.labels.tolist()) == [1, 2, 3]


def test_nms_uses_the_voc_plus_one_iou():
    # [0,0,9,9] vs [5,0,14,9]: +1 IoU = 50 / 150 = 0.333 > 0.3 (suppressed);
    # without the +1 it would be 36 / 126 = 0.286 (kept).
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9]], np.float32)
    out = postprocess_detections(boxes, probs_of([[0.9, 0, 0], [0.8, 0, 0]]), 0.05, 0.3)
    assert len(out) == 1 and out.scores[0] == pytest.approx(0.9)


def test_score_threshold_and_max_detections():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (200, 2))
    boxes = np.concatenate([xy, xy + 20], axis=1).astype(np.float32)
    scores = rng.uniform(0, 0.33, (200, 3))
    out = postprocess_detections(boxes, probs_of(scores), score_threshold=0.2, nms_iou=0.5, max_detections=1000)
    assert len(out) > 10 and (out.scores >= 0.2).all()
    assert np.all(np.diff(out.scores) <= 0)
    top = postprocess_detections(boxes, probs_of(scores), score_threshold=0.2, nms_iou=0.5, max_detections=7)
    assert len(top) == 7
    np.testing.assert_array_equal(top.scores, out.scores[:7])
    empty = postprocess_detections(boxes, probs_of(scores), score_threshold=0.5)
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)


def test_per_class_boxes_are_used():
    proposals = np.array([[10, 10, 50, 50]], np.float32)
    per_class = np.repeat(proposals[:, None, :], 4, axis=1)
    per_class[0, 2] = [20, 20, 60, 60]
    out = postprocess_detections(per_class, probs_of([[0.2, 0.7, 0.0]]), 0.05, 0.3)
    np.testing.assert_array_equal(out.labels, [2, 1])
    np.testing.assert_array_equal(out.boxes, [[20, 20, 60, 60], [10, 10, 50, 50]])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = RegionClassifier("resnet18", len(CLASSES), weights="none", hidden=16)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, model, {"classes": CLASSES, "crop_size": 32, "context": 2, "params": {}})
    return path


def _proposals(ann, rng, n=40):
    """Jittered ground truth plus random boxes, ranked arbitrarily."""
    xy = rng.uniform(0, [ann.width - 20, ann.height - 20], (n, 2))
    rand = np.concatenate([xy, xy + rng.uniform(8, 60, (n, 2))], axis=1)
    boxes = np.concatenate([ann.boxes + rng.normal(0, 2, ann.boxes.shape), rand])
    return np.clip(boxes, 0, [ann.width - 1, ann.height - 1] * 2).astype(np.float32)


def test_detector_outputs_are_well_formed(tiny_checkpoint, synthetic_voc):
    detector = load_detector(tiny_checkpoint, "cpu", score_threshold=0.05, max_detections=20)
    assert detector.classes == CLASSES
    ids = voc.read_split(synthetic_voc, "val")[:3]
    anns = [voc.parse_annotation(voc.annotation_path(synthetic_voc, i), CLASSES) for i in ids]
    rng = np.random.default_rng(0)
    proposals = [_proposals(a, rng) for a in anns]
    image = voc.read_image(voc.image_path(synthetic_voc, ids[0]))
    found = detector.detect(image, proposals[0])
    assert 0 < len(found) <= 20
    h, w = image.shape[:2]
    assert found.boxes.dtype == np.float32 and found.boxes.shape == (len(found), 4)
    assert (found.boxes[:, :2] >= 0).all() and (found.boxes[:, 2] <= w - 1).all() and (found.boxes[:, 3] <= h - 1).all()
    assert np.all(np.diff(found.scores) <= 0) and (found.scores >= 0.05).all()
    assert set(found.labels.tolist()) <= {1, 2, 3}
    assert len(detector.detect(image, np.zeros((0, 4), np.float32))) == 0
    # Batch size does not change the result; many images at once equal one at a time.
    paths = [voc.image_path(synthetic_voc, i) for i in ids]
    many = list(dataclasses.replace(detector, batch_size=7).detect_images(paths, proposals))
    assert len(many) == 3
    np.testing.assert_array_equal(many[0].boxes, found.boxes)
    np.testing.assert_allclose(many[0].scores, found.scores, rtol=1e-5)


def test_cli_prints_detections_and_renders(tiny_checkpoint, synthetic_voc, tmp_path, capsys):
    image = voc.image_path(synthetic_voc, voc.read_split(synthetic_voc, "val")[0])
    out = tmp_path / "out.jpg"
    main([str(image), "--checkpoint", str(tiny_checkpoint), "--score", "0.05", "--max-proposals", "50",
          "--out", str(out), "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines
    for line in lines:
        name, score, *box = line.split()
        assert name in CLASSES and 0.05 <= float(score) <= 1 and len(box) == 4
        assert float(box[0]) >= 1 and float(box[1]) >= 1  # 1-based corners
    assert cv2.imread(str(out)).shape == cv2.imread(str(image)).shape


def test_cli_errors_are_one_line_exit_2(tiny_checkpoint, synthetic_voc, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "nope.jpg"), "--checkpoint", str(tiny_checkpoint)])
    assert err.value.code == 2 and "nope.jpg" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    image = voc.image_path(synthetic_voc, voc.read_split(synthetic_voc, "val")[0])
    with pytest.raises(SystemExit) as err:
        main([str(image), "--checkpoint", str(bad)])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "bad.pt" in message and len(message.strip().splitlines()) == 1


def test_evaluate_stage_writes_detections_metrics_and_curves(tiny_checkpoint, synthetic_voc, tmp_path):
    ids = voc.read_split(synthetic_voc, "test")
    rng = np.random.default_rng(1)
    proposals = {i: _proposals(voc.parse_annotation(voc.annotation_path(synthetic_voc, i), CLASSES), rng)
                 for i in ids[1:]}  # the first image "was skipped" by the proposals stage
    prop_dir = tmp_path / "proposals"
    prop_dir.mkdir()
    np.savez_compressed(proposal_file(prop_dir, "test", "fast"), **proposals)
    params = dataclasses.replace(Params(), evaluate=EvaluateParams(split="test", max_proposals=30, batch_size=16))
    out = {k: tmp_path / v for k, v in (("detections_dir", "det"), ("metrics_path", "metrics/eval.json"),
                                        ("pr_dir", "metrics/pr"))}
    with pytest.warns(RuntimeWarning, match="no proposals"):
        summary = run_evaluate_stage(params, synthetic_voc, prop_dir, tiny_checkpoint, **out)
    metrics = json.loads(out["metrics_path"].read_text())
    assert metrics["images"] == len(ids) and metrics["images_without_proposals"] == 1
    assert 0 <= metrics["map"] <= 1 and 0 <= metrics["map07"] <= 1 and metrics["map"] == summary["map"]
    assert set(metrics["ap"]) <= set(CLASSES) and metrics["detections"] > 0
    assert set(metrics["time"]) == {"proposals_load", "crops", "cnn", "postprocess", "total"}
    for key in ("map07", "map"):
        low, high = metrics[f"{key}_ci95"]
        assert low <= metrics[key] <= high
    assert metrics["allow_overlap"] is False and metrics["shared_ids"] == {"train": 0, "val": 0}
    coco = metrics["coco"]  # pycocotools' figures of the same detections (shown by dvc metrics as coco.ap, ...)
    assert set(coco) == {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar100"}
    assert 0 <= coco["ap75"] <= coco["ap50"] <= 1 and coco["ap"] <= coco["ap50"] and 0 < coco["ar100"] <= 1
    # The headline file dvc.yaml declares as metrics: a few scalars, the same figures as eval.json's.
    scores = json.loads((out["metrics_path"].with_name("scores.json")).read_text())
    assert scores == {"map07": metrics["map07"], "map07_ci_low": metrics["map07_ci95"][0],
                      "map07_ci_high": metrics["map07_ci95"][1], "map": metrics["map"], "coco_ap": coco["ap"],
                      "seconds_per_image": metrics["seconds_per_image"]}
    stored = load_detections(out["detections_dir"] / "detections.npz")
    assert stored.classes == CLASSES and stored.split == "test" and sorted(stored.detections) == ids
    assert len(stored.detections[ids[0]]) == 0
    assert all(len(d) <= 100 for d in stored.detections.values())
    back = read_voc_results(out["detections_dir"], "test", CLASSES)
    assert sum(len(d) for d in back.values()) == metrics["detections"]
    for name in metrics["ap"]:
        rows = json.loads((out["pr_dir"] / f"{name}.json").read_text())
        assert rows and {"recall", "precision"} == set(rows[0])
    # A split that was never downloaded: a clear error naming data.splits.
    only_val = tmp_path / "voc"
    (only_val / "ImageSets" / "Main").mkdir(parents=True)
    for sub in ("JPEGImages", "Annotations"):
        (only_val / sub).symlink_to(synthetic_voc / sub)
    (only_val / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids) + "\n")
    params = dataclasses.replace(params, evaluate=EvaluateParams(split="test"))
    with pytest.raises(RcnnError, match="data.splits"):
        run_evaluate_stage(params, only_val, prop_dir, tiny_checkpoint, **out)


def test_box_regressor_in_checkpoint_moves_boxes(tmp_path, synthetic_voc):
    torch.manual_seed(0)
    model = RegionClassifier("resnet18", len(CLASSES), weights="none", hidden=16)
    c, d = len(CLASSES) + 1, model.feature_dim
    bias = torch.zeros(c, 4)
    bias[1:, 0] = 0.1  # every class shifts its box right by 10 % of the width
    regressor = {"weight": torch.zeros(c, d, 4), "bias": bias, "fitted": torch.ones(c, dtype=torch.bool)}
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, {"classes": CLASSES, "crop_size": 32, "context": 0, "params": {},
                                  "bbox_regressor": regressor})
    detector = load_detector(path, "cpu", score_threshold=0.0, max_detections=5)
    image = voc.read_image(voc.image_path(synthetic_voc, voc.read_split(synthetic_voc, "val")[0]))
    proposal = np.array([[20, 20, 69, 59]], np.float32)
    found = detector.detect(image, proposal)
    np.testing.assert_allclose(found.boxes, np.repeat([[25, 20, 74, 59]], len(found), axis=0), atol=1e-4)
    # Turned off (no regressor in the checkpoint): the plain detector, same scores, proposal boxes.
    plain_path = tmp_path / "plain.pt"
    save_checkpoint(plain_path, model, {"classes": CLASSES, "crop_size": 32, "context": 0, "params": {},
                                        "bbox_regressor": None})
    plain = load_detector(plain_path, "cpu", score_threshold=0.0, max_detections=5).detect(image, proposal)
    np.testing.assert_allclose(plain.boxes, np.repeat(proposal, len(plain), axis=0))
    np.testing.assert_allclose(plain.scores, found.scores, rtol=1e-6)


def test_trained_pipeline_beats_random_scores(synthetic_voc, tmp_path):
    """proposals -> regions -> features -> train -> evaluate on the synthetic set, small settings."""
    from rcnn.proposals import selective_search
    from rcnn.families.rcnn import regions
    from rcnn.families.rcnn import features, training
    from rcnn.evaluation.voc_eval import evaluate_detections
    from rcnn.pipeline.params import ModelParams, TrainParams

    p = Params(classes=CLASSES)
    p = dataclasses.replace(
        p, proposals=dataclasses.replace(p.proposals, max_side=128, max_proposals=200, n_jobs=1),
        regions=dataclasses.replace(p.regions, crop_size=64, max_boxes=24, shard_size=100, fg_iou=0.5, bg_iou=0.3,
                                    add_ground_truth=True),
        model=ModelParams(backbone="resnet18", weights="none", hidden=64),
        train=TrainParams(lr=1e-3, batch_size=32, epochs=12, patience=3, device="cpu"),
        evaluate=EvaluateParams(split="test", max_proposals=100))
    selective_search.run_proposals_stage(p, synthetic_voc, tmp_path / "proposals", tmp_path / "proposals.json")
    regions.run_regions_stage(p, synthetic_voc, tmp_path / "proposals", tmp_path / "regions",
                              tmp_path / "regions.json", n_jobs=1)
    features.run_features_stage(p, tmp_path / "regions", tmp_path / "features")
    training.run_train_stage(p, tmp_path / "features", tmp_path / "regions", tmp_path / "model.pt",
                             tmp_path / "train.json", tmp_path / "dvclive")
    summary = run_evaluate_stage(p, synthetic_voc, tmp_path / "proposals", tmp_path / "model.pt",
                                 tmp_path / "det", tmp_path / "eval.json", tmp_path / "pr")
    # Baseline: the same proposals scored at random.
    ids = voc.read_split(synthetic_voc, "test")
    anns = voc.load_split(synthetic_voc, "test", CLASSES)
    props = np.load(proposal_file(tmp_path / "proposals", "test", "fast"), allow_pickle=False)
    rng = np.random.default_rng(0)
    random = {i: postprocess_detections(props[i][:100], rng.dirichlet(np.ones(len(CLASSES) + 1), len(props[i][:100])))
              for i in ids}
    random_map = evaluate_detections(random, anns, CLASSES).map
    print(f"trained mAP {summary['map']:.3f} (11-point {summary['map07']:.3f}), random scores {random_map:.3f}")
    assert summary["map"] > max(0.3, random_map + 0.3)
