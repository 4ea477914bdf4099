"""Batches of whole images for the two-stage trainer (:mod:`rcnn.engine.two_stage_trainer`).

The plan (which images, in which order, flipped or not, and with ``train.batch_shapes`` grouped, at which
training size) is drawn in the training process from the run's generator; a ``torch.utils.data.DataLoader`` only reads, decodes and flips what the plan names, in
``train.workers`` worker processes kept for the whole run, into pinned memory on CUDA, so that reading
overlaps with the step. The plan never depends on the number of workers, and the loader draws nothing from
torch's global generator (the one RoI sampling and multi-scale sizes use): one seed gives the same batches,
flips and model bytes with 0 workers or 8.

Grouped batches (:func:`grouped_batches`: ``train.batch_shapes``) hold images of one orientation (torchvision's
``GroupedBatchSampler``, detectron2's ``AspectRatioGroupedDataset``) at one training size drawn per batch, so that
padded to :class:`rcnn.modeling.image_input.CanvasTransform`'s canvases a run meets a few batch shapes, not one per
step: what lets cuDNN keep the algorithms it benchmarked.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rcnn.data import voc
from rcnn.modeling.image_input import flipped, image_tensor, to_continuous
from rcnn.proposals.region_boxes import ImageBoxes
from rcnn.utils.boxes import FLIPS
from rcnn.utils.errors import RcnnError

MAX_AUTO_WORKERS = 8


class PlanItem(NamedTuple):
    """One image of a planned batch."""

    index: int  # into the examples
    flips: tuple[str, ...]  # the mirrorings drawn for it, of train.flips
    size: int = 0  # the batch's training size (short side); 0: the model draws one per image


# images, proposals, targets, and the batch's training size (0: the model draws one per image)
Batch = tuple[list[torch.Tensor], list[torch.Tensor], list[dict[str, torch.Tensor]], int]


@dataclass
class Example:
    """One training image in memory-light form: the image is read when its batch comes."""

    path: Path
    boxes: ImageBoxes
    proposals: np.ndarray  # labelled (not ignored) proposals, inclusive corners; none for Faster R-CNN
    gt_index: np.ndarray  # objects to learn (difficult ones excluded unless asked)


def training_examples(root: Path, items: Sequence[ImageBoxes], difficult_as_foreground: bool,
                      bg_iou_low: float = 0.0) -> list[Example]:
    """The examples of one split's labelled boxes (``items``), images under the VOC folder ``root``."""
    out = []
    for item in items:
        proposals, gt_index = item.training_targets(difficult_as_foreground, bg_iou_low)
        out.append(Example(voc.image_path(root, item.image_id), item, proposals, gt_index))
    return out


def load_example(example: Example, flips: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor,
                                                                        dict[str, torch.Tensor]] | None:
    """Image tensor, proposals and targets (continuous corners), mirrored by ``flips``; None if unreadable."""
    try:
        image = image_tensor(voc.read_image(example.path))
    except RcnnError as err:
        warnings.warn(f"skipping unreadable training image: {err}", RuntimeWarning, stacklevel=2)
        return None
    proposals = to_continuous(example.proposals)
    gt = to_continuous(example.boxes.gt_boxes[example.gt_index])
    labels = torch.from_numpy(example.boxes.gt_labels[example.gt_index].astype(np.int64))
    image, (proposals, gt) = flipped(image, (proposals, gt), flips)
    return image, proposals, {"boxes": gt, "labels": labels}


