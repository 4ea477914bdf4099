"""Few photos per class (issue 35): the few-photo set builder is deterministic and takes what it says; the
trainer's class-balanced sampling, backbone rate, class prior and cosine classifier do what params.md says, and
R-CNN refuses them rather than ignoring them."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn.data import voc
from rcnn.engine import device as device_module
from rcnn.engine.device import precision_name
from rcnn.engine.optim import backbone_rate, build_optimizer, step_floor
from rcnn.engine.two_stage_batches import Example, repeat_factors, training_order
from rcnn.engine.two_stage_trainer import init_class_prior
from rcnn.families.fast_rcnn.model import build_fast_rcnn
from rcnn.modeling.two_stage import save_roi_detector
from rcnn.pipeline.family_registry import load_detector
from rcnn.pipeline.params import TrainParams, from_dict
from rcnn.proposals.region_boxes import ImageBoxes
from rcnn.utils.errors import ParamError, RcnnError

BUILDER = Path(__file__).resolve().parents[1] / "bench" / "few_photos.py"


def _example(labels: list[int]) -> Example:
    n = len(labels)
    boxes = ImageBoxes("x", 100, 100, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                       np.tile(np.array([[0, 0, 9, 9]], np.float32), (n, 1)), np.array(labels, np.int64),
                       np.zeros(n, bool))
    return Example(Path("x.jpg"), boxes, np.zeros((0, 4), np.float32), np.arange(n))


def test_repeat_factors_follow_lvis_and_draw_rare_class_images_more_often():
    # class 1 in every image, class 2 in one of ten: r(2) = sqrt(0.5 / 0.1)
    examples = [_example([1])] * 9 + [_example([1, 2])]
    per_image, per_class = repeat_factors(examples, 3, threshold=0.5)
    assert per_class[1] == 1.0 and per_class[2] == pytest.approx(np.sqrt(5))
    assert list(per_image[:9]) == [1.0] * 9 and per_image[9] == pytest.approx(np.sqrt(5))
    assert list(repeat_factors(examples, 3, threshold=0.0)[0]) == [1.0] * 10  # off
    order = training_order(10, 10_000, np.random.default_rng(0), per_image)
    assert np.mean(order == 9) == pytest.approx(np.sqrt(5) / (9 + np.sqrt(5)), abs=0.01)
    again = training_order(10, 10_000, np.random.default_rng(0), per_image)
    np.testing.assert_array_equal(order, again)  # seeded: the same draw every run


def test_the_backbone_learns_at_its_own_rate_and_the_head_at_train_lr():
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 2)})
    t = TrainParams(lr=0.01, optimizer="sgd", backbone_lr=0.1)
    optimizer = build_optimizer(model.parameters(), t, model["body"].parameters(), backbone_rate(t, 15))
    rates = sorted((g["lr"], len(g["params"])) for g in optimizer.param_groups)
    assert rates == [(pytest.approx(0.001), 2), (0.01, 2)]
    assert len(build_optimizer(model.parameters(), TrainParams(lr=0.01)).param_groups) == 1  # default: one rate


def test_the_backbone_rate_derived_from_the_rarest_class_grows_with_its_boxes_up_to_the_full_rate():
    derived = TrainParams(backbone_lr=0.1, backbone_lr_objects=150)
    # neu-few's rarest class (15 boxes) keeps the floor, kangaroo's 128 boxes get most of the rate, bccd's 209 all
    assert [backbone_rate(derived, n) for n in (0, 15, 75, 128, 150, 209)] == \
        [0.1, 0.1, 0.5, pytest.approx(128 / 150), 1.0, 1.0]
    assert backbone_rate(TrainParams(backbone_lr=0.3), 10_000) == 0.3  # not derived: the value as given


def test_the_step_floor_rises_only_where_the_rarest_class_has_few_boxes():
    derived = TrainParams(min_steps=960, rare_class_objects=50, min_steps_rare=1440)
    # neu-few's rarest class (15 boxes) gets the higher floor; kangaroo's 128 and bccd's 209 keep train.min_steps
    assert [step_floor(derived, n) for n in (1, 15, 49, 50, 128, 209)] == [1440, 1440, 1440, 960, 960, 960]
    assert step_floor(TrainParams(min_steps=960), 1) == 960  # not derived: train.min_steps as given
    assert step_floor(TrainParams(min_steps=2000, rare_class_objects=50, min_steps_rare=1440), 1) == 2000


@pytest.mark.parametrize("train", [{"rare_class_objects": 50}, {"min_steps_rare": 1440}])
def test_a_rare_step_floor_without_its_other_half_is_refused(train: dict):
    with pytest.raises(ParamError, match=r"train\.rare_class_objects = \d+ and train\.min_steps_rare = \d+ work "
                                         r"together"):
        from_dict({"model": {"arch": "fast_rcnn"}, "train": train})


def test_the_class_prior_starts_scores_at_the_sampled_shares():
    params = from_dict({"classes": ["a", "b", "c"], "model": {"arch": "fast_rcnn", "backbone": "resnet18",
                                                              "weights": "none", "roi_channels": 8, "hidden": 16}})
    model = build_fast_rcnn(params)
    init_class_prior(model, 0.25)
    features = torch.zeros(1, 16)
    probs = torch.softmax(model.roi_heads.box_predictor(features)[0], dim=1)[0]
    np.testing.assert_allclose(probs.detach().numpy(), [0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3], rtol=1e-5)


def _tiny_fast_rcnn(**model: object):
    params = from_dict({"classes": ["a", "b", "c"], "model": {"arch": "fast_rcnn", "backbone": "resnet18",
                                                              "weights": "none", "roi_channels": 8, "hidden": 16,
                                                              **model}})
    return params, build_fast_rcnn(params)


def _cosine_model(scale: float = 20.0):
    return _tiny_fast_rcnn(classifier="cosine", cosine_scale=scale)


def test_cosine_scores_ignore_the_length_of_features_and_of_class_weights():
    _, model = _cosine_model(scale=10.0)
    predictor = model.roi_heads.box_predictor
    features = torch.rand(4, 16)
    scores, deltas = predictor(features)
    assert scores.shape == (4, 4) and deltas.shape == (4, 16)
    assert float(scores.abs().max()) <= 10.0 + 1e-4  # scale times a cosine
    torch.testing.assert_close(predictor(features * 7.0)[0], scores)
    with torch.no_grad():
        predictor.cls_score.weight[2] *= 50.0  # a class with long weights does not outscore the others for it
    torch.testing.assert_close(predictor(features)[0], scores)


def _round_trip_config(tmp_path: Path, params, model) -> dict:
    """The config of ``model`` saved and loaded again, after checking the loaded one scores the same."""
    save_roi_detector(tmp_path / "m.pt", model.eval(), params, {})
    loaded = load_detector(tmp_path / "m.pt", "cpu", score_threshold=0.0)
    image, rois = torch.rand(3, 96, 128), torch.tensor([[0.0, 0.0, 40.0, 40.0], [20.0, 10.0, 90.0, 80.0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.score(image, rois)[0], model.score(image, rois)[0])
    return loaded.model.config


def _older_checkpoint(tmp_path: Path, *missing: str) -> dict:
    """The payload of a default model's checkpoint written before the config keys ``missing`` existed."""
    params, plain = _tiny_fast_rcnn()
    save_roi_detector(tmp_path / "p.pt", plain.eval(), params, {})
    payload = torch.load(tmp_path / "p.pt", weights_only=True)
    for key in missing:
        del payload["meta"]["config"][key]
    return payload


