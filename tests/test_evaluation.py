"""VOC AP evaluation, VOC results files, detections.npz and PR-curve files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rcnn.utils.errors import RcnnError
from rcnn.evaluation.voc_eval import (
    Detections, average_precision, downsample_curve, evaluate_detections, load_detections,
    read_voc_results, results_file, save_detections, write_pr_curves, write_voc_results,
)
from rcnn.data.voc import Annotation

CLASSES = ["car", "dog"]


def ann(image_id, boxes, labels, difficult=None, size=(100, 100)):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return Annotation(image_id, size[0], size[1], boxes, np.asarray(labels, np.int64), difficult,
                      np.zeros(len(boxes), bool))


def dets(boxes, scores, labels):
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(labels, np.int64))


A, B = [10, 10, 29, 29], [60, 60, 89, 89]
C, D = [10, 10, 49, 49], [60, 10, 89, 39]
ANNS = [ann("img1", [A, B], [1, 1]), ann("img2", [C, D], [1, 1], difficult=[False, True])]


def test_perfect_detections_score_one_under_both_metrics():
    res = evaluate_detections({"img1": dets([A, B], [0.9, 0.8], [1, 1]), "img2": dets([C], [0.7], [1])},
                              ANNS, CLASSES)
    car = res.per_class[0]
    assert car.ap == pytest.approx(1.0) and car.ap07 == pytest.approx(1.0)
    assert res.map == pytest.approx(1.0) and res.map07 == pytest.approx(1.0)
    assert car.num_gt == 3  # the difficult object does not count


def test_hand_computed_example():
    # Ranked detections of "car" (3 non-difficult objects A, B, C; D is difficult):
    #   0.90 on A -> TP | 0.85 on C -> TP | 0.80 on A again -> FP (duplicate)
    #   0.70 on D -> ignored (difficult) | 0.60 on empty ground -> FP
    # cum TP 1,2,2,2 ; cum FP 0,0,1,2 -> precision 1, 1, 2/3, 1/2 ; recall 1/3, 2/3, 2/3, 2/3
    # all-point: envelope is 1 up to recall 2/3, 0 after -> AP = 2/3 * 1 = 0.666...
    # 11-point: t = 0.0 .. 0.6 (7 thresholds) reach recall 2/3 with max precision 1; t >= 0.7 -> 0
    #           AP = 7 / 11 = 0.6363...
    d = {"img1": dets([A, A, [40, 70, 50, 80]], [0.9, 0.8, 0.6], [1, 1, 1]),
         "img2": dets([C, D], [0.85, 0.7], [1, 1])}
    car = evaluate_detections(d, ANNS, CLASSES).per_class[0]
    assert car.ap == pytest.approx(2 / 3)
    assert car.ap07 == pytest.approx(7 / 11)
    np.testing.assert_allclose(car.precision, [1, 1, 2 / 3, 1 / 2])
    np.testing.assert_allclose(car.recall, [1 / 3, 2 / 3, 2 / 3, 2 / 3])


def test_duplicate_detection_is_false_positive():
    anns = [ann("i", [A, B], [1, 1])]
    # A 0.9 TP, A again 0.8 FP, B 0.7 TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # all-point AP = 0.5 * 1 + 0.5 * 2/3
    car = evaluate_detections({"i": dets([A, A, B], [0.9, 0.8, 0.7], [1, 1, 1])}, anns, CLASSES).per_class[0]
    np.testing.assert_allclose(car.precision, [1, 0.5, 2 / 3])
    assert car.ap == pytest.approx(0.5 + 1 / 3)


def test_detection_on_difficult_object_changes_nothing():
    base = {"img1": dets([A, [40, 70, 50, 80]], [0.9, 0.5], [1, 1]), "img2": dets([C], [0.6], [1])}
    extra = dict(base, img2=dets([D, C], [0.95, 0.6], [1, 1]))
    r1, r2 = evaluate_detections(base, ANNS, CLASSES), evaluate_detections(extra, ANNS, CLASSES)
    assert r1.per_class[0].ap == pytest.approx(r2.per_class[0].ap)
    assert r1.per_class[0].ap07 == pytest.approx(r2.per_class[0].ap07)
    np.testing.assert_allclose(r1.per_class[0].precision, r2.per_class[0].precision)


def test_wrong_class_or_low_overlap_is_false_positive_and_iou_half_counts():
    anns = [ann("i", [[0, 0, 9, 9]], [1])]
    # [0,0,9,19] vs [0,0,9,9]: IoU = 100 / 200 = 0.5 exactly -> a hit (devkit uses >=)
    hit = evaluate_detections({"i": dets([[0, 0, 9, 19]], [0.9], [1])}, anns, CLASSES).per_class[0]
    assert hit.ap == pytest.approx(1.0)
    miss = evaluate_detections({"i": dets([[0, 0, 9, 20]], [0.9], [1])}, anns, CLASSES).per_class[0]
    assert miss.ap == 0.0
    wrong = evaluate_detections({"i": dets([[0, 0, 9, 9]], [0.9], [2])}, anns, CLASSES)
    assert wrong.per_class[0].ap == 0.0 and wrong.per_class[1].num_detections == 1


def test_class_without_detections_has_ap_zero_and_class_without_gt_is_not_averaged():
    anns = [ann("i", [A, B], [1, 1])]
    res = evaluate_detections({}, anns, CLASSES)
    assert res.per_class[0].ap == 0.0 and res.per_class[0].ap07 == 0.0
    assert math.isnan(res.per_class[1].ap)  # "dog" has no ground truth
    assert res.map == 0.0
    summary = res.to_dict()
    assert summary["classes_without_ground_truth"] == ["dog"] and "dog" not in summary["ap"]


def test_detections_for_unknown_image_are_rejected():
    with pytest.raises(RcnnError, match="img9"):
        evaluate_detections({"img9": dets([A], [0.5], [1])}, ANNS, CLASSES)


def _reference_ap(detections, annotations, cls, use_07):
    """Straightforward transcription of the devkit loop (one detection at a time)."""
    gts = {a.image_id: (a.boxes[a.labels == cls], a.difficult[a.labels == cls],
                        np.zeros((a.labels == cls).sum(), bool)) for a in annotations}
    npos = sum(int((~g[1]).sum()) for g in gts.values())
    flat = [(float(s), i, b) for i, d in sorted(detections.items())
            for b, s, l in zip(d.boxes, d.scores, d.labels) if l == cls]
    flat.sort(key=lambda t: -t[0])
    tp, fp = [], []
    for _, image_id, b in flat:
        boxes, difficult, taken = gts[image_id]
        best, jmax = -np.inf, -1
        for j, g in enumerate(boxes):
            iw = min(b[2], g[2]) - max(b[0], g[0]) + 1
            ih = min(b[3], g[3]) - max(b[1], g[1]) + 1
            if iw > 0 and ih > 0:
                inter = iw * ih
                union = (b[2] - b[0] + 1) * (b[3] - b[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - inter
                if inter / union > best:
                    best, jmax = inter / union, j
        if best >= 0.5:
            if difficult[jmax]:
                continue
            if not taken[jmax]:
                taken[jmax] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        return sum((prec[rec >= t].max() if (rec >= t).any() else 0.0) for t in np.arange(0, 1.1, 0.1)) / 11
    mrec, mpre = np.concatenate(([0.0], rec, [1.0])), np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _random_case(seed, n_images=12):
    rng = np.random.default_rng(seed)
    anns, detections = [], {}
    for k in range(n_images):
        n_gt = int(rng.integers(0, 5))
        xy = rng.uniform(0, 60, (n_gt, 2))
        gt = np.concatenate([xy, xy + rng.uniform(10, 40, (n_gt, 2))], axis=1).round()
        labels = rng.integers(1, 3, n_gt)
        anns.append(ann(f"{k:03d}", gt, labels, difficult=rng.random(n_gt) < 0.2))
        n_det = int(rng.integers(0, 8))
        # Detections are jittered copies of ground truth or random boxes.
        src = gt[rng.integers(0, n_gt, n_det)] if n_gt else np.zeros((n_det, 4))
        jitter = rng.normal(0, 4, (n_det, 4)) * (rng.random((n_det, 1)) < 0.8)
        boxes = np.where(rng.random((n_det, 1)) < 0.85, src + jitter, rng.uniform(0, 80, (n_det, 4)))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = rng.random(n_det)
        order = np.argsort(-scores)
        lab = np.where(rng.random(n_det) < 0.9, labels[rng.integers(0, n_gt, n_det)] if n_gt else 1,
                       rng.integers(1, 3, n_det))
        detections[f"{k:03d}"] = dets(boxes[order], scores[order], lab[order])
    return anns, detections


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_straightforward_reference(seed):
    anns, detections = _random_case(seed)
    res = evaluate_detections(detections, anns, CLASSES)
    for c, r in enumerate(res.per_class, start=1):
        assert r.ap == pytest.approx(_reference_ap(detections, anns, c, False), abs=1e-9)
        assert r.ap07 == pytest.approx(_reference_ap(detections, anns, c, True), abs=1e-9)
    assert 0 < res.map < 1


def test_average_precision_edge_cases():
    assert average_precision(np.array([]), np.array([])) == 0.0
    assert average_precision(np.array([]), np.array([]), use_07_metric=True) == 0.0
    assert average_precision(np.array([0.5, 1.0]), np.array([1.0, 1.0]), True) == pytest.approx(1.0)


def test_results_files_round_trip(tmp_path):
    anns, detections = _random_case(5)
    detections["000"] = dets([[0.25, 1.5, 20.75, 30.125]], [0.123456789], [2])
    paths = write_voc_results(tmp_path, "val", CLASSES, detections)
    assert [p.name for p in paths] == ["comp4_det_val_car.txt", "comp4_det_val_dog.txt"]
    lines = results_file(tmp_path, "val", "dog").read_text().splitlines()
    mine = [line.split() for line in lines if line.startswith("000 ")]
    # 1-based coordinates on disk.
    assert len(mine) == 1 and [float(v) for v in mine[0][2:]] == pytest.approx([1.25, 2.5, 21.75, 31.125])
    back = read_voc_results(tmp_path, "val", CLASSES)
    for image_id, d in detections.items():
        if len(d) == 0:
            assert image_id not in back
            continue
        got = back[image_id]
        order = np.argsort(-d.scores, kind="stable")
        np.testing.assert_array_equal(got.scores, d.scores[order])
        np.testing.assert_allclose(got.boxes, d.boxes[order], atol=1e-4)  # float32 (x + 1) - 1
        np.testing.assert_array_equal(got.labels, d.labels[order])
    a, b = evaluate_detections(detections, anns, CLASSES), evaluate_detections(back, anns, CLASSES)
    assert [c.ap for c in a.per_class] == pytest.approx([c.ap for c in b.per_class], abs=1e-12)
    assert [c.ap07 for c in a.per_class] == pytest.approx([c.ap07 for c in b.per_class], abs=1e-12)


def test_results_file_with_no_detections_is_empty_and_bad_lines_are_reported(tmp_path):
    write_voc_results(tmp_path, "test", CLASSES, {"a": dets([A], [0.5], [1])})
    assert results_file(tmp_path, "test", "dog").read_text() == ""
    results_file(tmp_path, "test", "dog").write_text("a 0.5 1 2 3\n")
    with pytest.raises(RcnnError, match=r"comp4_det_test_dog.txt:1"):
        read_voc_results(tmp_path, "test", CLASSES)
    with pytest.raises(RcnnError, match="not found"):
        read_voc_results(tmp_path, "val", CLASSES)


def test_detections_npz_round_trip(tmp_path):
    _, detections = _random_case(7)
    detections["999"] = Detections.empty()
    path = tmp_path / "d" / "detections.npz"
    save_detections(path, "val", CLASSES, detections)
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) >= {"image_ids", "offsets", "boxes", "scores", "labels", "classes"}
    loaded = load_detections(path)
    assert loaded.split == "val" and loaded.classes == CLASSES
    assert sorted(loaded.detections) == sorted(detections)
    for k, d in detections.items():
        np.testing.assert_array_equal(loaded.detections[k].boxes, d.boxes)
        np.testing.assert_array_equal(loaded.detections[k].labels, d.labels)
    with pytest.raises(RcnnError, match="not found"):
        load_detections(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(RcnnError, match="not a valid detections file"):
        load_detections(tmp_path / "bad.npz")


def test_pr_curves_are_downsampled_dvc_rows(tmp_path):
    r, p = downsample_curve(np.linspace(0, 1, 1000), np.linspace(1, 0, 1000), 200)
    assert len(r) == 200 and r[0] == 0 and r[-1] == 1
    anns, detections = _random_case(0)
    res = evaluate_detections(detections, anns, CLASSES)
    paths = write_pr_curves(tmp_path, res)
    assert sorted(p.name for p in paths) == ["car.json", "dog.json"]
    rows = json.loads(paths[0].read_text())
    assert rows and set(rows[0]) == {"recall", "precision"}
    assert len(rows) == len(res.per_class[0].recall)