def repeat_factors(examples: list[Example], num_classes: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """LVIS's repeat-factor sampling (detectron2's ``RepeatFactorTrainingSampler``): class ``c``, held by a
    share ``f(c)`` of the training images, gets ``r(c) = max(1, sqrt(threshold / f(c)))``; an image the largest
    ``r`` of its classes. Returns the factor of each image and of each label (index 0 unused); all ones for
    ``threshold`` 0."""
    held = np.zeros(num_classes)
    labels = [np.unique(ex.boxes.gt_labels[ex.gt_index]) for ex in examples]
    for image_labels in labels:
        held[image_labels] += 1
    share = held / max(len(examples), 1)
    per_class = np.ones(num_classes)
    if threshold > 0:
        per_class[share > 0] = np.maximum(1.0, np.sqrt(threshold / share[share > 0]))
    per_image = np.array([per_class[x].max() if len(x) else 1.0 for x in labels])
    return per_image, per_class


def training_order(n: int, needed: int, rng: np.random.Generator, repeat: np.ndarray | None) -> np.ndarray:
    """``needed`` image indices: passes over the images, each in a fresh order; with ``repeat`` factors each
    pass holds image i ``floor(r_i)`` times and once more with probability ``r_i - floor(r_i)``."""
    if repeat is None:
        passes = -(-needed // n)
        return np.concatenate([rng.permutation(n) for _ in range(passes)])[:needed]
    order, total = [], 0
    while total < needed:
        counts = np.floor(repeat).astype(np.int64) + (rng.random(n) < repeat - np.floor(repeat))
        one_pass = np.repeat(np.arange(n), counts)
        order.append(one_pass[rng.permutation(len(one_pass))])
        total += len(one_pass)
    return np.concatenate(order)[:needed]


def draw_flips(n: int, flips: Sequence[str], rng: np.random.Generator) -> list[tuple[str, ...]]:
    """For each of ``n`` images, which of ``flips`` mirror it (each with probability 1/2, one draw of ``rng``
    per named flip, in :data:`rcnn.utils.boxes.FLIPS`' order)."""
    drawn = [(name, rng.random(n) < 0.5) for name in FLIPS if name in flips]
    return [tuple(name for name, chosen in drawn if chosen[k]) for k in range(n)]


def training_plan(num_examples: int, images_per_batch: int, rng: np.random.Generator, steps: int | None = None,
                  repeat: np.ndarray | None = None, groups: np.ndarray | None = None,
                  sizes: Sequence[int] = (), flips: Sequence[str] = ("horizontal",)) -> list[list[PlanItem]]:
    """One epoch's batches: a shuffled order, each image mirrored by each of ``flips`` with probability 1/2,
    ``steps`` batches (passing over the images as often as that takes, each pass in a fresh order, images drawn by
    their ``repeat`` factors where given).
    With ``groups`` (a group number per example, e.g. its orientation) each batch holds one group's images in
    the order they come (the leftovers of every group at the end, together) and gets one of ``sizes``."""
    one_pass = -(-num_examples // images_per_batch)
    needed = steps * images_per_batch if steps and steps > one_pass else num_examples
    order = training_order(num_examples, needed, rng, repeat)
    items = [PlanItem(int(i), drawn) for i, drawn in zip(order, draw_flips(len(order), flips, rng))]
    if groups is None:
        return [items[start:start + images_per_batch] for start in range(0, len(items), images_per_batch)]
    batches, waiting = [], {}
    for item in items:
        group = waiting.setdefault(int(groups[item.index]), [])
        group.append(item)
        if len(group) == images_per_batch:
            batches.append(group[:])
            group.clear()
    left = [item for group in sorted(waiting) for item in waiting[group]]
    batches += [left[start:start + images_per_batch] for start in range(0, len(left), images_per_batch)]
    drawn = rng.choice(np.asarray(sizes, np.int64), size=len(batches)) if len(sizes) else np.zeros(len(batches), int)
    return [[item._replace(size=int(size)) for item in batch] for batch, size in zip(batches, drawn)]


def orientation_groups(examples: Sequence[Example]) -> np.ndarray:
    """Group 0 for images at least as wide as high, 1 for the others: batches of one group pad little."""
    return np.array([int(ex.boxes.height > ex.boxes.width) for ex in examples], np.int64)


def grouped_batches(setting: str, device: torch.device) -> bool:
    """``train.batch_shapes``: ``grouped`` or ``free``, or ``auto``: grouped on CUDA, where every new batch shape
    costs cuDNN an algorithm search; free elsewhere, where a shape costs nothing and grouped batches would change
    which images train together for no speed (docs/performance.md)."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "grouped"


def in_order_plan(num_examples: int, images_per_batch: int) -> list[list[PlanItem]]:
    """Every image once, in order, unflipped: validation and the trained model's scoring."""
    items = [PlanItem(i, ()) for i in range(num_examples)]
    return [items[start:start + images_per_batch] for start in range(0, num_examples, images_per_batch)]


def loader_workers(setting: int | str, device: torch.device) -> int:
    """``train.workers``: a count, or ``auto``: none on a CPU, where a worker takes a core from the step and
    reading a batch costs a few percent of it (docs/performance.md), else half the cores, at most 8."""
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) // 2))


class _ExampleImages(Dataset):
    """The examples, loaded by plan item: ``dataset[PlanItem(index, flips)]``."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: PlanItem):  # noqa: ANN204
        loaded = load_example(self.examples[item.index], item.flips)
        return None if loaded is None else (*loaded, item.size)


class _Plan(Sampler):
    """The batch sampler: whatever plan the loader was last given (iterated in the training process)."""

    def __init__(self) -> None:
        self.batches: list[list[PlanItem]] = []

    def __iter__(self) -> Iterator[list[PlanItem]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(loaded: list) -> Batch | None:
    kept = [x for x in loaded if x is not None]
    if not kept:
        return None
    images, proposals, targets, sizes = zip(*kept)
    return list(images), list(proposals), list(targets), sizes[0]


class BatchLoader:
    """Loads the batches of a plan; with ``workers`` > 0 in that many worker processes (forkserver ones, clean of
    the torch and OpenMP threads a forked child could deadlock on), started once and kept for every plan."""

    def __init__(self, examples: Sequence[Example], workers: int, device: torch.device) -> None:
        self._plan = _Plan()
        extra = {}
        if workers:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            extra = {"multiprocessing_context": multiprocessing.get_context(method), "persistent_workers": True}
        self.loader = DataLoader(_ExampleImages(examples), batch_sampler=self._plan, num_workers=workers,
                                 collate_fn=_collate, pin_memory=device.type == "cuda",
                                 generator=torch.Generator(), **extra)  # draws nothing from the global generator

    def __call__(self, plan: list[list[PlanItem]]) -> Iterator[Batch]:
        """The loaded batches of ``plan`` in its order (a batch whose every image is unreadable is left out)."""
        self._plan.batches = plan
        return (batch for batch in self.loader if batch is not None)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on ``device``; copies from pinned memory do not wait for the device."""
    non_blocking = device.type == "cuda"
    images, proposals, targets, size = batch
    return ([x.to(device, non_blocking=non_blocking) for x in images],
            [x.to(device, non_blocking=non_blocking) for x in proposals],
            [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets], size)
