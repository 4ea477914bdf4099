"""The tutorial's way of doing each step, re-implemented from its description (shared SEED-NOTES) as
the baseline of ``bench/run.py``. Deliberately naive: it reproduces the tutorial's costs, not ours.

- proposals: selective search one image after another, at full resolution (no resize);
- regions: labelled per ground-truth object in search order, each crop pickled at its original
  size to its own file ``{"image": crop, "label": int}``;
- training: every epoch reads every pickle, resizes it and runs the frozen backbone again, in
  float32 NCHW, before the head step;
- detection: quality-mode search, per-crop resize, softmax/argmax, a 0.5 score threshold and a
  greedy pure-Python O(n^2) per-class NMS.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from rcnn.proposals import selective_search

from rcnn.data import voc
from rcnn.families.rcnn.model import RegionClassifier, preprocess
from rcnn.families.rcnn.train_data import TrainData
from rcnn.utils.fileio import load_pickle

TRAIN_PROPOSALS = 1000  # the first 1,000 fast-mode rectangles
MAX_BOXES = 50  # regions per image, half foreground, half background
FG_IOU = 0.7
SCORE_THRESHOLD = 0.5
NMS_IOU = 0.5
DETECT_BATCH = 64


def compute_proposals(root: Path, image_ids: Sequence[str]) -> selective_search.ProposalRun:
    """Fast-mode selective search, sequential and at full resolution, first 1,000 boxes of each image."""
    return selective_search.compute_proposals(root, image_ids, "fast", TRAIN_PROPOSALS, max_side=None, min_size=1,
                                       n_jobs=1, desc="tutorial proposals")


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two inclusive-corner boxes with the VOC +1 convention, one pair at a time in Python."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union


def _sample(image_rgb: np.ndarray, boxes: np.ndarray, annotation: voc.Annotation) -> Iterator[tuple[np.ndarray, int]]:
    """The tutorial's labelling: object by object, proposals in search order, IoU > 0.7 foreground, else
    background, until 25 of each are taken (the same proposal may come out several times)."""
    half = MAX_BOXES // 2
    fg = bg = 0
    for gt, label in zip(annotation.boxes.tolist(), annotation.labels.tolist()):
        for box in boxes.tolist():
            if fg >= half and bg >= half:
                return
            overlap = iou(gt, box)
            if overlap > FG_IOU and fg < half:
                fg += 1
                crop_label = int(label)
            elif overlap <= FG_IOU and bg < half:
                bg += 1
                crop_label = 0
            else:
                continue
            x1, y1, x2, y2 = (int(v) for v in box)
            yield image_rgb[y1:y2 + 1, x1:x2 + 1], crop_label


def write_regions(root: Path, annotations: Sequence[voc.Annotation], boxes: dict[str, np.ndarray],
                  out_dir: Path) -> list[Path]:
    """One pickle per region at the crop's original size, sequentially; returns the files written.

    Plain ``pickle.dump`` into a throwaway folder, as the tutorial did: atomic writes would add a
    temp file and a rename per region and make the baseline look slower than it was.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for ann in tqdm(annotations, desc="tutorial regions", unit="img"):
        if ann.image_id not in boxes:
            continue
        rgb = cv2.cvtColor(voc.read_image(voc.image_path(root, ann.image_id)), cv2.COLOR_BGR2RGB)
        for k, (crop, label) in enumerate(_sample(rgb, boxes[ann.image_id], ann)):
            path = out_dir / f"{ann.image_id}_{k:03d}.pkl"
            with open(path, "wb") as fh:
                pickle.dump({"image": crop, "label": label}, fh)
            files.append(path)
    return files


def read_region(path: Path, size: int) -> tuple[np.ndarray, int]:
    """Unpickle one region and resize its crop to ``size x size`` (the tutorial's Dataset.__getitem__)."""
    region = load_pickle(path)
    return cv2.resize(region["image"], (size, size), interpolation=cv2.INTER_LINEAR), int(region["label"])


def train_data(files: Sequence[Path], size: int, batch_size: int, seed: int, device: torch.device) -> TrainData:
    """Epoch batches read from the pickles every time; the logits run the whole model (backbone
    included) in float32 NCHW, without the bf16/channels-last inference path."""
    generator = torch.Generator().manual_seed(seed)

    def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(files), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            crops, labels = zip(*(read_region(files[i], size) for i in order[start:start + batch_size]))
            yield torch.from_numpy(np.stack(crops)), torch.tensor(labels, dtype=torch.int64)

    def logits(model: RegionClassifier, crops: torch.Tensor) -> torch.Tensor:
        return model(preprocess(crops, device).contiguous())

    return TrainData(train_batches, lambda: iter(()), logits, len(files), 0, batch_size, head_only=True)


def greedy_nms(boxes: list[list[float]], scores: list[float], threshold: float) -> list[int]:
    """Greedy NMS with Python loops: O(n^2) IoU calls; indices kept, best score first."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    while order:
        best = order.pop(0)
        keep.append(best)
        order = [i for i in order if iou(boxes[best], boxes[i]) <= threshold]
    return keep


def detect(model: RegionClassifier, image_bgr: np.ndarray, size: int, max_proposals: int,
           device: torch.device) -> tuple[int, dict[str, float]]:
    """Detect the tutorial's way (it took the first 300 quality-mode boxes); returns the number of
    detections and seconds per step."""
    times: dict[str, float] = {}
    start = time.perf_counter()
    boxes = selective_search.selective_search(image_bgr, "quality", max_proposals, max_side=None, min_size=1)
    times["proposals"] = time.perf_counter() - start

    start = time.perf_counter()
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    crops = np.stack([cv2.resize(rgb[int(y1):int(y2) + 1, int(x1):int(x2) + 1], (size, size))
                      for x1, y1, x2, y2 in boxes])
    times["crops"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.inference_mode():
        probs = torch.cat([torch.softmax(model(preprocess(crops[s:s + DETECT_BATCH], device).contiguous()), dim=1).cpu()
                           for s in range(0, len(crops), DETECT_BATCH)])
    times["cnn"] = time.perf_counter() - start

    start = time.perf_counter()
    scores, labels = probs.max(dim=1)
    found = 0
    per_class: dict[int, tuple[list[list[float]], list[float]]] = {}
    for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        if label != 0 and score > SCORE_THRESHOLD:
            per_class.setdefault(label, ([], []))
            per_class[label][0].append(box)
            per_class[label][1].append(score)
    for class_boxes, class_scores in per_class.values():
        found += len(greedy_nms(class_boxes, class_scores, NMS_IOU))
    times["postprocess"] = time.perf_counter() - start
    return found, times
