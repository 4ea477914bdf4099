"""PASCAL VOC detection evaluation (AP at IoU 0.5) and the files detections are exchanged in.

Matching follows the official VOC devkit (``VOCevaldet.m``, also py-faster-rcnn's ``voc_eval``):

* only non-difficult ground truth counts towards recall (``npos``);
* detections of a class are taken in descending score order (stable sort, so ties keep the
  order of sorted image ids, then the order within an image);
* each detection is compared with the ground truth of its class in its image; if the best
  overlap (IoU with the ``+1`` convention) is >= the threshold, the detection is ignored when
  that object is difficult, a true positive when the object is still unmatched, and a false
  positive (duplicate) otherwise; below the threshold it is a false positive.

AP is reported under both the VOC2007 11-point metric and the all-point (VOC2010+) area under
the interpolated precision envelope. mAP averages over the classes that have at least one
non-difficult ground-truth object; classes without any are listed separately, not counted as 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rcnn.data.voc import Annotation
from rcnn.utils.boxes import box_iou
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import atomic_path, load_npz, safe_name, write_json


@dataclass(frozen=True)
class Detections:
    """Detections of one image: inclusive 0-based boxes, scores (descending), labels in 1..C."""

    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


@dataclass(frozen=True)
class ClassResult:
    """AP of one class; ``recall``/``precision`` are the raw curve in score order."""

    name: str
    ap: float  # all-point (VOC2010+); nan when the class has no non-difficult ground truth
    ap07: float  # VOC2007 11-point; nan likewise
    num_gt: int  # non-difficult ground-truth objects
    num_detections: int
    recall: np.ndarray
    precision: np.ndarray
    # What image resampling needs (rcnn.evaluation.bootstrap): the image (index in sorted image-id order) and the
    # true-positive flag of each PR point, and the non-difficult objects of this class in each image.
    image_index: np.ndarray
    true_positive: np.ndarray
    gt_per_image: np.ndarray


@dataclass(frozen=True)
class EvalResult:
    per_class: list[ClassResult]
    map: float
    map07: float
    num_images: int

    def to_dict(self) -> dict:
        """JSON-ready summary (classes without ground truth are listed, not scored)."""
        scored = [c for c in self.per_class if c.num_gt > 0]
        return {
            "map": self.map,
            "map07": self.map07,
            "ap": {c.name: c.ap for c in scored},
            "ap07": {c.name: c.ap07 for c in scored},
            "num_gt": {c.name: c.num_gt for c in self.per_class},
            "classes_without_ground_truth": [c.name for c in self.per_class if c.num_gt == 0],
        }


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """AP from a PR curve: VOC2007 11-point interpolation, or the all-point area (VOC2010+)."""
    recall = np.asarray(recall, dtype=np.float64)[None, :]
    precision = np.asarray(precision, dtype=np.float64)[None, :]
    return float(batched_average_precision(recall, precision, use_07_metric)[0])


def batched_average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> np.ndarray:
    """AP of many PR curves at once: ``(B, N)`` recall (non-decreasing along a row) and precision -> ``(B,)``.

    The precision envelope at point k is the best precision at recall >= recall[k]; the all-point
    area sums it over recall steps, the 11-point metric reads it at the first point reaching each
    threshold (zero past the last point), exactly as the devkit's loops do.
    """
    rows, n = recall.shape
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    if use_07_metric:
        padded = np.concatenate([envelope, np.zeros((rows, 1))], axis=1)
        total = np.zeros(rows)
        for threshold in np.linspace(0.0, 1.0, 11):
            first = (recall < threshold).sum(axis=1)  # index of the first point reaching the threshold
            total += padded[np.arange(rows), first]
        return total / 11.0
    steps = np.diff(recall, axis=1, prepend=0.0)
    return (steps * envelope).sum(axis=1)


def pr_curve(true_positive_weight: np.ndarray, false_positive_weight: np.ndarray,
             npos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision ``(B, N)`` of ranked detections counted with weights ``(B, N)`` (1 each for one
    evaluation; how often the detection's image was drawn, for a bootstrap resample) and ``npos`` ``(B,)``."""
    tp_cum = np.cumsum(true_positive_weight, axis=1, dtype=np.float64)
    fp_cum = np.cumsum(false_positive_weight, axis=1, dtype=np.float64)
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    recall = tp_cum / np.maximum(np.asarray(npos, np.float64), 1.0)[:, None]
    return recall, precision


