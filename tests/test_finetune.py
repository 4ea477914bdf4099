"""R-CNN the paper's way: proposals sampled afresh each epoch, hard-negative mining, per-class SVMs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rcnn.proposals import labelling

from rcnn.families.rcnn import regions

from rcnn.data import voc
from rcnn.evaluation.validation import labelled_split_ap
from rcnn.families.rcnn import features, train_data, training
from rcnn.families.rcnn.crops import warp_crops
from rcnn.families.rcnn.features import crop_features
from rcnn.families.rcnn.finetune import ProposalSampler, flipped_crops, jitter_boxes
from rcnn.families.rcnn.hard_negatives import mine_hard_negatives, negative_pool
from rcnn.families.rcnn.model import RegionClassifier
from rcnn.families.rcnn.svm import fit_svms, svm_scores
from rcnn.modeling.postprocess import postprocess_settings
from rcnn.pipeline.family_registry import load_detector
from rcnn.pipeline.params import EvaluateParams, ModelParams, Params, TrainParams
from rcnn.proposals.region_boxes import load_boxes
from rcnn.utils.boxes import box_iou

CLASSES = ["car", "dog", "person"]


def _items(regions_dir: Path):
    return load_boxes(regions_dir / labelling.read_index(regions_dir)["labelled_boxes"]["train"])


def _sampler(regions_dir: Path, **train_changes) -> ProposalSampler:
    train = TrainParams(**{"batch_size": 32, "fg_fraction": 0.25, **train_changes})
    return ProposalSampler(regions_dir.parent / "VOC2007", _items(regions_dir), regions.region_settings(regions_dir),
                           train, seed=0)


def _region_key(crop: torch.Tensor) -> str:
    """The same region whether flipped or not."""
    a = crop.numpy()
    return min(hashlib.md5(a.tobytes()).hexdigest(), hashlib.md5(a[:, ::-1].copy().tobytes()).hexdigest())


def test_every_batch_has_the_requested_foreground_share_and_epochs_draw_afresh(regions_dir):
    sampler = _sampler(regions_dir)
    index = labelling.read_index(regions_dir)
    stored_sample = index["splits"]["train"]["regions"]
    seen: set[str] = set()
    for epoch in (1, 2, 3):
        count = 0
        for crops, labels in sampler.epoch(epoch):
            assert crops.shape == (32, 64, 64, 3) and crops.dtype == torch.uint8
            assert int((labels > 0).sum()) == 8  # round(0.25 * 32) foreground, every batch
            assert set(labels.tolist()) <= {0, 1, 2, 3}
            count += len(labels)
            seen.update(_region_key(c) for c in crops)
        assert count == sampler.regions_per_epoch
    # One epoch holds as many regions as the regions stage's fixed sample; three epochs saw many more.
    assert sampler.regions_per_epoch <= stored_sample + 32
    assert len(seen) > 1.5 * sampler.regions_per_epoch
    assert sampler.pool_size > 3 * sampler.regions_per_epoch
    # Same seed and epoch: the same batches.
    first = [(c.clone(), y.clone()) for c, y in sampler.epoch(2)]
    again = list(sampler.epoch(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))


def test_tiny_batches_all_foreground_batches_and_images_without_objects_do_not_crash(regions_dir):
    """Issue 23, defect 2: a chunk that draws no foreground or no background used to end in
    ``ValueError: need at least one array to stack``."""
    tiny = _sampler(regions_dir, batch_size=2)  # round(0.25 x 2) = 0: still one foreground a batch
    assert all(int((y > 0).sum()) == 1 for _, y in tiny.epoch(1))
    only_fg = _sampler(regions_dir, fg_fraction=1.0)
    assert all(bool((y > 0).all()) for _, y in only_fg.epoch(1))
    items = [dataclasses.replace(i, labels=np.zeros_like(i.labels), gt_boxes=np.zeros((0, 4), np.float32),
                                 gt_labels=np.zeros(0, np.int64), gt_difficult=np.zeros(0, bool))
             if k % 3 else i for k, i in enumerate(_items(regions_dir))]
    mostly_empty = ProposalSampler(regions_dir.parent / "VOC2007", items, regions.region_settings(regions_dir),
                                   TrainParams(batch_size=32, fg_fraction=0.25), seed=0)
    batches = list(mostly_empty.epoch(1))
    assert batches and sum(len(y) for _, y in batches) == mostly_empty.regions_per_epoch


def test_jittered_boxes_keep_their_labels(regions_dir):
    settings = regions.region_settings(regions_dir)
    rng = np.random.default_rng(0)
    moved_any = 0
    for item in _items(regions_dir)[:10]:
        keep = item.labels >= 0
        boxes, labels = item.proposals[keep], item.labels[keep]
        moved = jitter_boxes(boxes, labels, item, 0.3, settings.fg_iou, settings.bg_iou, rng)
        moved_any += int((moved != boxes).any(axis=1).sum())
        assert (moved[:, 2] >= moved[:, 0]).all() and (moved[:, [0, 2]] <= item.width - 1).all()
        iou = box_iou(moved, item.gt_boxes)
        fg = labels > 0
        same = labels[fg][:, None] == item.gt_labels[None, :]
        assert (np.where(same, iou[fg], 0).max(axis=1) >= settings.fg_iou).all()
        assert (iou[~fg].max(axis=1) < settings.bg_iou).all()
    assert moved_any > 0


def test_crops_are_mirrored_as_the_crops_of_mirrored_images():
    crops = np.random.default_rng(0).integers(0, 255, (400, 6, 6, 3), dtype=np.uint8)
    out = flipped_crops(crops.copy(), ["vertical", "diagonal"], np.random.default_rng(1))
    views = {"none": crops, "vertical": crops[:, ::-1], "diagonal": crops.transpose(0, 2, 1, 3),
             "both": crops[:, ::-1].transpose(0, 2, 1, 3)}
    seen = {name: np.array([np.array_equal(o, v) for o, v in zip(out, view)]) for name, view in views.items()}
    assert all(seen[name].mean() > 0.15 for name in views)  # each of the four about a quarter of the time
    assert (seen["none"] | seen["vertical"] | seen["diagonal"] | seen["both"]).all()
    assert not any(np.array_equal(o, c[:, ::-1]) for o, c in zip(out, crops))  # never left to right


def test_mining_takes_each_images_highest_scores_not_yet_taken():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.8, 0.8, 0.3])
    image = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    taken = np.array([False, True, False, False, False, False, False, False])
    np.testing.assert_array_equal(mine_hard_negatives(scores, image, taken, per_image=2), [2, 3, 5, 6])
    np.testing.assert_array_equal(mine_hard_negatives(scores, image, np.ones(8, bool), per_image=2), [])
    # Only ones the classifier gets wrong or nearly wrong: easy negatives are not added to fill the quota.
    np.testing.assert_array_equal(mine_hard_negatives(scores, image, taken, per_image=2, min_score=0.75), [5, 6])


def test_mining_never_adds_a_background_region_the_regions_stage_sampled(regions_dir, tmp_path):
    from rcnn.families.rcnn.hard_negatives import NegativePool, already_sampled

    items = _items(regions_dir)[:3]
    bg = [item.proposals[item.labels == 0] for item in items]
    pool = NegativePool(np.zeros((sum(map(len, bg)), 4), np.float16), np.repeat(np.arange(3), [len(b) for b in bg]),
                        np.concatenate(bg))
    # The sample holds image 0's first two background boxes and image 2's first, plus a foreground row.
    ids = np.array([items[0].image_id, items[0].image_id, items[2].image_id, items[1].image_id])
    boxes = np.stack([bg[0][0], bg[0][1], bg[2][0], bg[1][0]])
    taken = already_sampled(pool, items, ids, boxes, np.array([0, 0, 0, 2]))
    expected = np.zeros(len(pool.boxes), bool)
    expected[[0, 1, len(bg[0]) + len(bg[1])]] = True
    np.testing.assert_array_equal(taken, expected)


def test_a_vanishing_svm_c_warns_that_the_svms_learned_nothing():
    x, y = _toy(64, 200, seed=1)
    with pytest.warns(RuntimeWarning, match="train.svm_c = 1e-12 is too small to learn anything"):
        fit_svms(x, y, len(CLASSES) + 1, 1e-12)


def test_the_mining_pool_is_every_background_proposal_and_nothing_near_an_object(regions_dir, tmp_path):
    items = _items(regions_dir)[:4]
    settings = regions.region_settings(regions_dir)
    model = RegionClassifier("resnet18", len(CLASSES), hidden=16).eval()
    root = regions_dir.parent / "VOC2007"
    pool = negative_pool(model, root, items, settings.crop_size, settings.context, torch.device("cpu"), 64, tmp_path)
    assert len(pool.boxes) == sum(int((i.labels == 0).sum()) for i in items) > 0
    for k, item in enumerate(items):
        boxes = pool.boxes[pool.image_index == k]
        assert (box_iou(boxes, item.gt_boxes).max(axis=1) < settings.bg_iou).all()
    first = items[0]
    rgb = cv2.cvtColor(voc.read_image(voc.image_path(root, first.image_id)), cv2.COLOR_BGR2RGB)
    exact = crop_features(model, warp_crops(rgb, pool.boxes[:5], settings.crop_size, settings.context), torch.device("cpu"), 8)
    np.testing.assert_allclose(np.asarray(pool.features[:5], np.float32), exact, rtol=2e-3, atol=2e-3)


def test_mining_scores_only_the_proposals_detection_will_score(regions_dir, tmp_path):
    """With ``max_rank`` (evaluate.max_proposals), a negative ranked past it is never mined: detection never sees it."""
    items = _items(regions_dir)[:4]
    settings = regions.region_settings(regions_dir)
    model = RegionClassifier("resnet18", len(CLASSES), hidden=16).eval()
    root = regions_dir.parent / "VOC2007"
    rank = 5
    assert any(int((i.labels[rank:] == 0).sum()) for i in items)  # the cap leaves something out
    pool = negative_pool(model, root, items, settings.crop_size, settings.context, torch.device("cpu"), 64, tmp_path,
                         max_rank=rank)
    assert len(pool.boxes) == sum(int((i.labels[:rank] == 0).sum()) for i in items) > 0
    for k, item in enumerate(items):
        first = item.proposals[:rank][item.labels[:rank] == 0]
        np.testing.assert_array_equal(pool.boxes[pool.image_index == k], first)


def _toy(dim: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Background plus three classes, as well-separated Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(4, dim))
    labels = rng.integers(0, 4, size=n)
    return (centres[labels] + rng.normal(0, 1, size=(n, dim))).astype(np.float32), labels.astype(np.int64)


def test_svms_separate_a_toy_problem():
    x, y = _toy(32, 600, seed=1)
    svm = fit_svms(x, y, num_classes=4, c=0.01)
    assert svm["weight"].shape == (3, 32) and svm["bias"].shape == (3,)
    xt, yt = _toy(32, 900, seed=1)  # same centres; rows 600.. are new samples
    scores = svm_scores(svm, torch.from_numpy(xt[600:])).numpy()
    assert scores.shape == (300, 4) and (scores[:, 0] == 0).all() and ((scores >= 0) & (scores <= 1)).all()
    fg = yt[600:] > 0
    assert (scores[fg, 1:].argmax(axis=1) + 1 == yt[600:][fg]).mean() > 0.97
    assert (scores[~fg, 1:].max(axis=1) < 0.5).mean() > 0.95


def test_the_softmax_head_separates_the_same_toy_problem():
    params = Params(classes=CLASSES, train=TrainParams(lr=1e-3, batch_size=32, epochs=30, patience=30, device="cpu"))
    model = RegionClassifier("resnet18", len(CLASSES), hidden=32, dropout=0.0)
    x, y = _toy(model.feature_dim, 1200, seed=2)
    data = train_data.cached_feature_data({"features": x[:900], "labels": y[:900]},
                                          {"features": x[900:], "labels": y[900:]}, 32, 0, torch.device("cpu"))
    summary = training.fit(model, data, params, torch.device("cpu"))
    assert summary["val_accuracy"] > 0.97 and summary["val_fg_accuracy_overall"] > 0.97


def _paper_params(**train_changes) -> Params:
    train = {"optimizer": "sgd", "lr": 0.01, "batch_size": 32, "epochs": 1, "patience": 1, "device": "cpu",
             "hard_negative_rounds": 1, "box_jitter": 0.1, "feature_batch_size": 64, **train_changes}
    return Params(classes=CLASSES,  # validation AP on 50 proposals an image (not 300) keeps the tests fast
                  model=ModelParams(backbone="resnet18", weights="none", hidden=32, trainable_layers=1,
                                    classifier="svm", bbox_regression=True),
                  train=TrainParams(**train), evaluate=EvaluateParams(max_proposals=50))


def test_fine_tuning_with_svms_and_hard_negatives_is_reproducible_and_detects(regions_dir, tmp_path):
    # The SVMs stay only where they beat the fine-tuned softmax head on validation AP: what is recorded must be
    # what is saved.
    params = _paper_params(classifier_choice="validation")
    root = regions_dir.parent / "VOC2007"
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        metrics = training.run_train_stage(params, tmp_path / "no-features", regions_dir, out / "model.pt",
                                           out / "train.json", out / "dvclive", root)
        outs.append(out)
    first, second = (json.loads((o / "train.json").read_text()) for o in outs)
    strip = lambda m: {k: v for k, v in m.items() if "seconds" not in k}  # noqa: E731
    assert strip({**first, "final_classifier": strip(first["final_classifier"])}) == \
        strip({**second, "final_classifier": strip(second["final_classifier"])})
    assert (outs[0] / "model.pt").read_bytes() == (outs[1] / "model.pt").read_bytes()
    assert metrics["pool_regions"] > metrics["regions_per_epoch"]
    final = metrics["final_classifier"]
    assert final["mined_per_round"][0] > 0 and final["pool_regions"] > 0 and final["choice"] == "validation"
    softmax_ap, retrained_ap = final["val_ap_softmax_head"], final["val_ap_retrained"]
    assert softmax_ap == {"map": round(metrics["val_map"], 6), "map07": round(metrics["val_map07"], 6)}
    kept = "retrained" if retrained_ap["map"] > softmax_ap["map"] else "softmax head"
    assert final["kept"] == kept and final["classifier"] == ("svm" if kept == "retrained" else "softmax")
    detector = load_detector(outs[0] / "model.pt", "cpu", **postprocess_settings(params))
    assert detector.meta["bbox_regressor"] is not None
    assert (detector.meta["svm"] is not None) == (kept == "retrained")
    if kept == "retrained":
        assert detector.meta["svm"]["weight"].shape == (3, 512)
    val_items = train_data.labelled_boxes(regions_dir, "val")
    scored = labelled_split_ap(detector, [voc.image_path(root, item.image_id) for item in val_items], val_items,
                               params.evaluate.max_proposals)
    assert scored["map"] == pytest.approx((retrained_ap if kept == "retrained" else softmax_ap)["map"], abs=1e-6)
    detector.score_threshold = 0.0
    image_id = voc.read_split(root, "val")[0]
    image = voc.read_image(voc.image_path(root, image_id))
    found = detector.detect(image, np.array([[5, 5, 60, 60], [10, 20, 90, 70]], np.float32))
    assert len(found.scores) > 0 and ((found.scores >= 0) & (found.scores <= 1)).all()


def test_choice_on_validation_puts_the_softmax_head_back_when_retraining_scores_lower():
    model = RegionClassifier("resnet18", len(CLASSES), hidden=8)
    trained_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    torch.nn.init.zeros_(model.head[3].weight)  # what retraining left in the head
    svm = {"weight": torch.ones(3, 512), "bias": torch.zeros(3), "scale": torch.tensor(1.0)}
    retrained = {"classifier": "svm", "hard_negative_rounds": 1}
    scored = []

    def val_ap(scored_model, scored_svm=None):
        scored.append(scored_svm)
        return {"map": 0.40, "map07": 0.41}

    kept_svm, summary = training._keep_better_on_validation(model, svm, retrained, trained_head,
                                                            {"map": 0.50, "map07": 0.49}, val_ap)
    assert scored == [svm]  # the retrained classifier was scored as it is, SVMs included
    assert kept_svm is None and summary["kept"] == "softmax head" and summary["classifier"] == "softmax"
    assert summary["val_ap_softmax_head"] == {"map": 0.5, "map07": 0.49}
    assert summary["val_ap_retrained"] == {"map": 0.4, "map07": 0.41} and summary["hard_negative_rounds"] == 1
    assert all(torch.equal(v, trained_head[k]) for k, v in model.head.state_dict().items())

    torch.nn.init.zeros_(model.head[3].weight)
    kept_svm, summary = training._keep_better_on_validation(model, svm, retrained, trained_head,
                                                            {"map": 0.30, "map07": 0.31}, val_ap)
    assert kept_svm is svm and summary["kept"] == "retrained" and summary["classifier"] == "svm"
    assert not model.head[3].weight.any()  # the retrained head stays


def test_softmax_hard_negative_rounds_add_negatives_and_retrain_the_head(regions_dir, tmp_path):
    # A one-epoch head on random-weight features: mining is what is tested, kept even if it learned nothing yet.
    # Frozen, the softmax head's validation AP is measured before mining, so the choice can be made.
    params = dataclasses.replace(_paper_params(hard_negative_rounds=2, allow_collapse=True,
                                               classifier_choice="validation"),
                                 model=ModelParams(backbone="resnet18", weights="none", hidden=32))
    features_dir = tmp_path / "features"
    features.run_features_stage(params, regions_dir, features_dir)
    metrics = training.run_train_stage(params, features_dir, regions_dir, tmp_path / "model.pt",
                                       tmp_path / "train.json", tmp_path / "dvclive", regions_dir.parent / "VOC2007")
    final = metrics["final_classifier"]
    assert final["classifier"] == "softmax" and len(final["mined_per_round"]) == 2
    retrained_better = final["val_ap_retrained"]["map"] > final["val_ap_softmax_head"]["map"]
    assert final["kept"] == ("retrained" if retrained_better else "softmax head")
    assert all(n > 0 for n in final["mined_per_round"]) and "refit_val_loss" in final
    items = _items(regions_dir)
    per_image = regions.region_settings(regions_dir).max_boxes
    assert sum(final["mined_per_round"]) <= 2 * per_image * len(items)
