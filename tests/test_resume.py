"""Resumable training (issue 23): a train stage stopped after a finished epoch continues from it and ends
with the bytes of an uninterrupted run; other params or data never reuse its state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from rcnn.engine import resume

from rcnn.engine import two_stage_trainer
from rcnn.families.rcnn import train_data, training
from rcnn.pipeline.family_registry import run_regions_stage, run_train_stage
from rcnn.pipeline.params import Params, from_dict
from rcnn.proposals.selective_search import run_proposals_stage

REPO = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "seconds_per_epoch", "steps_per_second", "resumed_from_epoch")


def _fast_rcnn_params(source: Path, **train) -> Params:
    return from_dict({
        "classes": ["car", "dog", "person"], "data": {"source": str(source)},
        "proposals": {"max_proposals": 150, "max_side": 160, "n_jobs": 1}, "regions": {"fg_iou": 0.5, "bg_iou": 0.5},
        "model": {"arch": "fast_rcnn", "backbone": "resnet18", "weights": "none", "trainable_layers": 1,
                  "image_size": 96, "max_size": 160, "roi_channels": 8, "roi_size": 3, "hidden": 32, "dropout": 0.1},
        "train": {"optimizer": "sgd", "lr": 0.02, "schedule": "cosine", "warmup_epochs": 1, "epochs": 2, "patience": 2,
                  "device": "cpu", "rois_per_image": 32, "image_sizes": [80, 96], "allow_collapse": True, **train},
        "evaluate": {"max_proposals": 100}})


@pytest.fixture(scope="module")
def boxes_inputs(synthetic_voc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Proposals and labelled boxes of the synthetic set for the Fast R-CNN params above."""
    root = tmp_path_factory.mktemp("resume-inputs")
    params = _fast_rcnn_params(synthetic_voc)
    run_proposals_stage(params, synthetic_voc, root / "proposals", root / "proposals.json")
    run_regions_stage(params, synthetic_voc, root / "proposals", root / "regions", root / "regions.json")
    return root


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "train.json" not in p.name}


def _metrics(out: Path) -> dict:
    def strip(tree: dict) -> dict:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in tree.items()
                if k not in TIMING and not k.endswith("seconds")}
    return strip(json.loads((out / "train.json").read_text()))


class _Interrupt(Exception):
    """Stands in for a kill: raised inside the epoch after the resume point was saved."""


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, module, name: str, call: int) -> None:
    real, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise _Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def test_a_killed_fast_rcnn_training_resumes_to_the_same_bytes(boxes_inputs, synthetic_voc, tmp_path, monkeypatch):
    params = _fast_rcnn_params(synthetic_voc)

    def train(out: Path, p: Params = params) -> dict:
        return run_train_stage(p, boxes_inputs / "features", boxes_inputs / "regions", out / "model.pt",
                               out / "train.json", out / "dvclive", synthetic_voc, resume_dir=tmp_path / "resume")

    plain = train(tmp_path / "plain")
    assert plain["resumed_from_epoch"] is None and not (tmp_path / "resume").exists()  # cleared after success

    # Interrupted in epoch 2's validation: epoch 1 was saved; nothing of the stage's outputs is written.
    _interrupt_at(monkeypatch, two_stage_trainer, "validate", call=2)
    with pytest.raises(_Interrupt):
        train(tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists() or not any((tmp_path / "resumed").rglob("*.pt"))
    assert len(list((tmp_path / "resume").iterdir())) == 1
    monkeypatch.undo()
    resumed = train(tmp_path / "resumed")
    assert resumed["resumed_from_epoch"] == 1
    assert _outputs(tmp_path / "resumed") == _outputs(tmp_path / "plain")  # model.pt and the dvclive curves
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "plain")

    # Another learning rate: a new key, so the saved epoch of the old one is never used (and is deleted).
    _interrupt_at(monkeypatch, two_stage_trainer, "validate", call=2)
    with pytest.raises(_Interrupt):
        train(tmp_path / "lr")
    monkeypatch.undo()
    (saved_key,) = [p.name for p in (tmp_path / "resume").iterdir()]
    other = _fast_rcnn_params(synthetic_voc, lr=0.01)
    point = resume.open_resume_point(tmp_path / "resume", other, [boxes_inputs / "regions"], synthetic_voc)
    assert point.key != saved_key and point.state is None and not (tmp_path / "resume" / saved_key).exists()
    same = resume.open_resume_point(tmp_path / "resume", params, [boxes_inputs / "regions"], synthetic_voc)
    assert same.state is None  # deleted with the old key: nothing stale comes back


