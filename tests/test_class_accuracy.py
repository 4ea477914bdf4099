"""Per-class foreground accuracy and the collapse check: a model that calls everything background is
never saved; one that learned some classes is, with the classes it learned nothing of named in a warning
and in metrics/train.json, and each class's accuracy beside them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn.engine.device import precision_name
from rcnn.evaluation.class_accuracy import ClassTally, check_trained, check_training_objects, objects_per_class
from rcnn.families.fast_rcnn import model as fast_rcnn_family
from rcnn.families.fast_rcnn.model import build_fast_rcnn
from rcnn.families.rcnn.features import run_features_stage
from rcnn.pipeline.family_registry import run_regions_stage, run_train_stage
from rcnn.pipeline.params import from_dict
from rcnn.proposals.selective_search import run_proposals_stage
from rcnn.synthetic import generate
from rcnn.utils.errors import RcnnError

CLASSES = ["car", "dog", "person"]


def _tally(predicted: list[int], labels: list[int]) -> ClassTally:
    tally = ClassTally(len(CLASSES) + 1)
    tally.add(torch.tensor(predicted), torch.tensor(labels))
    return tally


def test_per_class_accuracy_counts_each_class_and_skips_absent_ones():
    tally = _tally([1, 0, 2, 2, 0, 0], [1, 1, 2, 2, 0, 0])
    assert tally.per_class(CLASSES) == {"car": 0.5, "dog": 1.0}  # no person region: left out
    assert tally.fg_accuracy() == pytest.approx(0.75)
    assert list(objects_per_class([np.array([1, 2]), np.array([2, 3, 3])], 4)) == [0, 1, 2, 2]


def test_collapse_check_stops_only_a_model_that_learned_no_class_and_names_what_to_change():
    objects = np.array([0, 30, 30, 30])
    with pytest.raises(RcnnError, match=r"training collapsed: .* none of the 4 foreground regions .* lower train\.lr"):
        check_trained(_tally([0, 0, 0, 0, 0], [1, 2, 3, 3, 0]), CLASSES, objects, "lower train.lr")
    assert check_trained(_tally([1, 2, 3, 0], [1, 2, 3, 0]), CLASSES, objects, "-") == (None, [])  # healthy


def test_a_class_that_learned_nothing_is_a_warning_and_listed_not_a_lost_model():
    with pytest.warns(RuntimeWarning, match=r"learned 2 of 3 classes but no foreground of dog \(30 training "
                                            r"objects\).*the model is saved; to try: more photos of it, train longer"):
        collapsed, unlearned = check_trained(_tally([1, 0, 3, 0], [1, 2, 3, 0]), CLASSES, np.array([0, 30, 30, 30]),
                                             "train longer")
    assert collapsed is None
    assert unlearned == [{"class": "dog", "train_objects": 30, "train_fg_accuracy": 0.0}]


def test_allow_collapse_keeps_a_model_that_learned_nothing_with_a_warning():
    with pytest.warns(RuntimeWarning, match="kept because train.allow_collapse is true"):
        collapsed, unlearned = check_trained(_tally([0, 0, 0, 0], [1, 2, 3, 0]), CLASSES, np.array([0, 5, 5, 5]),
                                             "-", allow=True)
    assert collapsed.startswith("training collapsed") and [c["class"] for c in unlearned] == CLASSES


def test_a_training_split_without_objects_is_an_error_and_a_missing_class_a_warning():
    with pytest.raises(RcnnError, match=r"training split 'train' holds no objects of the classes .*data\.train_split"):
        check_training_objects(np.array([0, 0, 0, 0]), CLASSES, "train")
    with pytest.warns(RuntimeWarning, match=r"holds no objects of dog, person: the model cannot learn them"):
        check_training_objects(np.array([0, 5, 0, 0]), CLASSES, "train")


@pytest.fixture(scope="module")
def multiclass_boxes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Labelled proposals of a 40-image synthetic set with three classes, made by the real stages."""
    root = tmp_path_factory.mktemp("multiclass")
    voc_dir = generate(root / "VOC2007", images=40, seed=3)
    raw = {"classes": CLASSES, "data": {"source": str(voc_dir)},
           "proposals": {"max_proposals": 150, "max_side": 160, "n_jobs": 1},
           "regions": {"fg_iou": 0.5, "bg_iou": 0.5},
           "model": {"arch": "fast_rcnn", "backbone": "resnet18", "weights": "none", "trainable_layers": 2,
                     "image_size": 128, "max_size": 160, "roi_channels": 16, "roi_size": 5, "hidden": 64,
                     "dropout": 0.0},
           "train": {"optimizer": "sgd", "lr": 0.02, "schedule": "cosine", "warmup_epochs": 1, "epochs": 4,
                     "patience": 4, "device": "cpu", "rois_per_image": 64,
                     "rare_class_objects": 11, "min_steps_rare": 300},  # dog's 10 boxes make it rare
           "evaluate": {"split": "test", "max_proposals": 150}}
    params = from_dict(raw)
    run_proposals_stage(params, voc_dir, root / "proposals", root / "proposals.json")
    run_regions_stage(params, voc_dir, root / "proposals", root / "regions", root / "regions.json")
    run_features_stage(params, root / "regions", root / "features")
    return voc_dir, root, raw


