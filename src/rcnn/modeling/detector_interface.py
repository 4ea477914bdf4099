"""The detector interface every family implements: a trained model plus the settings that turn its scores
into detections (:mod:`rcnn.modeling.postprocess`), one image or many."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rcnn.data import voc
from rcnn.evaluation.voc_eval import Detections


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
class Detector(abc.ABC):
    """A trained model of any family plus the settings that turn its scores into detections; each family
    subclasses it (:mod:`rcnn.pipeline.family_registry` picks the subclass a checkpoint names)."""

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
    @abc.abstractmethod
    def from_payload(cls, payload: dict, path: str | Path, device: torch.device, **settings: float) -> "Detector":
        """The detector of a checkpoint payload of this family (see :func:`rcnn.pipeline.family_registry.load_detector`)."""

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @abc.abstractmethod
    def detect(self, image_bgr: np.ndarray, proposals: np.ndarray | None) -> Detections:
        """Detections of one BGR image given its ranked proposals (inclusive corners; None where the
        detector proposes its own regions)."""

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


