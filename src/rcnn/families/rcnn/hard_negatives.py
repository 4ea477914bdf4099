"""Hard-negative mining over the background proposals detection scores (R-CNN §2.3, App. B).

The classifier first learns from the regions stage's sample. Then, for ``train.hard_negative_rounds``
rounds, it scores every background proposal of the training images (IoU below ``regions.bg_iou``
with every object) among each image's first ``evaluate.max_proposals`` (the proposals detection scores:
a negative ranked later is never seen at test time), adds each image's ``regions.max_boxes``
highest-scoring ones not yet in the training set (neither mined before nor in the regions stage's
sample) that it gets wrong or nearly wrong (:func:`hard_score`), and is retrained. The pool's features
are computed once (one backbone pass over all those crops, kept as float16 in a memory-mapped scratch
file so memory stays bounded) and reused by every round. The classifier is the softmax head or the
SVMs of :mod:`rcnn.families.rcnn.svm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from rcnn.data import voc
from rcnn.families.rcnn.crops import warp_crops
from rcnn.families.rcnn.features import crop_features
from rcnn.families.rcnn.model import RegionClassifier
from rcnn.proposals.region_boxes import ImageBoxes

SCORE_CHUNK = 8192  # pool rows scored at a time


@dataclass
class NegativePool:
    """Backbone features of every background proposal of the training images."""

    features: np.ndarray  # (N, D) float16, memory-mapped
    image_index: np.ndarray  # (N,) position of the proposal's image in the split
    boxes: np.ndarray  # (N, 4)


def negative_pool(model: RegionClassifier, root: Path, items: Sequence[ImageBoxes], crop_size: int, context: int,
                  device: torch.device, batch_size: int, scratch: Path, max_rank: int | None = None) -> NegativePool:
    """Compute the features of every background (label 0) proposal of ``items`` once; with ``max_rank``,
    only of those among each image's first ``max_rank`` proposals."""
    bg = [np.flatnonzero(item.labels[:max_rank] == 0) for item in items]
    total = int(sum(len(b) for b in bg))
    feats = np.lib.format.open_memmap(scratch / "pool.npy", mode="w+", dtype=np.float16,
                                      shape=(total, model.feature_dim))
    pos = 0
    with tqdm(total=total, desc="hard negatives: pool features", unit="region") as bar:
        for item, rows in zip(items, bg):
            if not len(rows):
                continue
            rgb = cv2.cvtColor(voc.read_image(voc.image_path(root, item.image_id)), cv2.COLOR_BGR2RGB)
            for start in range(0, len(rows), 1024):  # bounded crops in memory per image
                part = item.proposals[rows[start:start + 1024]]
                feats[pos:pos + len(part)] = crop_features(model, warp_crops(rgb, part, crop_size, context), device,
                                                           batch_size)
                pos += len(part)
                bar.update(len(part))
    image_index = np.repeat(np.arange(len(items)), [len(b) for b in bg])
    boxes = np.concatenate([item.proposals[b] for item, b in zip(items, bg)]).reshape(-1, 4) if items else \
        np.zeros((0, 4), np.float32)
    return NegativePool(feats, image_index, boxes)


def pool_scores(pool: NegativePool, score: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Object score (highest over classes) of every pool proposal, in bounded chunks."""
    out = [score(np.asarray(pool.features[s:s + SCORE_CHUNK], np.float32))
           for s in range(0, len(pool.features), SCORE_CHUNK)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


SVM_HARD_MARGIN = -1.0  # the paper's: a negative inside the hinge (margin > -1) still teaches the SVM


def hard_score(svm: bool, score_threshold: float) -> float:
    """The object score from which a negative counts as hard: inside the SVM's hinge (margin above
    :data:`SVM_HARD_MARGIN`), or for the softmax head a probability the evaluate stage would report
    as a detection (``evaluate.score_threshold``)."""
    return SVM_HARD_MARGIN if svm else score_threshold


def already_sampled(pool: NegativePool, items: Sequence[ImageBoxes], image_ids: np.ndarray, boxes: np.ndarray,
                    labels: np.ndarray) -> np.ndarray:
    """Which pool rows are background regions the training set holds already (the regions stage's
    sample: ``image_ids``/``boxes``/``labels`` of its rows), so mining never adds them twice."""
    taken = np.zeros(len(pool.boxes), bool)
    background = labels == 0
    position = {item.image_id: k for k, item in enumerate(items)}
    for image_id in np.unique(image_ids[background]):
        k = position.get(str(image_id))
        if k is None:
            continue
        rows = np.flatnonzero(pool.image_index == k)
        sampled = boxes[background & (image_ids == image_id)]
        taken[rows] = (pool.boxes[rows][:, None, :] == sampled[None, :, :]).all(axis=2).any(axis=1)
    return taken


def mine_hard_negatives(scores: np.ndarray, image_index: np.ndarray, taken: np.ndarray, per_image: int,
                        min_score: float = -np.inf) -> np.ndarray:
    """Indices (sorted) of each image's ``per_image`` highest-scoring proposals not yet ``taken`` and scoring
    at least ``min_score`` (ties: lower index first)."""
    candidates = np.flatnonzero(~taken & (scores >= min_score))
    order = candidates[np.lexsort((candidates, -scores[candidates], image_index[candidates]))]
    images = image_index[order]
    first = np.searchsorted(images, images, side="left")  # sorted by image: rank = position - first
    rank = np.arange(len(order)) - first
    return np.sort(order[rank < per_image])
