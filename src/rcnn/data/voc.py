"""PASCAL VOC reading: annotations parsed by tag name, split lists, image paths.

Layout of a VOC-format folder (``ROOT``)::

    ROOT/JPEGImages/<id>.jpg  ROOT/Annotations/<id>.xml  ROOT/ImageSets/Main/<split>.txt

Boxes come back as 0-based inclusive corners (see :mod:`rcnn.utils.boxes`), clipped to the image.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import cv2
import numpy as np
from PIL import Image

from rcnn.utils.errors import RcnnError
from rcnn.utils.fileio import safe_name


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
        number = float(value)
    except ValueError:
        raise AnnotationError(f"{path}: <{tag}> is {value!r}, not a number") from None
    if not math.isfinite(number):  # a nan corner passes every clipping test and then matches nothing
        raise AnnotationError(f"{path}: <{tag}> is {value!r}, not a finite number")
    return number


def _flag(node: ET.Element, tag: str, path: Path) -> bool:
    """A 0/1 flag such as ``difficult``; a missing or empty tag means 0."""
    child = node.find(tag)
    if child is None or not (child.text or "").strip():
        return False
    return _number(node, tag, path) != 0


class UnknownClassError(AnnotationError):
    """An object of a class that ``classes`` does not list."""


SOURCE_FILE = "source.json"  # the download stage's note, next to its VOC2007 copy, of where the data came from


def shown(path: str | Path) -> str:
    """``path`` as messages show it: when it is the download stage's copy, with the user's own file
    (or archive) it came from, which is the one to fix."""
    path = Path(path)
    for parent in path.parents:
        note = parent / SOURCE_FILE
        if not note.is_file():
            continue
        try:
            info = json.loads(note.read_text(encoding="utf-8"))
            relative = path.relative_to(parent / "VOC2007")
        except (ValueError, OSError):
            break
        if info.get("format"):  # converted from COCO or YOLO: no file of that name in the source
            return f"{path} (converted from the {info['format']} source {info.get('root') or info.get('source')})"
        if info.get("kind") == "folder":
            return f"{path} (copied from {Path(info['root']) / relative})"
        if info.get("kind") == "archive":
            return f"{path} (extracted from {info['source']})"
        break
    return str(path)


def source_names(path: str | Path) -> list[str] | None:
    """The class names of the COCO or YOLO source the download stage converted ``path``'s folder from."""
    for parent in Path(path).parents:
        note = parent / SOURCE_FILE
        if note.is_file():
            try:
                names = json.loads(note.read_text(encoding="utf-8")).get("names")
            except (ValueError, OSError):
                return None
            return list(names) if isinstance(names, list) else None
    return None


def parse_annotation(path: str | Path, classes: Sequence[str],
                     on_bad: Literal["error", "skip"] = "error",
                     image_size: tuple[int, int] | None = None) -> Annotation:
    """Parse one VOC XML file by tag name.

    ``on_bad="skip"`` drops objects of unknown classes or with unusable boxes with a warning
    instead of raising. ``image_size`` (width, height) is used when ``<size>`` is missing or zero.
    Messages name the user's own file where ``path`` is the download stage's copy (:func:`shown`).
    """
    try:
        return _parse_annotation(Path(path), classes, on_bad, image_size)
    except UnknownClassError as err:
        names = source_names(path)
        hint = f"; the source's classes are {names}" if names else ""
        raise AnnotationError(str(err).replace(str(path), shown(path), 1) + hint) from None
    except AnnotationError as err:
        raise AnnotationError(str(err).replace(str(path), shown(path), 1)) from None


def _parse_annotation(path: Path, classes: Sequence[str], on_bad: Literal["error", "skip"],
                      image_size: tuple[int, int] | None) -> Annotation:
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
                raise UnknownClassError(f"{path}: object class {name!r} is not in classes {list(classes)}")
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
            warnings.warn(f"skipping object: {str(err).replace(str(path), shown(path), 1)}", stacklevel=3)
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


def split_line_id(line: str) -> str:
    """The image id of one line of a split list: the whole line, stripped (ids may hold spaces: ``my photo``),
    except in VOC's per-class form ``<id> 1`` / ``<id> -1`` / ``<id> 0``, whose first field it is."""
    text = line.strip()
    per_class = re.fullmatch(r"(\S+)\s+(-?1|0)", text)
    return per_class.group(1) if per_class else text


def read_split(root: str | Path, split: str) -> list[str]:
    """Sorted image ids of ``ImageSets/Main/<split>.txt``."""
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise RcnnError(f"split {split!r} not found: {path} does not exist")
    ids = {split_line_id(line) for line in path.read_text().splitlines() if line.strip()}
    unsafe = sorted(i for i in ids if safe_name(i) != i)
    if unsafe:  # an id names files under JPEGImages/ and Annotations/: it may not climb out of them
        raise RcnnError(f"{path}: image id {unsafe[0]!r} is not a plain file name (no '/', '\\', '..' or control "
                        f"characters)")
    return sorted(ids)


