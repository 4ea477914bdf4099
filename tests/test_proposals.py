"""Selective-search proposals: filtering, scaling, recall, determinism across n_jobs, corrupt images."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import pytest

from rcnn.proposals import selective_search

from rcnn.data import voc
from rcnn.pipeline.params import Params
from rcnn.utils.errors import RcnnError

CLASSES = ["car", "dog", "person"]


def small_params(**proposal_changes) -> Params:
    """Cheap settings: small search image, few proposals, one process unless told otherwise."""
    p = Params(classes=CLASSES)
    changes = {"max_side": 128, "max_proposals": 300, "n_jobs": 1, **proposal_changes}
    return dataclasses.replace(p, proposals=dataclasses.replace(p.proposals, **changes))


def test_filter_boxes_drops_small_and_repeated_boxes_keeping_rank_order():
    boxes = np.array([[5, 5, 24, 24], [0, 0, 5, 40], [0, 0, 40, 8], [5, 5, 24, 24], [1, 1, 30, 30],
                      [2, 2, 50, 50]], dtype=np.float32)
    kept = selective_search.filter_boxes(boxes, min_size=10, max_proposals=10)
    np.testing.assert_array_equal(kept, [[5, 5, 24, 24], [1, 1, 30, 30], [2, 2, 50, 50]])
    np.testing.assert_array_equal(selective_search.filter_boxes(boxes, 10, 2), [[5, 5, 24, 24], [1, 1, 30, 30]])
    # A box exactly min_size pixels wide (inclusive corners) stays.
    assert len(selective_search.filter_boxes(np.array([[0, 0, 9, 9]]), 10, 5)) == 1


def test_recall_is_one_when_ground_truth_boxes_are_proposed():
    gt = [np.array([[10, 10, 50, 60], [70, 5, 90, 40]], np.float32), np.zeros((0, 4), np.float32)]
    props = [np.concatenate([[[0, 0, 5, 5]], gt[0]]).astype(np.float32), np.array([[0, 0, 9, 9]], np.float32)]
    assert selective_search.proposal_recall(props, gt) == {"gt_boxes": 2, "recall_iou50": 1.0, "recall_iou70": 1.0}


def test_recall_counts_boxes_below_the_threshold_as_missed():
    gt = [np.array([[0, 0, 99, 99], [200, 200, 299, 299]], np.float32)]
    # IoU with the first box is 0.6: found at 0.5, missed at 0.7; the second box has no proposal near it.
    props = [np.array([[0, 0, 99, 59]], np.float32)]
    assert selective_search.proposal_recall(props, gt) == {"gt_boxes": 2, "recall_iou50": 0.5, "recall_iou70": 0.0}
    assert selective_search.proposal_recall([np.zeros((0, 4))], [np.zeros((0, 4))])["recall_iou50"] is None


def test_max_side_maps_boxes_back_to_original_coordinates():
    rng = np.random.default_rng(0)
    image = np.full((200, 400, 3), 40, np.uint8)
    image[30:170, 50:180] = (30, 200, 30)
    image[60:140, 250:380] = (200, 30, 30)
    image = (image + rng.integers(0, 20, image.shape)).astype(np.uint8)
    boxes = selective_search.selective_search(image, "fast", max_proposals=500, max_side=100, min_size=4)
    assert boxes.dtype == np.float32 and len(boxes) > 0
    assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
    assert boxes[:, 2].max() <= 399 and boxes[:, 3].max() <= 199
    # The search ran at 100x50; the whole-image region must come back at full size.
    assert boxes[:, 2].max() == 399 and boxes[:, 3].max() == 199
    assert np.all(boxes[:, 2] - boxes[:, 0] + 1 >= 4) and np.all(boxes[:, 3] - boxes[:, 1] + 1 >= 4)
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_a_small_image_segments_finer_below_the_reference_size_and_is_unchanged_without_one(synthetic_voc):
    # Felzenszwalb's k counts pixels: OpenCV's 150 above the reference, proportionally less below it
    assert [selective_search.segmentation_k(n, 67_500) for n in (40_000, 67_500, 200_000)] == [89, 150, 150]
    assert selective_search.segmentation_k(40_000, 0) == 150 and selective_search.segmentation_k(1, 10**8) == 1
    ids = voc.read_split(synthetic_voc, "train")[:2]  # the synthetic photos are 128-160 px: below 300x225
    runs = [selective_search.compute_proposals(synthetic_voc, ids, "fast", 2000, None, n_jobs=1, reference_pixels=r)
            for r in (0, 67_500)]
    assert all(len(runs[1].boxes[i]) > len(runs[0].boxes[i]) for i in ids)
    # 0, or a reference the image reaches, keeps OpenCV's own search to the byte
    image = voc.read_image(voc.image_path(synthetic_voc, ids[0]))
    np.testing.assert_array_equal(selective_search.selective_search(
        image, "fast", 2000, None, seed=selective_search.image_seed(ids[0]),
        reference_pixels=image.shape[0] * image.shape[1]), runs[0].boxes[ids[0]])


def test_ranking_does_not_depend_on_previously_processed_images(synthetic_voc):
    first, second = (voc.read_image(voc.image_path(synthetic_voc, i)) for i in voc.read_split(synthetic_voc, "val")[:2])
    before = selective_search.selective_search(first, max_side=128, seed=7)
    selective_search.selective_search(second, max_side=128, seed=3)
    np.testing.assert_array_equal(selective_search.selective_search(first, max_side=128, seed=7), before)


def test_results_identical_for_one_and_two_jobs(synthetic_voc):
    ids = voc.read_split(synthetic_voc, "train")[:6]
    runs = [selective_search.compute_proposals(synthetic_voc, ids, max_proposals=300, max_side=128, n_jobs=n)
            for n in (1, 2)]
    assert sorted(runs[0].boxes) == ids
    for image_id in ids:
        np.testing.assert_array_equal(runs[0].boxes[image_id], runs[1].boxes[image_id])


def test_stage_writes_one_file_per_split_and_mode_with_metrics(synthetic_voc, tmp_path):
    p = small_params(eval_mode="fast")
    metrics = selective_search.run_proposals_stage(p, synthetic_voc, tmp_path / "proposals", tmp_path / "m.json")
    assert sorted(f.name for f in (tmp_path / "proposals").iterdir()) == ["test-fast.npz", "train-fast.npz",
                                                                          "val-fast.npz"]
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    assert sorted(metrics["files"]) == ["test-fast", "train-fast", "val-fast"]
    assert metrics["images"] == sum(len(voc.read_split(synthetic_voc, s)) for s in ("train", "val", "test"))
    assert metrics["skipped_images"] == 0 and metrics["n_jobs"] == 1
    # the settings that shaped the boxes, beside their recall
    assert (metrics["max_side"], metrics["max_proposals"], metrics["reference_pixels"]) == (128, 300, 0)
    assert 0.5 <= metrics["recall_iou50"] <= 1.0 and metrics["recall_iou70"] <= metrics["recall_iou50"]
    assert metrics["images_per_second"] > 0
    loaded = selective_search.load_proposals(selective_search.proposal_file(tmp_path / "proposals", "val", "fast"))
    assert sorted(loaded) == voc.read_split(synthetic_voc, "val")
    for image_id, boxes in loaded.items():
        ann = voc.parse_annotation(voc.annotation_path(synthetic_voc, image_id), CLASSES)
        assert boxes.dtype == np.float32 and 0 < len(boxes) <= 300
        assert boxes[:, 2].max() <= ann.width - 1 and boxes[:, 3].max() <= ann.height - 1


def test_corrupt_image_is_skipped_warned_and_counted(synthetic_voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(synthetic_voc, root)
    ids = voc.read_split(root, "val")
    voc.image_path(root, ids[1]).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    p = small_params()
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, train_split="val"),  # one split: val only
                            evaluate=dataclasses.replace(p.evaluate, split="val", allow_overlap=True))
    with pytest.warns(RuntimeWarning, match=f"skipping image {ids[1]}"):
        metrics = selective_search.run_proposals_stage(p, root, tmp_path / "out", tmp_path / "m.json")
    assert metrics["skipped_images"] == 1 and metrics["skipped_ids"] == [f"val/{ids[1]}"]
    assert metrics["images"] == len(ids) - 1
    loaded = selective_search.load_proposals(selective_search.proposal_file(tmp_path / "out", "val", "fast"))
    assert sorted(loaded) == [i for i in ids if i != ids[1]]


def test_proposal_jobs_computes_each_split_and_mode_once():
    p = Params(classes=CLASSES)
    p = dataclasses.replace(p, evaluate=dataclasses.replace(p.evaluate, split="test"),
                            proposals=dataclasses.replace(p.proposals, mode="fast", eval_mode="quality"))
    assert selective_search.proposal_jobs(p) == [("train", "fast"), ("val", "fast"), ("test", "quality")]
    p = dataclasses.replace(p, evaluate=dataclasses.replace(p.evaluate, split="val"),
                            proposals=dataclasses.replace(p.proposals, eval_mode="fast"))
    assert selective_search.proposal_jobs(p) == [("train", "fast"), ("val", "fast")]


def test_missing_or_corrupt_proposals_file_is_a_clear_error(tmp_path):
    with pytest.raises(RcnnError, match="run the proposals stage"):
        selective_search.load_proposals(tmp_path / "train-fast.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(RcnnError, match="bad.npz"):
        selective_search.load_proposals(tmp_path / "bad.npz")


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_missing_parallel_backend_package_is_a_clear_error():
    with pytest.raises(RcnnError, match="proposals.backend = 'ray' needs ray"):
        with selective_search.parallel_backend("ray", 2):
            pass


def test_unknown_split_is_a_clear_error(synthetic_voc, tmp_path):
    p = small_params()
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, train_split="trainval"))
    root = tmp_path / "voc"
    shutil.copytree(synthetic_voc, root)
    (root / "ImageSets" / "Main" / "trainval.txt").unlink()
    with pytest.raises(RcnnError, match="trainval"):
        selective_search.run_proposals_stage(p, root, tmp_path / "out", tmp_path / "m.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def _stage_bytes(params: Params, voc_dir, out) -> dict[str, bytes]:
    selective_search.run_proposals_stage(params, voc_dir, out, out.parent / f"{out.name}.json")
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_a_dask_cluster_gives_byte_identical_proposals_to_loky(synthetic_voc, tmp_path):
    from dask.distributed import LocalCluster  # the [dask] extra, installed by requirements.txt

    p = small_params(n_jobs=2, max_proposals=100, max_side=96)
    reference = _stage_bytes(p, synthetic_voc, tmp_path / "loky")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        on_cluster = small_params(n_jobs=2, max_proposals=100, max_side=96, backend="dask",
                                  scheduler=cluster.scheduler_address)
        assert _stage_bytes(on_cluster, synthetic_voc, tmp_path / "cluster") == reference
    # scheduler null: the stage starts (and stops) a local cluster of n_jobs workers itself.
    own = small_params(n_jobs=2, max_proposals=100, max_side=96, backend="dask")
    assert _stage_bytes(own, synthetic_voc, tmp_path / "own") == reference


def test_an_unreachable_dask_scheduler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(selective_search, "DASK_CONNECT_SECONDS", 1)
    with pytest.raises(RcnnError, match="cannot reach the dask scheduler"):
        with selective_search.parallel_backend("dask", 2, "tcp://127.0.0.1:9"):
            pass


def test_a_scheduler_without_the_dask_backend_is_an_invalid_param():
    from rcnn.pipeline.params import from_dict

    with pytest.raises(RcnnError, match="proposals.scheduler .* only used with proposals.backend = 'dask'"):
        from_dict({"proposals": {"scheduler": "tcp://127.0.0.1:8786"}})
