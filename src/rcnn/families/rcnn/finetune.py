"""Fine-tuning R-CNN's CNN on warped proposals drawn afresh every epoch (the R-CNN paper's §2.3).

Each epoch draws ``images x regions.max_boxes`` regions from *all* labelled proposals of the
training images (``boxes.npz`` of the regions stage) plus their ground-truth boxes, in
mini-batches of ``train.batch_size`` holding exactly ``round(train.fg_fraction x batch_size)``
foreground regions, at least one (the paper: 32 of 128); a chunk of images without any foreground
(or any background) fills its batches from what it has. Images are taken in chunks of :data:`CHUNK_IMAGES`:
a chunk's images are decoded once and its batches' crops warped from them with the warp and
context padding detection uses, so memory stays bounded whatever the split size. Augmentation: mirroring
(``train.flips``, left to right by default) and, with ``train.box_jitter``, box corners moved by up to that
fraction of the box size where the moved box keeps its label. Every draw comes from a generator seeded by
(seed, epoch): the same params give the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch

from rcnn.data import voc
from rcnn.families.rcnn.crops import warp_crops
from rcnn.pipeline.params import RegionParams, TrainParams
from rcnn.proposals.region_boxes import ImageBoxes
from rcnn.utils.boxes import FLIPS, box_iou

CHUNK_IMAGES = 16  # images decoded together; their regions are shuffled into each other's batches


@dataclass(frozen=True)
class _Pools:
    """One image's candidate regions: foreground boxes with classes, background boxes."""

    fg_boxes: np.ndarray  # (F, 4) proposals with IoU >= regions.fg_iou, then the ground truth
    fg_labels: np.ndarray  # (F,)
    bg_boxes: np.ndarray  # (B, 4) proposals below regions.bg_iou with every object


def _pools(item: ImageBoxes, difficult_as_foreground: bool) -> _Pools:
    keep_gt = np.ones(len(item.gt_labels), bool) if difficult_as_foreground else ~item.gt_difficult
    fg = item.labels > 0
    return _Pools(np.concatenate([item.proposals[fg], item.gt_boxes[keep_gt]]).reshape(-1, 4),
                  np.concatenate([item.labels[fg], item.gt_labels[keep_gt]]).astype(np.int64),
                  item.proposals[item.labels == 0].reshape(-1, 4))


def jitter_boxes(boxes: np.ndarray, labels: np.ndarray, item: ImageBoxes, amount: float, fg_iou: float,
                 bg_iou: float, rng: np.random.Generator) -> np.ndarray:
    """Boxes with each corner moved by up to ``amount`` x the box size, kept only where the moved
    box keeps its label (foreground: IoU >= ``fg_iou`` with an object of its class; background:
    IoU < ``bg_iou`` with every object); others stay as they were."""
    if amount <= 0 or len(boxes) == 0:
        return boxes
    size = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1] * 2, axis=1)
    moved = boxes + rng.uniform(-amount, amount, size=boxes.shape) * size
    moved[:, [0, 2]] = np.clip(moved[:, [0, 2]], 0, item.width - 1)
    moved[:, [1, 3]] = np.clip(moved[:, [1, 3]], 0, item.height - 1)
    valid = (moved[:, 2] - moved[:, 0] >= 1) & (moved[:, 3] - moved[:, 1] >= 1)
    if len(item.gt_boxes):
        iou = box_iou(moved, item.gt_boxes)
        same_class = labels[:, None] == item.gt_labels[None, :]
        fg_ok = np.where(same_class, iou, -1.0).max(axis=1) >= fg_iou
        bg_ok = iou.max(axis=1) < bg_iou
        valid &= np.where(labels > 0, fg_ok, bg_ok)
    return np.where(valid[:, None], moved, boxes).astype(np.float32)


