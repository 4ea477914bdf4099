"""The evaluate stage, and detection on one arbitrary image, for a checkpoint of any detector family.

:func:`rcnn.pipeline.family_registry.load_detector` builds the detector the checkpoint names; selective search runs
only for a detector that takes proposals. The ``rcnn-detect`` CLI is :mod:`rcnn.detect_cli`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from rcnn.data import voc
from rcnn.data.splits import check_evaluation_split
from rcnn.evaluation.bootstrap import map_intervals
from rcnn.evaluation.coco_metrics import coco_metrics
from rcnn.evaluation.confusion import confusion_records
from rcnn.evaluation.voc_eval import (Detections, evaluate_detections, save_detections, write_metrics, write_pr_curves,
                                      write_scores, write_voc_results)
from rcnn.modeling.detector_interface import Detector
from rcnn.modeling.postprocess import postprocess_settings
from rcnn.pipeline.family_registry import load_detector
from rcnn.pipeline.params import Params
from rcnn.proposals.selective_search import load_proposals, proposal_file, proposal_recall, selective_search
from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import atomic_dir, write_json


# ---------------------------------------------------------------- evaluate stage

def _load_annotations(root: Path, split: str, classes: Sequence[str]) -> tuple[list[voc.Annotation], int]:
    """Split annotations for the checkpoint's classes; objects of other classes are dropped and counted."""
    try:
        voc.read_split(root, split)
    except RcnnError:
        raise RcnnError(f"evaluate.split = {split!r} is not in {root}: add it to data.splits and rerun "
                        f"the download stage") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        annotations = voc.load_split(root, split, classes, on_bad="skip")
    return annotations, len(caught)


def run_evaluate_stage(params: Params, voc_dir: str | Path = "data/voc", proposals_dir: str | Path = "data/proposals",
                       model_path: str | Path = "data/model/model.pt",
                       detections_dir: str | Path = "data/detections",
                       metrics_path: str | Path = "metrics/eval.json", pr_dir: str | Path = "metrics/pr") -> dict:
    """Detect on every image of ``evaluate.split`` and write detections, VOC AP metrics, PR curves and the
    confusion matrix's records (``confusion.json`` beside ``metrics_path``, detections scoring at least
    ``render.score_threshold``: the ones the pictures show) and the headline ``scores.json`` beside it."""
    e = params.evaluate
    mode = params.proposals.eval_mode
    root = voc.find_voc_root(voc_dir)
    protocol = check_evaluation_split(root, params)
    detector = load_detector(model_path, "auto", batch_size=e.batch_size, **postprocess_settings(params))
    classes = detector.classes
    annotations, skipped_objects = _load_annotations(root, e.split, classes)
    if skipped_objects:
        warnings.warn(f"{skipped_objects} ground-truth objects of {e.split} are not among the checkpoint's "
                      f"classes (or unusable) and are not evaluated", RuntimeWarning, stacklevel=2)
    ids = [a.image_id for a in annotations]
    if detector.takes_proposals:
        start = time.perf_counter()
        all_proposals = load_proposals(proposal_file(proposals_dir, e.split, mode))
        detector.timings.proposals_load += time.perf_counter() - start
    else:  # the model proposes its own regions: every image runs, whatever the proposals stage wrote
        all_proposals = dict.fromkeys(ids)
    missing = [i for i in ids if i not in all_proposals]
    if missing:
        warnings.warn(f"{len(missing)} images of {e.split} have no proposals (skipped by the proposals stage, "
                      f"e.g. {missing[0]}); they count with no detections", RuntimeWarning, stacklevel=2)
    run_ids = [i for i in ids if i in all_proposals]
    proposals = [None if all_proposals[i] is None else all_proposals[i][:e.max_proposals] for i in run_ids]
    start = time.perf_counter()
    found, scored_rois = {}, []
    for image_id, image_found in zip(run_ids, detector.detect_images([voc.image_path(root, i) for i in run_ids],
                                                                     proposals, desc=f"detect {e.split}")):
        found[image_id] = image_found
        scored_rois.append(detector.last_rois)
    seconds = time.perf_counter() - start
    detections = {i: found.get(i, Detections.empty()) for i in ids}
    by_id = {a.image_id: a for a in annotations}
    recall = proposal_recall(scored_rois, [by_id[i].boxes[~by_id[i].difficult] for i in run_ids],
                             [by_id[i].labels[~by_id[i].difficult] for i in run_ids], classes)
    result = evaluate_detections(detections, annotations, classes)
    with atomic_dir(detections_dir) as tmp:
        write_voc_results(tmp, e.split, classes, detections)
        save_detections(tmp / "detections.npz", e.split, classes, detections)
        write_json(tmp / "info.json", {"split": e.split, "classes": classes, "proposals_mode": mode,
                                       "evaluate": dataclasses.asdict(e)})
    with atomic_dir(pr_dir) as tmp:
        write_pr_curves(tmp, result)
    write_json(Path(metrics_path).with_name("confusion.json"),
               confusion_records(detections, annotations, classes, params.render.score_threshold))
    extra = {
        **map_intervals(result),
        "coco": coco_metrics(detections, annotations, classes),
        "split": e.split,
        **protocol,
        "iou_threshold": 0.5,
        "images": len(ids),
        "images_without_proposals": len(missing),
        "skipped_objects": skipped_objects,
        "detections": int(sum(len(d) for d in detections.values())),
        "mean_proposals_per_image": float(np.mean([len(r) for r in scored_rois])) if scored_rois else 0.0,
        # the regions the detector scored: the first evaluate.max_proposals of selective search, or the RPN's
        "proposal_recall": {"source": "selective_search" if detector.takes_proposals else "learned", **recall},
        # classes the train stage saw learn no foreground (their AP above is near 0: a classification failure)
        "unlearned_classes": list(detector.meta.get("unlearned_classes", [])),
        "seconds_per_image": round(seconds / max(len(run_ids), 1), 4),
        "time": {**detector.timings.as_dict(), "total": round(seconds, 3)},
        "device": str(detector.device),
    }
    if not math.isfinite(result.map):
        warnings.warn(f"no object of {e.split} can be scored (none of the classes, or every one difficult): "
                      f"map and map07 are null in {metrics_path}", RuntimeWarning, stacklevel=2)
    write_metrics(metrics_path, result, extra)
    write_scores(Path(metrics_path).with_name("scores.json"), {**result.to_dict(), **extra})
    return {**result.to_dict(), **extra}


# ---------------------------------------------------------------- one image

def detect_image(image_bgr: np.ndarray, detector: Detector, mode: str = "fast", max_proposals: int = 300,
                 max_side: int | None = 500, min_size: int = 10, reference_pixels: int = 0) -> Detections:
    """Selective search (unless the detector proposes its own regions) + detection on one arbitrary image."""
    if not detector.takes_proposals:
        return detector.detect(image_bgr, None)
    proposals = selective_search(image_bgr, mode, max_proposals, max_side, min_size,
                                 reference_pixels=reference_pixels)
    return detector.detect(image_bgr, proposals)
