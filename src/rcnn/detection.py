"""R-CNN detection: proposals -> warped crops -> CNN class scores -> per-class NMS.

The evaluate stage and ``rcnn-detect`` work with a checkpoint of any detector family
(:mod:`rcnn.detectors` picks the detector the checkpoint names); :class:`Detector` is R-CNN's.

Post-processing is vectorised: every (proposal, object class) pair scoring at least
``score_threshold`` is a candidate (a low threshold such as 0.05 keeps the recall mAP needs;
the tutorial's 0.5 before NMS threw it away), one ``torchvision.ops.batched_nms`` call runs
class-wise NMS, and the ``max_detections`` best survive. When the checkpoint carries a
bounding-box regressor, each candidate uses its class's refined box (:meth:`Detector.class_boxes`).

CLI: ``python -m rcnn.detection IMAGE --checkpoint data/model/model.pt [--out out.jpg]`` (also
``rcnn-detect``) prints ``label score x1 y1 x2 y2`` per detection, 1-based VOC pixel corners.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import cv2
import numpy as np
import torch
from torchvision.ops import batched_nms
from tqdm import tqdm

from rcnn import voc
from rcnn.bbox_regression import refine_boxes
from rcnn.bootstrap import map_intervals
from rcnn.boxes import INCLUSIVE_SHIFT, clip_boxes
from rcnn.crops import warp_crops
from rcnn.drawing import draw_detections, write_image
from rcnn.errors import RcnnError, run_cli
from rcnn.evaluation import (Detections, evaluate_detections, save_detections, write_metrics, write_pr_curves,
                             write_voc_results)
from rcnn.fileio import atomic_dir, write_json
from rcnn.features import crop_features
from rcnn.model import load_checkpoint
from rcnn.params import Params
from rcnn.proposals import load_proposals, proposal_file, proposal_recall, selective_search
from rcnn.region_boxes import ImageBoxes
from rcnn.splits import check_evaluation_split
from rcnn.svm import svm_scores


def postprocess_detections(boxes: np.ndarray, probs: np.ndarray, score_threshold: float = 0.05,
                           nms_iou: float = 0.3, max_detections: int = 100) -> Detections:
    """Per-class thresholding, class-wise NMS and a top-k cut, all vectorised.

    ``boxes``: ``(N, 4)`` proposals shared by every class, or ``(N, C+1, 4)`` per-class boxes
    (column 0, background, unused). ``probs``: ``(N, C+1)`` softmax scores. NMS uses the VOC
    ``+1`` IoU (torchvision's has none, so far corners are shifted by one pixel first).
    Returns detections sorted by descending score (ties: proposal order, then class).
    """
    probs = np.asarray(probs, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = probs[:, 1:]
    idx_box, idx_cls = np.nonzero(scores >= score_threshold)  # row-major: proposal order, then class
    if len(idx_box) == 0:
        return Detections.empty()
    cand_boxes = boxes[idx_box] if boxes.ndim == 2 else boxes[idx_box, idx_cls + 1]
    cand_scores = scores[idx_box, idx_cls]
    keep = batched_nms(torch.from_numpy(cand_boxes + INCLUSIVE_SHIFT), torch.from_numpy(cand_scores),
                       torch.from_numpy(idx_cls), nms_iou).numpy()
    keep = keep[np.lexsort((keep, -cand_scores[keep]))][:max_detections]  # deterministic tie order
    return Detections(cand_boxes[keep], cand_scores[keep], (idx_cls[keep] + 1).astype(np.int64))


@dataclass
class Timings:
    """Seconds spent in each part of detection, summed over images."""

    proposals_load: float = 0.0
    crops: float = 0.0
    cnn: float = 0.0
    postprocess: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in vars(self).items()}


@dataclass
class Detector:
    """A trained region classifier plus the settings that turn its scores into detections."""

    model: torch.nn.Module
    meta: dict
    device: torch.device
    score_threshold: float = 0.05
    nms_iou: float = 0.3
    max_detections: int = 100
    batch_size: int = 64
    timings: Timings = field(default_factory=Timings)
    takes_proposals: ClassVar[bool] = True  # False for a detector that proposes its own regions (Faster R-CNN)
    last_rois: np.ndarray | None = None  # the regions the last image was scored on (inclusive corners)

    @classmethod
    def from_payload(cls, payload: dict, path: str | Path, device: torch.device, **settings: float) -> "Detector":
        """The detector of an R-CNN checkpoint payload (see :func:`rcnn.detectors.load_detector`)."""
        model, meta = load_checkpoint(path, device, payload)
        return cls(model, meta, device, **settings)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def crops(self, image_bgr: np.ndarray, proposals: np.ndarray) -> np.ndarray:
        """Warped RGB crops exactly as the regions stage made them for training."""
        start = time.perf_counter()
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        out = warp_crops(rgb, proposals, int(self.meta["crop_size"]), int(self.meta["context"]))
        self.timings.crops += time.perf_counter() - start
        return out

    def classify(self, crops: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Scores ``(N, C+1)`` (softmax, or the SVMs' of :mod:`rcnn.svm`) and backbone features ``(N, D)``
        of warped crops.

        Features come from :func:`rcnn.features.crop_features`, the very numerics the head and
        the box regressor were trained on; the head then runs in float32.
        """
        start = time.perf_counter()
        feats = torch.from_numpy(crop_features(self.model, crops, self.device, self.batch_size))
        with torch.inference_mode():
            if self.meta.get("svm") is not None:
                probs = svm_scores(self.meta["svm"], feats).numpy()
            else:
                logits = self.model.classify_features(feats.to(self.device))
                probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        self.timings.cnn += time.perf_counter() - start
        return probs, feats

    def class_boxes(self, proposals: np.ndarray, features: torch.Tensor, width: int, height: int) -> np.ndarray:
        """Boxes to score: the proposals, or per-class regressed boxes ``(N, C+1, 4)`` clipped to the image."""
        regressor = self.meta.get("bbox_regressor")
        if regressor is None:
            return proposals
        refined = refine_boxes(regressor, features, proposals)
        return clip_boxes(refined.reshape(-1, 4), width, height).reshape(refined.shape)

    def detect(self, image_bgr: np.ndarray, proposals: np.ndarray) -> Detections:
        """Detections of one BGR image given its ranked proposals (inclusive corners)."""
        proposals = self.last_rois = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
        if len(proposals) == 0:
            return Detections.empty()
        probs, feats = self.classify(self.crops(image_bgr, proposals))
        start = time.perf_counter()
        boxes = self.class_boxes(proposals, feats, image_bgr.shape[1], image_bgr.shape[0])
        out = postprocess_detections(boxes, probs, self.score_threshold, self.nms_iou, self.max_detections)
        self.timings.postprocess += time.perf_counter() - start
        return out

    def detect_images(self, paths: Sequence[Path], proposals: Sequence[np.ndarray | None],
                      desc: str = "detect") -> Iterator[Detections]:
        """Detections of many images, one at a time with a progress bar (after each, :attr:`last_rois` holds
        the regions that image was scored on).

        Reading and warping run in the same thread as the CNN: on the 2-core CPU they take
        about 1 % of the time and a prefetch thread only competed with torch's own threads.
        """
        with tqdm(total=len(paths), desc=desc, unit="img") as bar:
            for path, props in zip(paths, proposals):
                found = self.detect(voc.read_image(path), props)
                bar.update()  # before handing it over: a caller that stops at the last image sees n of n
                yield found


def postprocess_settings(params: Params) -> dict[str, float]:
    """The evaluate stage's post-processing, which every validation AP that selects a model uses too."""
    e = params.evaluate
    return {"score_threshold": e.score_threshold, "nms_iou": e.nms_iou, "max_detections": e.max_detections}


def labelled_split_ap(detector: Detector, paths: Sequence[Path], items: Sequence[ImageBoxes],
                      max_proposals: int | None = None) -> dict[str, float]:
    """AP and AP07 of ``detector`` on the images at ``paths`` whose proposals and ground truth the regions
    stage stored in ``items`` (each image's first ``max_proposals`` proposals; all when None): the training
    loops' validation AP, with ``detector`` set up by :func:`postprocess_settings` and ``max_proposals`` =
    ``evaluate.max_proposals``, as the evaluate stage scores. An unreadable image counts with no
    detections (training warned about it)."""
    found = {}
    for path, item in zip(paths, items):
        try:
            found[item.image_id] = detector.detect(voc.read_image(path), item.proposals[:max_proposals])
        except RcnnError:
            continue
    result = evaluate_detections(found, [item.annotation() for item in items], detector.classes)
    return {"map": _finite(result.map), "map07": _finite(result.map07)}


def warn_if_unscorable(items: Sequence[ImageBoxes], split: str) -> None:
    """A validation split without a non-difficult object gives AP 0 every epoch: say that the best epoch is
    then chosen by the validation loss alone, instead of letting it look like a selection by AP."""
    if not any((~item.gt_difficult).any() for item in items):
        warnings.warn(f"the validation split {split!r} holds no object that AP can score (none, or all "
                      f"difficult): the best epoch is chosen by the validation loss alone", RuntimeWarning,
                      stacklevel=2)


def _finite(value: float) -> float:
    return value if value == value else 0.0


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
    """Detect on every image of ``evaluate.split`` and write detections, VOC AP metrics and PR curves."""
    from rcnn.detectors import load_detector  # the factory imports this module's Detector lazily

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
    recall = proposal_recall(scored_rois, [by_id[i].boxes[~by_id[i].difficult] for i in run_ids])
    result = evaluate_detections(detections, annotations, classes)
    with atomic_dir(detections_dir) as tmp:
        write_voc_results(tmp, e.split, classes, detections)
        save_detections(tmp / "detections.npz", e.split, classes, detections)
        write_json(tmp / "info.json", {"split": e.split, "classes": classes, "proposals_mode": mode,
                                       "evaluate": dataclasses.asdict(e)})
    with atomic_dir(pr_dir) as tmp:
        write_pr_curves(tmp, result)
    extra = {
        **map_intervals(result),
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
        "seconds_per_image": round(seconds / max(len(run_ids), 1), 4),
        "time": {**detector.timings.as_dict(), "total": round(seconds, 3)},
        "device": str(detector.device),
    }
    if not math.isfinite(result.map):
        warnings.warn(f"no object of {e.split} can be scored (none of the classes, or every one difficult): "
                      f"map and map07 are null in {metrics_path}", RuntimeWarning, stacklevel=2)
    write_metrics(metrics_path, result, extra)
    return {**result.to_dict(), **extra}


# ---------------------------------------------------------------- CLI

def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rcnn-detect", description="Detect objects in one image with a trained "
                                     "R-CNN checkpoint; prints 'label score x1 y1 x2 y2' (1-based VOC corners).")
    parser.add_argument("image", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=Path("data/model/model.pt"))
    parser.add_argument("--out", type=Path, help="write a copy of the image with the detections drawn")
    parser.add_argument("--score", type=float, default=0.5, help="minimum score to report (default 0.5)")
    parser.add_argument("--nms", type=float, default=0.3, help="class-wise NMS IoU (default 0.3)")
    parser.add_argument("--max-detections", type=int, default=100)
    parser.add_argument("--max-proposals", type=int, default=300)
    parser.add_argument("--mode", choices=("fast", "quality"), default="fast", help="selective search mode")
    parser.add_argument("--max-side", type=int, default=500, help="selective search image size (longer side)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    return parser.parse_args(argv)


def detect_image(image_bgr: np.ndarray, detector: Detector, mode: str = "fast", max_proposals: int = 300,
                 max_side: int | None = 500, min_size: int = 10) -> Detections:
    """Selective search (unless the detector proposes its own regions) + detection on one arbitrary image."""
    if not detector.takes_proposals:
        return detector.detect(image_bgr, None)
    proposals = selective_search(image_bgr, mode, max_proposals, max_side, min_size)
    return detector.detect(image_bgr, proposals)


def main(argv: Sequence[str] | None = None) -> None:
    """``rcnn-detect`` entry point; user errors print one line and exit with code 2."""
    from rcnn.detectors import load_detector  # the factory imports this module's Detector lazily

    def run() -> None:
        args = _parse_args(argv)
        if not 0 <= args.score < 1 or not 0 < args.nms <= 1 or args.max_proposals < 1 or args.max_detections < 1:
            raise RcnnError("--score must be in [0, 1), --nms in (0, 1], --max-proposals and --max-detections >= 1")
        if args.max_side < 32:
            raise RcnnError(f"--max-side {args.max_side} is invalid: selective search needs at least 32 pixels "
                            f"(default 500)")
        if args.out is not None and args.out.is_dir():
            raise RcnnError(f"--out {args.out} is a folder: name the image file to write, e.g. {args.out / 'out.jpg'}")
        if args.image.is_dir():
            raise RcnnError(f"{args.image} is a folder: rcnn-detect takes one image file (run it per image, or "
                            f"use the evaluate and render stages for a folder)")
        image = voc.read_image(args.image)
        try:
            detector = load_detector(args.checkpoint, args.device, score_threshold=args.score, nms_iou=args.nms,
                                     max_detections=args.max_detections)
        except RcnnError as err:  # the device check speaks of params.yaml's key; here it came from --device
            raise RcnnError(str(err).replace("train.device", "--device")) from None
        found = detect_image(image, detector, args.mode, args.max_proposals, args.max_side)
        for box, score, label in zip(found.boxes + 1.0, found.scores, found.labels):
            print(f"{detector.classes[label - 1]} {score:.4f} " + " ".join(f"{v:.1f}" for v in box))
        if args.out is not None:
            write_image(args.out, draw_detections(image, found, detector.classes, args.score))

    run_cli(run)


if __name__ == "__main__":
    main()
