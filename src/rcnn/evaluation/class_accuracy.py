"""Foreground accuracy per class of a region classifier, and the collapse check built on it.

A detector that has learned to call every region background keeps a modest loss and a high
overall accuracy (background is most of every sample), so neither number shows the collapse;
the share of each class's regions classified as that class does. Both families report it for
training and validation data (``train_fg_accuracy.<class>``, ``val_fg_accuracy.<class>`` in
``metrics/train.json``), refuse to save a model that learned no foreground at all, and name the
classes a saved model learned nothing of (``unlearned_classes``).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from rcnn.utils.errors import RcnnError

class ClassTally:
    """Regions seen and regions classified correctly, per label (0 is background). Batches are counted where
    their tensors are, and read back only when a count is asked for: on a GPU a training step waits for
    nothing."""

    def __init__(self, num_labels: int) -> None:
        self._seen = np.zeros(num_labels, np.int64)
        self._correct = np.zeros(num_labels, np.int64)
        self._pending: torch.Tensor | None = None  # (2, num_labels) counts on the batches' device, not yet read

    def add(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch of predicted and true labels."""
        labels = labels.detach().long()
        counts = torch.zeros(2, len(self._seen), dtype=torch.int64, device=labels.device)
        counts[0].index_add_(0, labels, torch.ones_like(labels))
        counts[1].index_add_(0, labels, (predicted.detach() == labels).long())
        self._pending = counts if self._pending is None else self._pending + counts

    def _read(self) -> None:
        if self._pending is not None:
            seen, correct = self._pending.cpu().numpy()
            self._seen, self._correct, self._pending = self._seen + seen, self._correct + correct, None

    @property
    def seen(self) -> np.ndarray:
        self._read()
        return self._seen

    @property
    def correct(self) -> np.ndarray:
        self._read()
        return self._correct

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


def rarest_class_objects(objects: np.ndarray) -> int:
    """The training objects of the rarest class that has any (:func:`objects_per_class`' counts), what the
    two-stage trainers derive the backbone's rate and the step floor from."""
    present = objects[1:][objects[1:] > 0]
    return int(present.min()) if present.size else 0


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


def unlearned_classes(tally: ClassTally, classes: Sequence[str], objects: np.ndarray) -> list[dict]:
    """The classes with training objects of which the model classifies no training region as that class:
    ``{"class", "train_objects", "train_fg_accuracy"}`` each, in class order."""
    return [{"class": name, "train_objects": int(objects[i]), "train_fg_accuracy": 0.0}
            for i, name in enumerate(classes, start=1) if objects[i] and tally.seen[i] and tally.correct[i] == 0]


def total_collapse(tally: ClassTally) -> str | None:
    """What collapsed, if the model classifies no foreground region of its training data correctly (it learned
    no class at all); None otherwise."""
    if tally.seen[1:].sum() and tally.correct[1:].sum() == 0:
        return (f"training collapsed: the trained model classifies none of the {int(tally.seen[1:].sum())} "
                f"foreground regions of its own training data correctly (it calls everything background)")
    return None


def with_weights_advice(advice: str, weights: str) -> str:
    """``advice``, led by the likeliest cause where the backbone started from random weights: every preset
    assumes pretrained ones."""
    if weights != "none":
        return advice
    return (f"give the backbone pretrained weights first (model.weights, now none: imagenet, or a local .pth; the "
            f"presets assume them), or {advice}")


def check_trained(tally: ClassTally, classes: Sequence[str], objects: np.ndarray, advice: str,
                  allow: bool = False) -> tuple[str | None, list[dict]]:
    """The collapse check: one error naming ``advice`` (what to change) if the model learned no class at all
    (with ``allow``, ``train.allow_collapse``, a warning and the model kept); one warning naming the classes it
    learned no foreground of, whose model is still worth saving (VOC has hard classes: a model useful on 17 of
    18 classes is not thrown away for the 18th). Returns the total collapse (or None) and the unlearned
    classes (:func:`unlearned_classes`)."""
    problem = total_collapse(tally)
    if problem and not allow:
        raise RcnnError(f"{problem}, so it was not saved; {advice} (a smoke test that only needs the files can "
                        f"set train.allow_collapse=true)")
    if problem:
        warnings.warn(f"{problem}; kept because train.allow_collapse is true", RuntimeWarning, stacklevel=2)
    unlearned = unlearned_classes(tally, classes, objects)
    if unlearned and not problem:
        named = ", ".join(f"{c['class']} ({c['train_objects']} training objects)" for c in unlearned)
        one = len(unlearned) == 1
        learned = int(np.count_nonzero(objects[1:len(classes) + 1])) - len(unlearned)
        warnings.warn(f"the model learned {learned} of {len(classes)} classes but no foreground of {named}: it will detect little or none of {'it' if one else 'them'} "
                      f"(unlearned_classes in the train metrics, per-class AP in the evaluate metrics); the model is "
                      f"saved; to try: more photos of {'it' if one else 'them'}, {advice}", RuntimeWarning,
                      stacklevel=2)
    return problem, unlearned