def test_a_cosine_checkpoint_round_trips_and_older_ones_load_as_softmax(tmp_path: Path):
    assert _round_trip_config(tmp_path, *_cosine_model())["classifier"] == "cosine"
    torch.save(_older_checkpoint(tmp_path, "classifier", "cosine_scale"), tmp_path / "old.pt")
    assert load_detector(tmp_path / "old.pt", "cpu").model.config["classifier"] == "softmax"


def test_a_context_region_checkpoint_round_trips_and_older_ones_load_without_one(tmp_path: Path):
    assert _round_trip_config(tmp_path, *_tiny_fast_rcnn(roi_context=1.5))["roi_context"] == 1.5
    payload = _older_checkpoint(tmp_path, "roi_context")
    torch.save(payload, tmp_path / "old.pt")
    assert load_detector(tmp_path / "old.pt", "cpu").model.config["roi_context"] == 0.0
    payload["meta"]["config"]["roi_context"] = -1.0
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(RcnnError, match="config roi_context = -1.0 is invalid"):
        load_detector(tmp_path / "bad.pt", "cpu")


def test_a_checkpoint_records_its_precision_and_warns_when_scored_in_another(tmp_path: Path, monkeypatch):
    params, model = _cosine_model()
    validated = precision_name(torch.device("cpu"))
    save_roi_detector(tmp_path / "m.pt", model.eval(), params, {"precision": validated})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["meta"]["precision"]  # written before checkpoints recorded it
    torch.save(payload, tmp_path / "old.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_detector(tmp_path / "m.pt", "cpu")  # scored as validated: silent
        load_detector(tmp_path / "old.pt", "cpu")  # unknown: silent
    other = "float32" if validated != "float32" else "bfloat16"
    monkeypatch.setattr(device_module, "precision_name", lambda device: other)
    with pytest.warns(RuntimeWarning, match=f"validated in {validated} and is scored in {other} here"):
        assert load_detector(tmp_path / "m.pt", "cpu").model.config["classifier"] == "cosine"


@pytest.mark.parametrize("raw, message", [
    ({"model": {"classifier": "cosine"}}, "model.classifier = 'cosine' is Fast and Faster R-CNN's"),
    ({"model": {"arch": "fast_rcnn", "classifier": "svm"}}, "are R-CNN's"),
    ({"model": {"arch": "fast_rcnn", "classifier": "cosine"}, "train": {"prior_init": True}},
     "train.prior_init = true needs model.classifier = 'softmax'"),
])
def test_classifier_combinations_that_would_be_ignored_or_break_are_refused(raw: dict, message: str):
    with pytest.raises(ParamError, match=message):
        from_dict(raw)


@pytest.mark.parametrize("key, value", [("repeat_threshold", 0.5), ("backbone_lr", 0.1), ("backbone_lr_objects", 150),
                                        ("rare_class_objects", 50), ("prior_init", True)])
def test_r_cnn_refuses_the_two_stage_sampling_keys_instead_of_ignoring_them(key: str, value: object):
    with pytest.raises(ParamError, match=rf"train\.{key} .*are Fast and Faster R-CNN's"):
        from_dict({"train": {key: value}})


def test_the_few_photo_builder_takes_n_photos_of_each_class_the_same_way_every_time(synthetic_voc: Path,
                                                                                   tmp_path: Path):
    runs = []
    for out in (tmp_path / "a", tmp_path / "b"):
        proc = subprocess.run([sys.executable, str(BUILDER), str(synthetic_voc), str(out), "--train-per-class", "2",
                               "--val-per-class", "1"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        runs.append({s: voc.read_split(out, s) for s in ("train", "val", "test")})
    assert runs[0] == runs[1]
    train = voc.load_split(tmp_path / "a", "train", ["car", "dog", "person"])
    held = [set(a.labels.tolist()) for a in train]
    assert 3 <= len(train) <= 6 and all(sum(c in h for h in held) >= 2 for c in (1, 2, 3))
    assert runs[0]["test"] == voc.read_split(synthetic_voc, "test")  # test: the whole source list
    dev = subprocess.run([sys.executable, str(BUILDER), str(synthetic_voc), str(tmp_path / "d"), "--train-per-class",
                          "2", "--val-per-class", "1", "--dev"], capture_output=True, text=True)
    assert dev.returncode == 0, dev.stderr
    cut = {s: voc.read_split(tmp_path / "d", s) for s in ("train", "val", "test")}
    assert (cut["train"], cut["val"]) == (runs[0]["train"], runs[0]["val"])  # the same photos to train and pick on
    assert cut["test"] and sorted(cut["test"]) == sorted(set(voc.read_split(synthetic_voc, "val")) - set(cut["val"]))
    assert (tmp_path / "a" / "JPEGImages" / f"{train[0].image_id}.jpg").read_bytes() == \
        voc.image_path(synthetic_voc, train[0].image_id).read_bytes()
    bad = subprocess.run([sys.executable, str(BUILDER), str(tmp_path / "nowhere"), str(tmp_path / "c")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
