"""PASCAL VOC reading: annotations parsed by tag name, split lists, image paths.

Layout of a VOC-format folder (``ROOT``)::

    ROOT/JPEGImages/<id>.jpg  ROOT/Annotations/<id>.xml  ROOT/ImageSets/Main/<split>.txt

Boxes come back as 0-based inclusive corners (see :mod:`rcnn.boxes`), clipped to the image.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import cv2
import numpy as np

from rcnn.errors import RcnnError


@dataclass(frozen=True)
class Annotation:
    """Ground truth of one image. ``labels`` index ``classes`` from 1 (0 is background)."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32, inclusive 0-based corners
    labels: np.ndarray  # (N,) int64, 1..len(classes)
    difficult: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool


class AnnotationError(RcnnError):
    """A malformed annotation file or an object that cannot be used."""


def _text(node: ET.Element, tag: str, path: Path, default: str | None = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is not None:
            return default
        raise AnnotationError(f"{path}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    value = _text(node, tag, path)
    try:
        return float(value)
    except ValueError:
        raise AnnotationError(f"{path}: <{tag}> is {value!r}, not a number") from None


def _flag(node: ET.Element, tag: str, path: Path) -> bool:
    """A 0/1 flag such as ``difficult``; a missing or empty tag means 0."""
    child = node.find(tag)
    if child is None or not (child.text or "").strip():
        return False
    return _number(node, tag, path) != 0


def parse_annotation(path: str | Path, classes: Sequence[str],
                     on_bad: Literal["error", "skip"] = "error",
                     image_size: tuple[int, int] | None = None) -> Annotation:
    """Parse one VOC XML file by tag name.

    ``on_bad="skip"`` drops objects of unknown classes or with unusable boxes with a warning
    instead of raising. ``image_size`` (width, height) is used when ``<size>`` is missing or zero.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: malformed XML ({err})") from None
    size = root.find("size")
    width = height = 0
    if size is not None:
        width, height = int(_number(size, "width", path)), int(_number(size, "height", path))
    if (width <= 0 or height <= 0) and image_size is not None:
        width, height = image_size
    if width <= 0 or height <= 0:
        raise AnnotationError(f"{path}: missing or zero image <size>")
    class_index = {name: i + 1 for i, name in enumerate(classes)}
    boxes, labels, difficult, truncated = [], [], [], []
    for obj in root.iter("object"):
        try:
            name = _text(obj, "name", path)
            if name not in class_index:
                raise AnnotationError(f"{path}: object class {name!r} is not in classes {list(classes)}")
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise AnnotationError(f"{path}: object {name!r} has no <bndbox>")
            x1, y1, x2, y2 = (_number(bndbox, t, path) - 1 for t in ("xmin", "ymin", "xmax", "ymax"))
            x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(x2, width - 1.0), min(y2, height - 1.0)
            if x2 < x1 or y2 < y1:
                raise AnnotationError(f"{path}: object {name!r} has an empty box after clipping to "
                                      f"the {width}x{height} image")
        except AnnotationError as err:
            if on_bad == "error":
                raise
            warnings.warn(f"skipping object: {err}", stacklevel=2)
            continue
        boxes.append((x1, y1, x2, y2))
        labels.append(class_index[name])
        difficult.append(_flag(obj, "difficult", path))
        truncated.append(_flag(obj, "truncated", path))
    return Annotation(
        image_id=path.stem, width=width, height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
        truncated=np.asarray(truncated, dtype=bool),
    )


def read_split(root: str | Path, split: str) -> list[str]:
    """Sorted image ids of ``ImageSets/Main/<split>.txt``."""
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise RcnnError(f"split {split!r} not found: {path} does not exist")
    ids = {line.split()[0] for line in path.read_text().splitlines() if line.strip()}
    return sorted(ids)


def image_path(root: str | Path, image_id: str) -> Path:
    return Path(root) / "JPEGImages" / f"{image_id}.jpg"


def annotation_path(root: str | Path, image_id: str) -> Path:
    return Path(root) / "Annotations" / f"{image_id}.xml"


def load_split(root: str | Path, split: str, classes: Sequence[str],
               on_bad: Literal["error", "skip"] = "error") -> list[Annotation]:
    """Annotations of every image of a split, in sorted id order."""
    return [parse_annotation(annotation_path(root, i), classes, on_bad) for i in read_split(root, split)]


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as BGR uint8; a missing or undecodable file raises :class:`RcnnError`."""
    path = Path(path)
    if not path.is_file():
        raise RcnnError(f"{path}: image not found")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise RcnnError(f"{path}: not a decodable image")
    return image


def is_voc_root(path: str | Path) -> bool:
    path = Path(path)
    return all((path / d).is_dir() for d in ("JPEGImages", "Annotations", "ImageSets/Main"))


def find_voc_root(path: str | Path) -> Path:
    """The VOC-format folder at or below ``path`` (``path``, ``VOC2007`` or ``VOCdevkit/VOC2007``)."""
    path = Path(path)
    for candidate in (path, path / "VOC2007", path / "VOCdevkit" / "VOC2007"):
        if is_voc_root(candidate):
            return candidate
    found = sorted(p.parent.parent for p in path.glob("**/ImageSets/Main") if is_voc_root(p.parent.parent))
    if found:
        return found[0]
    raise RcnnError(f"{path}: no VOC-format folder (JPEGImages/, Annotations/, ImageSets/Main/) found")


def class_counts(annotations: Iterable[Annotation], classes: Sequence[str]) -> dict[str, int]:
    counts = np.zeros(len(classes) + 1, dtype=np.int64)
    for ann in annotations:
        np.add.at(counts, ann.labels, 1)
    return {name: int(counts[i + 1]) for i, name in enumerate(classes)}
