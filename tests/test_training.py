"""Features stage and train stage on regions of the synthetic dataset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn.engine.device import precision_name
from rcnn.families.rcnn import features, training
from rcnn.families.rcnn import regions
from rcnn.families.rcnn.model import build_model, load_checkpoint, preprocess
from rcnn.pipeline.params import ModelParams, Params, TrainParams
from rcnn.utils.errors import RcnnError

CLASSES = ["car", "dog", "person"]


def tiny_params(**model_changes) -> Params:
    return Params(classes=CLASSES,
                  model=ModelParams(backbone="resnet18", weights="none", hidden=64, **model_changes),
                  train=TrainParams(lr=1e-3, batch_size=32, epochs=20, patience=5, device="cpu",
                                    feature_batch_size=64))


def _all_regions(regions_dir: Path, split: str) -> dict[str, np.ndarray]:
    shards = list(regions.iter_shards(regions_dir, split))
    return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


def test_features_stage_caches_what_the_model_computes_in_region_order(regions_dir, features_dir):
    info = json.loads((features_dir / "info.json").read_text())
    assert info["cached"] and info["backbone"] == "resnet18" and info["dim"] == 512
    assert info["device"] == "cpu" and "seconds" not in info  # timing goes to metrics/features.json
    assert sorted(p.name for p in features_dir.iterdir()) == ["info.json", "train.npz", "val.npz"]
    model = build_model(tiny_params())
    for split in ("train", "val"):
        cached = features.load_features(features_dir, split)
        region = _all_regions(regions_dir, split)
        assert info["splits"][split] == len(region["labels"]) == len(cached["features"])
        for key in features.REGION_KEYS:
            np.testing.assert_array_equal(cached[key], region[key])
        # Same numerics as detection uses (features.crop_features) ...
        np.testing.assert_array_equal(cached["features"][:50],
                                      features.crop_features(model, region["crops"][:50], torch.device("cpu"), 16))
        # ... and the model's own fp32 features up to bf16 rounding where the CPU uses bf16.
        with torch.inference_mode():
            exact = model.eval().features(preprocess(region["crops"][:50], "cpu")).numpy()
        assert np.abs(cached["features"][:50] - exact).max() <= 0.03 * np.abs(exact).max()


def test_fine_tuning_writes_only_info_saying_features_are_not_cached(regions_dir, tmp_path):
    info = features.run_features_stage(tiny_params(trainable_layers=1), regions_dir, tmp_path / "f")
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["info.json"]
    assert info["cached"] is False and "trainable_layers" in info["reason"]
    assert json.loads((tmp_path / "f" / "info.json").read_text()) == info


def test_features_stage_without_regions_is_an_error(tmp_path):
    with pytest.raises(RcnnError, match="index.json not found"):
        features.run_features_stage(tiny_params(), tmp_path / "none", tmp_path / "f")
    assert not (tmp_path / "f").exists()


def _train(regions_dir: Path, features_dir: Path, out: Path, params: Params) -> dict:
    return training.run_train_stage(params, features_dir, regions_dir, out / "model.pt", out / "train.json",
                                    out / "dvclive", regions_dir.parent / "VOC2007")


def test_head_training_learns_the_classes_and_is_reproducible(regions_dir, features_dir, tmp_path):
    params = tiny_params()
    first = _train(regions_dir, features_dir, tmp_path / "a", params)
    second = _train(regions_dir, features_dir, tmp_path / "b", params)
    timing = ("seconds", "seconds_per_epoch")
    assert {k: v for k, v in first.items() if k not in timing} == {k: v for k, v in second.items() if k not in timing}
    assert json.loads((tmp_path / "a" / "train.json").read_text()) == first
    # Three object classes: chance foreground accuracy is 1/3.
    assert first["val_fg_accuracy_overall"] > 2 / 3, first
    assert set(first["val_fg_accuracy"]) == set(first["train_fg_accuracy"]) == set(params.classes), first
    assert min(first["train_fg_accuracy"].values()) > 0, first
    assert first["val_accuracy"] > 0.7 and 1 <= first["best_epoch"] <= first["epochs_run"] <= 20
    for name in ("loss", "accuracy", "fg_accuracy"):
        for split in ("train", "val"):
            rows = (tmp_path / "a" / "dvclive" / "plots" / "metrics" / split / f"{name}.tsv").read_text().splitlines()
            assert rows[0] == f"step\t{name}" and len(rows) == first["epochs_run"] + 1

    model, meta = load_checkpoint(tmp_path / "a" / "model.pt")
    assert meta["classes"] == CLASSES and meta["crop_size"] == 64 and meta["bbox_regressor"] is None
    assert meta["params"]["train"]["lr"] == 1e-3
    assert meta["precision"] == precision_name(torch.device("cpu"))  # loading it elsewhere warns (test_few_photos)
    val = features.load_features(features_dir, "val")
    with torch.inference_mode():
        logits = model.classify_features(torch.from_numpy(val["features"]))
    accuracy = (logits.argmax(1).numpy() == val["labels"]).mean()
    assert accuracy == pytest.approx(first["val_accuracy"])
    # The saved backbone is the one the features were computed with.
    region = _all_regions(regions_dir, "val")
    np.testing.assert_array_equal(features.crop_features(model, region["crops"][:20], torch.device("cpu"), 20),
                                  val["features"][:20])


def test_box_regressor_is_fitted_into_the_checkpoint_when_asked(regions_dir, features_dir, tmp_path):
    # One epoch on random-weight features may not have learned every class yet: keep the model anyway.
    params = dataclasses.replace(tiny_params(bbox_regression=True),
                                 train=dataclasses.replace(tiny_params().train, epochs=1, bbox_lambda=10.0,
                                                           allow_collapse=True))
    _train(regions_dir, features_dir, tmp_path, params)
    _, meta = load_checkpoint(tmp_path / "model.pt")
    assert meta["bbox_regressor"]["weight"].shape == (4, 512, 4)
    assert bool(meta["bbox_regressor"]["fitted"][1:].any())


def test_features_from_another_backbone_are_refused(regions_dir, features_dir, tmp_path):
    params = tiny_params()
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, backbone="resnet34"))
    with pytest.raises(RcnnError, match=r"info\.json has backbone = 'resnet18'.*rerun the features stage"):
        _train(regions_dir, features_dir, tmp_path, params)
    assert not (tmp_path / "model.pt").exists()


def test_end_to_end_fine_tuning_changes_only_the_trainable_units(regions_dir, tmp_path):
    params = tiny_params(trainable_layers=1)  # one epoch: it may not have learned yet, keep it anyway
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=1, allow_collapse=True))
    metrics = _train(regions_dir, tmp_path / "no-features", tmp_path, params)
    assert metrics["epochs_run"] == 1 and 0 <= metrics["val_fg_accuracy_overall"] <= 1
    model, meta = load_checkpoint(tmp_path / "model.pt")
    assert meta["trainable_layers"] == 1
    start = build_model(params).backbone.state_dict()
    trained = model.backbone.state_dict()
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed and all(k.startswith("layer4.") for k in changed)


def test_val_start_trains_the_same_epochs_and_scores_only_the_later_ones(regions_dir, features_dir, tmp_path):
    every = tiny_params()
    late = dataclasses.replace(every, train=dataclasses.replace(every.train, epochs=6, patience=2, val_start=0.5))
    every = dataclasses.replace(every, train=dataclasses.replace(every.train, epochs=6, patience=6))
    scored_all = _train(regions_dir, features_dir, tmp_path / "all", every)
    scored_late = _train(regions_dir, features_dir, tmp_path / "late", late)
    metrics = tmp_path / "{}" / "dvclive" / "plots" / "metrics"
    train_curve = [(Path(str(metrics).format(run)) / "train" / "loss.tsv").read_text() for run in ("all", "late")]
    assert train_curve[0] == train_curve[1]  # scoring validation changes nothing that is trained
    val_steps = (Path(str(metrics).format("late")) / "val" / "loss.tsv").read_text().splitlines()[1:]
    first = 4  # epochs 1-3 (half of 6) trained unscored; dvclive steps count from 0
    assert [int(row.split("\t")[0]) for row in val_steps] == list(range(first - 1, scored_late["epochs_run"]))
    assert scored_late["best_epoch"] >= first
    # Patience counts scored epochs (from epoch 1 it would have stopped at epoch 2, with nothing scored).
    assert scored_late["epochs_run"] == 6
    if scored_all["best_epoch"] >= first:  # the same choice when it was among the scored epochs
        assert scored_late["best_epoch"] == scored_all["best_epoch"]

