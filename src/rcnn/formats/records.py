"""What every format reader returns: images with their objects in VOC's 1-based corners, and the one rule
for a bad entry (an error naming file and entry, or with ``on_bad: skip`` a warning and a count)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rcnn.errors import RcnnError


class FormatError(RcnnError):
    """A COCO or YOLO source that cannot be converted."""


@dataclass
class SourceObject:
    name: str
    box: tuple[float, float, float, float]  # VOC corners: 1-based, inclusive (xmin, ymin, xmax, ymax)
    difficult: bool = False
    truncated: bool = False


@dataclass
class SourceImage:
    image_id: str
    path: Path
    width: int
    height: int
    objects: list[SourceObject] = field(default_factory=list)


@dataclass
class BadEntries:
    """Bad objects seen while reading: raised at once (``error``) or warned about and counted (``skip``)."""

    on_bad: Literal["error", "skip"]
    skipped: int = 0

    def __call__(self, message: str) -> None:
        if self.on_bad == "error":
            raise FormatError(f"{message} (or set data.on_bad_annotation: skip)")
        self.skipped += 1
        warnings.warn(f"skipping object: {message}", RuntimeWarning, stacklevel=3)


def continuous_to_voc(x1: float, y1: float, x2: float, y2: float, width: int, height: int,
                      ) -> tuple[float, float, float, float] | None:
    """A box in continuous pixel coordinates (``x2`` one past the last pixel) as VOC corners, clipped to the
    image; None when nothing of it is inside (an empty or outside box)."""
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if x2 - x1 < 1.0 or y2 - y1 < 1.0:
        return None
    return x1 + 1.0, y1 + 1.0, x2, y2