def test_a_killed_fine_tuning_resumes_to_the_same_bytes(regions_dir, tmp_path, monkeypatch):
    from rcnn.pipeline.params import EvaluateParams, ModelParams, TrainParams

    # validation AP on 50 proposals an image, not 300, and no hard negatives: the resume is tested, not the AP
    params = Params(classes=["car", "dog", "person"], evaluate=EvaluateParams(max_proposals=50),
                    model=ModelParams(backbone="resnet18", weights="none", hidden=32, trainable_layers=1,
                                      bbox_regression=True),
                    train=TrainParams(optimizer="sgd", lr=0.01, batch_size=32, epochs=2, patience=2, device="cpu",
                                      schedule="cosine", feature_batch_size=64,
                                      allow_collapse=True))
    root = regions_dir.parent / "VOC2007"

    def train(out: Path) -> dict:
        return training.run_train_stage(params, tmp_path / "no-features", regions_dir, out / "model.pt",
                                        out / "train.json", out / "dvclive", root, resume_dir=tmp_path / "resume")

    train(tmp_path / "plain")
    _interrupt_at(monkeypatch, train_data, "labelled_split_ap", call=2)  # epoch 2's validation AP
    with pytest.raises(_Interrupt):
        train(tmp_path / "resumed")
    monkeypatch.undo()
    resumed = train(tmp_path / "resumed")
    assert resumed["resumed_from_epoch"] == 1
    assert _outputs(tmp_path / "resumed") == _outputs(tmp_path / "plain")
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "plain")


def test_a_damaged_resume_point_starts_over(tmp_path):
    point = resume.ResumePoint(tmp_path, "abc")
    point.folder.mkdir(parents=True)
    (point.folder / resume.STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="is damaged .*; starting at epoch 0"):
        assert resume.ResumePoint(tmp_path, "abc").state is None
    assert not point.folder.exists()  # set aside: the next save starts clean
    point.folder.mkdir(parents=True)
    torch.save({"key": "other"}, point.folder / resume.STATE_FILE)
    with pytest.warns(RuntimeWarning, match="is damaged"):
        assert resume.ResumePoint(tmp_path, "abc").state is None


def test_the_key_covers_the_params_the_train_stage_declares():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    assert tuple(stage["params"]) == resume.TRAIN_PARAMS
    assert "data/train-resume" not in json.dumps(stage.get("outs", []))  # DVC would delete it before a rerun


def test_a_killed_frozen_head_training_resumes_to_the_same_bytes_saving_only_the_head(regions_dir, features_dir,
                                                                                    tmp_path, monkeypatch):
    from rcnn.pipeline.params import EvaluateParams, ModelParams, TrainParams

    # validation AP on 50 proposals an image, not 300, and no hard negatives: the resume is tested, not the AP
    params = Params(classes=["car", "dog", "person"], evaluate=EvaluateParams(max_proposals=50), model=ModelParams(backbone="resnet18", weights="none", hidden=64),
                    train=TrainParams(lr=1e-3, batch_size=32, epochs=4, patience=4, device="cpu",
                                      feature_batch_size=64, allow_collapse=True))

    def train(out: Path) -> dict:
        return training.run_train_stage(params, features_dir, regions_dir, out / "model.pt", out / "train.json",
                                        out / "dvclive", regions_dir.parent / "VOC2007", resume_dir=tmp_path / "resume")

    train(tmp_path / "plain")
    real_save, saved = resume.ResumePoint.save, []

    def save_then_stop(self, state, live):
        real_save(self, state, live)
        saved.append(sum(v.numel() for v in state["model"].values()))
        if len(saved) == 2:
            raise _Interrupt

    monkeypatch.setattr(resume.ResumePoint, "save", save_then_stop)
    with pytest.raises(_Interrupt):
        train(tmp_path / "resumed")
    monkeypatch.undo()
    assert saved[0] < 1_000_000  # the head's weights, not the 11M of the frozen ResNet-18
    assert train(tmp_path / "resumed")["resumed_from_epoch"] == 2
    assert _outputs(tmp_path / "resumed") == _outputs(tmp_path / "plain")
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "plain")


def test_a_killed_float16_training_resumes_its_gradient_scale_and_grouped_batches_to_the_same_bytes(
        boxes_inputs, synthetic_voc, tmp_path, monkeypatch):
    """What a CUDA GPU without bf16 runs (float16 autocast, scaled gradients), on the CPU: the scaler's state
    (its scale backs off on every overflowing step) is part of the resume point, and grouped batches replan alike."""
    params = _fast_rcnn_params(synthetic_voc, batch_shapes="grouped")
    scales = []

    def scaler(device):
        scales.append(torch.amp.GradScaler(device.type, init_scale=2.0 ** 24, growth_interval=3))
        return scales[-1]

    def float16(device):
        return torch.autocast(device.type, dtype=torch.float16)

    def train(out: Path) -> dict:
        monkeypatch.setattr(two_stage_trainer, "training_scaler", scaler)
        monkeypatch.setattr(two_stage_trainer, "inference_autocast", float16)
        return run_train_stage(params, boxes_inputs / "features", boxes_inputs / "regions", out / "model.pt",
                               out / "train.json", out / "dvclive", synthetic_voc, resume_dir=tmp_path / "resume")

    plain = train(tmp_path / "plain")
    assert plain["batch_shapes"] == "grouped" and scales[-1].get_scale() != 2.0 ** 24  # the scale moved
    _interrupt_at(monkeypatch, two_stage_trainer, "validate", call=2)
    with pytest.raises(_Interrupt):
        train(tmp_path / "resumed")
    monkeypatch.undo()
    resumed = train(tmp_path / "resumed")
    assert resumed["resumed_from_epoch"] == 1 and scales[-1].get_scale() == scales[0].get_scale()
    assert _outputs(tmp_path / "resumed") == _outputs(tmp_path / "plain")
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "plain")