def flipped_crops(crops: np.ndarray, flips: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """``(N,S,S,3)`` crops, each mirrored by each of ``flips`` with probability 1/2 (in place): a square crop
    mirrored is the crop of the mirrored image, context included (:func:`rcnn.modeling.image_input.flipped`)."""
    for name in FLIPS:
        if name in flips:
            chosen = rng.random(len(crops)) < 0.5
            if name == "horizontal":
                crops[chosen] = crops[chosen, :, ::-1]
            elif name == "vertical":
                crops[chosen] = crops[chosen, ::-1]
            else:
                crops[chosen] = crops[chosen].transpose(0, 2, 1, 3)
    return crops


class ProposalSampler:
    """Mini-batches of warped crops for one epoch, drawn afresh from every labelled proposal."""

    def __init__(self, root: Path, items: Sequence[ImageBoxes], regions: RegionParams, train: TrainParams,
                 seed: int) -> None:
        """``regions``: the settings the regions stage used (:func:`rcnn.families.rcnn.regions.region_settings`)."""
        self.root, self.items, self.regions, self.train, self.seed = root, list(items), regions, train, seed
        self.pools = [_pools(item, regions.difficult_as_foreground) for item in self.items]
        self.batch_size = train.batch_size
        # At least one foreground region a batch: fg_fraction > 0 asks for some, however small the batch.
        self.batch_fg = min(self.batch_size, max(1, int(round(train.fg_fraction * self.batch_size))))

    @property
    def pool_size(self) -> int:
        """Regions the epochs draw from (labelled proposals plus ground-truth boxes)."""
        return sum(len(p.fg_labels) + len(p.bg_boxes) for p in self.pools)

    def _chunks(self) -> list[list[int]]:
        return [list(range(s, min(s + CHUNK_IMAGES, len(self.items))))
                for s in range(0, len(self.items), CHUNK_IMAGES)]

    def _batches_in(self, chunk: Sequence[int]) -> int:
        return -(-len(chunk) * self.regions.max_boxes // self.batch_size)

    @property
    def regions_per_epoch(self) -> int:
        """Regions one epoch trains on (``images x regions.max_boxes``, rounded up to whole batches)."""
        return sum(self._batches_in(c) for c in self._chunks() if self._usable(c)) * self.batch_size

    def _usable(self, chunk: Sequence[int]) -> bool:
        return any(len(self.pools[k].fg_labels) + len(self.pools[k].bg_boxes) for k in chunk)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled batches ``((B,S,S,3) uint8 RGB crops, (B,) labels)`` of epoch ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.items))
        for chunk in self._chunks():
            chunk = [int(order[k]) for k in chunk]
            if self._usable(chunk):
                yield from self._chunk_batches(chunk, rng)

    def _draw(self, sizes: list[int], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (image position, row) pairs drawn uniformly from pools of ``sizes`` (without
        replacement while the pools last)."""
        owner = np.repeat(np.arange(len(sizes)), sizes)
        row = np.concatenate([np.arange(s) for s in sizes]) if sizes else np.zeros(0, np.int64)
        pick = rng.choice(len(owner), n, replace=n > len(owner)) if n else np.zeros(0, np.int64)
        return owner[pick], row[pick]

    def _chunk_batches(self, chunk: list[int], rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pools = [self.pools[k] for k in chunk]
        fg_sizes, bg_sizes = [len(p.fg_labels) for p in pools], [len(p.bg_boxes) for p in pools]
        n_fg = self.batch_fg if sum(fg_sizes) else 0
        n_fg = self.batch_size if not sum(bg_sizes) else n_fg
        n_batches = self._batches_in(chunk)
        fg_owner, fg_row = self._draw(fg_sizes, n_batches * n_fg, rng)
        bg_owner, bg_row = self._draw(bg_sizes, n_batches * (self.batch_size - n_fg), rng)
        owner = np.concatenate([fg_owner, bg_owner])
        # np.array, not np.stack: a chunk may draw no foreground (or no background) at all.
        boxes = np.concatenate([
            np.array([pools[o].fg_boxes[r] for o, r in zip(fg_owner, fg_row)], np.float32).reshape(-1, 4),
            np.array([pools[o].bg_boxes[r] for o, r in zip(bg_owner, bg_row)], np.float32).reshape(-1, 4)])
        labels = np.concatenate([np.array([pools[o].fg_labels[r] for o, r in zip(fg_owner, fg_row)], np.int64),
                                 np.zeros(len(bg_owner), np.int64)])
        crops = self._warp(chunk, owner, boxes, labels, rng)
        crops = flipped_crops(crops, self.train.flips, rng)
        # Batch b takes foreground rows b*n_fg.. and background rows b*n_bg.., shuffled within.
        n_bg = self.batch_size - n_fg
        for b in range(n_batches):
            rows = np.concatenate([np.arange(b * n_fg, (b + 1) * n_fg),
                                   len(fg_owner) + np.arange(b * n_bg, (b + 1) * n_bg)])
            rows = rng.permutation(rows)
            yield torch.from_numpy(crops[rows]), torch.from_numpy(labels[rows])

    def _warp(self, chunk: list[int], owner: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
        """Crops of ``boxes`` (jittered), each from its image, decoded once per chunk."""
        r = self.regions
        crops = np.empty((len(boxes), r.crop_size, r.crop_size, 3), np.uint8)
        for pos, k in enumerate(chunk):
            rows = np.flatnonzero(owner == pos)
            if not len(rows):
                continue
            item = self.items[k]
            rgb = cv2.cvtColor(voc.read_image(voc.image_path(self.root, item.image_id)), cv2.COLOR_BGR2RGB)
            moved = jitter_boxes(boxes[rows], labels[rows], item, self.train.box_jitter, r.fg_iou, r.bg_iou, rng)
            crops[rows] = warp_crops(rgb, moved, r.crop_size, r.context)
        return crops
