"""Fast R-CNN: RoI pooling, RoI sampling, flips, labelled boxes, checkpoints, training, the factory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from rcnn.data import voc
from rcnn.engine.two_stage_batches import Example, load_example, training_plan
from rcnn.engine.two_stage_trainer import steps_per_epoch
from rcnn.families.fast_rcnn.model import FastRCNN, FastRCNNDetector
from rcnn.modeling.roi_heads import RoIAlignPool, gathered_roi_align
from rcnn.modeling.two_stage import save_roi_detector
from rcnn.pipeline.evaluate_stage import run_evaluate_stage
from rcnn.pipeline.family_registry import family, load_detector, run_features_stage, run_regions_stage, run_train_stage
from rcnn.pipeline.params import Params, TrainParams, from_dict, to_dict
from rcnn.proposals.labelling import read_index
from rcnn.proposals.region_boxes import BOXES_FILE, ImageBoxes, load_boxes, save_boxes
from rcnn.proposals.selective_search import run_proposals_stage
from rcnn.utils.errors import RcnnError


def tiny_model(**kw) -> FastRCNN:
    torch.manual_seed(0)
    args = {"backbone": "resnet18", "num_classes": 3, "roi_channels": 8, "roi_size": 3, "hidden": 16,
            "image_size": 96, "max_size": 160, "trainable_layers": 1, **kw}
    return FastRCNN(**args)


def test_roi_pooling_equals_pooling_the_region_cropped_by_hand():
    torch.manual_seed(0)
    fmap = torch.randn(1, 5, 32, 40)
    pool = RoIAlignPool(7, spatial_scale=1.0, sampling_ratio=2)
    box = torch.tensor([[8.0, 4.0, 22.0, 18.0]])  # continuous corners: 14 x 14 feature pixels
    pooled = pool({"0": fmap}, [box], [(32, 40)])
    by_hand = torch.nn.functional.avg_pool2d(fmap[:, :, 4:18, 8:22], 2)  # 2x2 pixels per output bin
    assert pooled.shape == (1, 5, 7, 7)
    torch.testing.assert_close(pooled, by_hand, atol=1e-5, rtol=1e-5)


def test_cpu_roi_pooling_gives_torchvisions_values_and_gradients_for_boxes_in_on_and_off_the_map():
    torch.manual_seed(0)
    fmap = torch.randn(2, 6, 9, 12, requires_grad=True)
    boxes = [torch.zeros(0, 4),  # an image without RoIs
             torch.tensor([[0.0, 0.0, 12.0, 9.0], [3.3, 2.1, 3.3, 2.1], [-5.0, -4.0, 2.0, 3.0],  # whole, a point, off
                           [10.5, 7.5, 30.0, 20.0], [-40.0, -40.0, -30.0, -30.0], [1.2, 0.7, 8.9, 6.4]]) * 16]
    ours = gathered_roi_align(fmap, boxes, 3, 1 / 16, 2)
    theirs = roi_align(fmap, boxes, 3, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(ours, theirs)
    upstream = torch.randn_like(theirs)
    ours_grad, = torch.autograd.grad(ours, fmap, upstream)
    theirs_grad, = torch.autograd.grad(theirs, fmap, upstream)
    torch.testing.assert_close(ours_grad, theirs_grad)
    assert gathered_roi_align(fmap.detach().bfloat16(), boxes, 3, 1 / 16, 2).dtype == torch.bfloat16


def test_a_context_region_pools_the_box_and_a_box_around_it_enlarged_by_the_factor():
    torch.manual_seed(0)
    fmap = torch.randn(1, 5, 32, 40)
    box = torch.tensor([[14.0, 8.0, 24.0, 16.0]])  # centre (19, 12), 10 x 8
    pooled = RoIAlignPool(4, spatial_scale=1.0, context=2.0)({"0": fmap}, [box], [(32, 40)])
    plain = RoIAlignPool(4, spatial_scale=1.0)
    assert pooled.shape == (1, 10, 4, 4) and RoIAlignPool(4, context=2.0).channels(5) == 10
    torch.testing.assert_close(pooled[:, :5], plain({"0": fmap}, [box], [(32, 40)]))
    around = torch.tensor([[9.0, 4.0, 29.0, 20.0]])  # the same centre, twice as wide and high
    torch.testing.assert_close(pooled[:, 5:], plain({"0": fmap}, [around], [(32, 40)]))


def test_a_model_with_a_context_region_trains_on_what_surrounds_each_box():
    model = tiny_model(roi_context=1.8).train()
    assert model.roi_heads.box_head[1].in_features == 2 * 8 * 3 * 3  # the RoI's channels and its context's
    image = torch.rand(3, 96, 128)
    target = {"boxes": torch.tensor([[20.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([1])}
    proposals = torch.tensor([[18.0, 22.0, 58.0, 62.0], [0.0, 0.0, 30.0, 30.0], [50.0, 40.0, 120.0, 90.0]])
    losses, _, _ = model.losses([image], [proposals], [target])
    sum(losses.values()).backward()
    weight = model.roi_heads.box_head[1].weight.grad
    assert weight[:, 8 * 3 * 3:].abs().sum() > 0  # the context half of the head learns
    probs, boxes, rois = model.eval().score(image, proposals)
    assert probs.shape == (3, 4) and boxes.shape == (3, 4, 4) and torch.isfinite(probs).all()


def test_model_pools_at_the_backbone_stride():
    model = tiny_model()
    image = torch.rand(3, 96, 128)
    _, features, scaled, _, sizes = model._features([image], [torch.tensor([[0.0, 0.0, 64.0, 64.0]])])
    assert features["0"].shape[-2:] == (3, 4)  # 96 x 128 at stride 32
    assert sizes == [(96, 128)] and torch.equal(scaled[0], torch.tensor([[0.0, 0.0, 64.0, 64.0]]))


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_stride_16_map_adds_the_upsampled_last_map_and_pools_at_stride_16(backbone: str):
    model = tiny_model(backbone=backbone, feature_stride=16)
    image = torch.rand(3, 96, 128)
    _, features, _, _, _ = model._features([image], [torch.tensor([[0.0, 0.0, 64.0, 64.0]])])
    assert features["0"].shape[-2:] == (6, 8)  # 96 x 128 at stride 16
    assert model.roi_heads.box_roi_pool.spatial_scale == 1 / 16
    # the stride-32 map still counts: changing the backbone's last unit changes the pooled map
    before = features["0"].clone()
    with torch.no_grad():
        for param in model.body[-1].parameters():
            param.add_(1.0)
    _, after, _, _, _ = model._features([image], [torch.tensor([[0.0, 0.0, 64.0, 64.0]])])
    assert not torch.allclose(before, after["0"])


def test_stride_16_model_keeps_imagenet_statistics_and_round_trips(tmp_path: Path):
    plain = tiny_model(backbone="mobilenet_v2")
    model = tiny_model(backbone="mobilenet_v2", feature_stride=16)
    for a, b in zip(plain.body.modules(), model.body.modules()):  # probing for the stride-16 block ran no BN update
        if isinstance(a, torch.nn.BatchNorm2d):
            assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    save_roi_detector(tmp_path / "m.pt", model.eval(), Params(classes=["car", "dog", "person"]), {})
    loaded = load_detector(tmp_path / "m.pt", "cpu", score_threshold=0.0)
    assert loaded.model.config["feature_stride"] == 16
    image = torch.rand(3, 96, 128)
    rois = torch.tensor([[0.0, 0.0, 40.0, 40.0], [20.0, 10.0, 90.0, 80.0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.score(image, rois)[0], model.score(image, rois)[0])


def test_checkpoints_from_before_feature_stride_load_as_stride_32(tmp_path: Path):
    save_roi_detector(tmp_path / "m.pt", tiny_model(), Params(classes=["car", "dog", "person"]), {})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["meta"]["config"]["feature_stride"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_detector(tmp_path / "old.pt", "cpu").model.config["feature_stride"] == 32
    payload["meta"]["config"]["feature_stride"] = 8
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(RcnnError, match="config feature_stride = 8 is invalid"):
        load_detector(tmp_path / "bad.pt", "cpu")


@pytest.mark.parametrize("fg_fraction", [0.25, 0.5])
def test_sampled_rois_have_the_requested_foreground_share(fg_fraction: float):
    model = tiny_model(rois_per_image=32, fg_fraction=fg_fraction)
    gen = torch.Generator().manual_seed(1)
    gt = torch.tensor([[20.0, 20.0, 60.0, 60.0]])
    near = gt + torch.randint(-3, 4, (100, 4), generator=gen).float()  # IoU >= 0.5: foreground
    far = torch.tensor([[70.0, 0.0, 90.0, 15.0]]) + torch.rand(200, 4, generator=gen)  # background
    targets = [{"boxes": gt, "labels": torch.tensor([2])}]
    for _ in range(3):
        _, _, labels, _ = model.roi_heads.select_training_samples([torch.cat([near, far])], targets)
        assert len(labels[0]) == 32
        assert int((labels[0] > 0).sum()) == int(32 * fg_fraction)
        assert set(labels[0].tolist()) <= {0, 2}
    # Few positives: all of them (and the ground truth itself) are taken, background fills up.
    _, _, labels, _ = model.roi_heads.select_training_samples([torch.cat([near[:2], far])], targets)
    assert int((labels[0] > 0).sum()) == 3 and len(labels[0]) == 32


def _mirrored(image: torch.Tensor, name: str) -> torch.Tensor:
    return {"horizontal": image.flip(-1), "vertical": image.flip(-2), "diagonal": image.transpose(-1, -2)}[name]


@pytest.mark.parametrize("flips", [("horizontal",), ("vertical",), ("diagonal",),
                                   ("horizontal", "vertical", "diagonal")])
def test_flipped_example_mirrors_image_proposals_and_targets(synthetic_voc: Path, flips: tuple[str, ...]):
    image_id = voc.read_split(synthetic_voc, "train")[0]
    ann = voc.parse_annotation(voc.annotation_path(synthetic_voc, image_id), ["car", "dog", "person"])
    props = np.array([[0, 0, 9, 19], [5, 5, 30, 40]], np.float32)
    item = ImageBoxes(image_id, ann.width, ann.height, props, np.array([0, 0]), ann.boxes, ann.labels,
                      np.zeros(len(ann.labels), bool))
    example = Example(voc.image_path(synthetic_voc, image_id), item, props, np.arange(len(ann.labels)))
    plain_img, plain_props, plain_t = load_example(example)
    flip_img, flip_props, flip_t = load_example(example, flips)
    expected = plain_img
    for name in flips:
        expected = _mirrored(expected, name)
    torch.testing.assert_close(flip_img, expected)
    if flips == ("horizontal",):
        width = plain_img.shape[-1]
        torch.testing.assert_close(flip_props[0], torch.tensor([width - 10.0, 0, width, 20]))
    # Every box, proposal or object, covers the mirrored pixels of the box it was: same content.
    for plain_boxes, flip_boxes in ((plain_props, flip_props), (plain_t["boxes"], flip_t["boxes"])):
        for box, moved in zip(plain_boxes.int().tolist(), flip_boxes.int().tolist()):
            content = plain_img[:, box[1]:box[3], box[0]:box[2]]
            for name in flips:
                content = _mirrored(content, name)
            torch.testing.assert_close(flip_img[:, moved[1]:moved[3], moved[0]:moved[2]], content)


def test_labelled_boxes_round_trip_and_exclude_difficult_and_ignored(tmp_path: Path):
    items = [ImageBoxes("a", 50, 40, np.array([[0, 0, 9, 9], [1, 1, 20, 20], [2, 2, 5, 5]], np.float32),
                        np.array([1, -1, 0]), np.array([[0, 0, 10, 10], [20, 5, 30, 30]], np.float32),
                        np.array([1, 2]), np.array([False, True])),
             ImageBoxes("b", 30, 30, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                        np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))]
    save_boxes(tmp_path / "boxes.npz", items)
    loaded = load_boxes(tmp_path / "boxes.npz")
    assert [i.image_id for i in loaded] == ["a", "b"]
    for got, want in zip(loaded, items):
        for field in ("proposals", "labels", "gt_boxes", "gt_labels", "gt_difficult"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    proposals, gt_index = loaded[0].training_targets(difficult_as_foreground=False)
    np.testing.assert_array_equal(proposals, items[0].proposals[[0, 2]])
    assert gt_index.tolist() == [0]
    assert loaded[0].training_targets(difficult_as_foreground=True)[1].tolist() == [0, 1]
    # Fast R-CNN's background floor: only near misses (IoU >= 0.1 with an object) stay background.
    near_miss = ImageBoxes("c", 60, 60, np.array([[0, 0, 9, 9], [8, 8, 17, 17], [40, 40, 59, 59]], np.float32),
                           np.array([1, 0, 0]), np.array([[0, 0, 9, 9]], np.float32), np.array([1]),
                           np.array([False]))
    kept, _ = near_miss.training_targets(False, bg_iou_low=0.01)
    np.testing.assert_array_equal(kept, near_miss.proposals[:2])
    np.testing.assert_array_equal(near_miss.training_targets(False)[0], near_miss.proposals)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RcnnError, match="not a valid labelled-boxes file"):
        load_boxes(tmp_path / "bad.npz")


def test_checkpoint_round_trips_to_the_same_detections(tmp_path: Path, synthetic_voc: Path):
    model = tiny_model().eval()
    params = Params(classes=["car", "dog", "person"])
    save_roi_detector(tmp_path / "m.pt", model, params, {"best_epoch": 3})
    first = (tmp_path / "m.pt").read_bytes()
    save_roi_detector(tmp_path / "m.pt", model, params, {"best_epoch": 3})
    assert (tmp_path / "m.pt").read_bytes() == first  # same bytes: DVC can reuse what follows
    detector = load_detector(tmp_path / "m.pt", "cpu", score_threshold=0.0, max_detections=10)
    assert isinstance(detector, FastRCNNDetector) and detector.meta["arch"] == "fast_rcnn"
    assert detector.classes == ["car", "dog", "person"] and detector.meta["best_epoch"] == 3
    image = voc.read_image(voc.image_path(synthetic_voc, voc.read_split(synthetic_voc, "train")[0]))
    proposals = np.array([[0, 0, 40, 40], [10, 10, 60, 50], [30, 5, 90, 70]], np.float32)
    again = FastRCNNDetector(model, {"classes": detector.classes}, torch.device("cpu"), 0.0, 0.3, 10)
    a, b = detector.detect(image, proposals), again.detect(image, proposals)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    assert len(a) > 0 and (a.boxes[:, 2] <= image.shape[1] - 1).all()


def test_tampered_fast_rcnn_checkpoint_is_one_clear_error(tmp_path: Path):
    model = tiny_model()
    save_roi_detector(tmp_path / "m.pt", model, Params(classes=["car", "dog", "person"]), {})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["meta"]["config"]["hidden"] = 99
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(RcnnError, match="does not match its own description"):
        load_detector(tmp_path / "bad.pt", "cpu")


def test_factory_knows_each_arch_and_rejects_others():
    assert family("rcnn").region_format == "crops" and family("rcnn").features_stage.startswith("rcnn.families.rcnn.")
    assert family("fast_rcnn").region_format == "boxes" and family("fast_rcnn").features_stage.startswith(
        "rcnn.pipeline.feature_cache:")
    with pytest.raises(RcnnError, match="model.arch = 'yolo' is unknown"):
        family("yolo")


def _params(source: Path, **model) -> Params:
    raw = {"classes": ["car", "dog", "person"], "data": {"source": str(source)},
           "proposals": {"max_proposals": 200, "max_side": 192, "n_jobs": 1},
           "regions": {"fg_iou": 0.5, "bg_iou": 0.5},
           "model": {"arch": "fast_rcnn", "backbone": "resnet18", "weights": "none", "trainable_layers": 1,
                     "image_size": 128, "max_size": 192, "roi_channels": 16, "roi_size": 5, "hidden": 64,
                     "dropout": 0.0, **model},
           "train": {"optimizer": "sgd", "lr": 0.02, "schedule": "cosine", "warmup_epochs": 1, "epochs": 3,
                     "patience": 3, "device": "cpu", "rois_per_image": 64, "allow_collapse": True},  # plumbing
           "evaluate": {"max_proposals": 200}}
    return from_dict(raw)


def test_stages_train_and_evaluate_fast_rcnn(tmp_path: Path, synthetic_voc: Path):
    params = _params(synthetic_voc)
    run_proposals_stage(params, synthetic_voc, tmp_path / "proposals", tmp_path / "proposals.json")
    metrics = run_regions_stage(params, synthetic_voc, tmp_path / "proposals", tmp_path / "regions",
                                tmp_path / "regions.json")
    assert metrics["format"] == "boxes" and metrics["foreground"] > 0 and metrics["background"] > 0
    assert (tmp_path / "regions" / "train" / BOXES_FILE).is_file()
    with pytest.raises(RcnnError, match="format 'boxes', not 'crops'"):
        read_index(tmp_path / "regions")
    info = run_features_stage(params, tmp_path / "regions", tmp_path / "features")
    assert info["cached"] is False and "fast_rcnn" in info["reason"]
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["info.json"]
    summary = run_train_stage(params, tmp_path / "features", tmp_path / "regions", tmp_path / "model.pt",
                              tmp_path / "train.json", tmp_path / "live", synthetic_voc)
    assert 1 <= summary["best_epoch"] <= 3 and summary["train_images"] > 0
    assert 0.15 < summary["train_fg_share"] < 0.35  # requested 0.25 of each image's RoIs
    assert (tmp_path / "live" / "plots" / "metrics" / "val" / "map.tsv").is_file()
    result = run_evaluate_stage(params, synthetic_voc, tmp_path / "proposals", tmp_path / "model.pt",
                                tmp_path / "detections", tmp_path / "eval.json", tmp_path / "pr")
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert stored["map"] == pytest.approx(result["map"]) and set(stored["time"]) >= {"cnn", "total"}
    assert (tmp_path / "detections" / "detections.npz").is_file()


def test_small_sets_repeat_their_images_to_reach_min_steps():
    t = TrainParams(images_per_batch=2, epochs=10, min_steps=70)
    assert steps_per_epoch(5, t, 70) == 7 and steps_per_epoch(5, TrainParams(images_per_batch=2), 0) == 3
    batches = training_plan(5, 2, np.random.default_rng(0), 7)
    seen = [item.index for batch in batches for item in batch]
    assert [len(b) for b in batches] == [2] * 7 and sorted(set(seen)) == list(range(5))
    assert all(seen[:5].count(i) == 1 for i in range(5))  # each pass is a permutation
    # When min_steps does not bind, an epoch is one pass, drawn exactly as without it.
    one = [item.index for batch in training_plan(5, 2, np.random.default_rng(0), 3) for item in batch]
    assert one == list(np.random.default_rng(0).permutation(5))


def test_flips_are_drawn_per_image_and_the_default_plan_is_unchanged():
    plan = [item for batch in training_plan(50, 2, np.random.default_rng(0), 60) for item in batch]
    assert {item.flips for item in plan} == {(), ("horizontal",)}
    # The left-right flips are drawn right after the order, as before train.flips existed.
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(50) for _ in range(3)])[:120]
    assert [bool(item.flips) for item in plan] == list(rng.random(len(order)) < 0.5)
    every = [item.flips for batch in training_plan(50, 2, np.random.default_rng(0), 60,
                                                   flips=["diagonal", "vertical", "horizontal"]) for item in batch]
    assert set(every) == {(), ("horizontal",), ("vertical",), ("diagonal",), ("horizontal", "vertical"),
                          ("horizontal", "diagonal"), ("vertical", "diagonal"), ("horizontal", "vertical", "diagonal")}
    assert [("horizontal" in f) for f in every] == [bool(item.flips) for item in plan]  # the same first draw
    assert all(item.flips == () for batch in training_plan(50, 2, np.random.default_rng(0), 60, flips=[])
               for item in batch)


def test_val_start_leaves_training_unchanged_and_scores_only_the_later_epochs(tmp_path: Path, synthetic_voc: Path):
    params = _params(synthetic_voc)
    run_proposals_stage(params, synthetic_voc, tmp_path / "proposals", tmp_path / "proposals.json")
    run_regions_stage(params, synthetic_voc, tmp_path / "proposals", tmp_path / "regions", tmp_path / "regions.json")
    late = from_dict({**to_dict(params), "train": {**to_dict(params)["train"], "val_start": 0.5, "patience": 1}})
    runs = {}
    for name, p in (("every", params), ("late", late)):
        runs[name] = run_train_stage(p, tmp_path / "features", tmp_path / "regions", tmp_path / name / "model.pt",
                                     tmp_path / name / "train.json", tmp_path / name / "live", synthetic_voc)
    curves = tmp_path / "{}" / "live" / "plots" / "metrics"
    loss = [(Path(str(curves).format(name)) / "train" / "loss.tsv").read_text() for name in runs]
    assert loss[0] == loss[1]  # validation draws nothing the training draws
    scored = (Path(str(curves).format("late")) / "val" / "map.tsv").read_text().splitlines()[1:]
    assert [row.split("\t")[0] for row in scored] == ["1", "2"]  # epochs 2 and 3 of 3 (dvclive counts from 0)
    assert runs["late"]["best_epoch"] >= 2 and runs["late"]["epochs_run"] == 3
