"""Foreground accuracy per class of a region classifier, and the collapse check built on it.

A detector that has learned to call every region background keeps a modest loss and a high
overall accuracy (background is most of every sample), so neither number shows the collapse;
the share of each class's regions classified as that class does. Both families report it for
training and validation data (``train_fg_accuracy.<class>``, ``val_fg_accuracy.<class>`` in
``metrics/train.json``) and refuse to save a model that learned no foreground.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from rcnn.errors import RcnnError

COLLAPSE_MIN_OBJECTS = 20  # a class with this many training objects must have learned something


class ClassTally:
    """Regions seen and regions classified correctly, per label (0 is background)."""

    def __init__(self, num_labels: int) -> None:
        self.seen = np.zeros(num_labels, np.int64)
        self.correct = np.zeros(num_labels, np.int64)

    def add(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch of predicted and true labels."""
        labels_np = labels.detach().cpu().numpy().astype(np.int64)
        hit = predicted.detach().cpu().numpy() == labels_np
        size = len(self.seen)
        self.seen += np.bincount(labels_np, minlength=size)[:size]
        self.correct += np.bincount(labels_np[hit], minlength=size)[:size]

    def fg_accuracy(self) -> float:
        """Share of all foreground regions classified as their own class."""
        return float(self.correct[1:].sum() / max(self.seen[1:].sum(), 1))

    def per_class(self, classes: Sequence[str]) -> dict[str, float]:
        """Foreground accuracy of each class that had regions (classes without any are left out)."""
        return {name: round(float(self.correct[i] / self.seen[i]), 6)
                for i, name in enumerate(classes, start=1) if self.seen[i]}


def objects_per_class(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Training objects per label (index 0 unused) from each image's object labels."""
    joined = np.concatenate([np.asarray(x, np.int64).ravel() for x in labels]) if labels else np.zeros(0, np.int64)
    return np.bincount(joined, minlength=num_classes)[:num_classes]


def check_training_objects(objects: np.ndarray, classes: Sequence[str], split: str) -> None:
    """One error if the training split has no objects of any class (nothing to learn); a warning naming the
    classes it has none of (the model cannot learn those)."""
    if not objects[1:].sum():
        raise RcnnError(f"the training split {split!r} holds no objects of the classes {list(classes)}: nothing to "
                        f"learn; check data.train_split and classes")
    missing = [name for i, name in enumerate(classes, start=1) if not objects[i]]
    if missing:
        warnings.warn(f"the training split {split!r} holds no objects of {', '.join(missing)}: the model cannot "
                      f"learn {'it' if len(missing) == 1 else 'them'}", RuntimeWarning, stacklevel=2)


def collapse(tally: ClassTally, classes: Sequence[str], objects: np.ndarray,
             min_objects: int = COLLAPSE_MIN_OBJECTS) -> str | None:
    """What collapsed, if the model classifies no foreground region of its training data correctly, overall
    or for a class with at least ``min_objects`` training objects; None for a healthy model."""
    if tally.seen[1:].sum() and tally.correct[1:].sum() == 0:
        return (f"training collapsed: the trained model classifies none of the {int(tally.seen[1:].sum())} "
                f"foreground regions of its own training data correctly (it calls everything background)")
    failed = [f"{name} ({int(objects[i])} objects)" for i, name in enumerate(classes, start=1)
              if objects[i] >= min_objects and tally.seen[i] and tally.correct[i] == 0]
    if failed:
        return (f"training collapsed for {', '.join(failed)}: the trained model classifies none of "
                f"{'that class' if len(failed) == 1 else 'those classes'}' training regions correctly")
    return None


def check_not_collapsed(tally: ClassTally, classes: Sequence[str], objects: np.ndarray, advice: str,
                        allow: bool = False) -> str | None:
    """One error naming what collapsed and ``advice`` (what to change); with ``allow``
    (``train.allow_collapse``, for smoke tests of the plumbing) a warning instead. Returns what collapsed."""
    problem = collapse(tally, classes, objects)
    if problem and not allow:
        raise RcnnError(f"{problem}, so it was not saved; {advice} (a smoke test that only needs the files can "
                        f"set train.allow_collapse=true)")
    if problem:
        warnings.warn(f"{problem}; kept because train.allow_collapse is true", RuntimeWarning, stacklevel=2)
    return problem