def _coordinate(value: float) -> str:
    """A box corner as VOC files write it: an integer where it is one, else two decimals."""
    value = round(float(value), 2)
    return str(int(value)) if value == int(value) else f"{value:.2f}"


def annotation_xml(image_id: str, width: int, height: int, objects: Sequence[dict], database: str) -> bytes:
    """A VOC XML annotation; each object a dict of ``name``, ``box`` (1-based VOC corners xmin, ymin, xmax,
    ymax), ``difficult`` and ``truncated``."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = database
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj["name"]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(obj.get("truncated", False)))
        ET.SubElement(node, "difficult").text = str(int(obj.get("difficult", False)))
        bndbox = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"]):
            ET.SubElement(bndbox, tag).text = _coordinate(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def image_path(root: str | Path, image_id: str) -> Path:
    return Path(root) / "JPEGImages" / f"{image_id}.jpg"


def annotation_path(root: str | Path, image_id: str) -> Path:
    return Path(root) / "Annotations" / f"{image_id}.xml"


def load_split(root: str | Path, split: str, classes: Sequence[str],
               on_bad: Literal["error", "skip"] = "error") -> list[Annotation]:
    """Annotations of every image of a split, in sorted id order."""
    return [parse_annotation(annotation_path(root, i), classes, on_bad) for i in read_split(root, split)]


MAX_IMAGE_PIXELS = 100_000_000  # 100 MP: decoding is refused above it (a 1 MB PNG can hold 400 MP, 1.2 GB decoded)


def check_pixel_limit(data: np.ndarray, path: Path) -> None:
    """Refuse an image above :data:`MAX_IMAGE_PIXELS` from its header, before decoding its pixels (a format
    Pillow cannot read is left to OpenCV to accept or refuse)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own decompression-bomb warning: the limit here decides
            with Image.open(io.BytesIO(data.tobytes())) as image:
                width, height = image.size
    except Image.DecompressionBombError:  # only far above Pillow's 89 MP default, so above this limit too
        raise RcnnError(f"{shown(path)}: more pixels than the {MAX_IMAGE_PIXELS // 10**6} MP limit") from None
    except (OSError, ValueError):
        return
    if width * height > MAX_IMAGE_PIXELS:
        raise RcnnError(f"{shown(path)}: {width}x{height} pixels ({width * height / 1e6:.0f} MP) is above the "
                        f"{MAX_IMAGE_PIXELS // 10**6} MP limit")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as BGR uint8; a missing or undecodable file raises :class:`RcnnError`."""
    path = Path(path)
    if not path.is_file():
        raise RcnnError(f"{shown(path)}: image not found")
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as err:
        raise RcnnError(f"{shown(path)}: cannot read the image ({err.strerror or err})") from None
    if not image_is_complete(data):
        raise RcnnError(f"{shown(path)}: truncated image (its end marker is missing)")
    check_pixel_limit(data, path)
    # The stored pixels, as annotation files describe them: OpenCV would otherwise turn a photo by its EXIF
    # orientation tag while its boxes stay where they were.
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if len(data) else None
    if image is None or image.size == 0:
        raise RcnnError(f"{shown(path)}: not a decodable image")
    return image


def image_is_complete(data: np.ndarray) -> bool:
    """False for a JPEG or PNG cut short: OpenCV decodes such a file partially (grey below the cut) with
    only a libjpeg warning on stderr, so it would be used silently. A JPEG is complete when walking its
    segments reaches the end-of-image marker (an embedded thumbnail's markers sit inside a skipped
    segment); a PNG when it holds its IEND chunk. Bytes after the end (phones' motion photos, padding)
    are allowed. Other formats are left to the decoder."""
    raw = bytes(data)
    if raw.startswith(b"\xff\xd8"):
        return _jpeg_reaches_end(raw)
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND\xaeB`\x82" in raw  # the IEND chunk with its (constant) CRC
    return True


_STANDALONE = set(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


def _jpeg_reaches_end(raw: bytes) -> bool:
    """Walk marker segments from SOI; after each scan (SOS) skip the entropy-coded data, where 0xFF is
    always followed by 0x00 or a restart marker, to the next marker; True once EOI is reached."""
    pos, end = 2, len(raw)
    while pos + 1 < end:
        if raw[pos] != 0xFF:
            return False
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return True
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > end:
            return False
        pos += 2 + int.from_bytes(raw[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # entropy-coded data up to the next real marker
            while True:
                pos = raw.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= end:
                    return False
                following = raw[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    pos += 1 if following == 0xFF else 2
                    continue
                break
    return False


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