def evaluate_detections(detections: Mapping[str, Detections], annotations: Sequence[Annotation],
                        classes: Sequence[str], iou_threshold: float = 0.5) -> EvalResult:
    """VOC AP of every class over the images of ``annotations`` (missing detections = none)."""
    known = {a.image_id for a in annotations}
    stray = sorted(set(detections) - known)
    if stray:
        raise RcnnError(f"detections for image {stray[0]!r} which is not in the evaluated split "
                        f"({len(stray)} such images)")
    labels, scores, gt_index, det_image = [], [], [], []
    gt_labels, gt_difficult, gt_image = [], [], []
    offset = 0
    ordered = sorted(annotations, key=lambda a: a.image_id)
    for image, ann in enumerate(ordered):
        det = detections.get(ann.image_id, Detections.empty())
        if len(det):
            # Best-overlapping ground truth of the detection's own class (first on ties, like max()).
            iou = np.where(det.labels[:, None] == ann.labels[None, :], box_iou(det.boxes, ann.boxes), -1.0)
            if iou.shape[1]:
                best = iou.argmax(axis=1)
                overlap = iou[np.arange(len(det)), best]
            else:
                best, overlap = np.zeros(len(det), np.int64), np.full(len(det), -1.0)
            gt_index.append(np.where(overlap >= iou_threshold, offset + best, -1))
            labels.append(det.labels)
            scores.append(det.scores)
            det_image.append(np.full(len(det), image, np.int64))
        gt_labels.append(ann.labels)
        gt_difficult.append(ann.difficult)
        gt_image.append(np.full(len(ann.labels), image, np.int64))
        offset += len(ann.labels)

    def joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    labels_all, scores_all = joined(labels, np.int64), joined(scores, np.float32)
    match_all, image_all = joined(gt_index, np.int64), joined(det_image, np.int64)
    gt_labels_all, gt_image_all = joined(gt_labels, np.int64), joined(gt_image, np.int64)
    # One False past the end: index -1 (no match) reads it, so an image set without objects works too.
    difficult_all = np.append(joined(gt_difficult, bool), False)

    per_class = []
    for c, name in enumerate(classes, start=1):
        counted = (gt_labels_all == c) & ~difficult_all[:-1]
        gt_per_image = np.bincount(gt_image_all[counted], minlength=len(ordered))
        npos = int(gt_per_image.sum())
        sel = np.flatnonzero(labels_all == c)
        order = sel[np.argsort(-scores_all[sel], kind="stable")]
        match = match_all[order]
        kept = ~((match >= 0) & difficult_all[match])  # ignored detections add no PR point (neither TP nor FP)
        match, order = match[kept], order[kept]
        tp = np.zeros(len(match), dtype=bool)
        hit = np.flatnonzero(match >= 0)
        _, first = np.unique(match[hit], return_index=True)  # first (highest-scored) hit of each object
        tp[hit[first]] = True
        recall, precision = (curve[0] for curve in pr_curve(tp[None].astype(np.float64),
                                                             (~tp)[None].astype(np.float64), np.array([npos])))
        if npos:
            ap, ap07 = average_precision(recall, precision), average_precision(recall, precision, True)
        else:
            recall, ap, ap07 = np.zeros(len(match)), math.nan, math.nan
        per_class.append(ClassResult(name, ap, ap07, npos, int(len(sel)), recall, precision, image_all[order], tp,
                                     gt_per_image))
    scored = [c for c in per_class if c.num_gt > 0]
    mean = float(np.mean([c.ap for c in scored])) if scored else math.nan
    mean07 = float(np.mean([c.ap07 for c in scored])) if scored else math.nan
    return EvalResult(per_class, mean, mean07, len(ordered))


# ---------------------------------------------------------------- VOC results files (comp4)

def results_file(out_dir: str | Path, split: str, class_name: str) -> Path:
    """Official VOC results file name of one class."""
    return Path(out_dir) / safe_name(f"comp4_det_{split}_{class_name}.txt")


def write_voc_results(out_dir: str | Path, split: str, classes: Sequence[str],
                      detections: Mapping[str, Detections]) -> list[Path]:
    """Write ``comp4_det_<split>_<class>.txt`` files: ``image_id score xmin ymin xmax ymax``.

    Coordinates are 1-based like VOC XML (internal 0-based + 1); numbers use 9 significant
    digits so float32 scores and boxes read back exactly. Every class gets a file, maybe empty.
    """
    lines: list[list[str]] = [[] for _ in classes]
    for image_id in sorted(detections):
        det = detections[image_id]
        for box, score, label in zip(det.boxes + 1.0, det.scores, det.labels):
            lines[int(label) - 1].append(f"{image_id} {score:.9g} {box[0]:.9g} {box[1]:.9g} "
                                         f"{box[2]:.9g} {box[3]:.9g}\n")
    paths = []
    for name, rows in zip(classes, lines):
        path = results_file(out_dir, split, name)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(rows))
        paths.append(path)
    return paths


def read_voc_results(results_dir: str | Path, split: str, classes: Sequence[str]) -> dict[str, Detections]:
    """Parse VOC results files back into per-image detections (0-based boxes, sorted by score)."""
    ids: list[str] = []
    rows: list[list[float]] = []
    labels: list[int] = []
    for c, name in enumerate(classes, start=1):
        path = results_file(results_dir, split, name)
        if not path.is_file():
            raise RcnnError(f"{path}: VOC results file not found")
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 6:
                    raise ValueError(f"expected 6 fields, got {len(parts)}")
                rows.append([float(v) for v in parts[1:]])
            except ValueError as err:
                raise RcnnError(f"{path}:{lineno}: not 'image_id score xmin ymin xmax ymax' ({err})") from None
            ids.append(parts[0])
            labels.append(c)
    table = np.asarray(rows, dtype=np.float32).reshape(-1, 5)
    id_array = np.asarray(ids)
    label_array = np.asarray(labels, dtype=np.int64)
    out = {}
    for image_id in sorted(set(ids)):
        idx = np.flatnonzero(id_array == image_id)
        idx = idx[np.argsort(-table[idx, 0], kind="stable")]
        out[image_id] = Detections(table[idx, 1:] - 1.0, table[idx, 0], label_array[idx])
    return out


