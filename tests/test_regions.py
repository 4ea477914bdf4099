"""Region labelling, sampling, shard storage and the regions stage."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from rcnn.proposals import selective_search

from rcnn.proposals import labelling

from rcnn.families.rcnn import regions

from rcnn.data import voc
from rcnn.pipeline.params import Params, RegionParams
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import load_pickle, write_pickle

CLASSES = ["car", "dog", "person"]
CAR, DOG = 1, 2


def annotation(difficult=(False, False)) -> voc.Annotation:
    """A car at (10,10)-(29,29) and a dog at (60,60)-(89,89) in a 100x100 image."""
    return voc.Annotation(image_id="hand", width=100, height=100,
                          boxes=np.array([[10, 10, 29, 29], [60, 60, 89, 89]], np.float32),
                          labels=np.array([CAR, DOG]), difficult=np.array(difficult), truncated=np.zeros(2, bool))


def settings(**changes) -> RegionParams:
    return dataclasses.replace(RegionParams(fg_iou=0.7, bg_iou=0.3), **changes)


NEAR_DOG = [61, 61, 89, 89]  # IoU 0.93 with the dog, 0 with the car
HALF_DOG = [60, 60, 89, 74]  # IoU 0.5 with the dog: between bg_iou and fg_iou
FAR = [0, 70, 20, 95]  # overlaps nothing


def test_proposal_over_second_object_takes_its_class_and_box():
    cand = labelling.label_candidates(np.array([NEAR_DOG, FAR, HALF_DOG], np.float32), annotation(), settings())
    np.testing.assert_array_equal(cand.labels, [DOG, 0, labelling.IGNORE])
    np.testing.assert_array_equal(cand.gt_boxes[0], [60, 60, 89, 89])
    assert cand.ious[0] == pytest.approx(29 * 29 / 900) and cand.ious[1] == 0
    assert cand.ious[2] == pytest.approx(0.5)


def test_each_proposal_takes_the_class_of_its_best_overlap():
    ann = voc.Annotation(image_id="x", width=100, height=100,
                         boxes=np.array([[0, 0, 49, 49], [0, 0, 59, 49]], np.float32), labels=np.array([CAR, DOG]),
                         difficult=np.zeros(2, bool), truncated=np.zeros(2, bool))
    cand = labelling.label_candidates(np.array([[0, 0, 58, 49], [0, 0, 48, 49]], np.float32), ann, settings())
    np.testing.assert_array_equal(cand.labels, [DOG, CAR])


def test_difficult_objects_are_never_background_and_foreground_only_when_allowed():
    props = np.array([NEAR_DOG, HALF_DOG], np.float32)
    strict = labelling.label_candidates(props, annotation(difficult=(False, True)), settings())
    np.testing.assert_array_equal(strict.labels, [labelling.IGNORE, labelling.IGNORE])
    allowed = labelling.label_candidates(props, annotation(difficult=(False, True)),
                                       settings(difficult_as_foreground=True))
    np.testing.assert_array_equal(allowed.labels, [DOG, labelling.IGNORE])


def test_add_ground_truth_adds_the_boxes_as_foreground():
    cand = labelling.label_candidates(np.array([FAR], np.float32), annotation(), settings(add_ground_truth=True))
    np.testing.assert_array_equal(cand.boxes[1:], annotation().boxes)
    np.testing.assert_array_equal(cand.labels, [0, CAR, DOG])
    np.testing.assert_allclose(cand.ious[1:], [1.0, 1.0])
    without = labelling.label_candidates(np.array([FAR], np.float32), annotation(), settings())
    assert len(without.labels) == 1
    difficult = labelling.label_candidates(np.array([FAR], np.float32), annotation(difficult=(False, True)),
                                         settings(add_ground_truth=True))
    np.testing.assert_array_equal(difficult.labels, [0, CAR, labelling.IGNORE])


def test_image_without_objects_is_all_background():
    empty = voc.Annotation("e", 100, 100, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool),
                           np.zeros(0, bool))
    cand = labelling.label_candidates(np.array([FAR, NEAR_DOG], np.float32), empty, settings(add_ground_truth=True))
    np.testing.assert_array_equal(cand.labels, [0, 0])
    assert not cand.gt_boxes.any() and not cand.ious.any()


def test_sample_respects_cap_and_foreground_fraction():
    labels = np.array([1] * 40 + [0] * 100 + [-1] * 30)
    keep = regions.sample_regions(labels, max_boxes=20, fg_fraction=0.25, rng=regions.image_rng(0, "a"))
    assert len(keep) == 20 and (labels[keep] > 0).sum() == 5 and (labels[keep] == 0).sum() == 15
    assert len(np.unique(keep)) == 20 and np.all(np.diff(keep) > 0)
    few_bg = np.array([2] * 40 + [0] * 3)
    keep = regions.sample_regions(few_bg, max_boxes=20, fg_fraction=0.5, rng=regions.image_rng(0, "a"))
    assert (few_bg[keep] > 0).sum() == 10 and (few_bg[keep] == 0).sum() == 3
    assert len(regions.sample_regions(np.array([-1, -1]), 5, 0.5, regions.image_rng(0, "a"))) == 0


def test_same_seed_same_sample_other_seed_or_image_other_sample():
    labels = np.array([1] * 60 + [0] * 300)
    draw = lambda seed, image_id: regions.sample_regions(labels, 50, 0.5, regions.image_rng(seed, image_id))
    np.testing.assert_array_equal(draw(0, "000005"), draw(0, "000005"))
    assert not np.array_equal(draw(0, "000005"), draw(1, "000005"))
    assert not np.array_equal(draw(0, "000005"), draw(0, "000006"))


def test_crops_survive_encoding_nearly_unchanged():
    yy, xx = np.mgrid[0:64, 0:64]
    crops = np.stack([np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)] * 3)
    data, offsets = regions.encode_crops(crops)
    assert data.dtype == np.uint8 and len(offsets) == 4 and offsets[-1] == len(data)
    decoded = regions.decode_crops(data, offsets, 64)
    assert decoded.shape == crops.shape and np.abs(decoded.astype(int) - crops).mean() < 2


class _RunsShell:
    def __reduce__(self):
        return os.system, ("echo owned > owned.txt",)


def test_restricted_unpickler_refuses_code_and_loads_a_valid_shard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"crop_data": _RunsShell()}))
    with pytest.raises(RcnnError, match="evil.pkl"):
        load_pickle(evil)
    assert not (tmp_path / "owned.txt").exists()
    data, offsets = regions.encode_crops(np.zeros((2, 32, 32, 3), np.uint8))
    shard = {"crop_data": data, "crop_offsets": offsets, "labels": np.array([0, 2]), "image_ids": np.array(["a", "b"]),
             "boxes": np.zeros((2, 4), np.float32), "gt_boxes": np.zeros((2, 4), np.float32),
             "ious": np.zeros(2, np.float32)}
    write_pickle(tmp_path / "shard.pkl", shard)
    loaded = load_pickle(tmp_path / "shard.pkl")
    assert loaded.keys() == shard.keys()
    np.testing.assert_array_equal(loaded["image_ids"], ["a", "b"])
    np.testing.assert_array_equal(loaded["crop_data"], data)


@pytest.fixture(scope="module")
def stage_inputs(synthetic_voc, tmp_path_factory) -> tuple[Params, Path]:
    """Params with cheap settings and the proposals of the synthetic train and val splits."""
    p = Params(classes=CLASSES)
    p = dataclasses.replace(p, proposals=dataclasses.replace(p.proposals, max_side=128, max_proposals=300, n_jobs=1),
                            regions=dataclasses.replace(p.regions, crop_size=48, max_boxes=12, shard_size=50,
                                                        fg_iou=0.6, bg_iou=0.3, add_ground_truth=True),
                            evaluate=dataclasses.replace(p.evaluate, split="val", allow_overlap=True))  # no test split needed
    out = tmp_path_factory.mktemp("stage") / "proposals"
    selective_search.run_proposals_stage(p, synthetic_voc, out, out.parent / "proposals.json")
    return p, out


def _read_all(regions_dir: Path, split: str) -> dict:
    shards = list(regions.iter_shards(regions_dir, split))
    return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


def test_stage_writes_shards_index_and_metrics(synthetic_voc, stage_inputs, tmp_path):
    p, props = stage_inputs
    metrics = regions.run_regions_stage(p, synthetic_voc, props, tmp_path / "regions", tmp_path / "m.json", n_jobs=1)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    index = labelling.read_index(tmp_path / "regions")
    assert index["crop_size"] == 48 and index["context"] == 0 and index["classes"] == CLASSES
    assert sorted(index["splits"]) == ["train", "val"]
    for split in ("train", "val"):
        entry, shards = index["splits"][split], list(regions.iter_shards(tmp_path / "regions", split))
        assert len(shards) == len(entry["shards"]) == -(-entry["regions"] // 50)
        assert all(len(s["labels"]) == 50 for s in shards[:-1]) and 0 < len(shards[-1]["labels"]) <= 50
        allr = _read_all(tmp_path / "regions", split)
        assert allr["crops"].shape == (entry["regions"], 48, 48, 3) and allr["crops"].dtype == np.uint8
        assert allr["labels"].dtype == np.int64 and set(np.unique(allr["labels"])) <= {0, 1, 2, 3}
        assert allr["boxes"].dtype == allr["gt_boxes"].dtype == allr["ious"].dtype == np.float32
        fg = allr["labels"] > 0
        assert np.all(allr["ious"][fg] >= 0.6) and np.all(allr["ious"][~fg] < 0.3)
        assert list(allr["image_ids"]) == sorted(allr["image_ids"])
        ids, counts = np.unique(allr["image_ids"], return_counts=True)
        assert counts.max() <= 12
        for image_id in ids:
            assert (allr["labels"][allr["image_ids"] == image_id] > 0).sum() <= 6
        m = metrics["splits"][split]
        assert m["regions"] == entry["regions"] and m["foreground"] + m["background"] == m["regions"]
        assert sum(m["per_class"].values()) == m["foreground"] == int(fg.sum()) > 0
    assert metrics["bytes_per_region"] > 0 and metrics["regions_per_second_read"] > 0
    assert metrics["shards"] == sum(len(e["shards"]) for e in index["splits"].values())


def test_stage_output_does_not_depend_on_n_jobs(synthetic_voc, stage_inputs, tmp_path):
    p, props = stage_inputs
    for n in (1, 2):
        regions.run_regions_stage(p, synthetic_voc, props, tmp_path / f"r{n}", tmp_path / f"m{n}.json", n_jobs=n)
    one, two = _read_all(tmp_path / "r1", "val"), _read_all(tmp_path / "r2", "val")
    for key in one:
        np.testing.assert_array_equal(one[key], two[key])


def test_image_without_proposals_is_skipped_with_a_warning(synthetic_voc, stage_inputs, tmp_path):
    p, props = stage_inputs
    val = selective_search.load_proposals(selective_search.proposal_file(props, "val", "fast"))
    dropped = sorted(val)[0]
    partial = tmp_path / "props"
    partial.mkdir()
    np.savez_compressed(selective_search.proposal_file(partial, "val", "fast"), **{k: v for k, v in val.items() if k != dropped})
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, train_split="val"))
    with pytest.warns(RuntimeWarning, match=f"skipping image {dropped}"):
        metrics = regions.run_regions_stage(p, synthetic_voc, partial, tmp_path / "r", tmp_path / "m.json", n_jobs=1)
    assert metrics["splits"]["val"]["skipped_ids"] == [dropped]
    assert dropped not in set(_read_all(tmp_path / "r", "val")["image_ids"])


def test_missing_inputs_are_clear_errors(synthetic_voc, stage_inputs, tmp_path):
    p, _ = stage_inputs
    with pytest.raises(RcnnError, match="run the proposals stage"):
        regions.run_regions_stage(p, synthetic_voc, tmp_path / "none", tmp_path / "r", tmp_path / "m.json", n_jobs=1)
    assert not (tmp_path / "r").exists()
    with pytest.raises(RcnnError, match="run the regions stage"):
        labelling.read_index(tmp_path / "r")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "index.json").write_text(json.dumps({"crop_size": 8, "splits": {"train": {"shards": []}}}))
    with pytest.raises(RcnnError, match="'val' has no regions"):
        next(regions.iter_shards(tmp_path / "r", "val"))
