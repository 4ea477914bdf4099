"""What every format reader returns: images with their objects in VOC's 1-based corners, and the one rule
for a bad entry (an error naming file and entry, or with ``on_bad: skip`` a warning and a count)."""

from __future__ import annotations

import math
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rcnn.utils.errors import RcnnError


class FormatError(RcnnError):
    """A COCO or YOLO source that cannot be converted."""


def finite_number(value: object) -> bool:
    """An int or float that is finite (JSON's ``NaN``/``Infinity`` and YAML's ``.nan`` are not; nor is ``true``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_class_name(name: object, where: str) -> str:
    """``name`` if it can be a class name, else a FormatError naming ``where``: a string, not ``background``
    (index 0 is background), without invisible characters (a BOM or a zero-width space makes a name that looks
    like another but is not) or control characters."""
    if isinstance(name, bool):
        raise FormatError(f"{where} is {str(name).lower()} (YAML reads unquoted yes/no/on/off/true/false as "
                          f"booleans): quote it")
    if not isinstance(name, str):
        raise FormatError(f"{where} is {name!r}, not a class name (quote it if it is a number)")
    hidden = next((c for c in name if unicodedata.category(c) in ("Cf", "Cc", "Zl", "Zp")), None)
    if hidden is not None:
        raise FormatError(f"{where} {name!r} contains an invisible character U+{ord(hidden):04X}: remove it")
    if not name.strip():
        raise FormatError(f"{where} is an empty class name")
    if name == "background":
        raise FormatError(f"{where} is named 'background', which is reserved (index 0 is background): rename it")
    return name


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
