"""The evaluation protocol: the evaluated split is held out, and model selection scores as evaluation does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import shipped_params_text
from rcnn.data import voc
from rcnn.data.splits import check_evaluation_split
from rcnn.evaluation.validation import labelled_split_ap
from rcnn.families.rcnn import train_data, training
from rcnn.modeling.postprocess import postprocess_settings
from rcnn.pipeline.family_registry import load_detector, run_regions_stage, run_train_stage
from rcnn.pipeline.params import Params, from_dict
from rcnn.proposals.region_boxes import BOXES_FILE, load_boxes
from rcnn.proposals.selective_search import run_proposals_stage
from rcnn.utils.errors import RcnnError

CLASSES = ["car", "dog", "person"]
REPO = Path(__file__).resolve().parents[1]


def _params(**evaluate: object) -> Params:
    return from_dict({"classes": CLASSES, "data": {"splits": ["train", "val", "test", "trainval"]},
                      "evaluate": evaluate})


def test_the_default_protocol_scores_the_held_out_test_split(synthetic_voc: Path):
    defaults = from_dict(yaml.safe_load(shipped_params_text()))
    assert defaults.evaluate.split == "test" and "test" in defaults.data.splits
    assert defaults.evaluate.allow_overlap is False
    assert check_evaluation_split(synthetic_voc, _params()) == {"allow_overlap": False,
                                                                 "shared_ids": {"train": 0, "val": 0}}


def test_scoring_the_validation_split_names_both_splits_and_the_shared_ids(synthetic_voc: Path):
    n_val = len(voc.read_split(synthetic_voc, "val"))
    with pytest.raises(RcnnError) as err:
        check_evaluation_split(synthetic_voc, _params(split="val"))
    message = str(err.value)
    assert f"shares {n_val} image ids with the validation split 'val'" in message
    assert "evaluate.split = 'val'" in message and "evaluate.allow_overlap" in message


def test_an_overlapping_split_is_refused_with_counts_for_each_split(synthetic_voc: Path):
    n_train, n_val = len(voc.read_split(synthetic_voc, "train")), len(voc.read_split(synthetic_voc, "val"))
    with pytest.raises(RcnnError) as err:
        check_evaluation_split(synthetic_voc, _params(split="trainval"))
    assert f"{n_train} image ids with the training split 'train'" in str(err.value)
    assert f"{n_val} image ids with the validation split 'val'" in str(err.value)


def test_opting_in_lets_the_overlap_through_and_says_so(synthetic_voc: Path):
    n_val = len(voc.read_split(synthetic_voc, "val"))
    record = check_evaluation_split(synthetic_voc, _params(split="val", allow_overlap=True))
    assert record == {"allow_overlap": True, "shared_ids": {"train": 0, "val": n_val}}


def test_the_stage_stops_before_any_work_with_one_error_line(synthetic_voc: Path, tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "voc").symlink_to(synthetic_voc)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"classes": CLASSES, "data": {"source": str(synthetic_voc)}, "evaluate": {"split": "val"}}))
    done = subprocess.run([sys.executable, str(REPO / "stages" / "proposals.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: evaluate.split = 'val' shares"), done.stderr
    assert not (tmp_path / "data" / "proposals").exists() and not (tmp_path / "metrics").exists()


def _fast_rcnn_params(source: Path, nms_iou: float) -> Params:
    return from_dict({
        "classes": CLASSES, "data": {"source": str(source)},
        "proposals": {"max_proposals": 120, "max_side": 160, "n_jobs": 1},
        "regions": {"fg_iou": 0.5, "bg_iou": 0.5},
        "model": {"arch": "fast_rcnn", "backbone": "resnet18", "weights": "none", "trainable_layers": 1,
                  "image_size": 96, "max_size": 160, "roi_channels": 8, "roi_size": 3, "hidden": 16, "dropout": 0.0},
        "train": {"optimizer": "sgd", "lr": 0.005, "epochs": 2, "patience": 2, "device": "cpu", "rois_per_image": 32},
        "evaluate": {"max_proposals": 60, "nms_iou": nms_iou, "score_threshold": 0.0, "max_detections": 50}})


def test_fast_rcnn_selects_its_epoch_with_the_evaluate_stages_post_processing(synthetic_voc: Path, tmp_path: Path):
    base = _fast_rcnn_params(synthetic_voc, 0.3)
    run_proposals_stage(base, synthetic_voc, tmp_path / "proposals", tmp_path / "proposals.json")
    run_regions_stage(base, synthetic_voc, tmp_path / "proposals", tmp_path / "regions", tmp_path / "regions.json")
    val_items = load_boxes(tmp_path / "regions" / "val" / BOXES_FILE)
    val_paths = [voc.image_path(synthetic_voc, item.image_id) for item in val_items]
    selected = {}
    for nms in (0.1, 0.9):
        params = _fast_rcnn_params(synthetic_voc, nms)
        out = tmp_path / f"nms-{nms}"
        metrics = run_train_stage(params, out / "features", tmp_path / "regions", out / "model.pt",
                                  out / "train.json", out / "live", synthetic_voc)
        detector = load_detector(out / "model.pt", "cpu", **postprocess_settings(params))
        evaluated = labelled_split_ap(detector, val_paths, val_items, params.evaluate.max_proposals)
        assert metrics["val_map"] == pytest.approx(evaluated["map"], abs=1e-4)
        selected[nms] = metrics["val_map"]
    assert selected[0.1] != selected[0.9]  # the setting really reached the selection


def test_rcnn_fine_tuning_selects_with_evaluate_settings_and_box_regression(regions_dir: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    seen = []

    def spy(detector, paths, items, max_proposals=None):  # noqa: ANN001, ANN202
        seen.append((detector.score_threshold, detector.nms_iou, detector.max_detections, max_proposals,
                     detector.meta["bbox_regressor"]))
        return labelled_split_ap(detector, paths, items, max_proposals)

    monkeypatch.setattr(train_data, "labelled_split_ap", spy)
    params = from_dict({"classes": CLASSES,
                        "model": {"backbone": "resnet18", "weights": "none", "hidden": 16, "trainable_layers": 1,
                                  "bbox_regression": True},
                        "train": {"optimizer": "sgd", "lr": 0.01, "epochs": 2, "patience": 2, "device": "cpu",
                                  "bbox_iou": 0.5},
                        "evaluate": {"nms_iou": 0.45, "score_threshold": 0.02, "max_detections": 7,
                                     "max_proposals": 33}})
    metrics = training.run_train_stage(params, tmp_path / "features", regions_dir, tmp_path / "model.pt",
                                       tmp_path / "train.json", tmp_path / "live", regions_dir.parent / "VOC2007")
    assert len(seen) == 2  # one validation AP per epoch
    for score, nms, top, proposals, regressor in seen:
        assert (score, nms, top, proposals) == (0.02, 0.45, 7, 33)
        assert regressor is not None and bool(regressor["fitted"].any())
    # The regressor that scored the best epoch is the one the checkpoint ships.
    final = load_detector(tmp_path / "model.pt", "cpu").meta["bbox_regressor"]
    chosen = seen[metrics["best_epoch"] - 1][4]
    torch.testing.assert_close(final["weight"], chosen["weight"], rtol=1e-3, atol=1e-5)
    assert torch.equal(final["fitted"], chosen["fitted"])
