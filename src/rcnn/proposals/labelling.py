"""Proposals labelled against the ground truth, and the regions stage of the two-stage families.

Each proposal is compared with every ground-truth box at once and takes the class of the box
it overlaps most (IoU >= ``fg_iou``: foreground), is background when it overlaps every box,
difficult ones included, less than ``bg_iou``, and is left out in between
(:func:`label_candidates`, the one rule every family uses). Fast and Faster R-CNN's regions stage
(:func:`run_box_regions_stage`) stores every labelled proposal per image
(:mod:`rcnn.proposals.region_boxes`), or for Faster R-CNN, which proposes its own regions, the ground
truth alone; R-CNN's warped crops are :mod:`rcnn.families.rcnn.regions`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcnn.data import voc
from rcnn.pipeline.params import Params, RegionParams
from rcnn.proposals.region_boxes import BOXES_FILE, image_boxes, save_boxes
from rcnn.proposals.selective_search import load_proposals, proposal_file
from rcnn.utils.boxes import box_iou
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import atomic_dir, read_json, write_json

IGNORE = -1  # label of proposals that are neither foreground nor background


@dataclass(frozen=True)
class Candidates:
    """Every candidate box of one image with its label (class, 0 background, -1 ignored) and best match."""

    boxes: np.ndarray  # (N, 4) float32
    labels: np.ndarray  # (N,) int64
    gt_boxes: np.ndarray  # (N, 4) float32, zeros when the image has no ground truth
    ious: np.ndarray  # (N,) float32


def label_candidates(proposals: np.ndarray, annotation: voc.Annotation, settings: RegionParams) -> Candidates:
    """Label proposals (plus ground-truth boxes when ``add_ground_truth``) against all objects at once."""
    gt = annotation.boxes.reshape(-1, 4).astype(np.float32)
    boxes = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
    if settings.add_ground_truth:
        boxes = np.concatenate([boxes, gt])
    n = len(boxes)
    if len(gt) == 0:
        return Candidates(boxes, np.zeros(n, np.int64), np.zeros((n, 4), np.float32), np.zeros(n, np.float32))
    iou = box_iou(boxes, gt)
    rows = np.arange(n)
    best_any = iou.argmax(axis=1)  # background eligibility counts difficult objects too
    eligible = np.ones(len(gt), bool) if settings.difficult_as_foreground else ~annotation.difficult
    fg_iou = np.where(eligible[None, :], iou, -1.0)
    best_fg = fg_iou.argmax(axis=1)
    is_fg = fg_iou[rows, best_fg] >= settings.fg_iou
    is_bg = iou[rows, best_any] < settings.bg_iou
    match = np.where(is_fg, best_fg, best_any)
    labels = np.where(is_fg, annotation.labels[match], np.where(is_bg, 0, IGNORE)).astype(np.int64)
    return Candidates(boxes, labels, gt[match], iou[rows, match].astype(np.float32))


def read_index(regions_dir: str | Path, region_format: str = "crops") -> dict:
    """``index.json`` of a regions folder holding ``region_format`` regions ("crops": crop_size, context,
    classes, encoding, splits -> shards and counts; "boxes": see :mod:`rcnn.proposals.region_boxes`)."""
    path = Path(regions_dir) / "index.json"
    index = read_json(path, "regions")
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise RcnnError(f"{path} is not a regions index (no 'splits' mapping); rerun the regions stage (dvc repro)")
    found = index.get("format", "crops")
    if found != region_format:
        raise RcnnError(f"{path} describes regions of format {found!r}, not {region_format!r}: the regions "
                        f"stage ran for another model.arch; rerun it (dvc repro)")
    return index


def split_inputs(params: Params, root: Path, proposals_dir: Path,
                 split: str) -> tuple[list[voc.Annotation], dict[str, np.ndarray], list[str]]:
    """Annotations of a split's images that have proposals, the proposals, and the ids skipped (warned)."""
    annotations = voc.load_split(root, split, params.classes, params.data.on_bad_annotation)
    proposals = load_proposals(proposal_file(proposals_dir, split, params.proposals.mode))
    missing = sorted(a.image_id for a in annotations if a.image_id not in proposals)
    for image_id in missing:
        warnings.warn(f"skipping image {image_id} of {split}: it has no proposals (unreadable image?)",
                      RuntimeWarning, stacklevel=3)
    return [a for a in annotations if a.image_id in proposals], proposals, missing


def split_boxes(params: Params, root: Path, proposals_dir: Path, split: str, out_dir: Path,
                with_proposals: bool = True) -> tuple[dict, float]:
    """Label every proposal of a split and write ``<out_dir>/<split>/boxes.npz``; returns its index entry.
    Without proposals (a detector that makes its own), the ground truth alone."""
    start = time.perf_counter()
    if with_proposals:
        annotations, proposals, skipped = split_inputs(params, root, proposals_dir, split)
    else:
        annotations = voc.load_split(root, split, params.classes, params.data.on_bad_annotation)
        proposals, skipped = {a.image_id: np.zeros((0, 4), np.float32) for a in annotations}, []
    # Ground truth is not appended here: the detector adds it to every image's sample itself.
    settings = dataclasses.replace(params.regions, add_ground_truth=False)
    items = [image_boxes(ann, proposals[ann.image_id], label_candidates(proposals[ann.image_id], ann, settings).labels)
             for ann in annotations]
    path = out_dir / split / BOXES_FILE
    save_boxes(path, items)
    labels = np.concatenate([i.labels for i in items]) if items else np.zeros(0, np.int64)
    per_class = np.bincount(labels[labels > 0], minlength=params.num_classes)
    entry = {"files": [path.relative_to(out_dir).as_posix()], "regions": int((labels >= 0).sum()),
             "foreground": int((labels > 0).sum()), "background": int((labels == 0).sum()),
             "ignored": int((labels < 0).sum()),
             "per_class": {c: int(per_class[i + 1]) for i, c in enumerate(params.classes)},
             "images": len(items), "skipped_images": len(skipped), "skipped_ids": skipped,
             "bytes": path.stat().st_size}
    return entry, time.perf_counter() - start


def run_box_regions_stage(params: Params, voc_dir: str | Path = "data/voc",
                          proposals_dir: str | Path = "data/proposals", out_dir: str | Path = "data/regions",
                          metrics_path: str | Path = "metrics/regions.json", with_proposals: bool = True) -> dict:
    """Write labelled boxes and ``index.json`` for the train and val splits, and ``metrics/regions.json``;
    ``with_proposals=False`` stores the ground truth alone (Faster R-CNN proposes its own regions)."""
    root = voc.find_voc_root(voc_dir)
    r = params.regions
    index = {"format": "boxes", "classes": list(params.classes), "fg_iou": r.fg_iou, "bg_iou": r.bg_iou,
             "difficult_as_foreground": r.difficult_as_foreground,
             "proposals_mode": params.proposals.mode if with_proposals else None,
             "splits": {}}
    seconds = 0.0
    with atomic_dir(out_dir) as tmp:
        for split in dict.fromkeys([params.data.train_split, params.data.val_split]):
            index["splits"][split], took = split_boxes(params, root, Path(proposals_dir), split, tmp, with_proposals)
            seconds += took
        write_json(tmp / "index.json", index)
    entries = index["splits"].values()
    metrics = {"format": "boxes",
               "splits": {s: {k: v for k, v in e.items() if k != "files"} for s, e in index["splits"].items()},
               **{key: sum(e[key] for e in entries) for key in ("regions", "foreground", "background", "bytes")},
               "seconds": round(seconds, 3)}
    write_json(metrics_path, metrics)
    return metrics