def _train(raw: dict, voc_dir: Path, root: Path, out: Path) -> dict:
    return run_train_stage(from_dict(raw), root / "features", root / "regions", out / "model.pt",
                           out / "train.json", out / "live", voc_dir)


def test_multiclass_fast_rcnn_saves_a_model_with_an_unlearned_class_and_says_which(multiclass_boxes,
                                                                                      tmp_path: Path):
    voc_dir, root, raw = multiclass_boxes
    with pytest.warns(RuntimeWarning, match=r"learned 2 of 3 classes but no foreground of dog \(10 training"):
        metrics = _train(raw, voc_dir, root, tmp_path)
    stored = json.loads((tmp_path / "train.json").read_text())
    assert stored["unlearned_classes"] == [{"class": "dog", "train_objects": 10, "train_fg_accuracy": 0.0}]
    assert stored["collapsed"] is None
    # Where each class stands at proposals: per-class recall of the regions scored, training and validation.
    for key in ("train_proposal_recall", "val_proposal_recall"):
        assert set(stored[key]["per_class"]) == set(CLASSES), stored[key]
        assert all(0 <= c["recall_iou50"] <= 1 for c in stored[key]["per_class"].values() if c["gt_boxes"])
    # 20 training images make 10 steps an epoch; a class under 11 boxes raises the floor to 300: 300 / 4 epochs
    assert metrics["steps_per_epoch"] == 75 and (stored["min_steps"], stored["rarest_class_objects"]) == (300, 10)
    assert stored["backbone_lr"] == 1.0  # train.backbone_lr as given: train.backbone_lr_objects is 0
    assert set(stored["train_fg_accuracy"]) == set(CLASSES), stored
    # car and person learn; dog, the synthetic "blob" that the background's grey blobs imitate, stays at 0 on
    # random-weight features however long this tiny model trains: the model is kept, dog named. person learns
    # slowly here, by how much depends on the CPU's precision (0.04 in float32 on an AMD EPYC, over 0.1 in bfloat16).
    assert stored["train_fg_accuracy"]["car"] > 0.2 and stored["train_fg_accuracy"]["person"] > 0, stored
    assert set(stored["val_fg_accuracy"]) <= set(CLASSES) and 0 < stored["val_fg_accuracy_overall"] <= 1
    meta = torch.load(tmp_path / "model.pt", weights_only=True)["meta"]
    assert meta["unlearned_classes"] == ["dog"]
    assert meta["precision"] == precision_name(torch.device("cpu"))  # what its validation AP was scored in


def test_fast_rcnn_forced_to_background_is_one_error_and_no_model(multiclass_boxes, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    voc_dir, root, raw = multiclass_boxes

    def background_only(*args, **kwargs):
        model = build_fast_rcnn(*args, **kwargs)
        predictor = model.roi_heads.box_predictor.cls_score
        with torch.no_grad():
            predictor.weight.zero_()
            predictor.bias.copy_(torch.tensor([100.0, 0.0, 0.0, 0.0]))
        return model

    monkeypatch.setattr(fast_rcnn_family, "build_fast_rcnn", background_only)
    tiny = json.loads(json.dumps(raw))
    tiny["train"].update(lr=1e-9, epochs=2, patience=2, rare_class_objects=0, min_steps_rare=0)
    with pytest.raises(RcnnError, match=r"^training collapsed: .*train\.min_steps"):
        _train(tiny, voc_dir, root, tmp_path)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "train.json").exists()
    # Opting in keeps it, with a warning and the finding in metrics/train.json.
    tiny["train"]["allow_collapse"] = True
    with pytest.warns(RuntimeWarning, match="kept because train.allow_collapse is true"):
        _train(tiny, voc_dir, root, tmp_path)
    stored = json.loads((tmp_path / "train.json").read_text())
    assert stored["collapsed"].startswith("training collapsed") and (tmp_path / "model.pt").is_file()


def test_a_stage_prints_a_warning_as_one_warning_line():
    code = ("import warnings; from rcnn.utils.errors import run_cli; "
            "run_cli(lambda: warnings.warn('the model learned 2 of 3 classes but no foreground of dog', RuntimeWarning))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "warning: the model learned 2 of 3 classes but no foreground of dog\n"


def test_the_advice_leads_with_pretrained_weights_when_the_backbone_started_random():
    from rcnn.evaluation.class_accuracy import with_weights_advice

    assert with_weights_advice("train longer", "imagenet") == "train longer"
    advice = with_weights_advice("train longer", "none")
    assert advice.startswith("give the backbone pretrained weights first (model.weights, now none") and \
        advice.endswith("or train longer")