# ---------------------------------------------------------------- detections.npz (evaluate -> render)

@dataclass(frozen=True)
class DetectionFile:
    """Everything the render stage needs: evaluated split, class names and per-image detections."""

    split: str
    classes: list[str]
    detections: dict[str, Detections]  # every evaluated image id, possibly with no detections


def save_detections(path: str | Path, split: str, classes: Sequence[str],
                    detections: Mapping[str, Detections]) -> None:
    """One npz of flat arrays plus offsets (``image_ids[i]`` owns rows ``offsets[i]:offsets[i+1]``)."""
    ids = sorted(detections)
    sizes = [len(detections[i]) for i in ids]
    dets = [detections[i] for i in ids]
    arrays = {
        "split": np.asarray(split),
        "classes": np.asarray(list(classes), dtype=str),
        "image_ids": np.asarray(ids, dtype=str).reshape(-1),
        "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "boxes": np.concatenate([d.boxes for d in dets] + [np.zeros((0, 4), np.float32)]).astype(np.float32),
        "scores": np.concatenate([d.scores for d in dets] + [np.zeros(0, np.float32)]).astype(np.float32),
        "labels": np.concatenate([d.labels for d in dets] + [np.zeros(0, np.int64)]).astype(np.int64),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def load_detections(path: str | Path) -> DetectionFile:
    """Read a file written by :func:`save_detections`; a missing or damaged file is a user error."""
    data = load_npz(path, "detections", "evaluate")
    try:
        offsets = data["offsets"]
        boxes, scores, labels = data["boxes"], data["scores"], data["labels"]
        ids = [str(i) for i in data["image_ids"]]
        if len(offsets) != len(ids) + 1 or not len(boxes) == len(scores) == len(labels) == offsets[-1]:
            raise ValueError("offsets and arrays disagree")
        out = {i: Detections(boxes[a:b], scores[a:b], labels[a:b]) for i, a, b in zip(ids, offsets[:-1], offsets[1:])}
        return DetectionFile(str(data["split"]), [str(c) for c in data["classes"]], out)
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise RcnnError(f"{path} is not a valid detections file ({err}); rerun the evaluate stage") from None


# ---------------------------------------------------------------- PR curves for DVC plots

def downsample_curve(recall: np.ndarray, precision: np.ndarray, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` evenly spaced points of a curve, always keeping the first and last."""
    n = len(recall)
    if n <= max_points:
        return recall, precision
    idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))
    return recall[idx], precision[idx]


def write_pr_curves(out_dir: str | Path, result: EvalResult, max_points: int = 200) -> list[Path]:
    """``<out_dir>/<class>.json``: a JSON list of ``{"recall", "precision"}`` rows per scored class."""
    paths = []
    for c in result.per_class:
        if c.num_gt == 0:
            continue
        recall, precision = downsample_curve(c.recall, c.precision, max_points)
        rows = [{"recall": round(float(r), 6), "precision": round(float(p), 6)}
                for r, p in zip(recall, precision)]
        path = Path(out_dir) / safe_name(f"{c.name}.json")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(rows) + "\n")
        paths.append(path)
    return paths


def write_metrics(path: str | Path, result: EvalResult, extra: Mapping[str, object]) -> None:
    """``metrics/eval.json``: mAP (all-point and 11-point), per-class AP, plus run facts in ``extra``.
    A value that cannot be computed (nothing scorable) is null: NaN is not JSON for strict parsers."""
    write_json(path, _nan_to_null({**result.to_dict(), **extra}))


def write_scores(path: str | Path, metrics: Mapping[str, object]) -> None:
    """``metrics/scores.json``: the headline figures of ``metrics/eval.json`` as scalars, the one file `dvc.yaml`
    declares as metrics, so ``dvc metrics show`` and ``dvc exp show`` stay a few columns wide (the details
    stay in ``eval.json``, ``train.json`` and the other stages' files, read with ``--targets``)."""
    map07_low, map07_high = metrics["map07_ci95"]
    write_json(path, _nan_to_null({"map07": metrics["map07"], "map07_ci_low": map07_low, "map07_ci_high": map07_high,
                                   "map": metrics["map"], "coco_ap": metrics["coco"]["ap"],
                                   "seconds_per_image": metrics["seconds_per_image"]}))


def _nan_to_null(tree: object) -> object:
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else None
    if isinstance(tree, dict):
        return {k: _nan_to_null(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_nan_to_null(v) for v in tree]
    return tree
