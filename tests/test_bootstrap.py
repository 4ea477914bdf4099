"""Bootstrap intervals of mAP: they hold the point estimate, narrow with more images, repeat exactly, cost seconds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rcnn.data.voc import Annotation
from rcnn.evaluation.bootstrap import image_draws, map_intervals, resampled_maps
from rcnn.evaluation.voc_eval import Detections, evaluate_detections

CLASSES = ["car", "dog", "person"]


def _noisy_set(images: int, seed: int = 0) -> tuple[dict[str, Detections], list[Annotation]]:
    """Images with 1-4 objects each and a detector that finds most of them, misplaces some and adds false alarms."""
    rng = np.random.default_rng(seed)
    detections, annotations = {}, []
    for i in range(images):
        n = int(rng.integers(1, 5))
        xy = rng.uniform(0, 300, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(30, 150, (n, 2))], axis=1).astype(np.float32)
        labels = rng.integers(1, len(CLASSES) + 1, n)
        difficult = rng.random(n) < 0.1
        image_id = f"{i:06d}"
        annotations.append(Annotation(image_id, 500, 500, boxes, labels, difficult, np.zeros(n, bool)))
        found = rng.random(n) < 0.8
        shift = rng.normal(0, 12, (n, 4)).astype(np.float32)
        false_xy = rng.uniform(0, 400, (2, 2))
        false = np.concatenate([false_xy, false_xy + 60], axis=1).astype(np.float32)
        det_boxes = np.concatenate([boxes[found] + shift[found], false])
        det_labels = np.concatenate([labels[found], rng.integers(1, len(CLASSES) + 1, 2)])
        scores = np.concatenate([rng.uniform(0.4, 1.0, found.sum()), rng.uniform(0.0, 0.7, 2)]).astype(np.float32)
        order = np.argsort(-scores, kind="stable")
        detections[image_id] = Detections(det_boxes[order], scores[order], det_labels[order].astype(np.int64))
    return detections, annotations


def test_interval_holds_the_point_estimate_and_repeats_exactly():
    detections, annotations = _noisy_set(60)
    result = evaluate_detections(detections, annotations, CLASSES)
    first, second = map_intervals(result), map_intervals(result)
    assert first == second
    for key in ("map07", "map"):
        low, high = first[f"{key}_ci95"]
        assert low < getattr(result, key) < high
        assert high - low > 0.01  # 60 noisy images: the figure is uncertain


def test_a_resample_scores_exactly_what_evaluating_its_images_again_would():
    """The weighted PR curve is exact: a resample drawn by hand and evaluated the slow way, on renamed
    copies of the images, gives the same mAP; drawing every image once gives the point estimate."""
    detections, annotations = _noisy_set(30)
    result = evaluate_detections(detections, annotations, CLASSES)
    resample = np.random.default_rng(5).integers(0, 30, 30)
    copies, copied_anns = {}, []
    for k, i in enumerate(resample):
        ann = annotations[i]
        new_id = f"copy{k:03d}"
        copies[new_id] = detections[ann.image_id]
        copied_anns.append(Annotation(new_id, ann.width, ann.height, ann.boxes, ann.labels, ann.difficult,
                                      ann.truncated))
    slow = evaluate_detections(copies, copied_anns, CLASSES)
    counts = np.stack([np.bincount(resample, minlength=30), np.ones(30, np.int64)])
    maps, maps07 = resampled_maps(result, counts)
    assert (maps[0], maps07[0]) == pytest.approx((slow.map, slow.map07), abs=1e-9)
    assert (maps[1], maps07[1]) == pytest.approx((result.map, result.map07), abs=1e-12)
    draws = image_draws(30, resamples=50, seed=1)
    assert draws.shape == (50, 30) and np.all(draws.sum(axis=1) == 30)


def test_interval_narrows_as_images_are_added():
    widths = []
    for images in (40, 160, 640):
        detections, annotations = _noisy_set(images, seed=1)
        low, high = map_intervals(evaluate_detections(detections, annotations, CLASSES))["map07_ci95"]
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < widths[0] / 2.5  # about 1/sqrt(n): 16x the images, a quarter of the width


def test_interval_ends_are_stable_across_bootstrap_seeds():
    detections, annotations = _noisy_set(200, seed=2)
    result = evaluate_detections(detections, annotations, CLASSES)
    ends = np.array([map_intervals(result, seed=seed)["map07_ci95"] for seed in range(4)])
    assert np.ptp(ends, axis=0).max() < 0.01  # any two seeds within 0.005 of the mean, roughly


def _timed_intervals_of_500_images() -> None:
    """Run in a fresh interpreter by the test below; prints seconds, low, point, high."""
    detections, annotations = _noisy_set(500, seed=3)
    # Pad every image to 40 detections (false alarms), as a detector with max_detections does.
    rng = np.random.default_rng(0)
    padded = {}
    for image_id, det in detections.items():
        extra = 40 - len(det)
        xy = rng.uniform(0, 400, (extra, 2))
        boxes = np.concatenate([det.boxes, np.concatenate([xy, xy + 50], axis=1).astype(np.float32)])
        scores = np.concatenate([det.scores, rng.uniform(0, 0.3, extra).astype(np.float32)])
        labels = np.concatenate([det.labels, rng.integers(1, 4, extra)])
        order = np.argsort(-scores, kind="stable")
        padded[image_id] = Detections(boxes[order], scores[order], labels[order])
    result = evaluate_detections(padded, annotations, CLASSES)
    start = time.perf_counter()
    low, high = map_intervals(result)["map07_ci95"]
    print(time.perf_counter() - start, low, result.map07, high)


def test_five_hundred_images_take_under_five_seconds():
    # A fresh interpreter: torch's worker threads left spinning by earlier tests in this process would be timed too.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_bootstrap; "
            "test_bootstrap._timed_intervals_of_500_images()")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seconds, low, point, high = map(float, done.stdout.split())
    assert seconds < 5.0 and low <= point <= high


def test_a_split_without_objects_has_no_interval_to_give():
    annotations = [Annotation("a", 100, 100, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                              np.zeros(0, bool), np.zeros(0, bool))]
    detections = {"a": Detections(np.array([[1, 1, 20, 20]], np.float32), np.array([0.9], np.float32),
                                  np.array([1]))}
    result = evaluate_detections(detections, annotations, CLASSES)  # no crash on an image set without objects
    intervals = map_intervals(result)
    assert all(np.isnan(v) for v in intervals["map07_ci95"])
